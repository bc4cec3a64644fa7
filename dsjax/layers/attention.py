"""Attention kernels behind one function: a reference einsum and a chunked (flash-style) scan.

Shapes: queries `q_BTGHK` (G key/value heads, H query heads per key/value head), keys `k_BSGK`,
values `v_BSGV`. The expanded MLA path uses G = heads, H = 1 (q/k head dim 192 != v head dim 128,
which `jax.nn.dot_product_attention` refuses); the absorbed decode path is multi-query attention
with G = 1, H = heads, one 576-dim key and a 512-dim value per token.

Masking: query t may see key s iff `k_idx[s] <= q_idx[t]` (causal by absolute index: the token
index in training, the cache slot = position in decoding) and, when segment ids are given, both
belong to the same segment (packed documents never attend across each other).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30
# Below this many query x key pairs per row the reference path is used by "auto".
_AUTO_REFERENCE_LIMIT = 2048 * 2048


def _mask_BTS(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS):
    mask = k_idx_BS[:, None, :] <= q_idx_BT[:, :, None]
    if q_seg_BT is not None:
        mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    return mask


def reference_attention(
    q_BTGHK, k_BSGK, v_BSGV, *, q_idx_BT, k_idx_BS, q_seg_BT=None, k_seg_BS=None, scale: float
):
    """Materialises the [B, G, H, T, S] logits; softmax in float32."""
    logits = (
        jnp.einsum("btghk,bsgk->bghts", q_BTGHK, k_BSGK, preferred_element_type=jnp.float32) * scale
    )
    mask = _mask_BTS(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS)[:, None, None]
    logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum(
        "bghts,bsgv->btghv", probs.astype(v_BSGV.dtype), v_BSGV, preferred_element_type=jnp.float32
    ).astype(v_BSGV.dtype)


def chunked_attention(
    q_BTGHK,
    k_BSGK,
    v_BSGV,
    *,
    q_idx_BT,
    k_idx_BS,
    q_seg_BT=None,
    k_seg_BS=None,
    scale: float,
    chunk: int = 512,
):
    """Online-softmax scan over key chunks: O(T * chunk) live logits instead of O(T * S)."""
    B, S = k_BSGK.shape[:2]
    chunk = min(chunk, S)
    pad = (-S) % chunk
    if pad:
        k_BSGK = jnp.pad(k_BSGK, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_BSGV = jnp.pad(v_BSGV, ((0, 0), (0, pad), (0, 0), (0, 0)))
        # Padded keys get an index no query reaches.
        k_idx_BS = jnp.pad(k_idx_BS, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
        if k_seg_BS is not None:
            k_seg_BS = jnp.pad(k_seg_BS, ((0, 0), (0, pad)), constant_values=-1)
    n = (S + pad) // chunk

    def split(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    xs = (
        split(k_BSGK),
        split(v_BSGV),
        split(k_idx_BS),
        split(k_seg_BS) if k_seg_BS is not None else None,
    )
    T, G, H = q_BTGHK.shape[1:4]
    V = v_BSGV.shape[-1]

    @jax.checkpoint
    def body(carry, x):
        m_BGHT, l_BGHT, acc_BTGHV = carry
        k_c, v_c, kidx_c, kseg_c = x
        s = (
            jnp.einsum("btghk,bsgk->bghts", q_BTGHK, k_c, preferred_element_type=jnp.float32)
            * scale
        )
        mask = _mask_BTS(q_idx_BT, kidx_c, q_seg_BT, kseg_c)[:, None, None]
        s = jnp.where(mask, s, _MASKED)
        m_new = jnp.maximum(m_BGHT, s.max(-1))
        corr = jnp.exp(m_BGHT - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        l_new = l_BGHT * corr + p.sum(-1)
        pv = jnp.einsum(
            "bghts,bsgv->btghv", p.astype(v_c.dtype), v_c, preferred_element_type=jnp.float32
        )
        acc = acc_BTGHV * jnp.transpose(corr, (0, 3, 1, 2))[..., None] + pv
        return (m_new, l_new, acc), None

    init = (
        jnp.full((B, G, H, T), _MASKED, jnp.float32),
        jnp.zeros((B, G, H, T), jnp.float32),
        jnp.zeros((B, T, G, H, V), jnp.float32),
    )
    (_, l_BGHT, acc), _ = jax.lax.scan(body, init, xs)
    denom = jnp.maximum(jnp.transpose(l_BGHT, (0, 3, 1, 2)), 1e-30)[..., None]
    return (acc / denom).astype(v_BSGV.dtype)


def attention(
    q_BTGHK,
    k_BSGK,
    v_BSGV,
    *,
    q_idx_BT,
    k_idx_BS,
    q_seg_BT=None,
    k_seg_BS=None,
    scale: float,
    impl: str = "auto",
    chunk: int = 512,
):
    """Dispatches to an implementation; all return [B, T, G, H, V] in the value dtype."""
    if impl == "auto":
        big = q_BTGHK.shape[1] * k_BSGK.shape[1] > _AUTO_REFERENCE_LIMIT
        impl = "chunked" if big else "reference"
    kw = dict(
        q_idx_BT=q_idx_BT, k_idx_BS=k_idx_BS, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS, scale=scale
    )
    if impl == "reference":
        return reference_attention(q_BTGHK, k_BSGK, v_BSGV, **kw)
    if impl == "chunked":
        return chunked_attention(q_BTGHK, k_BSGK, v_BSGV, chunk=chunk, **kw)
    raise ValueError(f"attention impl={impl!r}: expected auto, reference or chunked")
