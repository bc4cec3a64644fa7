"""Chunk-skipping attention against a float64 reference (values, gradients, computed pair counts),
and the cuDNN path's selection rules (it cannot run on CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model.layers.attention import attention, chunk_schedule, chunked_attention
from dsjax.testing import np_attention, rel_err


def _inputs(seed, B, T, S, G=2, H=2, K=6, V=5):
    rng = np.random.RandomState(seed)
    q = rng.randn(B, T, G, H, K).astype(np.float32)
    k = rng.randn(B, S, G, K).astype(np.float32)
    v = rng.randn(B, S, G, V).astype(np.float32)
    return q, k, v


@jax.jit
def _skip_and_full(q, k, v, q_idx, k_idx, q_seg, k_seg):
    kw = dict(q_idx_BT=q_idx, k_idx_BS=k_idx, q_seg_BT=q_seg, k_seg_BS=k_seg, scale=0.4, chunk=4)
    out, pairs = chunked_attention(q, k, v, return_pairs=True, **kw)
    full, all_pairs = chunked_attention(q, k, v, skip=False, return_pairs=True, **kw)
    return out, pairs, full, all_pairs


def _check(q, k, v, q_idx, k_idx, seg_q, seg_k, pairs_expected, pairs_all):
    out, pairs, full, all_pairs = _skip_and_full(
        *map(jnp.asarray, (q, k, v, q_idx, k_idx, seg_q, seg_k))
    )
    ref = np_attention(q, k, v, q_idx, k_idx, seg_q, seg_k, 0.4)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5
    assert rel_err(full, ref) < 1e-5
    assert int(pairs) == pairs_expected
    assert int(all_pairs) == pairs_all


def test_causal_skip_uneven_length_matches_float64_and_halves_pairs():
    # T = 21, chunk 4: 6 query chunks x 6 key chunks; causal needs the 21 on/below the diagonal.
    B, T = 2, 21
    q, k, v = _inputs(0, B, T, T)
    idx = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    _check(q, k, v, idx, idx, seg, seg, pairs_expected=21, pairs_all=36)


def test_segment_skip_matches_float64():
    # Two packed documents of 12 tokens: query chunks 3-5 skip key chunks 0-2 too (21 - 9).
    B, T = 2, 24
    q, k, v = _inputs(1, B, T, T)
    idx = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    seg = np.broadcast_to(np.repeat([1, 2], 12), (B, T)).astype(np.int32)
    _check(q, k, v, idx, idx, seg, seg, pairs_expected=12, pairs_all=36)
    # Uneven documents (row 0 splits mid-chunk): only the pairs with no shared segment skip.
    seg = np.array([[1] * 9 + [2] * 15, [3] * 5 + [4] * 19], np.int32)
    idx_j, seg_j = jnp.asarray(idx), jnp.asarray(seg)
    sched = np.asarray(chunk_schedule(idx_j, idx_j, seg_j, seg_j, chunk=4))
    # q chunks 3-5 hold segment 2 (row 0) / 4 (row 1); key chunk 0 only segment 1 / 3.
    assert sched.sum() == 21 - 3 and not sched[3:, 0].any()
    _check(q, k, v, idx, idx, seg, seg, pairs_expected=18, pairs_all=36)


def test_decode_queries_skip_cache_slots_after_their_position():
    # Two new tokens per row at positions (5, 6) and (9, 10) over a 24-slot cache: key chunks
    # 0..2 (slots 0..11) are needed by row 1, chunks 3..5 by nobody.
    q, k, v = _inputs(2, 2, 2, 24, G=1, H=3)
    q_idx = np.array([[5, 6], [9, 10]], np.int32)
    k_idx = np.broadcast_to(np.arange(24), (2, 24)).astype(np.int32)
    out, pairs = jax.jit(
        lambda *a: chunked_attention(
            *a[:3], q_idx_BT=a[3], k_idx_BS=a[4], scale=0.4, chunk=4, return_pairs=True
        )
    )(*map(jnp.asarray, (q, k, v, q_idx, k_idx)))
    ref = np_attention(q, k, v, q_idx, k_idx, None, None, 0.4)
    assert rel_err(out, ref) < 1e-5
    assert int(pairs) == 3


def test_long_causal_schedule_is_about_half():
    T = 1000  # 16 chunks of 64 (the last one partial)
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, T))
    sched = np.asarray(chunk_schedule(idx, idx, chunk=64))
    assert sched.shape == (16, 16)
    assert sched.sum() == 16 * 17 // 2
    assert np.array_equal(sched, np.tril(np.ones((16, 16), bool)))


def test_chunk_skip_gradients_match_reference():
    B, T = 2, 13
    q, k, v = (jnp.asarray(a) for a in _inputs(3, B, T, T))
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.asarray(np.array([[1] * 6 + [2] * 7, [1] * 13], np.int32))
    w = jnp.asarray(np.random.RandomState(4).randn(B, T, 2, 2, 5).astype(np.float32))

    def loss(impl, q, k, v):
        o = attention(
            q,
            k,
            v,
            q_idx_BT=idx,
            k_idx_BS=idx,
            q_seg_BT=seg,
            k_seg_BS=seg,
            scale=0.4,
            impl=impl,
            chunk=4,
        )
        return (o * w).sum()

    grads = jax.jit(
        lambda q, k, v: [
            jax.grad(lambda *a, i=i: loss(i, *a), argnums=(0, 1, 2))(q, k, v)
            for i in ("reference", "chunked")
        ]
    )(q, k, v)
    for a, b in zip(grads[1], grads[0], strict=True):
        assert rel_err(a, b) < 1e-5


def test_cudnn_selection_rules_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU fallback")
    q = jnp.zeros((1, 8, 2, 1, 16), jnp.bfloat16)
    k = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    v = jnp.ones((1, 8, 2, 8), jnp.bfloat16)
    idx = jnp.arange(8, dtype=jnp.int32)[None]
    kw = dict(q_idx_BT=idx, k_idx_BS=idx, scale=1.0, causal=True)
    with pytest.raises(ValueError, match="cudnn.*cannot run.*backend"):
        attention(q, k, v, impl="cudnn", **kw)
    out = attention(q, k, v, impl="auto", **kw)  # falls back: uniform weights over ones
    assert out.shape == (1, 8, 2, 1, 8) and bool(jnp.all(out == 1))
    with pytest.raises(ValueError, match="impl='flash'"):
        attention(q, k, v, impl="flash", **kw)
    with pytest.raises(ValueError, match="q_seg_BT and k_seg_BS"):
        attention(q, k, v, q_seg_BT=idx, **kw)


def test_chunked_and_splash_in_remat_scanned_model_match_reference_grads():
    """The skipping kernel (lax.cond inside scans) and splash (Pallas interpreter; T = 12 padded
    to 128) under nn.scan + nn.remat, packed segments."""
    from flax import linen as nn

    from dsjax.model.transformer import Transformer, abstract_variables
    from dsjax.testing import tiny_config

    tokens = jnp.asarray(np.random.RandomState(5).randint(0, 64, (2, 12)))
    seg = jnp.asarray(np.array([[1] * 5 + [2] * 7, [1] * 12], np.int32))
    cfgs = [
        tiny_config(
            num_hidden_layers=1,
            num_mtp_layers=0,
            remat="full",
            attention_impl=impl,
            attention_chunk=4,
        )
        for impl in ("reference", "chunked", "splash")
    ]
    rng = np.random.default_rng(3)
    variables = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
        nn.unbox(abstract_variables(cfgs[0])),
    )

    def loss(cfg, params):
        out = Transformer(cfg).apply({**variables, "params": params}, tokens, segment_ids_BT=seg)
        return -jax.nn.log_softmax(out.logits).mean()

    grads = jax.jit(lambda p: [jax.value_and_grad(functools.partial(loss, c))(p) for c in cfgs])(
        variables["params"]
    )
    (l_ref, g_ref), *others = grads
    for l_chk, g_chk in others:
        assert abs(float(l_ref) - float(l_chk)) < 1e-6
        for a, b in zip(jax.tree.leaves(g_chk), jax.tree.leaves(g_ref), strict=True):
            assert rel_err(a, b) < 1e-4


# ====================================================================== splash (Pallas TPU)
# On CPU the splash kernels run in Pallas' interpreter (the same kernel code, not a reference).
def _splash_inputs(seed, B, T, G, H, K=16, V=8):
    q, k, v = _inputs(seed, B, T, T, G=G, H=H, K=K, V=V)
    idx = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    return q, k, v, idx


@pytest.fixture(scope="module")
def splash_vs_reference():
    """T = 300 -> padded to 384 = 3 blocks of 128; G = 2 key/value heads x H = 2 query heads;
    two rows of packed documents (row 0: three documents split mid-block, row 1: one)."""
    from dsjax.model.kernels import splash

    B, T = 2, 300
    q, k, v, idx = _splash_inputs(6, B, T, G=2, H=2)
    seg = np.array([[1] * 100 + [2] * 57 + [3] * 143, [7] * 300], np.int32)
    w = np.random.RandomState(7).randn(B, T, 2, 2, 8).astype(np.float32)
    assert splash.padded_length(T) == 384 and splash.block_size(384) == 128

    def loss(fn, q, k, v):
        return (fn(q, k, v) * w).sum()

    def splash_fn(q, k, v):
        return attention(q, k, v, q_idx_BT=idx, k_idx_BS=idx, q_seg_BT=seg, k_seg_BS=seg,
                         scale=0.4, impl="splash", causal=True)  # fmt: skip

    def ref_fn(q, k, v):
        return attention(q, k, v, q_idx_BT=idx, k_idx_BS=idx, q_seg_BT=seg, k_seg_BS=seg,
                         scale=0.4, impl="reference")  # fmt: skip

    @jax.jit
    def run(q, k, v):
        def grad(fn):
            return jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2))(q, k, v)

        return splash_fn(q, k, v), grad(splash_fn), grad(ref_fn)

    out, g_splash, g_ref = run(*map(jnp.asarray, (q, k, v)))
    ref = np_attention(q, k, v, idx, idx, seg, seg, 0.4)
    return out, ref, g_splash, g_ref


def test_splash_matches_float64_with_segments_and_padding(splash_vs_reference):
    out, ref, _, _ = splash_vs_reference
    assert out.shape == ref.shape == (2, 300, 2, 2, 8)
    assert rel_err(out, ref) < 1e-5


def test_splash_gradients_match_reference(splash_vs_reference):
    _, _, g_splash, g_ref = splash_vs_reference
    for name, a, b in zip("qkv", g_splash, g_ref, strict=True):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-5, name


def test_splash_without_segments_bfloat16_and_explicit_block():
    """No segment ids, 192/128-style unequal head dims, bf16, blocks of 128 over T = 256."""
    from dsjax.model.kernels.splash import splash_attention

    B, T = 1, 256
    q, k, v, idx = _splash_inputs(8, B, T, G=2, H=1, K=24, V=16)
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, scale=0.3, block=128))(
        *(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    )
    assert out.dtype == jnp.bfloat16
    r = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731
    ref = np_attention(r(q), r(k), r(v), idx, idx, None, None, 0.3)
    assert rel_err(out, ref) < 2e-2


def test_splash_selection_rules(monkeypatch):
    """splash needs causal=True; "auto" picks it only for programs built for TPU (decided from
    the target platform, not the host backend) and T >= 128; impl="splash" falls back with a
    warning where it cannot run."""
    from dsjax.model.kernels import splash

    def uses_pallas(T, impl, causal=True, seg=False):
        q, k, v, idx = _splash_inputs(9, 1, T, G=2, H=1)
        s = jnp.ones((1, T), jnp.int32) if seg else None
        jaxpr = jax.make_jaxpr(
            lambda q, k, v: attention(
                q,
                k,
                v,
                q_idx_BT=idx,
                k_idx_BS=idx,
                q_seg_BT=s,
                k_seg_BS=s,
                scale=1.0,
                impl=impl,
                causal=causal,
            )  # fmt: skip
        )(q, k, v)
        return "pallas_call" in str(jaxpr)

    assert not uses_pallas(256, "auto")  # built for CPU: no splash
    assert uses_pallas(256, "splash", seg=True)  # explicit: Pallas interpreter on CPU
    with pytest.warns(UserWarning, match="splash.*falls back.*causal=True"):
        assert not uses_pallas(256, "splash", causal=False)
    monkeypatch.setattr(splash, "target_platform", lambda: "tpu")
    assert uses_pallas(256, "auto", seg=True) and uses_pallas(130, "auto")
    assert not uses_pallas(64, "auto")  # short: padding to 128 would dominate
    assert not uses_pallas(256, "auto", causal=False)
    q, k, v, idx = _splash_inputs(9, 1, 256, G=2, H=1)
    assert splash.unusable_reason(q, k[:, :128], v[:, :128], causal=True).startswith(
        "splash is self-attention only"
    )
    monkeypatch.setattr(splash, "_target_device", lambda: ("tpu", "TPU v3"))
    assert not uses_pallas(256, "auto")  # Mosaic cannot build the kernel for TPU v2/v3
    assert "TPU v4 or later" in splash.unusable_reason(q, k, v, causal=True)


def test_splash_under_a_mesh_matches_reference():
    """Under a (data=2, tensor=2) mesh of fake CPU devices splash runs in shard_map (batch over
    data, heads over tensor): values and gradients equal the reference's."""
    from dsjax.model import sharding

    B, T = 2, 128
    q, k, v, idx = _splash_inputs(10, B, T, G=2, H=1)
    seg = np.array([[1] * 50 + [2] * 78, [3] * 128], np.int32)
    mesh = sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])

    def f(impl, q, k, v):
        o = attention(q, k, v, q_idx_BT=idx, k_idx_BS=idx, q_seg_BT=seg, k_seg_BS=seg,
                      scale=0.5, impl=impl, causal=True)  # fmt: skip
        return (o * o).sum(), o

    with jax.set_mesh(mesh):
        run = jax.jit(
            lambda q, k, v: [
                jax.value_and_grad(functools.partial(f, i), argnums=(0, 1, 2), has_aux=True)(
                    q, k, v
                )
                for i in ("splash", "reference")
            ]
        )
        text = run.lower(*map(jnp.asarray, (q, k, v))).as_text()
        ((_, o_s), g_s), ((_, o_r), g_r) = run(*map(jnp.asarray, (q, k, v)))
    assert "shard_map" in text or "sdy.manual_computation" in text
    assert rel_err(o_s, o_r) < 1e-5
    for a, b in zip(g_s, g_r, strict=True):
        assert rel_err(a, b) < 1e-5


needs_libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason="libtpu not installed (pip install -r requirements-tpu.txt)",
)


@needs_libtpu
def test_splash_compiles_for_v5p_with_mosaic_kernels():
    """XLA:TPU (libtpu, abstract v5p:2x2x1 chips) compiles splash forward + backward at V3's
    head dims (q/k 192, v 128, bf16, packed segments): three Mosaic custom calls (fwd, dq, dkv)."""
    from dsjax.model import sharding
    from dsjax.model.kernels.splash import splash_attention
    from dsjax.plan import planner as plan

    target = plan.make_target("v5p:2x2x1")
    mesh = sharding.make_mesh(data=-1, devices=target.devices)
    B, T, G = 4, 256, 2

    def loss(q, k, v, seg):
        o = splash_attention(q, k, v, q_seg_BT=seg, k_seg_BS=seg, scale=0.1)
        return o.astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        bs = functools.partial(sharding.batch_sharding, mesh)
        args = (
            jax.ShapeDtypeStruct((B, T, G, 1, 192), jnp.bfloat16, sharding=bs(5)),
            jax.ShapeDtypeStruct((B, T, G, 192), jnp.bfloat16, sharding=bs(4)),
            jax.ShapeDtypeStruct((B, T, G, 128), jnp.bfloat16, sharding=bs(4)),
            jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bs(2)),
        )
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    calls = [line for line in text.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    names = sorted(line.split("=")[0].strip().lstrip("%").rsplit(".", 1)[0] for line in calls)
    assert names == [
        "splash_mha_dkv_segmented_no_residuals",
        "splash_mha_dq_segmented_no_residuals",
        "splash_mha_fwd_segmented_residuals",
    ], names
