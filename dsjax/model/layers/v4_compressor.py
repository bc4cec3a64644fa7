"""DeepSeek-V4's KV compressors and lightning indexer (docs/spec.md §12), full-sequence form.

A compressor pools every `rate` consecutive tokens into one entry of width `dim`: per channel a
softmax over the window's gate logits `Z_s = W_z h_s + ape[s mod rate]` weights the values
`C_s = W_c h_s`; the sum is RMS-normed and rotated (the "compress" RoPE) at the position of the
window's first token. HCA (no overlap) pools its own window; CSA (`overlap`) projects 2*dim
per token and pools 2*rate slots: the previous window's first halves and its own second halves
(the first window's previous slots are absent: gate -inf). Entry w closes with token
(w+1)*rate - 1 and is visible from that token on (`EntryInfo`).

Packed rows (several documents per row, segment ids): windows stay aligned to the row, an entry
whose own window spans two documents is visible to nobody, and CSA's previous-window slots from
another document are gated out. On a row holding one sequence from position 0 this is exactly
transformers' `DeepseekV4{HCA,CSA}Compressor` with no cache.

The lightning indexer scores the CSA entries for each query with its own CSA-style compressor
at `index_head_dim`: `I[t, w] = Σ_h w_{t,h} ReLU(q_{t,h} · K_w) / sqrt(c_I)`, w = (W h_t)/sqrt(H_I),
q = RoPE(W_q c_Q) from the attention's normed query latent; each query keeps its
`index_topk` best visible entries (`v4_core.indexer_topk`, `v4_decode.cached_topk`). The
selection is not differentiable: the indexer gets no gradient from the language-model loss (as
in transformers).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.model.config import ModelConfig
from dsjax.model.layers.mlp import Linear
from dsjax.model.layers.norms import RMSNorm
from dsjax.model.layers.rope import rotate_trailing, v4_rope_frequencies
from dsjax.model.layers.v4_decode import compress_chunk, write_entries


@flax.struct.dataclass
class EntryInfo:
    """Where compressed entries come from: `last_idx_N` [N] int32 the row index of each
    entry's closing token; `segment_BN` [B, N] int32 the document of its window (-1 when the
    window spans two)."""

    last_idx_N: jax.Array
    segment_BN: jax.Array

    def visible(self, q_idx_BT, q_seg_BT) -> jax.Array:
        """[B, T, N] bool: entry w is visible to query t (closed by t, same document)."""
        closed = self.last_idx_N[None, None, :] <= q_idx_BT[:, :, None]
        return closed & (self.segment_BN[:, None, :] == q_seg_BT[:, :, None])


class Compressor(nn.Module):
    """`Compressor(cfg, rate, dim, overlap)(x_BTD, positions_BT, segment_ids_BT) ->
    (entries [B, N, dim] compute dtype, EntryInfo)`, N = T // rate. Parameters: wkv, wgate
    [D, c*dim], ape [rate, c*dim] (float32), norm [dim]; c = 2 with overlap, else 1.

    With `cache` (a `v4_cache.CompressorCache`, decode modes; segment ids > 0 mark the valid tokens):
    returns (all cached entries [B, N_max, dim] with the windows closing here written, the
    updated cache) instead (`v4_decode.compress_chunk`)."""

    cfg: ModelConfig
    rate: int
    dim: int
    overlap: bool

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, T, D = x_BTD.shape
        m, d = self.rate, self.dim
        width = (2 if self.overlap else 1) * d
        kw = dict(dtype=dtype, param_dtype=pdtype, init_std=cfg.init_std)
        kv = Linear(D, width, ("embed", "head_dim"), name="wkv", **kw)(x_BTD)
        gate = Linear(D, width, ("embed", "head_dim"), name="wgate", **kw)(x_BTD)
        ape = self.param(
            "ape", nn.with_logical_partitioning(nn.initializers.zeros, (None, "head_dim")),
            (m, width), jnp.float32,
        )  # fmt: skip
        norm = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "head_dim", name="norm")
        if cache is not None:
            gate_f32 = gate.astype(jnp.float32) + ape[positions_BT % m]
            pooled, w_BJ, emit, cache = compress_chunk(
                cache, kv, gate_f32, positions_BT, segment_ids_BT > 0, rate=m,
                overlap=self.overlap,
            )  # fmt: skip
            values = rotate_trailing(
                norm(pooled), w_BJ * m, v4_rope_frequencies(cfg, compressed=True)
            )
            entries = write_entries(cache.entries, values, w_BJ, emit)
            return entries, cache.replace(entries=entries)
        N = T // m
        kv_NmC = kv[:, : N * m].reshape(B, N, m, width)
        gate_NmC = gate[:, : N * m].reshape(B, N, m, width).astype(jnp.float32) + ape
        seg_Nm = segment_ids_BT[:, : N * m].reshape(B, N, m)
        first_seg = seg_Nm[:, :, 0]
        if self.overlap:
            # Window w's previous slots are window w-1's first halves (none for w = 0).
            def prev(x, fill):
                pad = [(0, 0)] * x.ndim
                pad[1] = (1, 0)
                return jnp.pad(x[:, :-1], pad, constant_values=fill)[:, :N]

            prev_kv = prev(kv_NmC[..., :d], 0)
            prev_gate = prev(gate_NmC[..., :d], -jnp.inf)
            prev_seg = prev(seg_Nm, -1)
            same = (prev_seg == first_seg[:, :, None])[..., None]
            prev_gate = jnp.where(same, prev_gate, -jnp.inf)
            kv_NmC = jnp.concatenate([prev_kv, kv_NmC[..., d:]], axis=2)
            gate_NmC = jnp.concatenate([prev_gate, gate_NmC[..., d:]], axis=2)
        weights = jax.nn.softmax(gate_NmC, axis=2)
        pooled = jnp.sum(kv_NmC.astype(jnp.float32) * weights, axis=2)
        normed = norm(pooled)
        starts = jnp.arange(N, dtype=jnp.int32) * m
        entries = rotate_trailing(
            normed, positions_BT[:, : N * m : m], v4_rope_frequencies(cfg, compressed=True)
        )
        whole = first_seg == seg_Nm[:, :, -1]
        info = EntryInfo(last_idx_N=starts + m - 1, segment_BN=jnp.where(whole, first_seg, -1))
        return entries, info


class Indexer(nn.Module):
    """`Indexer(cfg)(x_BTD, c_q_BTQ, positions_BT, segment_ids_BT)` -> the lightning indexer's
    projections (q [B, T, H_I, c_I], w [B, T, H_I] float32 scaled, keys [B, N, c_I]); the
    selection is the caller's (`v4_core.indexer_topk` chunked over the sequence,
    `v4_decode.cached_topk` over the cache). Parameters: wq_b [q_lora, H_I*c_I], weights_proj
    [D, H_I], compressor (CSA-style at c_I). With `cache` (decode modes, the indexer's
    `CompressorCache`), the keys are the cached ones ([B, N_max, c_I]) and it returns
    (q, w, keys, updated cache)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, c_q_BTQ, positions_BT, segment_ids_BT, cache=None):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, T, D = x_BTD.shape
        H, c = cfg.index_n_heads, cfg.index_head_dim
        kw = dict(dtype=dtype, param_dtype=pdtype, init_std=cfg.init_std)
        keys_BNc, second = Compressor(cfg, cfg.compress_rate_csa, c, True, name="compressor")(
            x_BTD, positions_BT, segment_ids_BT, cache
        )
        q = Linear(cfg.q_lora_rank, H * c, ("q_lora", "heads"), name="wq_b", fp8=cfg.fp8, **kw)(
            c_q_BTQ
        )
        q = rotate_trailing(
            q.reshape(B, T, H, c), positions_BT, v4_rope_frequencies(cfg, compressed=True)
        )
        w_BTH = Linear(D, H, ("embed", None), name="weights_proj", **kw)(x_BTD)
        w_BTH = w_BTH.astype(jnp.float32) * H**-0.5
        return (q, w_BTH, keys_BNc) if cache is None else (q, w_BTH, keys_BNc, second)
