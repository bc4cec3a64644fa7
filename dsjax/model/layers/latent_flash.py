"""Flash attention whose keys and values are expanded from the MLA latent one key block at a time.

`latent_flash_attention(q_BThK, latent_BSC, k_pe_BSR, w_ChN, ...)` computes the expanded MLA
attention of `dsjax.model.layers.mla` (per-head keys [k_nope | k_pe], values v, both from
`latent @ kv_b`) without ever holding the keys and values of the whole key axis: the loops run over
key blocks (outer) and query chunks (inner), and each key block's K/V is made from its latent slice
on entry, in the forward and again in the backward, whose key/value gradients fold straight back
into the latent, k_pe and kv_b gradients. Live memory: the query-side accumulators ([T, h, dv]
float32 forward, [T, h, K] backward) plus one key block, instead of [S, h, K + dv] keys and values
and their gradients (V3 at 131072 keys: 10.7 GB of bf16 K/V per layer).

This is context parallelism's attention (`dsjax.model.layers.context`): a chip's T local queries attend
to the S = whole-sequence keys whose latent it all-gathered. Masking and chunk skipping are those of
`dsjax.model.layers.attention` (causal by index, equal segment ids; a (query chunk, key block) pair
with no visible pair for any row is skipped, and so is a key block no query chunk needs).
Layouts: q [B, T, h, K=dn+dr], latent [B, S, C], k_pe [B, S, dr], w [C, h, dn+dv].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax.model.fp8 import match_varying
from dsjax.model.layers.attention import (
    _INT_MAX,
    _INT_MIN,
    _MASKED,
    _chunks,
    _key_chunk_grads,
    _mask_BTS,
    _maybe,
    _pad_axis1,
    _schedule,
    tie_to,
)


def _expand(latent_BsC, k_pe_BsR, w_ChN, dn: int):
    """One key block's per-head keys [B, s, h, dn+dr] and values [B, s, h, dv]."""
    kv = jnp.einsum("bsc,chn->bshn", latent_BsC, w_ChN)
    B, s, h = kv.shape[:3]
    rope = jnp.broadcast_to(k_pe_BsR[:, :, None], (B, s, h, k_pe_BsR.shape[-1]))
    return jnp.concatenate([kv[..., :dn], rope], -1), kv[..., dn:]


def _logits(q_c, k_c, qidx_c, qseg_c, kidx_c, kseg_c, scale):
    s = jnp.einsum("bthk,bshk->bhts", q_c, k_c, preferred_element_type=jnp.float32) * scale
    mask = _mask_BTS(qidx_c, kidx_c, qseg_c, kseg_c)[:, None]
    return jnp.where(mask, s, _MASKED), mask


def _forward(q_n, lat_n, kpe_n, w, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, dn):
    nq, B, cq, h, _ = q_n.shape
    dv, dt = w.shape[-1] - dn, q_n.dtype

    def k_body(carry, kx):
        need_Q, lat_c, kpe_c, kidx_c, kseg_c = kx

        def block(carry):
            k_c, v_c = _expand(lat_c, kpe_c, w, dn)

            def q_body(carry, qx):
                i, need, q_c, qidx_c, qseg_c = qx

                def compute(carry):
                    m, den, acc = carry
                    s, mask = _logits(q_c, k_c, qidx_c, qseg_c, kidx_c, kseg_c, scale)
                    m_new = jnp.maximum(m[i], s.max(-1))
                    corr = jnp.exp(m[i] - m_new)
                    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                    pv = jnp.einsum(
                        "bhts,bshv->bthv", p.astype(dt), v_c, preferred_element_type=jnp.float32
                    )
                    acc_i = acc[i] * jnp.swapaxes(corr, 1, 2)[..., None] + pv
                    den_i = den[i] * corr + p.sum(-1)
                    return m.at[i].set(m_new), den.at[i].set(den_i), acc.at[i].set(acc_i)

                return _maybe(need, compute, carry, True), None

            xs = (jnp.arange(nq), need_Q, q_n, qidx_n, qseg_n)
            return jax.lax.scan(q_body, carry, xs)[0]

        return _maybe(need_Q.any(), block, carry, True), None

    init = (
        jnp.full((nq, B, h, cq), _MASKED, jnp.float32),
        jnp.zeros((nq, B, h, cq), jnp.float32),
        jnp.zeros((nq, B, cq, h, dv), jnp.float32),
    )
    init = match_varying(q_n, lat_n, *init)[2:]  # inside shard_map: the carries' mesh types
    (m, den, acc), _ = jax.lax.scan(k_body, init, (need_QK.T, lat_n, kpe_n, kidx_n, kseg_n))
    den = jnp.maximum(den, 1e-30)  # a row that sees no key: output 0
    out = acc / jnp.swapaxes(den, 2, 3)[..., None]
    return out.astype(dt), m + jnp.log(den)


def _backward(res, dout_n, scale, dn):
    """Per key block: K/V expanded from the latent, `attention._key_chunk_grads` over the query
    chunks (this layout is its G = h heads of H = 1 query each), and dK/dV folded back into the
    latent, k_pe and w gradients through the expansion's VJP."""
    q_n, lat_n, kpe_n, w, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, out_n, lse_n = res
    dt = q_n.dtype
    D_n = jnp.einsum("nbthv,nbthv->nbht", dout_n.astype(jnp.float32), out_n.astype(jnp.float32))
    one = lambda a, axis: jnp.expand_dims(a, axis)  # noqa: E731  (insert the H = 1 axis)
    q5, do5, lse5, D5 = one(q_n, 4), one(dout_n, 4), one(lse_n, 3), one(D_n, 3)

    def k_body(carry, kx):
        need_Q, lat_c, kpe_c, kidx_c, kseg_c = kx

        def block(carry):
            dq5, dw = carry
            (k_c, v_c), expand_vjp = jax.vjp(lambda a, b, c: _expand(a, b, c, dn), lat_c, kpe_c, w)
            dq5, dk, dv = _key_chunk_grads(
                dq5, k_c, v_c, kidx_c, kseg_c, need_Q, q5, qidx_n, qseg_n, do5, lse5, D5,
                scale, True,
            )  # fmt: skip
            dlat, dkpe, dw_c = expand_vjp((dk.astype(dt), dv.astype(dt)))
            return (dq5, dw + dw_c.astype(jnp.float32)), (dlat, dkpe)

        def skip(carry):
            zeros = (jnp.zeros_like(lat_c), jnp.zeros_like(kpe_c))
            return carry, match_varying(carry[0], *zeros)[1:]

        return jax.lax.cond(need_Q.any(), block, skip, carry)

    init = (jnp.zeros(q5.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
    init = match_varying(q_n, lat_n, *init)[2:]
    (dq5, dw), (dlat_n, dkpe_n) = jax.lax.scan(
        k_body, init, (need_QK.T, lat_n, kpe_n, kidx_n, kseg_n)
    )
    return dq5[..., 0, :].astype(dt), dlat_n, dkpe_n, dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _latent_flash(q_n, lat_n, kpe_n, w, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, dn):
    return _fwd(q_n, lat_n, kpe_n, w, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, dn)[0]


def _fwd(q_n, lat_n, kpe_n, w, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, dn):
    out_n, lse_n = _forward(
        q_n, lat_n, kpe_n, w, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, dn
    )
    return out_n, (q_n, lat_n, kpe_n, w, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, out_n, lse_n)


def _bwd(scale, dn, res, dout_n):
    dq, dlat, dkpe, dw = _backward(res, dout_n, scale, dn)
    return dq, dlat, dkpe, dw, None, None, None, None, None


_latent_flash.defvjp(_fwd, _bwd)


def latent_flash_attention(
    q_BThK, latent_BSC, k_pe_BSR, w_ChN, *, q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS,
    scale: float, chunk: int = 512,
):  # fmt: skip
    """Expanded MLA attention, K/V made per key block from the latent -> out [B, T, h, dv].

    q_BThK [B, T, h, dn+dr] rotated queries; latent_BSC [B, S, C] and k_pe_BSR [B, S, dr] the
    keys' normalised latent and rotated shared key; w_ChN [C, h, dn+dv] the kv_b up-projection
    (dn = K - dr); indices and segment ids [B, T] / [B, S] as for `attention`. All in the compute
    dtype; logits, softmax and accumulators in float32. Differentiable in q, latent, k_pe and w.
    """
    B, T, h, K = q_BThK.shape
    S, dr = latent_BSC.shape[1], k_pe_BSR.shape[-1]
    dn = K - dr
    cq, ck = min(chunk, T), min(chunk, S)
    nq, nk = -(-T // cq), -(-S // ck)
    q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS = tie_to(q_BThK, q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS)
    need_QK = _schedule(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS, cq, ck)
    qp, kp = nq * cq - T, nk * ck - S
    out_n = _latent_flash(
        _chunks(_pad_axis1(q_BThK, qp, 0), cq),
        _chunks(_pad_axis1(latent_BSC, kp, 0), ck),
        _chunks(_pad_axis1(k_pe_BSR, kp, 0), ck),
        w_ChN,
        _chunks(_pad_axis1(q_idx_BT, qp, _INT_MIN), cq),
        _chunks(_pad_axis1(q_seg_BT, qp, -2), cq),
        _chunks(_pad_axis1(k_idx_BS, kp, _INT_MAX), ck),
        _chunks(_pad_axis1(k_seg_BS, kp, -1), ck),
        need_QK,
        float(scale),
        int(dn),
    )
    return jnp.moveaxis(out_n, 0, 1).reshape(B, nq * cq, h, -1)[:, :T]
