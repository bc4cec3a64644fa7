"""Chunk-skipping attention against a float64 reference (values, gradients, computed pair counts),
and the cuDNN path's selection rules (it cannot run on CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.layers.attention import attention, chunk_schedule, chunked_attention
from tests.helpers import np_attention, rel_err


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


def test_chunked_in_remat_scanned_model_matches_reference_grads():
    """The skipping kernel (lax.cond inside scans) under nn.scan + nn.remat, packed segments."""
    from flax import linen as nn

    from dsjax.model import Transformer, abstract_variables
    from tests.helpers import tiny_config

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
        for impl in ("reference", "chunked")
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
    (l_ref, g_ref), (l_chk, g_chk) = grads
    assert abs(float(l_ref) - float(l_chk)) < 1e-6
    for a, b in zip(jax.tree.leaves(g_chk), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, b) < 1e-4
