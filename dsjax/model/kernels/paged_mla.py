"""Pallas TPU paged MLA decode attention: absorbed queries over latent cache pages, read in place.

The engine's latent cache is a pool of pages (docs/spec.md §14): per layer stack latent
[layers, N, page, C] and rotated shared key k_pe [layers, N, page, R] (V3: C = 512, R = 64),
request b's position s at page table_BP[b, s // page], offset s mod page. In the absorbed form
(spec §3) every head's query is q = [W_UK^T q_nope; q_pe] (L = C + R values) and attends,
multi-query style, over keys [latent; k_pe] and values latent. This kernel computes, for the Q query rows of
each request (T new tokens x H heads, token-major, token t at position pos_BT[b, t]),

    o[b, i] = softmax_s(scale * (q[b, i, :C] . latent_s + q[b, i, C:] . k_pe_s)) . latent_s

over the positions s <= pos_BT[b, i // H], reading each page once per request straight from the
pool (no gathered copy): grid (B, P) with the page table, the positions and the layer as
scalar-prefetch operands, the page's block index (layer, table entry) taken in the BlockSpec
index map, an online softmax (running max, sum and accumulator in VMEM scratch) across the P
pages. Pages past a
request's last position repeat its last page's block index (so no new DMA is issued) and skip
the compute. T > 1 covers speculative (MTP) verification.

`paged_mla_decode_reference` is the XLA gather path (the pages gathered into a contiguous
cache, then masked softmax); tests check the kernel against it in Pallas' interpreter on CPU
(`interpret=True`). The model's decode path over pages (`dsjax.model.layers.paged`) calls the
kernel on TPU (or when asked, in the interpreter) for decode and verification steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["paged_mla_decode", "paged_mla_decode_reference"]

_NEG = -1e30  # finite: a fully masked page leaves the running statistics unchanged


def _kernel(table_ref, pos_ref, layer_ref, q_ref, lat_ref, pe_ref, o_ref, m_sc, l_sc, acc_sc, *,
            H, T, scale):  # fmt: skip
    del table_ref, layer_ref
    b, p = pl.program_id(0), pl.program_id(1)
    Q, C = q_ref.shape[0], lat_ref.shape[-1]
    page = lat_ref.shape[0]
    last = pos_ref[b, 0]
    for t in range(1, T):
        last = jnp.maximum(last, pos_ref[b, t])

    @pl.when(p == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(p * page <= last)
    def _page():
        q = q_ref[...].astype(jnp.float32)
        lat = lat_ref[...].astype(jnp.float32)
        pe = pe_ref[...].astype(jnp.float32)
        s = jax.lax.dot_general(q[:, :C], lat, (((1,), (1,)), ((), ())))
        s = s + jax.lax.dot_general(q[:, C:], pe, (((1,), (1,)), ((), ())))
        s = s * scale  # [Q, page]
        token = jax.lax.broadcasted_iota(jnp.int32, (Q, page), 0) // H
        q_pos = jnp.zeros((Q, page), jnp.int32)
        for t in range(T):  # query row i is token i // H, at position pos[b, i // H]
            q_pos = jnp.where(token == t, pos_ref[b, t], q_pos)
        k_pos = p * page + jax.lax.broadcasted_iota(jnp.int32, (Q, page), 1)
        s = jnp.where(k_pos <= q_pos, s, _NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        e = jnp.exp(s - m_new)
        l_sc[...] = alpha * l_sc[...] + e.sum(axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(e, lat)
        m_sc[...] = m_new

    @pl.when(p == pl.num_programs(1) - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("heads", "scale", "interpret"))
def paged_mla_decode(
    q_BQL, latent_LNPC, k_pe_LNPR, table_BP, pos_BT, layer, *, heads: int, scale: float,
    interpret=False,
):  # fmt: skip
    """Absorbed MLA decode attention over pages (see the module docstring).

    q_BQL [B, Q = T * heads, L = C + R] (token-major: row i is token i // heads); latent_LNPC
    [layers, N, page, C] and k_pe_LNPR [layers, N, page, R] the pools of a layer stack, read at
    layer `layer` (an int32 scalar); table_BP [B, P] int32 page ids; pos_BT [B, T] int32 the
    position of each query token (a query sees positions <= its own). Returns o_BQC [B, Q, C]
    in q's dtype. `interpret`: run in Pallas' interpreter (any backend; slow, for tests).
    """
    B, Q, L = q_BQL.shape
    _, _, page, C = latent_LNPC.shape
    R = k_pe_LNPR.shape[-1]
    P, T = table_BP.shape[1], pos_BT.shape[1]
    if L != C + R or Q != T * heads:
        raise ValueError(
            f"paged_mla_decode: q [B, Q={Q}, L={L}] for C={C}, R={R}, T={T} tokens of "
            f"{heads} heads"
        )

    def page_index(b, p, table, pos, layer):  # past the last position: repeat the last page
        last = pos[b, 0]
        for t in range(1, T):
            last = jnp.maximum(last, pos[b, t])
        return layer[0], table[b, jnp.minimum(p, last // page)], 0, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, P),
        in_specs=[
            pl.BlockSpec((None, Q, L), lambda b, p, *_: (b, 0, 0)),
            pl.BlockSpec((None, None, page, C), page_index),
            pl.BlockSpec((None, None, page, R), page_index),
        ],
        out_specs=pl.BlockSpec((None, Q, C), lambda b, p, *_: (b, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((Q, 1), jnp.float32),
            pltpu.VMEM((Q, 1), jnp.float32),
            pltpu.VMEM((Q, C), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_kernel, H=heads, T=T, scale=scale),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, Q, C), q_BQL.dtype),
        interpret=interpret,
    )(
        table_BP.astype(jnp.int32),
        pos_BT.astype(jnp.int32),
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        q_BQL,
        latent_LNPC,
        k_pe_LNPR,
    )


def paged_mla_decode_reference(q_BQL, latent_NPC, k_pe_NPR, table_BP, pos_BT, *, heads, scale):
    """The XLA gather path for one layer's pools [N, page, X]: pages gathered into a
    contiguous cache, then masked softmax."""
    B, Q, _ = q_BQL.shape
    C = latent_NPC.shape[-1]
    lat = jnp.take(latent_NPC, table_BP, axis=0).reshape(B, -1, C).astype(jnp.float32)
    pe = jnp.take(k_pe_NPR, table_BP, axis=0).reshape(B, lat.shape[1], -1).astype(jnp.float32)
    q = q_BQL.astype(jnp.float32)
    s = jnp.einsum("bqc,bsc->bqs", q[..., :C], lat) + jnp.einsum("bqr,bsr->bqs", q[..., C:], pe)
    q_pos = jnp.repeat(pos_BT, heads, axis=1)  # [B, Q]
    visible = jnp.arange(lat.shape[1])[None, None] <= q_pos[..., None]
    w = jax.nn.softmax(jnp.where(visible, s * scale, -jnp.inf), axis=-1)
    return jnp.einsum("bqs,bsc->bqc", w, lat).astype(q_BQL.dtype)
