"""FP8 training, DeepSeek-V3's fine-grained recipe (docs/spec.md §8; tech report §3.3).

Every GEMM of a linear layer (forward `y = x W`, input gradient `dx = dy Wᵀ`, weight gradient
`dW = xᵀ dy`) runs on float8_e4m3fn operands with FP32 accumulation:

- activations and output gradients: one scale per 1×128 tile along the contraction axis (one
  token × 128 channels); for `dW` the contraction runs over tokens, so the same tensors are
  re-quantised in 128×1 tiles (128 tokens × one channel);
- weights: one scale per 128×128 block;
- `s = max|tile| / 448`, `q = e4m3(v / s)`; an all-zero tile gets `s = 1` (its q is exactly 0);
- a dimension that is not a multiple of 128 has a short last tile (zero padded: the padding
  never changes a max-abs, and it is cut off again after the multiply).

Scale arrays are "scale_inv" in the Hugging Face sense: the dequantised value is `q * s`.
Shapes: `quantize_tiles(x [..., n, ...], axis)` -> q like x, s with `axis` of size ceil(n/128);
`quantize_blocks(w [..., I, O])` -> q like w, s [..., ceil(I/128), ceil(O/128)].

The GEMMs go through one function, `_gemm(a_q [M,K], s_a [M,K/128], b_q [K,N], s_b [K/128, N/bn])
-> f32 [M,N]` (bn 128 for weight blocks, 1 for the per-column 128×1 tiles of `dW`): the portable
XLA path dequantises inside the computation and multiplies with `preferred_element_type=float32`;
a native kernel (GPU: dsjax/model/kernels/fp8_gemm.py) can replace it there. The quantised operands
pass through `jax.lax.optimization_barrier`, so XLA cannot fold the f32 -> e4m3 -> f32 round trip
away (XLA:GPU's algebraic simplifier does, under `xla_allow_excess_precision`): the FP8 tensors
are materialised, as the real FP8 data flow writes them anyway.

Residuals saved for the backward are the FP8 tensors and their scales, never the high-precision
inputs. Grouped (expert) matmuls (`fp8_grouped_dot`: `ragged_dot`, or the tile-batched einsum)
follow the same recipe: per-expert 128×128 weight blocks, 1×128 activation tiles, and the
backward's dx / dW are the transposes of the same grouped product evaluated on re-quantised
cotangents and activations (128×1 tiles along the sorted token axis).

Stored FP8 weights (the official FP8 release, kept as float8 + `*_scale_inv` blocks):
`dequantize_weight` gives the high-precision weight (also for DeepSeek-V4's FP4 experts, kept
as float4_e2m1fn with 32x1 power-of-two scales); `fp8_dot_stored` / `fp8_grouped_dot_stored`
use the stored blocks directly (only x is quantised) and treat them as frozen (zero gradient).
Under the recipe every stored weight whose blocks line up with its GEMM's 128×128 weight tiles
goes there: Linear kernels, FP8 expert stacks, and V4's grouped wo_a when o_lora_rank % 128 == 0
(each group's columns whole blocks). V4's FP4 experts are re-encoded exactly as FP8 blocks
(`fp4_to_fp8_blocks`) and go there too. Where they do not line up, the weight is dequantised,
frozen and re-quantised by the recipe:
- V4's wo_a when o_lora_rank % 128 != 0 (the release's blocks straddle the groups);
- the routed experts under a mesh whose shards cut hidden_size or moe_intermediate_size into
  pieces that are not whole 128-blocks (`moe._sharded_operands`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
E2M1 = jnp.float4_e2m1fn  # DeepSeek-V4's FP4 experts (stored only; dequantised to compute)
FP4_GROUP = 32
# A stored weight `<name>`'s block scales: the sibling leaf `<name>_scale_inv`.
SCALE_SUFFIX = "_scale_inv"


# ----------------------------------------------------------------------------- quantisation
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_axis(x, axis: int, multiple: int):
    n = x.shape[axis]
    pad = _ceil_div(n, multiple) * multiple - n
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _scale_of(amax):
    """`max|tile| / 448`, and 1 for all-zero tiles (their quantised values are exactly 0)."""
    amax = amax.astype(jnp.float32)
    return jnp.where(amax > 0, amax / E4M3_MAX, 1.0)


def _barrier(*arrays):
    """Materialises the FP8 tensors (see the module docstring)."""
    return jax.lax.optimization_barrier(arrays)


def _split_tiles(x, axis: int, block: int):
    """x [..., n, ...] -> [..., ceil(n/block), block, ...] (zero padded): a reshape in place, no
    transpose, so XLA can fuse the quantisation into one pass over x (a moved axis would copy it:
    7 GiB per f32 copy of V3's expert receive buffer)."""
    xp = _pad_axis(x, axis, block)
    return xp.reshape(*xp.shape[:axis], xp.shape[axis] // block, block, *xp.shape[axis + 1 :])


def quantize_tiles(x, axis: int = -1, block: int = BLOCK):
    """1×`block` tiles along `axis`: (q float8_e4m3fn like x, s float32 with `axis` of size
    ceil(n/block)); dequantised `x ≈ q * repeat(s, block, axis)`."""
    return _quantize_tiles(x, axis % x.ndim, block)


def _quantize_tiles(x, axis: int, block: int):
    n = x.shape[axis]
    xt = _split_tiles(x, axis, block)
    s = _scale_of(jnp.max(jnp.abs(xt), axis=axis + 1))  # max|.| is exact in x's own dtype
    q = (xt.astype(jnp.float32) / jnp.expand_dims(s, axis + 1)).astype(E4M3)
    q = q.reshape(*q.shape[:axis], -1, *q.shape[axis + 2 :])
    q = jax.lax.slice_in_dim(q, 0, n, axis=axis)
    q, s = _barrier(q, s)
    return q, s


def dequantize_tiles(q, s, axis: int = -1, dtype=jnp.float32, block: int = BLOCK):
    """Inverse of `quantize_tiles`: `q * s` with s repeated over each tile of `axis`."""
    axis = axis % q.ndim
    n = q.shape[axis]
    x = _split_tiles(q, axis, block).astype(jnp.float32) * jnp.expand_dims(s, axis + 1)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, n, axis=axis).astype(dtype)


def quantize_blocks(w, block: int = BLOCK):
    """128×128 blocks over the last two axes of w [..., I, O] (leading axes: experts, layers):
    (q float8_e4m3fn like w, s float32 [..., ceil(I/block), ceil(O/block)])."""
    *lead, n_in, n_out = w.shape
    ni, no = _ceil_div(n_in, block), _ceil_div(n_out, block)
    wp = _pad_axis(_pad_axis(w.astype(jnp.float32), -2, block), -1, block)
    wb = wp.reshape(*lead, ni, block, no, block)
    s = _scale_of(jnp.max(jnp.abs(wb), axis=(-3, -1)))
    q = (wb / s[..., :, None, :, None]).astype(E4M3).reshape(*lead, ni * block, no * block)
    q, s = _barrier(q[..., :n_in, :n_out], s)
    return q, s


def dequantize_blocks(q, s, dtype=jnp.float32, block: int = BLOCK):
    """Inverse of `quantize_blocks`: W[..., i, j] = q[..., i, j] * s[..., i // 128, j // 128]."""
    *_, n_in, n_out = q.shape
    s_full = jnp.repeat(jnp.repeat(s, block, axis=-2), block, axis=-1)[..., :n_in, :n_out]
    return (q.astype(jnp.float32) * s_full).astype(dtype)


def dequantize_weight(w_q, scale_inv, dtype=jnp.float32):
    """A stored FP8 weight [..., in, out] (float8_e4m3fn) and its `scale_inv` blocks
    [..., ceil(in/128), ceil(out/128)] -> the weight in `dtype`. Checks the shapes.
    A float4_e2m1fn weight (DeepSeek-V4's FP4 experts) has 32x1 groups along `in` instead:
    `scale_inv` [..., ceil(in/32), out], `W[..., i, j] = w_q[..., i, j] * s[..., i // 32, j]`."""
    if w_q.ndim < 2 or scale_inv.ndim != w_q.ndim:
        raise ValueError(
            f"dequantize_weight: weight {w_q.shape} and scale_inv {scale_inv.shape} must have "
            "the same rank >= 2"
        )
    if is_fp4(w_q):
        n_in = w_q.shape[-2]
        want = (*w_q.shape[:-2], _ceil_div(n_in, FP4_GROUP), w_q.shape[-1])
        if tuple(scale_inv.shape) != want:
            raise ValueError(
                f"dequantize_weight: scale_inv {tuple(scale_inv.shape)} must be {want} "
                f"(one scale per 32 inputs of the FP4 weight {tuple(w_q.shape)})"
            )
        s_full = jnp.repeat(scale_inv.astype(jnp.float32), FP4_GROUP, axis=-2)[..., :n_in, :]
        return (w_q.astype(jnp.float32) * s_full).astype(dtype)
    want = (*w_q.shape[:-2], _ceil_div(w_q.shape[-2], BLOCK), _ceil_div(w_q.shape[-1], BLOCK))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"dequantize_weight: scale_inv {tuple(scale_inv.shape)} must be {want} "
            f"(one scale per 128x128 block of the weight {tuple(w_q.shape)})"
        )
    return dequantize_blocks(w_q, scale_inv, dtype)


def fp4_to_fp8_blocks(w4, scale_inv):
    """DeepSeek-V4's FP4 weights (float4_e2m1fn [..., I, O], power-of-two scales [..., I/32, O])
    -> the same values as FP8 128x128 blocks (float8_e4m3fn like w4, float32 power-of-two scales
    [..., ceil(I/128), ceil(O/128)]): per block S = 2^ceil(log2(amax/448)), q = w / S.

    An e2m1 code times a power of two has at most one mantissa bit, so q is exact in e4m3 down
    to 2^-8 (the subnormal grid below): exact whenever a block's nonzero magnitudes lie within
    2^15 of its largest (its 32-group scales within 2^11 of the largest); smaller ones round to
    the grid (error < amax * 2^-17)."""
    w = dequantize_weight(w4, scale_inv)  # float32, exact
    *lead, n_in, n_out = w.shape
    ni, no = _ceil_div(n_in, BLOCK), _ceil_div(n_out, BLOCK)
    wb = _pad_axis(_pad_axis(w, -2, BLOCK), -1, BLOCK).reshape(*lead, ni, BLOCK, no, BLOCK)
    amax = jnp.max(jnp.abs(wb), axis=(-3, -1))
    m, e = jnp.frexp(amax / E4M3_MAX)
    s = jnp.where(amax > 0, jnp.ldexp(1.0, jnp.where(m == 0.5, e - 1, e)), 1.0)
    q = (wb / s[..., :, None, :, None]).astype(E4M3).reshape(*lead, ni * BLOCK, no * BLOCK)
    return q[..., :n_in, :n_out], s.astype(jnp.float32)


def _varying(a) -> frozenset:
    m = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset(m.varying) if m is not None else frozenset()


def match_varying(*arrays):
    """Inside `shard_map`: marks every array varying over the union of their varying mesh axes,
    so a custom VJP's cotangents have its inputs' types (autodiff of the cast psums the weight
    gradient over the axes the weight was replicated on). A no-op outside shard_map."""
    axes = frozenset().union(*(_varying(a) for a in arrays))
    return tuple(
        a
        if _varying(a) == axes
        else jax.lax.pcast(a, tuple(sorted(axes - _varying(a))), to="varying")
        for a in arrays
    )


# ----------------------------------------------------------------------------- the GEMM
def _native_gemm() -> bool:
    """Whether `_gemm` runs the native FP8 kernel: an FP8-capable NVIDIA GPU, one device."""
    from dsjax.model.kernels.fp8_gemm import supported

    mesh = jax.sharding.get_abstract_mesh()
    return (mesh.empty or mesh.size == 1) and supported()


def _gemm(a_q, s_a, b_q, s_b, b_cols: int = BLOCK):
    """Block-scaled FP8 GEMM with FP32 accumulation: a_q [M,K] with 1×128 scales s_a [M, K/128],
    b_q [K,N] with scales s_b [K/128, N/b_cols] (b_cols 128: weight blocks; 1: per-column 128×1
    tiles) -> f32 [M, N] = Σ_k (a_q s_a)[m,k] (b_q s_b)[k,n].

    On an NVIDIA GPU with FP8 tensor cores (sm >= 8.9) and no multi-device mesh in scope, the
    Pallas kernel `dsjax.model.kernels.fp8_gemm.block_scaled_matmul` (native FP8 dots, per-128-K-block
    promotion); elsewhere the portable XLA path: dequantise inside the computation, dot with f32
    accumulation. (A pallas_call is opaque to the SPMD partitioner, which would replicate its
    operands over a mesh: meshes keep the portable path.)"""
    if _native_gemm():
        from dsjax.model.kernels.fp8_gemm import block_scaled_matmul

        return block_scaled_matmul(a_q, s_a, b_q, s_b, interpret=False)
    a = dequantize_tiles(a_q, s_a, axis=1)
    K, N = b_q.shape
    s_b_full = jnp.repeat(s_b, BLOCK, axis=0)[:K]
    s_b_full = jnp.repeat(s_b_full, b_cols, axis=1)[:, :N]
    b = b_q.astype(jnp.float32) * s_b_full
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def block_scaled_dot(x_q, s_x, w_q, s_w):
    """y [..., N] f32 from x_q [..., K] (1×128 scales s_x [..., K/128]) and 128×128-block weights
    w_q [K, N], s_w [K/128, N/128]."""
    lead = x_q.shape[:-1]
    y = _gemm(x_q.reshape(-1, x_q.shape[-1]), s_x.reshape(-1, s_x.shape[-1]), w_q, s_w)
    return y.reshape(*lead, w_q.shape[1])


def _grad_x(dy_MN, w_q, s_w):
    """dx = dy Wᵀ: dy in 1×128 tiles along N, the forward's weight blocks transposed."""
    q, s = quantize_tiles(dy_MN, axis=1)
    return _gemm(q, s, w_q.T, s_w.T)


def _grad_w(x_q, s_x, dy_MN):
    """dW = xᵀ dy: the saved 1×128 FP8 activations are dequantised and re-quantised in 128×1
    tiles along tokens (the transposed grouping), dy likewise."""
    x_MK = dequantize_tiles(x_q, s_x, axis=1)
    xq, xs = quantize_tiles(x_MK, axis=0)  # [M,K], [M/128, K]
    dq, ds = quantize_tiles(dy_MN, axis=0)  # [M,N], [M/128, N]
    return _gemm(xq.T, xs.T, dq, ds, b_cols=1)


# ----------------------------------------------------------------------------- dense layers
def fp8_dot(x, w, out_dtype=None):
    """`x [..., K] @ w [K, N]` in the FP8 recipe (all three GEMMs); result in `out_dtype`
    (default x.dtype); gradients in the input dtypes."""
    return _fp8_dot(*match_varying(x, w), out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_dot(x, w, out_dtype=None):
    return _fp8_dot_fwd(x, w, out_dtype)[0]


def _fp8_dot_fwd(x, w, out_dtype):
    out_dtype = out_dtype or x.dtype
    x_MK = x.reshape(-1, x.shape[-1])
    x_q, s_x = quantize_tiles(x_MK, axis=1)
    w_q, s_w = quantize_blocks(w)
    y = _gemm(x_q, s_x, w_q, s_w).reshape(*x.shape[:-1], w.shape[1]).astype(out_dtype)
    # Residuals in FP8 (+ scales); the zero-size arrays only carry the input dtypes and shape.
    proto = (jnp.zeros((0,) * x.ndim, x.dtype), jnp.zeros((0,), w.dtype))
    return y, (x_q, s_x, w_q, s_w, proto)


def _fp8_dot_bwd(out_dtype, res, dy):
    x_q, s_x, w_q, s_w, (x_proto, w_proto) = res
    dy_MN = dy.reshape(-1, dy.shape[-1]).astype(jnp.float32)
    dx = _grad_x(dy_MN, w_q, s_w)
    dw = _grad_w(x_q, s_x, dy_MN)
    lead = dy.shape[:-1]
    return dx.reshape(*lead, -1).astype(x_proto.dtype), dw.astype(w_proto.dtype)


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def fp8_dot_stored(x, w_q, s_w, out_dtype=None):
    """`x [..., K] @ W` with W stored as FP8 blocks (w_q [K,N] float8, s_w [K/128, N/128]): only
    x is quantised. The stored weight is frozen: its cotangents are zero."""
    return _fp8_dot_stored(*match_varying(x, w_q, s_w), out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_dot_stored(x, w_q, s_w, out_dtype=None):
    return _fp8_dot_stored_fwd(x, w_q, s_w, out_dtype)[0]


def _fp8_dot_stored_fwd(x, w_q, s_w, out_dtype):
    out_dtype = out_dtype or x.dtype
    x_q, s_x = quantize_tiles(x.reshape(-1, x.shape[-1]), axis=1)
    y = _gemm(x_q, s_x, w_q, s_w).reshape(*x.shape[:-1], w_q.shape[1]).astype(out_dtype)
    return y, (w_q, s_w, jnp.zeros((0,) * x.ndim, x.dtype))


def _fp8_dot_stored_bwd(out_dtype, res, dy):
    w_q, s_w, x_proto = res
    dx = _grad_x(dy.reshape(-1, dy.shape[-1]).astype(jnp.float32), w_q, s_w)
    dx = dx.reshape(*dy.shape[:-1], -1).astype(x_proto.dtype)
    return dx, jnp.zeros_like(w_q), jnp.zeros_like(s_w)


_fp8_dot_stored.defvjp(_fp8_dot_stored_fwd, _fp8_dot_stored_bwd)


# ----------------------------------------------------------------------------- grouped (experts)
# kind "ragged": x [M, K] rows sorted by expert, w [E, K, N], aux = group sizes [E] int32.
# kind "tiled":  x [T, m, K] (each tile of m rows belongs to one expert), w [E, K, N],
#                aux = tile_expert [T] int32.
def _grouped(kind: str, x, w, aux, out_dtype=jnp.float32):
    """The grouped product on dequantised operands, f32 accumulation."""
    if kind == "ragged":
        return jax.lax.ragged_dot(x, w, aux, preferred_element_type=out_dtype)
    if kind == "tiled":
        return jnp.einsum("tmk,tkn->tmn", x, w[aux], preferred_element_type=out_dtype)
    raise ValueError(f"fp8 grouped kind={kind!r}: expected ragged or tiled")


def _token_axis(kind: str) -> int:
    return 0 if kind == "ragged" else 1


def grouped_forward(kind, x, w_q, s_w, aux, dot_dtype):
    """The grouped product of dequantised rows x (FP8 values in `dot_dtype`, see `dot_dtype_for`)
    and per-expert 128×128 weight blocks, f32 result. (A `dot_dtype` result measured 6.9 GiB
    more temporaries per chip in the V3 plan on v5p-256 than f32.)"""
    w = dequantize_blocks(w_q, s_w, dot_dtype)
    return _grouped(kind, x.astype(dot_dtype), w, aux)


def _grouped_fwd_core(kind, x, w_q, s_w, aux, dot_dtype):
    x_q, s_x = quantize_tiles(x, axis=-1)
    x_deq = dequantize_tiles(x_q, s_x, axis=-1, dtype=dot_dtype)
    return grouped_forward(kind, x_deq, w_q, s_w, aux, dot_dtype), x_q, s_x


def _grouped_transpose(kind, dy, aux, dot_dtype, *, x=None, w=None, like):
    """The grouped product's transpose at dy: in x (given w) or in w (given x), `like` the other
    operand (its shape and varying mesh axes). Every operand in `dot_dtype`: a mixed-precision
    transpose would upcast the other operand whole (a 7 GiB f32 copy of V3's [262144, 7168]
    expert rows per chip). The product is linear, so the VJP at zero is the transpose."""
    dy = dy.astype(dot_dtype)
    zero = match_varying(jnp.zeros(like.shape, dot_dtype), like)[0]
    if w is not None:
        w = w.astype(dot_dtype)
        return jax.vjp(lambda x_: _grouped(kind, x_, w, aux, dot_dtype), zero)[1](dy)[0]
    x = x.astype(dot_dtype)
    return jax.vjp(lambda w_: _grouped(kind, x, w_, aux, dot_dtype), zero)[1](dy)[0]


def _grouped_grad_x(kind, dy, x_q, w_q, s_w, aux, dot_dtype):
    """dx = the transpose of the grouped product in x, on dy quantised 1×128 along N."""
    q, s = quantize_tiles(dy, axis=-1)
    dy_deq = dequantize_tiles(q, s, axis=-1, dtype=dot_dtype)
    w = dequantize_blocks(w_q, s_w, dot_dtype)
    return _grouped_transpose(kind, dy_deq, aux, dot_dtype, w=w, like=x_q)


def tokens_requantized(kind, x_q, s_x, dot_dtype):
    """The weight gradient's x: the saved 1×128 FP8 rows re-quantised in 128×1 tiles along the
    (sorted) token axis, dequantised to `dot_dtype`. Shared by every GEMM that read the same x."""
    t = _token_axis(kind)
    x = dequantize_tiles(x_q, s_x, axis=-1, dtype=dot_dtype)
    return dequantize_tiles(*quantize_tiles(x, axis=t), axis=t, dtype=dot_dtype)


def _grouped_grad_w(kind, x_t, dy, w_q, aux, dot_dtype):
    """dW = the transpose of the grouped product in w, on x (`tokens_requantized`) and dy
    re-quantised in 128×1 tiles along the token axis."""
    t = _token_axis(kind)
    dy_t = dequantize_tiles(*quantize_tiles(dy, axis=t), axis=t, dtype=dot_dtype)
    return _grouped_transpose(kind, dy_t, aux, dot_dtype, x=x_t, like=w_q)


def dot_dtype_for(dtype):
    """Dequantised operands of the portable path: bf16 stays bf16 (its 8-bit mantissa holds the
    4-bit FP8 mantissa times the scale to 2^-9), anything else f32."""
    return jnp.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.float32


def grouped_backward(kind, dy, x_q, s_x, w_q, s_w, aux, x_dtype, w_dtype, x_t=None):
    """(dx in x_dtype, dW in w_dtype) of the grouped product at the saved FP8 operands; `x_t`:
    `tokens_requantized(kind, x_q, s_x, ...)` when the caller already has it."""
    dt = dot_dtype_for(x_dtype)
    if x_t is None:
        x_t = tokens_requantized(kind, x_q, s_x, dt)
    dx = _grouped_grad_x(kind, dy, x_q, w_q, s_w, aux, dt)
    dw = _grouped_grad_w(kind, x_t, dy, w_q, aux, dt)
    return dx.astype(x_dtype), dw.astype(w_dtype)


def fp8_grouped_dot(kind: str, x, w, aux):
    """Grouped expert matmul in the FP8 recipe (see `_grouped` for the kinds); per-expert
    128×128 weight blocks, 1×128 activation tiles; f32 result."""
    x, w = match_varying(x, w)
    return _fp8_grouped_dot(kind, x, w, aux)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_grouped_dot(kind: str, x, w, aux):
    return _fp8_grouped_fwd(kind, x, w, aux)[0]


def _fp8_grouped_fwd(kind, x, w, aux):
    w_q, s_w = quantize_blocks(w)
    y, x_q, s_x = _grouped_fwd_core(kind, x, w_q, s_w, aux, dot_dtype_for(x.dtype))
    proto = (jnp.zeros((0,) * x.ndim, x.dtype), jnp.zeros((0,) * w.ndim, w.dtype))
    return y, (x_q, s_x, w_q, s_w, aux, proto)


def _fp8_grouped_bwd(kind, res, dy):
    x_q, s_x, w_q, s_w, aux, (x_proto, w_proto) = res
    dx, dw = grouped_backward(kind, dy, x_q, s_x, w_q, s_w, aux, x_proto.dtype, w_proto.dtype)
    return dx, dw, None


_fp8_grouped_dot.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)


def fp8_grouped_dot_stored(kind: str, x, w_q, s_w, aux):
    """`fp8_grouped_dot` with the expert weights stored as FP8 blocks (w_q [E,K,N] float8,
    s_w [E, K/128, N/128]); frozen (zero cotangents)."""
    x, w_q, s_w = match_varying(x, w_q, s_w)
    return _fp8_grouped_dot_stored(kind, x, w_q, s_w, aux)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_grouped_dot_stored(kind: str, x, w_q, s_w, aux):
    return _fp8_grouped_stored_fwd(kind, x, w_q, s_w, aux)[0]


def _fp8_grouped_stored_fwd(kind, x, w_q, s_w, aux):
    y, x_q, s_x = _grouped_fwd_core(kind, x, w_q, s_w, aux, dot_dtype_for(x.dtype))
    return y, (x_q, s_x, w_q, s_w, aux, jnp.zeros((0,) * x.ndim, x.dtype))


def _fp8_grouped_stored_bwd(kind, res, dy):
    x_q, s_x, w_q, s_w, aux, x_proto = res
    dt = dot_dtype_for(x_proto.dtype)
    dx = _grouped_grad_x(kind, dy, x_q, w_q, s_w, aux, dt)
    return dx.astype(x_proto.dtype), jnp.zeros_like(w_q), jnp.zeros_like(s_w), None


_fp8_grouped_dot_stored.defvjp(_fp8_grouped_stored_fwd, _fp8_grouped_stored_bwd)


@jax.custom_vjp
def fp8_swiglu(gate, up):
    """`silu(gate) * up` whose backward keeps only FP8 copies of its inputs (1×128 tiles along
    the last axis) and recomputes from them: the recipe's cached-and-recomputed SwiGLU input."""
    return jax.nn.silu(gate) * up


def _fp8_swiglu_fwd(gate, up):
    return fp8_swiglu(gate, up), (*quantize_tiles(gate), *quantize_tiles(up), gate[..., :0])


def _fp8_swiglu_bwd(res, dh):
    g_q, g_s, u_q, u_s, proto = res
    g, u = dequantize_tiles(g_q, g_s), dequantize_tiles(u_q, u_s)
    sig = jax.nn.sigmoid(g)
    dh = dh.astype(jnp.float32)
    d_gate = dh * u * sig * (1.0 + g * (1.0 - sig))
    return d_gate.astype(proto.dtype), (dh * g * sig).astype(proto.dtype)


fp8_swiglu.defvjp(_fp8_swiglu_fwd, _fp8_swiglu_bwd)


def grouped_matmul(kind: str, x, w, aux, scale_inv=None, fp8: bool = False, dtype=None):
    """One grouped expert matmul, f32 result: FP8 recipe when `fp8`; `w` may be stored FP8
    (float8 with `scale_inv` blocks), used directly under `fp8`, else dequantised to `dtype`."""
    dtype = dtype or x.dtype
    if scale_inv is not None:
        if fp8:
            return fp8_grouped_dot_stored(kind, x, w, scale_inv, aux)
        w = dequantize_weight(w, scale_inv, dtype)
    if fp8:
        return fp8_grouped_dot(kind, x, w, aux)
    return _grouped(kind, x.astype(dtype), w.astype(dtype), aux)


def is_fp8(a) -> bool:
    """True for a float8_e4m3fn array (a stored FP8 weight)."""
    return jnp.dtype(a.dtype) == jnp.dtype(E4M3)


def is_fp4(a) -> bool:
    """True for a float4_e2m1fn array (a stored FP4 expert weight)."""
    return jnp.dtype(a.dtype) == jnp.dtype(E2M1)


def scale_blocks(w) -> tuple[int, int]:
    """(rows, columns) of `w` [..., in, out] that one entry of its `scale_inv` covers: 128x128
    for FP8 blocks, 32x1 for DeepSeek-V4's FP4 groups."""
    return (FP4_GROUP, 1) if is_fp4(w) else (BLOCK, BLOCK)


def num_blocks(n: int) -> int:
    """Number of 128-wide tiles covering n."""
    return math.ceil(n / BLOCK)
