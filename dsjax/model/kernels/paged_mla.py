"""Pallas TPU paged MLA decode attention: absorbed queries over latent cache pages, read in place.

The engine's latent cache is a pool of pages (docs/spec.md §14): per layer latent
[N, page, C] and rotated shared key k_pe [N, page, R] (V3: C = 512, R = 64), request b's
position s at page table_BP[b, s // page], offset s mod page. In the absorbed form (spec §3)
every head's query is q = [W_UK^T q_nope; q_pe] (L = C + R values) and attends, multi-query
style, over keys [latent; k_pe] and values latent. This kernel computes, for the Q query rows of
each request (T new tokens x H heads, token-major, token t at position pos_B[b] + t),

    o[b, i] = softmax_s(scale * (q[b, i, :C] . latent_s + q[b, i, C:] . k_pe_s)) . latent_s

over the positions s <= pos_B[b] + i // H, reading each page once per request straight from the
pool (no gathered copy): grid (B, P) with the page table and positions as scalar-prefetch
operands, the page's block index taken from the table in the BlockSpec index map, an online
softmax (running max, sum and accumulator in VMEM scratch) across the P pages. Pages past a
request's last position repeat its last page's block index (so no new DMA is issued) and skip
the compute. T > 1 covers speculative (MTP) verification.

`paged_mla_decode_reference` is the XLA gather path the engine uses today (the pages gathered
into a contiguous cache, then masked softmax); tests check the kernel against it in Pallas'
interpreter on CPU (`interpret=True`). The kernel is not yet called by the model's decode path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["paged_mla_decode", "paged_mla_decode_reference"]

_NEG = -1e30  # finite: a fully masked page leaves the running statistics unchanged


def _kernel(table_ref, pos_ref, q_ref, lat_ref, pe_ref, o_ref, m_sc, l_sc, acc_sc, *, H, scale):
    del table_ref
    b, p = pl.program_id(0), pl.program_id(1)
    Q, C = q_ref.shape[0], lat_ref.shape[-1]
    page = lat_ref.shape[0]
    last = pos_ref[b] + Q // H - 1  # the last query's position

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
        q_pos = pos_ref[b] + jax.lax.broadcasted_iota(jnp.int32, (Q, page), 0) // H
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
    q_BQL, latent_NPC, k_pe_NPR, table_BP, pos_B, *, heads: int, scale: float, interpret=False
):
    """Absorbed MLA decode attention over pages (see the module docstring).

    q_BQL [B, Q = T * heads, L = C + R] (token-major); latent_NPC [N, page, C]; k_pe_NPR
    [N, page, R]; table_BP [B, P] int32 page ids; pos_B [B] int32 position of each request's
    first query token. Returns o_BQC [B, Q, C] in q's dtype. `interpret`: run in Pallas'
    interpreter (any backend; slow, for tests).
    """
    B, Q, L = q_BQL.shape
    _, page, C = latent_NPC.shape
    R = k_pe_NPR.shape[-1]
    P = table_BP.shape[1]
    if L != C + R or Q % heads:
        raise ValueError(f"paged_mla_decode: q [B, Q={Q}, L={L}] for C={C}, R={R}, heads={heads}")

    def page_index(b, p, table, pos):  # past the last position: repeat the last page (no DMA)
        last = (pos[b] + Q // heads - 1) // page
        return table[b, jnp.minimum(p, last)], 0, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, P),
        in_specs=[
            pl.BlockSpec((None, Q, L), lambda b, p, table, pos: (b, 0, 0)),
            pl.BlockSpec((None, page, C), page_index),
            pl.BlockSpec((None, page, R), page_index),
        ],
        out_specs=pl.BlockSpec((None, Q, C), lambda b, p, table, pos: (b, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((Q, 1), jnp.float32),
            pltpu.VMEM((Q, 1), jnp.float32),
            pltpu.VMEM((Q, C), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_kernel, H=heads, scale=scale),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, Q, C), q_BQL.dtype),
        interpret=interpret,
    )(table_BP.astype(jnp.int32), pos_B.astype(jnp.int32), q_BQL, latent_NPC, k_pe_NPR)


def paged_mla_decode_reference(q_BQL, latent_NPC, k_pe_NPR, table_BP, pos_B, *, heads, scale):
    """The XLA gather path: pages gathered into a contiguous cache, then masked softmax."""
    B, Q, _ = q_BQL.shape
    C = latent_NPC.shape[-1]
    lat = jnp.take(latent_NPC, table_BP, axis=0).reshape(B, -1, C).astype(jnp.float32)
    pe = jnp.take(k_pe_NPR, table_BP, axis=0).reshape(B, lat.shape[1], -1).astype(jnp.float32)
    q = q_BQL.astype(jnp.float32)
    s = jnp.einsum("bqc,bsc->bqs", q[..., :C], lat) + jnp.einsum("bqr,bsr->bqs", q[..., C:], pe)
    q_pos = pos_B[:, None] + jnp.arange(Q) // heads
    visible = jnp.arange(lat.shape[1])[None, None] <= q_pos[..., None]
    w = jax.nn.softmax(jnp.where(visible, s * scale, -jnp.inf), axis=-1)
    return jnp.einsum("bqs,bsc->bqc", w, lat).astype(q_BQL.dtype)
