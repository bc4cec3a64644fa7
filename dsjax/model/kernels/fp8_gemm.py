"""DeepSeek-V3 block-scaled FP8 GEMM: a Pallas (Triton backend) kernel and its XLA reference.

The recipe (docs/spec.md §8): the left operand is quantised per 1×128 tile along K (one row, 128
channels), the right operand per 128×128 block (weights) or per 128×1 tile (the weight-gradient
GEMM, where both operands are tiled along the token dimension). The product

    out[m, n] = Σ_kb ( Σ_{k in kb} a_q[m, k] · b_q[k, n] ) · s_a[m, kb] · s_b[kb, n]

promotes each 128-wide K block's partial product to an f32 accumulator times its two scales
(DeepSeek's "promotion every 128 elements"; DeepGEMM does the same). XLA cannot say this as one
native FP8 GEMM, so the kernel keeps the K loop inside: per grid cell (BM×BN output tile) it walks
K in BK steps, one FP8 tensor-core dot per step (Triton lowers an f8E4M3FN `tt.dot` to wgmma on
Hopper), rescales and accumulates in f32 registers.

Backend: the Pallas Triton lowering (`pl.pallas_call` on GPU). It exists with the same API in
jax 0.10.2 and 0.11.2 and knows float8_e4m3fn (compute capability >= 8.9). Mosaic GPU's Hopper
matmul is faster-moving API; the Triton path is the low-risk choice.

Shapes (names carry them): a_q_MK, s_a_MKb (Kb = ceil(K/128)), b_q_KN, s_b_KbNb (Nb = ceil(N/128))
or s_b_KbN. Sizes that are not multiples of the blocks are zero-padded in the wrapper (zero FP8
values and zero scales contribute exactly zero) and the result is sliced back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

SCALE_TILE = 128  # the recipe's quantisation granularity along K (and along N for weights)
E4M3 = jnp.float8_e4m3fn


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def supported() -> bool:
    """True when the default backend can run the kernel natively (an NVIDIA GPU with sm >= 8.9)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        return False
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return (major, minor) >= (8, 9)


def _check_inputs(a_q_MK, s_a_MKb, b_q_KN, s_b):
    """Validate dtypes/shapes; return (M, K, N, per_column) where per_column says s_b is [Kb, N]."""
    if a_q_MK.ndim != 2 or b_q_KN.ndim != 2:
        raise ValueError(f"a_q and b_q must be 2-D, got a_q {a_q_MK.shape} and b_q {b_q_KN.shape}")
    M, K = a_q_MK.shape
    K2, N = b_q_KN.shape
    if K != K2:
        raise ValueError(
            f"contraction sizes differ: a_q is [M,K]={a_q_MK.shape}, b_q is [K,N]={b_q_KN.shape}"
        )
    for name, x in (("a_q", a_q_MK), ("b_q", b_q_KN)):
        if x.dtype != E4M3:
            raise ValueError(f"{name} must be float8_e4m3fn, got {x.dtype}")
    Kb, Nb = _cdiv(K, SCALE_TILE), _cdiv(N, SCALE_TILE)
    if tuple(s_a_MKb.shape) != (M, Kb):
        raise ValueError(
            f"s_a must be [M, ceil(K/128)] = {(M, Kb)} (1x128 tiles along K), got {s_a_MKb.shape}"
        )
    if tuple(s_b.shape) == (Kb, Nb):
        per_column = False
    elif tuple(s_b.shape) == (Kb, N):
        per_column = True
    else:
        raise ValueError(
            f"s_b must be [ceil(K/128), ceil(N/128)] = {(Kb, Nb)} (128x128 blocks) or "
            f"[ceil(K/128), N] = {(Kb, N)} (128x1 tiles), got {s_b.shape}"
        )
    return M, K, N, per_column


def _scales_per_column(s_b, N: int, per_column: bool):
    """s_b as [Kb, N] f32: a 128×128-block layout is repeated along N (Kb·N·4 bytes, small)."""
    s_b = s_b.astype(jnp.float32)
    if per_column:
        return s_b
    return jnp.repeat(s_b, SCALE_TILE, axis=1)[:, :N]


def block_scaled_matmul_reference(a_q_MK, s_a_MKb, b_q_KN, s_b, *, out_dtype=jnp.float32):
    """Pure-XLA block-scaled GEMM with the kernel's math: per 128-wide K block an exact f32 dot of
    the FP8 values, times s_a[:, kb, None] · s_b[kb, n], summed over kb in f32 (a scan over K blocks,
    so memory stays O(M·N)). Same arguments and result as `block_scaled_matmul`."""
    M, K, N, per_column = _check_inputs(a_q_MK, s_a_MKb, b_q_KN, s_b)
    Kb = _cdiv(K, SCALE_TILE)
    Kp = Kb * SCALE_TILE
    a = jnp.pad(a_q_MK.astype(jnp.float32), ((0, 0), (0, Kp - K)))
    b = jnp.pad(b_q_KN.astype(jnp.float32), ((0, Kp - K), (0, 0)))
    # The barrier keeps XLA:GPU from folding the f8->f32 converts into a cuBLASLt FP8 GEMM: its
    # accumulation is not exact (a plain f8 dot per K block, the bench's block_kscan, is 1.3e-4
    # off the recipe on an H100); with f32 operands every per-block dot is exact.
    a, b = jax.lax.optimization_barrier((a, b))
    a_KbMT = a.reshape(M, Kb, SCALE_TILE).transpose(1, 0, 2)
    b_KbTN = b.reshape(Kb, SCALE_TILE, N)
    s_b_KbN = _scales_per_column(s_b, N, per_column)
    s_a_KbM = s_a_MKb.astype(jnp.float32).T

    def step(acc_MN, xs):
        a_MT, b_TN, sa_M, sb_N = xs
        part_MN = jnp.dot(
            a_MT, b_TN, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )
        return acc_MN + part_MN * sa_M[:, None] * sb_N[None, :], None

    acc_MN, _ = jax.lax.scan(
        step, jnp.zeros((M, N), jnp.float32), (a_KbMT, b_KbTN, s_a_KbM, s_b_KbN)
    )
    return acc_MN.astype(out_dtype)


def _kernel(
    a_ref, sa_ref, b_ref, sb_ref, o_ref, *, block_k: int, num_k: int, b_nk: bool, sb_per_tile: bool
):
    """One BM×BN output tile. Refs: a [BM, Kp] e4m3, sa [Kb, BM] f32, b [Kp, BN] (or [BN, Kp]
    when b_nk) e4m3, o [BM, BN]; sb [Kb, BN] f32, or [Kb, 1] when the tile lies inside one
    128-column weight block (sb_per_tile): then the promotion is one FMA per element,
    acc + part · (s_a · s_b) with a [BM, 1] combined scale."""
    bm, bn = o_ref.shape
    steps_per_scale = SCALE_TILE // block_k

    def body(k, acc_MN):
        k0 = pl.multiple_of(k * block_k, block_k)
        a_MK = a_ref[:, pl.ds(k0, block_k)]
        if b_nk:
            b_NK = b_ref[:, pl.ds(k0, block_k)]
            part_MN = jax.lax.dot_general(
                a_MK, b_NK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
        else:
            b_KN = b_ref[pl.ds(k0, block_k), :]
            part_MN = jnp.dot(a_MK, b_KN, preferred_element_type=jnp.float32)
        kb = k // steps_per_scale
        sa_M1 = sa_ref[pl.ds(kb, 1), :].reshape(bm, 1)
        if sb_per_tile:
            return acc_MN + part_MN * (sa_M1 * sb_ref[pl.ds(kb, 1), :])
        return acc_MN + part_MN * sa_M1 * sb_ref[pl.ds(kb, 1), :]

    acc_MN = jax.lax.fori_loop(0, num_k, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc_MN.astype(o_ref.dtype)


def _compiler_params(num_warps, num_stages):
    """Triton compiler params; the class name moved across jax versions (guarded)."""
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415 - GPU-only module

    cls = getattr(pl_triton, "CompilerParams", None) or pl_triton.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def _tile_of_program(p, num_m: int, num_n: int, group_m: int):
    """Program id -> output tile (i, j), `group_m` row tiles at a time (column-major inside a
    group), so programs running together share a few A row blocks and B column blocks in L2.
    group_m=1 is plain row-major order."""
    group = group_m * num_n
    first_m = (p // group) * group_m
    size_m = jnp.minimum(num_m - first_m, group_m)
    return first_m + (p % group) % size_m, (p % group) // size_m


@functools.partial(
    jax.jit,
    static_argnames=(
        "out_dtype",
        "interpret",
        "block_m",
        "block_n",
        "block_k",
        "num_warps",
        "num_stages",
        "b_nk",
        "group_m",
    ),
)
def _pallas_matmul(
    a_q_MK,
    s_a_MKb,
    b_q,
    s_b,
    *,
    out_dtype,
    interpret,
    block_m,
    block_n,
    block_k,
    num_warps,
    num_stages,
    b_nk,
    group_m,
):
    """Padded operands in, padded [Mp, Np] out. b_q is [Kp, Np], or [Np, Kp] when b_nk.
    s_b is [Kb, Np] (one scale per column) or [Kb, Np/128] (128×128 blocks, block_n | 128)."""
    Mp, Kp = a_q_MK.shape
    Np = b_q.shape[0] if b_nk else b_q.shape[1]
    Kb = Kp // SCALE_TILE
    num_m, num_n = Mp // block_m, Np // block_n
    s_a_KbM = s_a_MKb.astype(jnp.float32).T  # row loads of the scales are contiguous
    sb_per_tile = s_b.shape[1] != Np  # [Kb, ceil(Np/128)] block scales (Np > 1 always here)
    kernel = functools.partial(
        _kernel, block_k=block_k, num_k=Kp // block_k, b_nk=b_nk, sb_per_tile=sb_per_tile
    )
    tiles_per_block = SCALE_TILE // block_n if sb_per_tile else 1
    tile = functools.partial(
        _tile_of_program, num_m=num_m, num_n=num_n, group_m=min(group_m, num_m)
    )

    def row(f):  # index maps over the 1-D grid
        return lambda p: f(tile(p)[0])

    def col(f):
        return lambda p: f(tile(p)[1])

    sb_spec = (
        pl.BlockSpec((Kb, 1), col(lambda j: (0, j // tiles_per_block)))
        if sb_per_tile
        else pl.BlockSpec((Kb, block_n), col(lambda j: (0, j)))
    )
    b_spec = (
        pl.BlockSpec((block_n, Kp), col(lambda j: (j, 0)))
        if b_nk
        else pl.BlockSpec((Kp, block_n), col(lambda j: (0, j)))
    )
    params = {} if interpret else {"compiler_params": _compiler_params(num_warps, num_stages)}
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(num_m * num_n,),
        in_specs=[
            pl.BlockSpec((block_m, Kp), row(lambda i: (i, 0))),
            pl.BlockSpec((Kb, block_m), row(lambda i: (0, i))),
            b_spec,
            sb_spec,
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda p: tile(p)),
        interpret=interpret,
        name="block_scaled_fp8_matmul",
        **params,
    )(a_q_MK, s_a_KbM, b_q, s_b)


def _check_blocks(block_m: int, block_n: int, block_k: int, group_m: int):
    if group_m < 1:
        raise ValueError(f"group_m must be >= 1, got {group_m}")
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (Triton tile rule), got {v}")
    if SCALE_TILE % block_k:
        raise ValueError(f"block_k must divide the scale tile {SCALE_TILE}, got {block_k}")


def block_scaled_matmul(
    a_q_MK,
    s_a_MKb,
    b_q_KN,
    s_b,
    *,
    out_dtype=jnp.float32,
    interpret=None,
    block_m: int = 128,
    block_n: int = 64,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
    b_k_major: bool = True,
    group_m: int = 16,
):
    """Block-scaled FP8 GEMM, f32 accumulation with per-128-K-block promotion.

    a_q_MK [M,K] float8_e4m3fn; s_a_MKb [M, ceil(K/128)] f32 (1×128 tiles along K);
    b_q_KN [K,N] float8_e4m3fn; s_b [ceil(K/128), ceil(N/128)] (128×128 blocks) or
    [ceil(K/128), N] (128×1 tiles). Returns [M,N] out_dtype =
    Σ_kb (a_q[:, kb] · b_q[kb, :]) · s_a[:, kb, None] · s_b[kb, n-block].

    interpret: True runs the Pallas kernel in the interpreter (any backend, for tests);
    False runs it natively (needs `supported()`); None picks native when `supported()` and the
    XLA reference `block_scaled_matmul_reference` otherwise.
    b_k_major: the kernel reads b from an [N,K] (K-major) copy, which Hopper's FP8 wgmma wants
    (H100, 16384x7168x7168: 370 TFLOP/s vs 293 reading [K,N]); it costs one XLA transpose of b,
    folded away when the caller holds b as [N,K] (an HF [out,in] weight passed as `w_NK.T`).
    Block sizes: powers of two >= 16, block_k dividing 128; the defaults (BM=128, BN=64, BK=128,
    4 warps, 4 stages, group_m=16) were the fastest of a sweep on an H100 with jax 0.11.2
    (benchmarks/fp8_gemm_bench.py --sweep; bf16 cuBLAS ~590, unscaled FP8 cuBLAS ~830 TFLOP/s there).
    group_m: output tiles are visited group_m row tiles at a time (L2 reuse; 1 = row-major).
    M, N, K need not be multiples of the blocks: operands are zero-padded (zero FP8 values, zero
    scales) and the result sliced back.
    """
    M, K, N, per_column = _check_inputs(a_q_MK, s_a_MKb, b_q_KN, s_b)
    _check_blocks(block_m, block_n, block_k, group_m)
    if interpret is None:
        if not supported():
            return block_scaled_matmul_reference(a_q_MK, s_a_MKb, b_q_KN, s_b, out_dtype=out_dtype)
        interpret = False
    Kb = _cdiv(K, SCALE_TILE)
    Mp, Np, Kp = _cdiv(M, block_m) * block_m, _cdiv(N, block_n) * block_n, Kb * SCALE_TILE
    if per_column or SCALE_TILE % block_n:
        s_b_p = jnp.pad(_scales_per_column(s_b, N, per_column), ((0, 0), (0, Np - N)))
    else:  # 128×128 blocks and each output tile inside one block: the kernel reads s_b as is
        s_b_p = jnp.pad(
            s_b.astype(jnp.float32), ((0, 0), (0, _cdiv(Np, SCALE_TILE) - s_b.shape[1]))
        )
    a_p = jnp.pad(a_q_MK, ((0, Mp - M), (0, Kp - K))) if (Mp, Kp) != (M, K) else a_q_MK
    s_a_p = jnp.pad(s_a_MKb.astype(jnp.float32), ((0, Mp - M), (0, 0)))
    b_p = jnp.pad(b_q_KN, ((0, Kp - K), (0, Np - N))) if (Kp, Np) != (K, N) else b_q_KN
    if b_k_major:
        b_p = b_p.T
    out = _pallas_matmul(
        a_p,
        s_a_p,
        b_p,
        s_b_p,
        out_dtype=np.dtype(out_dtype),
        interpret=bool(interpret),
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        b_nk=b_k_major,
        group_m=group_m,
    )
    return out[:M, :N] if (Mp, Np) != (M, N) else out
