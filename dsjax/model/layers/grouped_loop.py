"""The grouped matmul as a loop of plain 2-D GEMMs over each expert's contiguous rows (the CPU's).

Rows arrive sorted by expert (`group_sizes` [E] rows each, rows past their sum are padding). Each
group is cut into chunks of power-of-two sizes, largest first (`CHUNKS`: any number of 512-row
chunks, then one chunk per set bit of the rest, 256 ... 16, then at most one 16-row chunk with
the last rows masked), and every chunk is one 2-D GEMM with its expert's weight slice read in
place: no padded copy of the activations, no per-tile copy of the weights, at most 15 rows of
wasted compute per expert. A chunk size is one `while` loop over a table of (start, expert,
rows) built from `group_sizes`.

Why (benchmarks/RESULTS.md): XLA:CPU runs the tiled layout's batched GEMM (80 x [128x256 @
256x128]) at about half its 2-D GEMM rate; the same rows as sixteen 512-row 2-D GEMMs in a loop
take a quarter of the time. The VJP is written out so that the backward is the same loops: dX is
the grouped matmul against the transposed weights, dW one GEMM x_chunkᵀ dY_chunk per chunk
accumulated into its expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.model import fp8 as fp8_lib

CHUNKS = (512, 256, 128, 64, 32, 16)


def _chunk_table(group_sizes_E, M: int, c: int, top: bool, last: bool):
    """Chunks of `c` rows: (start [n], expert [n], rows [n], count) with the static bound n.

    `top`: each group's leading floor(g / c) chunks; otherwise the chunk of bit c of g (and with
    `last`, ceil((g mod 2c) / c) chunks covering the remainder below c too)."""
    E = group_sizes_E.shape[0]
    g = group_sizes_E
    begin = jnp.cumsum(g) - g
    if top and last:  # one chunk size: it covers every row
        per_e, offset, bound = -(-g // c), jnp.zeros_like(g), M // c + E
    elif top:
        per_e, offset, bound = g // c, jnp.zeros_like(g), M // c
    else:
        rem = g % (2 * c)
        offset = g - rem
        per_e = -(-rem // c) if last else rem // c
        bound = min(2 * E, M // c + E) if last else min(E, M // c)
    first = jnp.cumsum(per_e) - per_e
    j = jnp.arange(bound)
    expert = jnp.clip((first + per_e <= j[:, None]).sum(1), 0, E - 1)  # few: no search loop
    k = j - first[expert]
    start = begin[expert] + offset[expert] + k * c
    end = begin[expert] + g[expert]
    rows = jnp.clip(end - start, 0, c)
    return start, expert, rows, per_e.sum()


def _tables(group_sizes_E, M: int):
    """One chunk table per chunk size that fits M rows, largest first: [(c, table)]."""
    sizes = [c for c in CHUNKS if c <= M] or [M]
    return [
        (c, _chunk_table(group_sizes_E, M, c, i == 0, i == len(sizes) - 1))
        for i, c in enumerate(sizes)
    ]


def _window(start, rows, M: int, c: int):
    """(first row read, mask [c]) of a chunk: reads are clamped into the array, the mask keeps
    the chunk's own rows."""
    at = jnp.minimum(start, M - c)
    i = at + jnp.arange(c)
    return at, (i >= start) & (i < start + rows)


def _forward(x_MK, w_EKN, group_sizes_E, transpose: bool):
    """y[rows of e] = x[rows of e] @ w[e] (or @ w[e]ᵀ) -> [M, N]; rows past the groups 0."""
    M = x_MK.shape[0]
    N = w_EKN.shape[1] if transpose else w_EKN.shape[2]
    out = fp8_lib.match_varying(jnp.zeros((M, N), x_MK.dtype), x_MK)[0]
    dims = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))
    for c, (start, expert, rows, count) in _tables(group_sizes_E, M):

        def body(j, out, c=c, start=start, expert=expert, rows=rows):
            at, mask = _window(start[j], rows[j], M, c)
            x = jax.lax.dynamic_slice_in_dim(x_MK, at, c)
            w = jax.lax.dynamic_index_in_dim(w_EKN, expert[j], keepdims=False)
            y = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
            y = y.astype(out.dtype)
            old = jax.lax.dynamic_slice_in_dim(out, at, c)
            return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask[:, None], y, old), at, 0)

        out = jax.lax.fori_loop(0, count, body, out)
    return out


def _weight_grad(x_MK, dy_MN, group_sizes_E, E: int):
    """dw[e] = x[rows of e]ᵀ dy[rows of e] -> [E, K, N]."""
    M, K = x_MK.shape
    dw = fp8_lib.match_varying(jnp.zeros((E, K, dy_MN.shape[1]), jnp.float32), x_MK)[0]
    for c, (start, expert, rows, count) in _tables(group_sizes_E, M):

        def body(j, dw, c=c, start=start, expert=expert, rows=rows):
            at, mask = _window(start[j], rows[j], M, c)
            x = jax.lax.dynamic_slice_in_dim(x_MK, at, c)
            dy = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(dy_MN, at, c), 0)
            part = jax.lax.dot_general(
                x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            e = expert[j]
            acc = jax.lax.dynamic_index_in_dim(dw, e, keepdims=True)
            return jax.lax.dynamic_update_index_in_dim(dw, acc + part[None], e, 0)

        dw = jax.lax.fori_loop(0, count, body, dw)
    return dw


def looped_matmul(x_MK, w_EKN, group_sizes_E):
    """The grouped matmul: row block e of x (rows sorted by expert) times w[e] -> [M, N] in x's
    dtype, rows past sum(group_sizes) zero. Same contract as `jax.lax.ragged_dot`. Inside
    `shard_map` the operands first take each other's varying axes (a custom VJP's gradients must
    type as its inputs)."""
    return _looped(*fp8_lib.match_varying(x_MK, w_EKN, group_sizes_E))


@jax.custom_vjp
def _looped(x_MK, w_EKN, group_sizes_E):
    return _forward(x_MK, w_EKN, group_sizes_E, transpose=False)


def _looped_fwd(x_MK, w_EKN, group_sizes_E):
    return _looped(x_MK, w_EKN, group_sizes_E), (x_MK, w_EKN, group_sizes_E)


def _looped_bwd(res, dy_MN):
    x_MK, w_EKN, group_sizes_E = res
    dx = _forward(dy_MN, w_EKN, group_sizes_E, transpose=True).astype(x_MK.dtype)
    dw = _weight_grad(x_MK, dy_MN, group_sizes_E, w_EKN.shape[0]).astype(w_EKN.dtype)
    return dx, dw, None


_looped.defvjp(_looped_fwd, _looped_bwd)
