"""RMSNorm, RoPE/YaRN and the attention kernels against hand-worked and float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import deepseek_v3
from dsjax.model.config import ModelConfig
from dsjax.model.layers.attention import attention
from dsjax.model.layers.norms import RMSNorm
from dsjax.model.layers.rope import apply_rope, rope_frequencies, yarn_correction_range
from dsjax.testing import np_attention, rel_err, tiny_config


def test_rmsnorm_matches_formula():
    x = np.random.RandomState(0).randn(2, 3, 16).astype(np.float32)
    w = np.random.RandomState(1).randn(16).astype(np.float32)
    y = RMSNorm(1e-6).apply({"params": {"scale": w}}, jnp.asarray(x))
    x64 = x.astype(np.float64)
    ref = w * x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
    assert rel_err(y, ref) < 1e-6


def test_yarn_range_and_frequencies_v3():
    cfg = ModelConfig(**deepseek_v3.get_config().model)
    assert yarn_correction_range(cfg) == (10, 23)  # docs/spec.md §4
    base = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    f = rope_frequencies(cfg).astype(np.float64)
    np.testing.assert_allclose(f[:11], base[:11], rtol=1e-6)  # pairs <= 10 keep θ
    np.testing.assert_allclose(f[23:], base[23:] / 40, rtol=1e-6)  # pairs >= 23 divided by 40
    ramp = (16 - 10) / 13
    assert f[16] == pytest.approx(base[16] * ((1 - ramp) + ramp / 40), rel=1e-6)


def test_rope_rotates_interleaved_pairs():
    cfg = tiny_config()
    rng = np.random.RandomState(0)
    x = rng.randn(2, 5, 3, 8).astype(np.float32)
    pos = rng.randint(0, 200, (2, 5))
    y = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg))
    # Independent reference: each (2i, 2i+1) pair is a complex number turned by e^{i pos θ_i}.
    z = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2]
    phase = np.exp(1j * pos[..., None, None] * rope_frequencies(cfg).astype(np.float64))
    zr = z * phase * cfg.rope_cos_sin_scale
    ref = np.stack([zr.real, zr.imag], -1).reshape(x.shape)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize(
    "impl,chunk", [("reference", 0), ("chunked", 4), ("chunked", 7), ("chunked", 64)]
)
@pytest.mark.parametrize("groups,heads", [(3, 1), (1, 3)])
def test_attention_impls_match_float64(impl, chunk, groups, heads):
    rng = np.random.RandomState(1)
    B, T, K, V = 2, 13, 12, 5
    q = rng.randn(B, T, groups, heads, K).astype(np.float32)
    k = rng.randn(B, T, groups, K).astype(np.float32)
    v = rng.randn(B, T, groups, V).astype(np.float32)
    idx = np.broadcast_to(np.arange(T), (B, T))
    seg = np.array([[1] * 6 + [2] * 7, [1] * 13])
    out = attention(
        *(jnp.asarray(a) for a in (q, k, v)),
        q_idx_BT=jnp.asarray(idx),
        k_idx_BS=jnp.asarray(idx),
        q_seg_BT=jnp.asarray(seg),
        k_seg_BS=jnp.asarray(seg),
        scale=0.3,
        impl=impl,
        chunk=chunk or 512,
    )
    ref = np_attention(q, k, v, idx, idx, seg, seg, 0.3)
    assert out.shape == (B, T, groups, heads, V)
    assert rel_err(out, ref) < 1e-5


def test_chunked_attention_gradients_match_reference():
    rng = np.random.RandomState(2)
    q = jnp.asarray(rng.randn(1, 9, 2, 1, 6).astype(np.float32))
    k = jnp.asarray(rng.randn(1, 9, 2, 6).astype(np.float32))
    v = jnp.asarray(rng.randn(1, 9, 2, 4).astype(np.float32))
    idx = jnp.arange(9)[None]

    def loss(impl, q, k, v):
        o = attention(q, k, v, q_idx_BT=idx, k_idx_BS=idx, scale=0.5, impl=impl, chunk=4)
        return (o * jnp.arange(o.size).reshape(o.shape)).sum()

    g_ref = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
    g_chk = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_chk, g_ref, strict=True):
        assert rel_err(a, b) < 1e-5
