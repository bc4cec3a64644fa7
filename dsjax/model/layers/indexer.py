"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2, docs/spec.md §10).

Per layer, beside MLA and on the same input x and query latent c_Q = RMSNorm(x W_qa):
  q^I = c_Q W_q^I            [T, N, I]   (N = index_n_heads, I = index_head_dim)
  k^I = LayerNorm(x W_k^I)   [S, I]      (one key per token, weight and bias, eps 1e-6)
  RoPE on the first qk_rope_head_dim dims of both, NON-interleaved (half split), unlike MLA
  w   = x W_w * N^-1/2       [T, N]      (float32)
  I(t, s) = sum_j w[t, j] * ReLU(I^-1/2 q^I[t, j] . k^I[s]), masked to the visible keys,
and each query keeps its `index_topk` highest-scoring keys (all of them when fewer are visible;
the invisible picks are then flagged invalid). Scores are computed per chunk of queries, so
memory is [chunk, N, S] at a time, never [T, N, S].

The indexer is not trained by the language-model loss (its output is integer indices; HF runs it
under `no_grad`): its inputs are detached here. It is trained by its own loss (DeepSeek-V3.2-Exp
§2.1), the KL divergence from the main attention to the indexer's distribution, per query t:
  L_I(t) = KL( p_t || Softmax(I_t) ),  p_t = Σ_h P_h(t, :) / H  (summed over heads, L1-normalised)
with p a stop-gradient target. Dense warm-up (`ModelConfig.dsa_stage="warmup"`): dense attention,
over every visible key (`dense_indexer_kl`, which recomputes the attention probabilities per query
chunk). Sparse stage (`"sparse"`): over the selected keys S_t only, p and I both renormalised over
S_t (`sparse_indexer_kl`, from the sparse kernel's probabilities).

Also here: `dsa_flops`, the analytic attention-core FLOPs of DSA vs dense MLA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.model.config import ModelConfig
from dsjax.model.layers import paged
from dsjax.model.layers.mlp import Linear
from dsjax.model.layers.rope import rope_frequencies

LAYER_NORM_EPS = 1e-6
# Elements of the largest per-chunk intermediate (indexer logits [B, c, N, S], sparse attention's
# gathered latents [B, c, k, C + dr]); the query chunk is the largest power of two within it.
CHUNK_BUDGET = 1 << 24


def query_chunk(batch: int, length: int, per_query: int, budget: int | None = None) -> int:
    """Largest power-of-two query chunk (<= length rounded up to a power of two) whose
    intermediate `batch * chunk * per_query` stays within `budget` elements (default
    CHUNK_BUDGET, read at trace time; at least 1)."""
    budget = CHUNK_BUDGET if budget is None else budget
    c = max(1, budget // max(1, batch * per_query))
    c = 1 << (c.bit_length() - 1)
    return max(1, min(c, 1 << max(0, (length - 1).bit_length())))


def map_query_chunks(fn: Callable, chunk: int, *arrays_BT):
    """`fn` over query chunks: each array [B, T, ...] is padded along T to a multiple of `chunk`
    (zeros), cut into [n, B, chunk, ...] and mapped with `lax.map`; every output [B, chunk, ...]
    is reassembled to [B, T, ...]. The body is rematerialised in the backward pass, so only the
    chunk inputs are saved (memory O(T), not O(T * per-chunk intermediate))."""
    B, T = arrays_BT[0].shape[:2]
    n = -(-T // chunk)
    pad = n * chunk - T

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(B, n, chunk, *a.shape[2:]), 1, 0)

    if n == 1:
        outs = fn(*(split(a)[0] for a in arrays_BT))
        return jax.tree.map(lambda o: o[:, :T], outs)
    outs = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(split(a) for a in arrays_BT))
    return jax.tree.map(
        lambda o: jnp.moveaxis(o, 0, 1).reshape(B, n * chunk, *o.shape[3:])[:, :T], outs
    )


def apply_rope_half_split(x_BTHR, positions_BT, cfg: ModelConfig):
    """Non-interleaved RoPE: dims i and i + R/2 form a pair rotated by frequency i (HF's
    `rotate_half`), same frequencies and YaRN cos/sin scale as MLA's interleaved rotation.

    x_BTHR [B, T, H, R=qk_rope_head_dim], positions_BT [B, T] -> [B, T, H, R] in x's dtype."""
    angle_BTP = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(cfg))
    mscale = cfg.rope_cos_sin_scale
    cos = (jnp.cos(angle_BTP) * mscale)[:, :, None, :]
    sin = (jnp.sin(angle_BTP) * mscale)[:, :, None, :]
    x = x_BTHR.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTHR.dtype)


class LayerNorm(nn.Module):
    """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, in float32 (torch's
    nn.LayerNorm: biased variance). Parameters scale [D] (ones), bias [D] (zeros)."""

    eps: float = LAYER_NORM_EPS
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
            self.param_dtype,
        )  # fmt: skip
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
            self.param_dtype,
        )  # fmt: skip
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * cast(jax.Array, scale).astype(jnp.float32) + cast(jax.Array, bias).astype(
            jnp.float32
        )
        return y.astype(self.dtype)


class Indexer(nn.Module):
    """The lightning indexer's projections (see the module docstring).

    `Indexer(cfg, mode)(x_BTD, c_q_BTQ, positions_BT) -> (q_BTNI, w_BTN, k_BTI, k_BSI)`, all
    float32: x_BTD [B, T, D] the attention input; c_q_BTQ [B, T, q_lora_rank] MLA's normed query
    latent; positions_BT [B, T] (RoPE angles; in prefill/decode also the cache slots written).
    k_BTI are this call's keys. In prefill/decode they are also written to the cache (`cache/k`
    [B, S, I] in the compute dtype, created at init with S = the init input's length) and k_BSI
    is the whole cache after the write (None in train mode); with `pages` (a paged cache,
    `dsjax.model.layers.paged`) the keys go to their pages and k_BSI is the rows' pages.
    Parameters (HF `self_attn.indexer.*`): wq_b [q_lora, N*I], wk [D, I], k_norm (scale, bias)
    [I], weights_proj [D, N].
    """

    cfg: ModelConfig
    mode: str = "train"

    @nn.compact
    def __call__(self, x_BTD, c_q_BTQ, positions_BT, pages=None):
        cfg = self.cfg
        B, T, D = x_BTD.shape
        N, Di, R = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(param_dtype=pdtype, init_std=cfg.init_std)
        x_BTD = jax.lax.stop_gradient(x_BTD)
        c_q_BTQ = jax.lax.stop_gradient(c_q_BTQ)

        q = Linear(cfg.q_lora_rank, N * Di, ("q_lora", "heads"), dtype=dtype, name="wq_b", **kw)(
            c_q_BTQ
        )
        q_BTNI = q.reshape(B, T, N, Di).astype(jnp.float32)
        q_BTNI = jnp.concatenate(
            [apply_rope_half_split(q_BTNI[..., :R], positions_BT, cfg), q_BTNI[..., R:]], -1
        )
        k = Linear(D, Di, ("embed", "head_dim"), dtype=dtype, name="wk", **kw)(x_BTD)
        k = LayerNorm(dtype=jnp.float32, param_dtype=pdtype, name="k_norm")(k)
        k_BTI = jnp.concatenate(
            [apply_rope_half_split(k[:, :, None, :R], positions_BT, cfg)[:, :, 0], k[..., R:]], -1
        )
        # HF keeps weights_proj in float32 and feeds it float32 activations.
        w = Linear(D, N, ("embed", "heads"), dtype=jnp.float32, name="weights_proj", **kw)(x_BTD)
        w_BTN = w.astype(jnp.float32) * N**-0.5

        if self.mode == "train":
            return q_BTNI, w_BTN, k_BTI, None
        cache = self.variable("cache", "k", jnp.zeros, (B, T, Di), dtype)
        if pages is not None:  # a paged cache: written in place, read as the rows' pages
            cache.value = paged.write(cache.value, pages, positions_BT, k_BTI)
            return q_BTNI, w_BTN, k_BTI, paged.gather(cache.value, pages).astype(jnp.float32)
        rows = jnp.arange(B)[:, None]
        cache.value = cache.value.at[rows, positions_BT].set(k_BTI.astype(dtype))
        return q_BTNI, w_BTN, k_BTI, cache.value.astype(jnp.float32)


def index_scores(q_BTNI, w_BTN, k_BSI, mask_BTS):
    """I(t, s) = sum_j w[t,j] ReLU(I^-1/2 q[t,j] . k[s]) [B, T, S] float32, -inf where masked."""
    scale = q_BTNI.shape[-1] ** -0.5
    logits = jnp.einsum("btni,bsi->btns", q_BTNI, k_BSI, preferred_element_type=jnp.float32)
    scores = jnp.einsum("btn,btns->bts", w_BTN, jax.nn.relu(logits * scale))
    return jnp.where(mask_BTS, scores, -jnp.inf)


def visible_mask(q_idx_BT, k_idx_BS, q_seg_BT=None, k_seg_BS=None):
    """bool [B, T, S]: key s is visible to query t (k_idx <= q_idx, same segment if given)."""
    mask = k_idx_BS[:, None, :] <= q_idx_BT[:, :, None]
    if q_seg_BT is not None:
        mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    return mask


def select_topk(
    q_BTNI, w_BTN, k_BSI, topk: int, *, q_idx_BT, k_idx_BS, q_seg_BT=None, k_seg_BS=None
):
    """The `topk` highest-scoring visible keys of each query, computed per query chunk.

    Returns (idx_BTK int32 key slots, valid_BTK bool). When a query sees fewer than `topk` keys
    all of them are picked, and the remaining picks (invisible keys) have valid False.
    Requires topk <= S.
    """
    B, T, N, _ = q_BTNI.shape
    S = k_BSI.shape[1]
    if not 0 < topk <= S:
        raise ValueError(f"select_topk: topk={topk} must be in [1, S={S}]")
    chunk = query_chunk(B, T, N * S)
    segs = q_seg_BT is not None

    def body(q_c, w_c, qidx_c, *qseg):
        mask = visible_mask(qidx_c, k_idx_BS, qseg[0] if segs else None, k_seg_BS)
        scores = index_scores(q_c, w_c, k_BSI, mask)
        vals, idx = jax.lax.top_k(scores, topk)
        return idx.astype(jnp.int32), vals > -jnp.inf

    extra = (q_seg_BT,) if segs else ()
    return map_query_chunks(body, chunk, q_BTNI, w_BTN, q_idx_BT, *extra)


# ====================================================================== indexer training loss
DSA_STAGES = ("off", "warmup", "sparse")


def kl_to_index_scores(p_BTS, scores_BTS, mask_BTS):
    """KL(p || Softmax(scores)) per query [B, T] float32, over the keys where mask is True.

    p_BTS [B, T, S] the target (rows sum to 1 over the mask, zero elsewhere; treated as
    constant); scores_BTS [B, T, S] the indexer scores (any value where masked); mask_BTS bool.
    A row with no masked-in key gives 0. Gradients are finite everywhere (no inf * 0)."""
    p = jax.lax.stop_gradient(p_BTS.astype(jnp.float32))
    keep = mask_BTS & (p > 0)  # also drops NaN targets (rows with no visible key)
    p = jnp.where(keep, p, 0.0)
    s = jnp.where(mask_BTS, scores_BTS.astype(jnp.float32), -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    z = jnp.where(mask_BTS, s - m, -jnp.inf)
    lse = jnp.log(jnp.maximum(jnp.exp(z).sum(-1, keepdims=True), 1e-30))
    log_q = jnp.where(mask_BTS, z - lse, 0.0)
    log_p = jnp.log(jnp.where(keep, p, 1.0))
    return jnp.where(keep, p * (log_p - log_q), 0.0).sum(-1)


def dense_indexer_kl(
    q_BTHK, k_BSHK, index_q_BTNI, index_w_BTN, index_k_BSI, *, scale: float,
    q_idx_BT, k_idx_BS, q_seg_BT=None, k_seg_BS=None,
):  # fmt: skip
    """The warm-up loss per query [B, T]: KL from the dense attention distribution (softmax of
    scale * q.k over the visible keys, averaged over the H heads = summed and L1-normalised) to
    Softmax(I) over the same keys.

    q_BTHK [B, T, H, K], k_BSHK [B, S, H, K] the attention's queries and keys (detached here: the
    target is a constant); index_* the indexer's outputs (`Indexer`); mask as `visible_mask`.
    Computed per query chunk with the chunk's body rematerialised: memory [B, c, H + N, S]."""
    q_BTHK, k_BSHK = jax.lax.stop_gradient(q_BTHK), jax.lax.stop_gradient(k_BSHK)
    B, T, H, _ = q_BTHK.shape
    S, N = k_BSHK.shape[1], index_q_BTNI.shape[2]
    chunk = query_chunk(B, T, (H + N) * S)
    segs = q_seg_BT is not None

    def body(q_c, iq_c, iw_c, qidx_c, *qseg):
        mask = visible_mask(qidx_c, k_idx_BS, qseg[0] if segs else None, k_seg_BS)
        logits = jnp.einsum("bthk,bshk->bths", q_c, k_BSHK, preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, :, None], logits * scale, -jnp.inf)
        p_BcS = jax.nn.softmax(logits, -1).mean(2)
        return kl_to_index_scores(p_BcS, index_scores(iq_c, iw_c, index_k_BSI, mask), mask)

    extra = (q_seg_BT,) if segs else ()
    return map_query_chunks(body, chunk, q_BTHK, index_q_BTNI, index_w_BTN, q_idx_BT, *extra)


def sparse_indexer_kl(index_q_BTNI, index_w_BTN, index_k_BSI, idx_BTK, valid_BTK, p_BTK):
    """The sparse-stage loss per query [B, T]: KL over each query's selected keys S_t from the
    sparse attention's distribution p_BTK [B, T, k] (head-averaged, zero on invalid picks; see
    `sparse_latent_attention(..., with_probs=True)`) to Softmax(I) renormalised over S_t.

    idx_BTK int32 / valid_BTK bool [B, T, k] as `select_topk` returns them. The indexer keys of
    the picks are gathered per query chunk: memory [B, c, k, I + N]."""
    B, T, N, Di = index_q_BTNI.shape
    k = idx_BTK.shape[-1]
    chunk = query_chunk(B, T, k * (Di + N))

    def body(q_c, w_c, idx_c, valid_c, p_c):
        k_BcKI = jax.vmap(lambda kk, i: kk[i])(index_k_BSI, idx_c)
        logits = jnp.einsum("btni,btki->btnk", q_c, k_BcKI, preferred_element_type=jnp.float32)
        scores = jnp.einsum("btn,btnk->btk", w_c, jax.nn.relu(logits * Di**-0.5))
        return kl_to_index_scores(p_c, scores, valid_c)

    return map_query_chunks(body, chunk, index_q_BTNI, index_w_BTN, idx_BTK, valid_BTK, p_BTK)


def mean_over_queries(kl_BT, query_valid_BT):
    """Mean of the per-query loss over the real queries (scalar float32; 0 when none)."""
    w = query_valid_BT.astype(jnp.float32)
    return (kl_BT * w).sum() / jnp.maximum(w.sum(), 1.0)


# ====================================================================== analytic FLOPs
def dsa_flops(cfg: ModelConfig, seq_len: int, topk: int | None = None) -> dict[str, float]:
    """Forward attention-core FLOPs of one layer over a causal sequence of `seq_len` tokens
    (multiply-add = 2 FLOPs; projections excluded: they are the same for all variants).

    Keys: `dense_expanded` (dense MLA as training/prefill runs it: per-head keys and values,
    causal, T(T+1)/2 query-key pairs x H x (dn+dr + dv)); `dense_absorbed` (dense MLA in the
    latent (MQA) form: pairs x H x (C+dr + C)); `dsa_core` (DSA attention over the selected
    latents in the absorbed form: each query attends to min(k, t+1) keys, H x (C+dr + C) per
    pair); `dsa_core_expanded` (the alternative that gathers per-head expanded keys/values:
    fewer FLOPs per pair but H x (dn+dr+dv) gathered values per selected key instead of the
    shared C+dr latent, 71x the bytes at V3.2's dims; not what dsjax runs); `indexer` (causal pairs x N x I for the scores, + N per pair for the head-weighted
    sum); `dsa_total` = dsa_core + indexer; and the ratios.
    """
    T = seq_len
    k = cfg.index_topk if topk is None else topk
    H, dn, dr, dv, C = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    causal_pairs = T * (T + 1) / 2
    # sum_t min(k, t+1): the first k queries see t+1 keys, the rest k.
    m = min(k, T)
    sparse_pairs = m * (m + 1) / 2 + (T - m) * k
    dense_expanded = 2 * causal_pairs * H * (dn + dr + dv)
    dense_absorbed = 2 * causal_pairs * H * (C + dr + C)
    dsa_core = 2 * sparse_pairs * H * (C + dr + C)
    dsa_core_expanded = 2 * sparse_pairs * H * (dn + dr + dv)
    indexer = causal_pairs * (2 * cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_n_heads)
    total = dsa_core + indexer
    return {
        "dense_expanded": dense_expanded,
        "dense_absorbed": dense_absorbed,
        "dsa_core": dsa_core,
        "dsa_core_expanded": dsa_core_expanded,
        "indexer": indexer,
        "dsa_total": total,
        "core_vs_dense_expanded": dsa_core / dense_expanded,
        "core_vs_dense_absorbed": dsa_core / dense_absorbed,
        "total_vs_dense_expanded": total / dense_expanded,
        "indexer_share_of_total": indexer / total,
        "log2_seq_len": math.log2(T),
    }
