"""DeepSeek-V4 attention (docs/spec.md §12): one shared key=value vector per token, sliding window plus
compressed entries, a learnable sink per head, grouped low-rank output.

    c_Q = RMSNorm(W_qa h);  q_i = RoPE_t(UnRMS(W_qb,i c_Q));  kv_t = RoPE_t(RMSNorm(W_kv h))
    keys(t) = {kv_s : t - W < s <= t} ∪ compressed entries visible to t
      (HCA layers: all closed entries; CSA layers: the lightning indexer's top-k of them)
    p = softmax([q_i·k / sqrt(d) for k in keys(t)] ∪ [sink_i]), the sink's share dropped
    o_i = RoPE_{-t}(Σ p_k k)   (K = V carries RoPE: the output is rotated back)
    out = W_ob · concat_g(W_oa^(g) · concat(o_i, i in group g))

Window layers rotate with the "main" table, CSA/HCA layers (all their rotations) with the
"compress" one (`rope.v4_rope_frequencies`).

Training (the full sequence) runs `v4_core.v4_attention_core`: query chunks over their window
keys, HCA's entries under a mask and CSA's top-k entries gathered, one softmax with the sink,
context-parallel over the `context` axis. `window_attention` below is the same computation in
dense form (blocks of W queries over 2W keys, a [T, N] entry mask): the reference its tests use.

"prefill" / "decode" modes read and write the layer's `V4LayerCache` (`cache` collection,
variable "v4"; `dsjax/model/v4_cache.py`): the new tokens attend to the window ring plus
themselves, and to the cached entries visible to them (HCA: all, CSA: the indexer's top-k,
gathered; `v4_decode.py`); both modes are the same computation (a prefill is a forward from
position 0 over an unused cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.model import fp8 as fp8_lib
from dsjax.model.config import CSA, HCA, SLIDING, ModelConfig
from dsjax.model.layers.mhc import unweighted_rms
from dsjax.model.layers.mlp import Linear
from dsjax.model.layers.norms import RMSNorm
from dsjax.model.layers.rope import rotate_trailing, v4_rope_frequencies
from dsjax.model.layers.v4_compressor import Compressor, Indexer
from dsjax.model.layers.v4_core import sink_attention, v4_attention_core
from dsjax.model.layers.v4_decode import (
    cached_topk,
    cached_window_attention,
    chunk_bounds,
    entries_visible,
    window_keys,
    write_slots,
)
from dsjax.model.v4_cache import cache_axes, zeros_layer_cache

MODES = ("train", "prefill", "decode")


def window_attention(q_BTHd, kv_BTd, comp_BNd, comp_visible_BTN, sinks_H, *, window: int,
                     scale: float, segment_ids_BT):  # fmt: skip
    """One softmax over each query's window keys (t - W < s <= t, same segment), its visible
    compressed entries and its head's sink logit, in blocks of W queries over 2W keys (the
    dense reference of `v4_core`). Returns [B, T, H, d] in kv's dtype."""
    B, T, H, d = q_BTHd.shape
    W = window
    nb = -(-T // W)
    pad = nb * W - T
    q_b = jnp.pad(q_BTHd, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, nb, W, H, d)
    kv_b = jnp.pad(kv_BTd, ((0, 0), (0, pad), (0, 0))).reshape(B, nb, W, d)
    keys = jnp.concatenate([jnp.pad(kv_b[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0))), kv_b], 2)
    seg_b = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=-1).reshape(B, nb, W)
    seg_k = jnp.concatenate(
        [jnp.pad(seg_b[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=-2), seg_b], 2
    )
    q_idx = jnp.arange(W)[None, :] + W * jnp.arange(nb)[:, None]  # [nb, W]
    k_idx = jnp.arange(2 * W)[None, :] + W * (jnp.arange(nb)[:, None] - 1)  # [nb, 2W]
    rel = q_idx[:, :, None] - k_idx[:, None, :]
    near = (rel >= 0) & (rel < W) & (k_idx[:, None, :] >= 0)  # [nb, W, 2W]
    vis_w = near[None] & (seg_b[..., :, None] == seg_k[..., None, :])  # [B, nb, W, 2W]
    q_b = q_b.reshape(B * nb, W, H, d)
    sources = [(keys.reshape(B * nb, 2 * W, d), vis_w.reshape(B * nb, W, 2 * W))]
    N = comp_BNd.shape[1]
    if N:
        vis_c = jnp.pad(comp_visible_BTN, ((0, 0), (0, pad), (0, 0)))
        comp = jnp.broadcast_to(comp_BNd[:, None], (B, nb, N, d)).reshape(B * nb, N, d)
        sources.append((comp, vis_c.reshape(B * nb, W, N)))
    out = sink_attention(q_b, sources, sinks_H, scale)
    return out.reshape(B, nb * W, H, d)[:, :T]


def grouped_out(o_BTgI, wo_a: Linear, g: int, fp8: bool):
    """The grouped low-rank output: group j's heads o[..., j, :] [I] times its own column block
    j*r..(j+1)*r of wo_a [I, g*r] -> [B, T, g*r]. Under `fp8` the g products are one tiled
    grouped GEMM in the FP8 recipe (per-group 128x128 weight blocks, 1x128 activation tiles).
    A stored FP8 wo_a (frozen) is used as stored when r % 128 == 0: group j's blocks are block
    columns j*r/128.. of its scales (`fp8.fp8_grouped_dot_stored`); otherwise the release's
    blocks straddle groups, and the weight is dequantised and re-quantised per group."""
    B, T, _, n_in = o_BTgI.shape
    if not fp8:
        w = wo_a.weight().reshape(n_in, g, -1)
        return jnp.einsum("btgi,igr->btgr", o_BTgI, w).reshape(B, T, -1)
    x_gMI = o_BTgI.reshape(B * T, g, n_in).transpose(1, 0, 2).astype(wo_a.dtype)
    per_group = lambda a: a.reshape(a.shape[0], g, -1).transpose(1, 0, 2)  # noqa: E731
    groups, scale = jnp.arange(g, dtype=jnp.int32), wo_a.scale_inv()
    if scale is not None and (wo_a.out_features // g) % fp8_lib.BLOCK == 0:
        w_q, s_w = per_group(wo_a.kernel), per_group(scale)
        y = fp8_lib.fp8_grouped_dot_stored("tiled", x_gMI, w_q, s_w, groups)
    else:
        w = wo_a.kernel if scale is None else jax.lax.stop_gradient(wo_a.weight())
        y = fp8_lib.fp8_grouped_dot("tiled", x_gMI, per_group(w), groups)
    return y.transpose(1, 0, 2).reshape(B, T, -1).astype(wo_a.dtype)


class V4Attention(nn.Module):
    """`V4Attention(cfg, layer_type)(x_BTD, positions_BT, segment_ids_BT) -> [B, T, D]`.

    Parameters: wq_a [D, q_lora], q_norm, wq_b [q_lora, H*d], wkv [D, d], kv_norm [d], wo_a
    [(H/g)*d, g*d_g] (group j's columns j*d_g..), wo_b [g*d_g, D], sinks [H] (float32); CSA /
    HCA layers a `compressor`, CSA layers an `indexer` too."""

    cfg: ModelConfig
    layer_type: str = SLIDING
    mode: str = "train"

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        cfg = self.cfg
        if self.mode not in MODES:
            raise ValueError(f"DeepSeek-V4 attention mode={self.mode!r}: expected one of {MODES}")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, T, D = x_BTD.shape
        H, d, g = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
        kw = dict(dtype=dtype, param_dtype=pdtype, init_std=cfg.init_std, fp8=cfg.fp8)
        inv_freq = v4_rope_frequencies(cfg, compressed=self.layer_type != SLIDING)

        c_q = Linear(D, cfg.q_lora_rank, ("embed", "q_lora"), name="wq_a", **kw)(x_BTD)
        c_q = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "q_lora", name="q_norm")(c_q)
        q = Linear(cfg.q_lora_rank, H * d, ("q_lora", "heads"), name="wq_b", **kw)(c_q)
        q = nn.with_logical_constraint(
            q.reshape(B, T, H, d), ("batch", "length", "heads", "head_dim")
        )
        q = rotate_trailing(
            unweighted_rms(q, cfg.rms_norm_eps).astype(dtype), positions_BT, inv_freq
        )
        kv = Linear(D, d, ("embed", "head_dim"), name="wkv", **kw)(x_BTD)
        kv = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "head_dim", name="kv_norm")(kv)
        kv = rotate_trailing(kv, positions_BT, inv_freq)
        if self.mode == "train":
            o = self._full(x_BTD, c_q, q, kv, positions_BT, segment_ids_BT)
        else:
            o = self._cached(x_BTD, c_q, q, kv, positions_BT, segment_ids_BT)
        o = rotate_trailing(o, positions_BT, inv_freq, inverse=True)
        wo_a = Linear(H * d // g, g * cfg.o_lora_rank, ("o_in", "heads"), name="wo_a", **kw)
        y = grouped_out(o.reshape(B, T, g, H * d // g), wo_a, g, cfg.fp8)
        return Linear(g * cfg.o_lora_rank, D, ("heads", "embed"), name="wo_b", **kw)(y)

    def _compressor(self):
        cfg, csa = self.cfg, self.layer_type == CSA
        rate = cfg.compress_rate_csa if csa else cfg.compress_rate_hca
        return rate, Compressor(cfg, rate, cfg.head_dim, csa, name="compressor")

    def _sinks(self):
        return self.param(
            "sinks", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
            (self.cfg.num_attention_heads,), jnp.float32,
        )  # fmt: skip

    def _full(self, x_BTD, c_q, q, kv, positions_BT, segment_ids_BT):
        """The full-sequence forward (train mode): window, entries and sink in query chunks,
        CSA's entries gathered by the indexer's top-k, context-parallel (`v4_core`)."""
        cfg = self.cfg
        B, T, d = kv.shape
        entries = jnp.zeros((B, 0, d), kv.dtype)
        entry_last, entry_seg = jnp.zeros((0,), jnp.int32), jnp.zeros((B, 0), jnp.int32)
        index = None
        if self.layer_type in (CSA, HCA):
            _, compressor = self._compressor()
            entries, info = compressor(x_BTD, positions_BT, segment_ids_BT)
            entry_last, entry_seg = info.last_idx_N, info.segment_BN
            if self.layer_type == CSA:
                index = Indexer(cfg, name="indexer")(x_BTD, c_q, positions_BT, segment_ids_BT)
        return v4_attention_core(
            q, kv, segment_ids_BT, entries, entry_last, entry_seg, self._sinks(), index,
            window=cfg.sliding_window, scale=cfg.softmax_scale, topk=cfg.index_topk,
            chunk=cfg.attention_chunk,
        )  # fmt: skip

    def _cached(self, x_BTD, c_q, q, kv, positions_BT, segment_ids_BT):
        """Prefill/decode: the new tokens over the layer's `V4LayerCache` (module docstring)."""
        cfg = self.cfg
        B, T, d = kv.shape
        var = self.variable(
            "cache", "v4", zeros_layer_cache, cfg, self.layer_type, B, T
        )  # at init T is the cache length
        cache = var.value
        valid = segment_ids_BT > 0
        first, last = chunk_bounds(positions_BT, valid)
        keys, key_pos = window_keys(cache.window, cache.window_pos, kv, positions_BT, valid, first)
        comp = jnp.zeros((B, 0, d), kv.dtype)
        visible = jnp.zeros((B, T, 0), jnp.bool_)
        if self.layer_type in (CSA, HCA):
            rate, compressor = self._compressor()
            comp, comp_cache = compressor(x_BTD, positions_BT, segment_ids_BT, cache.compressor)
            cache = cache.replace(compressor=comp_cache)
            visible = entries_visible(positions_BT, comp.shape[1], rate)
            if self.layer_type == CSA:  # the indexer's top-k entries, gathered
                *index, index_cache = Indexer(cfg, name="indexer")(
                    x_BTD, c_q, positions_BT, segment_ids_BT, cache.indexer
                )
                cache = cache.replace(indexer=index_cache)
                if comp.shape[1]:
                    top, visible = cached_topk(*index, visible, cfg.index_topk)
                    comp = jnp.take_along_axis(comp[:, None], top[..., None], axis=2)
        o = cached_window_attention(
            q, keys, key_pos, comp, visible, self._sinks(), window=cfg.sliding_window,
            scale=cfg.softmax_scale, positions_BT=positions_BT,
        )  # fmt: skip
        window, window_pos = write_slots(
            cache.window, cache.window_pos, kv, positions_BT, valid, last
        )
        cache = cache.replace(window=window, window_pos=window_pos)
        var.value = jax.tree.map(
            nn.with_logical_constraint, cache, cache_axes(cache),
            is_leaf=lambda x: isinstance(x, tuple),
        )  # fmt: skip
        return o
