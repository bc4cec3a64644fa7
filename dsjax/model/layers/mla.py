"""Multi-head Latent Attention (docs/spec.md §3): expanded path, absorbed decode, latent cache.

Modes:
  "train"   expanded attention over the given tokens (packed segments allowed); no cache.
  "prefill" expanded attention over the given tokens, which start a sequence at position 0; the
            normalised latent `c_KV` and the rotated shared key `k_pe` are written to the cache.
  "decode"  the new tokens' latents are written at their positions, then absorbed attention runs
            over the whole cache (slot s is visible to a query at position p iff s <= p). Any
            number of new tokens works, so speculative verification uses this path too.

The cache holds `kv_lora_rank + qk_rope_head_dim` values per token per layer (V3: 576), never the
per-head keys and values.

DeepSeek Sparse Attention (V3.2, `cfg.index_topk > 0`, docs/spec.md §10): a lightning indexer
(`dsjax/model/layers/indexer.py`, its own key cache `indexer/k` [B, S, index_head_dim] beside the latent
cache) picks each query's top-k keys, and attention runs in the absorbed (MQA) form over those
keys' latents only, gathered per query: k x (C + dr) values per query shared by all heads, so
FLOPs and memory grow with T * k, not T^2 (`sparse_latent_attention`). The absorbed form is
used in every mode because the gathered latent is shared by the H heads: gathering per-head
expanded keys/values instead would move H (dn + dr + dv) / (C + dr) times more bytes (V3.2: 71x)
for 3.4x fewer FLOPs per pair. When a query can see at most k keys (the whole key axis S <= k)
the selection is every visible key, and the dense path runs instead (identical math).

Training the indexer (`cfg.dsa_stage`, train mode only; `dsjax/model/layers/indexer.py`): "warmup" forces
dense attention (in every mode) and computes the KL from the dense attention distribution to the
indexer's over all visible keys; "sparse" keeps top-k attention and computes the KL over each
query's selected keys from the sparse kernel's probabilities. `MLA(..., with_indexer_kl=True)`
returns the layer's KL (mean over real queries, segment id > 0) beside its output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.model.config import ModelConfig
from dsjax.model.layers import paged
from dsjax.model.layers.attention import attention
from dsjax.model.layers.context import context_attention, splits_over_context
from dsjax.model.layers.indexer import (
    Indexer,
    dense_indexer_kl,
    map_query_chunks,
    mean_over_queries,
    query_chunk,
    select_topk,
    sparse_indexer_kl,
)
from dsjax.model.layers.mlp import Linear
from dsjax.model.layers.norms import RMSNorm
from dsjax.model.layers.rope import apply_rope

MODES = ("train", "prefill", "decode")


class MLA(nn.Module):
    """Multi-head Latent Attention (docs/spec.md §3); see the module docstring for the three modes.

    `MLA(cfg, mode)(x_BTD, positions_BT, segment_ids_BT, token_index_BT=None) -> out_BTD` (compute
    dtype): x_BTD [B, T, D=hidden_size]; positions_BT [B, T] int (RoPE angles; in prefill/decode
    also the cache slots written); segment_ids_BT [B, T] int (train: attention stays within equal
    ids, packed documents; ignored in prefill/decode); token_index_BT [B, T] int (train: each
    token's index in its sequence, what the causal mask compares; default arange(T); a permuted
    layout such as context parallelism's zig-zag passes it). Under a mesh with `context` > 1,
    train-mode attention runs context-parallel (`dsjax.model.layers.context`). Parameters: q_a [D, q_lora], q_b
    [q_lora, H*(dn+dr)] (or q [D, H*(dn+dr)] without q_lora), kv_a [D, C+dr], kv_b
    [C, H*(dn+dv)], o [H*dv, D], with DSA also indexer/{wq_b, wk, k_norm, weights_proj};
    cache collection (prefill/decode): latent [B, S, C], k_pe [B, S, dr] (with DSA also
    indexer/k [B, S, index_head_dim]), created at init with S = the init input's length.

    With `with_indexer_kl=True` it returns `(out_BTD, indexer_kl)`: indexer_kl the scalar float32
    KL loss of the lightning indexer (see the module docstring) in train mode when
    `cfg.dsa_stage` is "warmup" or "sparse", else None.
    """

    cfg: ModelConfig
    mode: str = "train"
    with_indexer_kl: bool = False

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, token_index_BT=None, pages=None):
        cfg = self.cfg
        if self.mode not in MODES:
            raise ValueError(f"MLA mode={self.mode!r}: expected one of {MODES}")
        if pages is not None and self.mode == "train":
            raise ValueError("MLA: pages (a paged cache) need mode 'prefill' or 'decode'")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, T, D = x_BTD.shape
        H, dn, dr, dv, C = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        kw = dict(dtype=dtype, param_dtype=pdtype, init_std=cfg.init_std, fp8=cfg.fp8)

        # Query.
        c_q = None
        if cfg.q_lora_rank:
            c_q = Linear(D, cfg.q_lora_rank, ("embed", "q_lora"), name="q_a", **kw)(x_BTD)
            c_q = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "q_lora", name="q_a_norm")(c_q)
            q = Linear(cfg.q_lora_rank, H * (dn + dr), ("q_lora", "heads"), name="q_b", **kw)(c_q)
        else:
            q = Linear(D, H * (dn + dr), ("embed", "heads"), name="q", **kw)(x_BTD)
        q_BTHK = nn.with_logical_constraint(
            q.reshape(B, T, H, dn + dr), ("batch", "length", "heads", "head_dim")
        )
        q_nope_BTHN = q_BTHK[..., :dn]
        q_pe_BTHR = apply_rope(q_BTHK[..., dn:], positions_BT, cfg)

        # Compressed key/value latent and the shared rotary key.
        kv_a = Linear(D, C + dr, ("embed", "kv_lora"), name="kv_a", **kw)(x_BTD)
        latent_BTC = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "kv_lora", name="kv_a_norm")(
            kv_a[..., :C]
        )
        k_pe_BTR = apply_rope(kv_a[..., None, C:], positions_BT, cfg)[:, :, 0]
        kv_b = Linear(C, H * (dn + dv), ("kv_lora", "heads"), name="kv_b", **kw)
        o_proj = Linear(H * dv, D, ("heads", "embed"), name="o", **kw)

        paged_kernel = (
            pages is not None and self.mode == "decode" and paged.kernel_applies(pages, T)
            and not cfg.use_dsa
        )  # fmt: skip
        if self.mode != "train":
            latent_BSC, k_pe_BSR = self._update_cache(
                latent_BTC, k_pe_BTR, positions_BT, pages, view=not paged_kernel
            )

        sparse, kl_BT = None, None
        train_indexer = cfg.use_dsa and self.mode == "train" and cfg.dsa_stage != "off"
        if cfg.use_dsa:
            # The indexer always runs (its parameters and cache exist at every length); its
            # scores are skipped (dead code) when every key fits in the top-k.
            index_q, index_w, index_k, index_cache = Indexer(cfg, self.mode, name="indexer")(
                x_BTD, c_q, positions_BT, pages
            )
            S = T if self.mode != "decode" else latent_BSC.shape[1]
            if cfg.index_topk < S and cfg.dsa_stage != "warmup":  # warm-up: dense attention
                if self.mode == "train":
                    q_idx = _token_index(token_index_BT, B, T)
                    k_idx, seg = q_idx, segment_ids_BT
                elif self.mode == "prefill":
                    q_idx, k_idx, seg = positions_BT, positions_BT, None
                else:
                    q_idx, seg, index_k = positions_BT, None, index_cache
                    k_idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
                sparse = select_topk(
                    index_q, index_w, index_k, cfg.index_topk,
                    q_idx_BT=q_idx, k_idx_BS=k_idx, q_seg_BT=seg, k_seg_BS=seg,
                )  # fmt: skip
                if self.mode != "decode":
                    latent_BSC, k_pe_BSR = latent_BTC, k_pe_BTR

        if sparse is not None:
            out_BTHV, p_BTK = self._sparse(
                q_nope_BTHN, q_pe_BTHR, latent_BSC, k_pe_BSR, kv_b.weight(dtype), *sparse,
                with_probs=train_indexer,
            )  # fmt: skip
            if train_indexer:
                kl_BT = sparse_indexer_kl(index_q, index_w, index_k, *sparse, p_BTK)
        elif paged_kernel:
            q_BTHL, w_uv_CHV = self._absorb(q_nope_BTHN, q_pe_BTHR, kv_b.weight(dtype))
            o_lat_BTHC = paged.kernel_attention(
                q_BTHL, latent_BSC, k_pe_BSR, pages, positions_BT, scale=cfg.softmax_scale
            )
            out_BTHV = jnp.einsum("bthc,chv->bthv", o_lat_BTHC, w_uv_CHV)
        elif self.mode == "decode":
            out_BTHV = self._absorbed(
                q_nope_BTHN, q_pe_BTHR, latent_BSC, k_pe_BSR, kv_b.weight(dtype), positions_BT
            )
        elif self.mode == "train" and splits_over_context(B, T):
            q_full = jnp.concatenate([q_nope_BTHN, q_pe_BTHR], -1)
            out_BTHV = context_attention(
                q_full, latent_BTC, k_pe_BTR, kv_b.weight(dtype),
                _token_index(token_index_BT, B, T), segment_ids_BT, cfg=cfg,
            )  # fmt: skip
        else:
            if self.mode == "train":
                q_idx = _token_index(token_index_BT, B, T)
                seg = segment_ids_BT
            else:  # prefill: the chunk is a sequence start; index by position.
                q_idx, seg = positions_BT, None
            kv_BTHK = kv_b(latent_BTC).reshape(B, T, H, dn + dv)
            k_BTHK = jnp.concatenate(
                [kv_BTHK[..., :dn], jnp.broadcast_to(k_pe_BTR[:, :, None], (B, T, H, dr))], -1
            )
            q_full = jnp.concatenate([q_nope_BTHN, q_pe_BTHR], -1)
            k_BTHK = nn.with_logical_constraint(k_BTHK, ("batch", "length", "heads", "head_dim"))
            out = attention(
                q_full[:, :, :, None],
                k_BTHK,
                kv_BTHK[..., dn:],
                q_idx_BT=q_idx,
                k_idx_BS=q_idx,
                q_seg_BT=seg,
                k_seg_BS=seg,
                scale=cfg.softmax_scale,
                impl=cfg.attention_impl,
                chunk=cfg.attention_chunk,
                # q/k index = arange(T) in prefill and in train's sequence order (cuDNN needs it)
                causal=token_index_BT is None,
            )
            out_BTHV = out[:, :, :, 0]
            if train_indexer:  # warm-up, or sparse stage with every key selected
                kl_BT = dense_indexer_kl(
                    q_full, k_BTHK, index_q, index_w, index_k, scale=cfg.softmax_scale,
                    q_idx_BT=q_idx, k_idx_BS=q_idx, q_seg_BT=seg, k_seg_BS=seg,
                )  # fmt: skip
        out_BTHV = nn.with_logical_constraint(out_BTHV, ("batch", "length", "heads", "head_dim"))
        out_BTD = o_proj(out_BTHV.reshape(B, T, H * dv))
        if not self.with_indexer_kl:
            return out_BTD
        kl = None if kl_BT is None else mean_over_queries(kl_BT, segment_ids_BT > 0)
        return out_BTD, kl

    def _update_cache(self, latent_BTC, k_pe_BTR, positions_BT, pages=None, view=True):
        """Writes the new tokens at their positions; returns the full cache [B, S, ...].

        With `pages` (a paged cache, `dsjax.model.layers.paged`) the tokens go to their pages
        in place and it returns the rows' pages as contiguous caches (`view`; the XLA gather
        path) or the pools themselves (the kernel reads them in place)."""
        B, T = positions_BT.shape
        dtype = jnp.dtype(self.cfg.dtype)
        # Created at init from the init input length: init with [B, max_len] tokens.
        latent = self.variable("cache", "latent", jnp.zeros, (B, T, latent_BTC.shape[-1]), dtype)
        k_pe = self.variable("cache", "k_pe", jnp.zeros, (B, T, k_pe_BTR.shape[-1]), dtype)
        if pages is not None:
            latent.value = paged.write(latent.value, pages, positions_BT, latent_BTC)
            k_pe.value = paged.write(k_pe.value, pages, positions_BT, k_pe_BTR)
            if not view:
                return latent.value, k_pe.value
            return paged.gather(latent.value, pages), paged.gather(k_pe.value, pages)
        rows = jnp.arange(B)[:, None]
        # The cache's rows as the attention core reads them (`cache_batch`: in the decode
        # layout over every chip, dsjax.model.sharding).
        cache_axes = ("cache_batch", None, None)
        latent.value = nn.with_logical_constraint(
            latent.value.at[rows, positions_BT].set(latent_BTC.astype(dtype)), cache_axes
        )
        k_pe.value = nn.with_logical_constraint(
            k_pe.value.at[rows, positions_BT].set(k_pe_BTR.astype(dtype)), cache_axes
        )
        return latent.value, k_pe.value

    def _absorb(self, q_nope_BTHN, q_pe_BTHR, kv_b_kernel):
        """W_UK folded into the query: (q_BTHL [B, T, H, L=C+dr], w_uv_CHV [C, H, dv])."""
        cfg = self.cfg
        H, dn, dv, C = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        dtype = jnp.dtype(cfg.dtype)
        w_CHK = kv_b_kernel.astype(dtype).reshape(C, H, dn + dv)
        w_uk_CHN, w_uv_CHV = w_CHK[..., :dn], w_CHK[..., dn:]
        q_lat_BTHC = jnp.einsum("bthn,chn->bthc", q_nope_BTHN, w_uk_CHN)
        return jnp.concatenate([q_lat_BTHC, q_pe_BTHR.astype(dtype)], -1), w_uv_CHV

    def _sparse(
        self, q_nope_BTHN, q_pe_BTHR, latent_BSC, k_pe_BSR, kv_b_kernel, idx, valid,
        with_probs=False,
    ):  # fmt: skip
        """DSA: absorbed attention over each query's selected latents only -> (out_BTHV, p_BTK
        the head-averaged probabilities of the picks, or None without `with_probs`)."""
        q_BTHL, w_uv_CHV = self._absorb(q_nope_BTHN, q_pe_BTHR, kv_b_kernel)
        kv_BSL = jnp.concatenate([latent_BSC, k_pe_BSR.astype(latent_BSC.dtype)], -1)
        o_lat = sparse_latent_attention(
            q_BTHL, kv_BSL, idx, valid, value_dim=self.cfg.kv_lora_rank,
            scale=self.cfg.softmax_scale, with_probs=with_probs,
        )  # fmt: skip
        o_lat, p_BTK = o_lat if with_probs else (o_lat, None)
        return jnp.einsum("bthc,chv->bthv", o_lat, w_uv_CHV), p_BTK

    def _absorbed(self, q_nope_BTHN, q_pe_BTHR, latent_BSC, k_pe_BSR, kv_b_kernel, positions_BT):
        """Multi-query attention in latent space: W_UK folded into q, W_UV applied after."""
        cfg = self.cfg
        q_BTHL, w_uv_CHV = self._absorb(q_nope_BTHN, q_pe_BTHR, kv_b_kernel)
        # The absorbed queries go to the rows' cache (decode layout: each chip its own requests,
        # all heads) and the latent outputs come back split by heads, for W_UV and o.
        q_BTHL = nn.with_logical_constraint(q_BTHL, ("cache_batch", "length", "heads", None))
        q_BT1HK = q_BTHL[:, :, None]
        k_BS1K = jnp.concatenate([latent_BSC, k_pe_BSR], -1)[:, :, None]
        B, S = latent_BSC.shape[:2]
        k_idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        o_lat = attention(
            q_BT1HK,
            k_BS1K,
            latent_BSC[:, :, None],
            q_idx_BT=positions_BT,
            k_idx_BS=k_idx,
            scale=cfg.softmax_scale,
            impl=cfg.attention_impl,
            chunk=cfg.attention_chunk,
        )
        o_lat_BTHC = nn.with_logical_constraint(o_lat[:, :, 0], ("batch", "length", "heads", None))
        return jnp.einsum("bthc,chv->bthv", o_lat_BTHC, w_uv_CHV)


def _token_index(token_index_BT, B: int, T: int):
    if token_index_BT is not None:
        return token_index_BT.astype(jnp.int32)
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def sparse_latent_attention(
    q_BTHL, kv_BSL, idx_BTK, valid_BTK, *, value_dim: int, scale: float, with_probs: bool = False
):
    """Each query attends only to its selected keys, gathered from the shared latent.

    q_BTHL [B, T, H, L] absorbed queries; kv_BSL [B, S, L] latent keys (the first `value_dim`
    columns are also the values); idx_BTK int32 [B, T, k] the selected key slots; valid_BTK bool
    [B, T, k] (False: a pick that is not visible, ignored) -> o_BTHC [B, T, H, value_dim] in q's
    dtype. Per query chunk the gather is [B, c, k, L] and the logits [B, c, H, k]: FLOPs and
    memory O(T k), softmax in float32. A query with no valid pick gets zeros.
    With `with_probs` it returns `(o_BTHC, p_BTK)`: p_BTK [B, T, k] float32 the attention
    probabilities averaged over heads (the indexer's sparse-stage target; stop-gradient).
    """
    B, T, H, L = q_BTHL.shape
    k = idx_BTK.shape[-1]
    chunk = query_chunk(B, T, k * (L + H))

    def body(q_c, idx_c, valid_c):
        sel_BcKL = jax.vmap(lambda kv, i: kv[i])(kv_BSL, idx_c)
        logits = jnp.einsum("bthl,btkl->bthk", q_c, sel_BcKL, preferred_element_type=jnp.float32)
        logits = jnp.where(valid_c[:, :, None], logits * scale, -jnp.inf)
        m = jnp.max(logits, -1, keepdims=True)
        p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
        p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
        out = jnp.einsum(
            "bthk,btkc->bthc", p.astype(q_c.dtype), sel_BcKL[..., :value_dim],
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        if with_probs:
            return out.astype(q_c.dtype), jax.lax.stop_gradient(p.mean(2))
        return out.astype(q_c.dtype)

    return map_query_chunks(body, chunk, q_BTHL, idx_BTK, valid_BTK)
