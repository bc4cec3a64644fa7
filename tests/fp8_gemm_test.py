"""Block-scaled FP8 GEMM (dsjax/model/kernels/fp8_gemm.py): the Pallas kernel in interpret mode and the
XLA reference against float64 NumPy, both scale layouts, padding, and the shape/dtype errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model.kernels import fp8_gemm

E4M3 = jnp.float8_e4m3fn


def _numpy_block_scaled(a_q, s_a, b_q, s_b):
    """float64 NumPy: out = sum_kb (a[:, kb] @ b[kb, :]) * s_a[:, kb, None] * s_b[kb, n]."""
    a = np.asarray(a_q.astype(jnp.float32), np.float64)
    b = np.asarray(b_q.astype(jnp.float32), np.float64)
    s_a = np.asarray(s_a, np.float64)
    s_b = np.asarray(s_b, np.float64)
    K, N = b.shape
    if s_b.shape[1] != N:  # 128x128 blocks -> one scale per column
        s_b = np.repeat(s_b, 128, axis=1)[:, :N]
    out = np.zeros((a.shape[0], N))
    for kb in range(s_a.shape[1]):
        ks = slice(kb * 128, min((kb + 1) * 128, K))
        out += (a[:, ks] @ b[ks, :]) * s_a[:, kb, None] * s_b[kb][None, :]
    return out


def _operands(seed, M, K, N, per_column):
    """Random FP8 values over the full E4M3 range and random positive scales spanning 2^-8..2^8."""
    rng = np.random.default_rng(seed)
    Kb, Nb = -(-K // 128), -(-N // 128)
    a_q = jnp.asarray(rng.normal(size=(M, K)) * 40.0, jnp.float32).astype(E4M3)
    b_q = jnp.asarray(rng.normal(size=(K, N)) * 40.0, jnp.float32).astype(E4M3)
    s_a = jnp.asarray(2.0 ** rng.uniform(-8, 8, size=(M, Kb)), jnp.float32)
    s_b = jnp.asarray(2.0 ** rng.uniform(-8, 8, size=(Kb, N if per_column else Nb)), jnp.float32)
    return a_q, s_a, b_q, s_b


# The Pallas interpreter runs the kernel's FP8 dots as ordinary XLA dots: exact on CPU (the CI
# backend), but on a GPU backend XLA sends them to cuBLASLt FP8, whose accumulation is ~1e-4 off.
INTERPRET_TOL = 1e-6 if jax.default_backend() == "cpu" else 1e-3


def _rel_err(x, ref):
    return float(np.abs(np.asarray(x, np.float64) - ref).max() / np.abs(ref).max())


# (M, K, N, per_column, kernel kwargs): exact-multiple shapes, both scale layouts (block scales read
# per tile when block_n | 128, expanded per column otherwise), non-multiples (padding in M, N and K
# with a ragged last scale tile), block_k < 128, both b layouts and a partial last tile group.
CASES = [
    (32, 256, 256, False, dict(block_m=16, block_n=256, b_k_major=False)),
    (32, 256, 128, True, dict(block_m=32, block_n=64, block_k=64, b_k_major=False)),
    (40, 300, 200, False, dict(block_m=16, block_n=128, b_k_major=True, group_m=2)),
    (24, 200, 72, True, dict(block_m=16, block_n=32)),
]


@pytest.mark.parametrize("M,K,N,per_column,kw", CASES)
def test_kernel_and_reference_match_float64(M, K, N, per_column, kw):
    a_q, s_a, b_q, s_b = _operands(M * 7 + N, M, K, N, per_column)
    want = _numpy_block_scaled(a_q, s_a, b_q, s_b)
    ref = fp8_gemm.block_scaled_matmul_reference(a_q, s_a, b_q, s_b)
    got = fp8_gemm.block_scaled_matmul(a_q, s_a, b_q, s_b, interpret=True, **kw)
    assert got.shape == ref.shape == (M, N) and got.dtype == jnp.float32
    # FP8 products are exact in f32; what is left is f32 summation/scaling rounding.
    assert _rel_err(ref, want) < 1e-6
    assert _rel_err(got, want) < INTERPRET_TOL


def test_scales_are_per_block_not_global():
    """A 1x128 tile scale must touch only its own rows/K-block, a 128x128 scale only its block."""
    M, K, N = 16, 256, 256
    a_q, s_a, b_q, s_b = _operands(3, M, K, N, per_column=False)
    kw = dict(interpret=True, block_m=16, block_n=32)  # four output tiles per 128-column block
    base = np.asarray(fp8_gemm.block_scaled_matmul(a_q, s_a, b_q, s_b, **kw))
    s_b2 = s_b.at[1, 0].multiply(1000.0)  # K block 1, columns 0..127
    got = np.asarray(fp8_gemm.block_scaled_matmul(a_q, s_a, b_q, s_b2, **kw))
    np.testing.assert_array_equal(got[:, 128:], base[:, 128:])
    assert np.abs(got[:, :128] - base[:, :128]).max() > 0
    assert _rel_err(got, _numpy_block_scaled(a_q, s_a, b_q, s_b2)) < INTERPRET_TOL


def test_bf16_output_and_auto_dispatch():
    a_q, s_a, b_q, s_b = _operands(5, 16, 128, 128, per_column=False)
    want = _numpy_block_scaled(a_q, s_a, b_q, s_b)
    got = fp8_gemm.block_scaled_matmul(
        a_q, s_a, b_q, s_b, out_dtype=jnp.bfloat16, interpret=True, block_m=16
    )
    assert got.dtype == jnp.bfloat16 and _rel_err(got, want) < 1e-2
    # interpret=None: native kernel where supported(), the XLA reference elsewhere (CPU here).
    auto = fp8_gemm.block_scaled_matmul(a_q, s_a, b_q, s_b)
    assert _rel_err(auto, want) < 1e-6


def test_errors_name_the_rule():
    a_q, s_a, b_q, s_b = _operands(1, 16, 256, 128, per_column=False)
    f = fp8_gemm.block_scaled_matmul
    with pytest.raises(ValueError, match="a_q must be float8_e4m3fn"):
        f(a_q.astype(jnp.bfloat16), s_a, b_q, s_b)
    with pytest.raises(ValueError, match="contraction sizes differ"):
        f(a_q, s_a, b_q[:128], s_b)
    with pytest.raises(ValueError, match=r"s_a must be \[M, ceil\(K/128\)\]"):
        f(a_q, s_a[:, :1], b_q, s_b)
    with pytest.raises(ValueError, match="s_b must be"):
        f(a_q, s_a, b_q, s_b[:1])
    with pytest.raises(ValueError, match="block_k must divide"):
        f(a_q, s_a, b_q, s_b, interpret=True, block_k=256)
    with pytest.raises(ValueError, match="group_m must be >= 1"):
        f(a_q, s_a, b_q, s_b, interpret=True, group_m=0)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        f(a_q, s_a, b_q, s_b, interpret=True, block_m=48)


@pytest.mark.skipif(not fp8_gemm.supported(), reason="needs an NVIDIA GPU with sm >= 8.9")
@pytest.mark.parametrize("per_column", [False, True])
def test_native_gpu_kernel_matches_reference(per_column):
    """Runs only where the kernel is native (e.g. JAX_PLATFORMS=cuda on an H100)."""
    M, K, N = 200, 640, 320
    a_q, s_a, b_q, s_b = _operands(11, M, K, N, per_column)
    want = _numpy_block_scaled(a_q, s_a, b_q, s_b)
    for kw in (dict(), dict(b_k_major=False, block_m=128, num_warps=8)):
        got = fp8_gemm.block_scaled_matmul(a_q, s_a, b_q, s_b, interpret=False, **kw)
        assert _rel_err(got, want) < 1e-6, kw
    got16 = fp8_gemm.block_scaled_matmul(a_q, s_a, b_q, s_b, out_dtype=jnp.bfloat16)
    assert got16.dtype == jnp.bfloat16 and _rel_err(got16, want) < 1e-2
