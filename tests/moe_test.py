"""Routing against float64 NumPy references; dropless ragged_dot dispatch against a dense one."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsjax.model.layers.moe import balance_stats, dispatch_combine, grouped_swiglu, route
from dsjax.testing import rel_err, tiny_config


def np_route(logits, bias, cfg):
    """float64 reference of docs/spec.md §5 (V3 sigmoid/noaux_tc, V2 softmax greedy/group-limit)."""
    x = logits.astype(np.float64)
    if cfg.scoring_func == "sigmoid":
        s = 1 / (1 + np.exp(-x))
    else:
        e = np.exp(x - x.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    choice = s + bias if cfg.topk_method == "noaux_tc" else s.copy()
    N, E = s.shape
    G = cfg.n_group
    allowed = np.ones((N, E), bool)
    if G > 1 and cfg.topk_method != "greedy":
        g = choice.reshape(N, G, E // G)
        if cfg.topk_method == "noaux_tc":
            gs = np.sort(g, -1)[..., -2:].sum(-1)
        else:
            gs = g.max(-1)
        keep = np.argsort(-gs, -1, kind="stable")[:, : cfg.topk_group]
        allowed = np.zeros((N, G), bool)
        np.put_along_axis(allowed, keep, True, -1)
        allowed = np.repeat(allowed, E // G, -1)
    choice = np.where(allowed, choice, -np.inf)
    idx = np.argsort(-choice, -1, kind="stable")[:, : cfg.num_experts_per_tok]
    w = np.take_along_axis(s, idx, -1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor, s, allowed


def _check_route(cfg, seed):
    rng = np.random.RandomState(seed)
    logits = rng.randn(64, cfg.n_routed_experts).astype(np.float32) * 2
    bias = rng.uniform(-0.2, 0.3, cfg.n_routed_experts).astype(np.float32)
    idx, w, s = route(jnp.asarray(logits), jnp.asarray(bias), cfg)
    ridx, rw, rs, allowed = np_route(logits, bias, cfg)
    # Compare as sets per token (top_k order among exact ties is irrelevant).
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(ridx, -1))
    order = np.argsort(np.asarray(idx), -1)
    rorder = np.argsort(ridx, -1)
    got = np.take_along_axis(np.asarray(w), order, -1)
    want = np.take_along_axis(rw, rorder, -1)
    assert rel_err(got, want) < 1e-5
    assert rel_err(s, rs) < 1e-5
    assert np.take_along_axis(allowed, np.asarray(idx), -1).all()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(
            scoring_func="softmax",
            topk_method="greedy",
            norm_topk_prob=False,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
        ),
        dict(
            scoring_func="softmax",
            topk_method="greedy",
            norm_topk_prob=True,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
        ),
        dict(
            scoring_func="softmax",
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,
            n_routed_experts=16,
            num_experts_per_tok=3,
        ),
        dict(
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            norm_topk_prob=True,
            n_group=4,
            topk_group=2,
            n_routed_experts=16,
            num_experts_per_tok=4,
        ),
    ],
)
def test_router_matches_float64_reference(overrides):
    _check_route(tiny_config(**overrides), seed=0)


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4, 8]),
    per_group=st.integers(2, 6),
    data=st.data(),
)
def test_selected_experts_lie_in_allowed_groups(groups, per_group, data):
    topk_group = data.draw(st.integers(1, groups))
    k = data.draw(st.integers(1, topk_group * per_group))
    method = data.draw(st.sampled_from(["noaux_tc", "group_limited_greedy"]))
    cfg = tiny_config(
        n_routed_experts=groups * per_group,
        n_group=groups,
        topk_group=topk_group,
        num_experts_per_tok=k,
        topk_method=method,
        scoring_func="sigmoid" if method == "noaux_tc" else "softmax",
        norm_topk_prob=data.draw(st.booleans()),
    )
    _check_route(cfg, seed=data.draw(st.integers(0, 1000)))


@pytest.mark.parametrize(
    "impl,tile", [("ragged_dot", 0), ("tiled", 4), ("tiled", 128), ("looped", 0)]
)
def test_grouped_dispatch_equals_dense_masked_reference(impl, tile):
    rng = np.random.RandomState(0)
    N, D, F, E, K = 53, 12, 8, 6, 2  # 106 rows: enough per expert for "looped" (moe._few_rows)
    x = rng.randn(N, D).astype(np.float32)
    wg, wu = rng.randn(2, E, D, F).astype(np.float32) * 0.3
    wd = rng.randn(E, F, D).astype(np.float32) * 0.3
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.int32)
    w = rng.rand(N, K).astype(np.float32)

    def fn(xs, gs):
        return grouped_swiglu(
            xs, gs, jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd), impl, tile or 128
        )

    out = dispatch_combine(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), E, fn)
    # Dense reference: every expert on every token, masked by the routing weights (float64).
    x64 = x.astype(np.float64)
    g = np.einsum("nd,edf->enf", x64, wg)
    u = np.einsum("nd,edf->enf", x64, wu)
    y = np.einsum("enf,efd->end", g / (1 + np.exp(-g)) * u, wd)
    dense_w = np.zeros((N, E))
    np.put_along_axis(dense_w, idx, w, -1)
    ref = np.einsum("end,ne->nd", y, dense_w)
    assert rel_err(out, ref) < 1e-5


def test_counts_and_balance_loss():
    rng = np.random.RandomState(3)
    B, T, K, E = 2, 5, 2, 4
    idx = np.stack(
        [np.stack([rng.choice(E, K, replace=False) for _ in range(T)]) for _ in range(B)]
    )
    scores = rng.rand(B, T, E)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    counts, loss = balance_stats(jnp.asarray(idx), jnp.asarray(scores), jnp.asarray(valid), E)
    assert float(counts.sum()) == valid.sum() * K
    # Hand formula per sequence over its valid tokens.
    per_seq = []
    for b in range(B):
        n = valid[b].sum()
        f = np.zeros(E)
        for t in range(T):
            if valid[b, t]:
                f[idx[b, t]] += 1
        f *= E / (K * n)
        p = (scores[b] / scores[b].sum(-1, keepdims=True))[valid[b]].mean(0)
        per_seq.append((f * p).sum())
    assert float(loss) == pytest.approx(np.mean(per_seq), rel=1e-5)


def test_tiled_dispatch_combine_equals_sort_then_pad_with_gradients():
    """The gather-only tiled path (custom VJPs) against autodiff of dispatch_combine +
    grouped_swiglu(tiled): outputs and gradients of x, routing weights and all expert weights,
    with an expert that receives no token and uneven loads."""
    import jax

    from dsjax.model.layers.moe import tiled_dispatch_combine

    rng = np.random.default_rng(3)
    N, K, E, D, F, tile = 13, 3, 5, 8, 6, 4
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    idx = jnp.asarray(rng.choice([0, 1, 1, 1, 3, 4], (N, K)), jnp.int32)  # expert 2 unused
    w = jnp.asarray(rng.uniform(0.1, 1, (N, K)), jnp.float32)
    ws = [
        jnp.asarray(rng.standard_normal(s) / 3, jnp.float32) for s in [(E, D, F)] * 2 + [(E, F, D)]
    ]
    cot = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)

    def ref(x, w, g, u, d):
        fn = lambda xs, gs: grouped_swiglu(xs, gs, g, u, d, "tiled", tile)  # noqa: E731
        return (dispatch_combine(x, idx, w, E, fn) * cot).sum()

    def new(x, w, g, u, d):
        return (tiled_dispatch_combine(x, idx, w, g, u, d, tile) * cot).sum()

    a = jax.value_and_grad(ref, argnums=(0, 1, 2, 3, 4))(x, w, *ws)
    b = jax.value_and_grad(new, argnums=(0, 1, 2, 3, 4))(x, w, *ws)
    assert rel_err(b[0], a[0]) < 1e-6
    for ga, gb in zip(a[1], b[1], strict=True):
        assert rel_err(gb, ga) < 1e-5


def test_tile_rows_shrink_for_decode_sized_batches():
    """Few rows (decode) get small tiles so the E reserved partial tiles stay cheap; training
    sizes keep the configured tile."""
    from dsjax.model.layers.moe import tile_rows

    assert tile_rows(128, 32, 16) == 8  # batch-8 decode, top-4 of 16 experts
    assert tile_rows(128, 512, 16) == 32
    assert tile_rows(128, 8192, 16) == 128  # issue 8's training step: unchanged
    assert tile_rows(128, 4, 16) == 4 and tile_rows(128, 3, 8) == 3  # never above M


@pytest.mark.parametrize(
    "sizes,M",
    [
        ([540, 512, 0, 1, 1033, 17, 31, 16, 32, 511, 513], 3300),  # every chunk size, padding rows
        ([0, 0, 37, 1, 0, 2, 15, 16, 17, 0, 0, 0, 3, 0, 0, 9], 100),  # past the last row: clamped
        ([2] * 16, 32),  # decode-sized: all chunks masked
        ([1, 0, 3, 2], 8),  # fewer rows than the smallest chunk
        ([0, 600, 0], 600),  # one expert takes every row
    ],
)
def test_looped_matmul_equals_ragged_dot_with_gradients(sizes, M):
    """The CPU's loop of 2-D GEMMs (`grouped_loop.looped_matmul`, hand-written VJP) against
    `jax.lax.ragged_dot` under autodiff: output (rows past the groups zero), dX and dW."""
    import jax

    from dsjax.model.layers.grouped_loop import looped_matmul

    rng = np.random.default_rng(0)
    E, K, N = len(sizes), 24, 12
    gs = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((E, K, N)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    valid = (jnp.arange(M) < sum(sizes))[:, None]

    def ref(x, w):
        return jnp.where(valid, jax.lax.ragged_dot(x, w, gs), 0)

    assert rel_err(jax.jit(looped_matmul)(x, w, gs), ref(x, w)) < 1e-6
    a = jax.grad(lambda x, w: (ref(x, w) * cot).sum(), (0, 1))(x, w)
    b = jax.jit(jax.grad(lambda x, w: (looped_matmul(x, w, gs) * cot).sum(), (0, 1)))(x, w)
    for ga, gb in zip(a, b, strict=True):
        assert rel_err(gb, ga) < 1e-6


def test_sorted_dispatch_combine_equals_tiled_with_gradients():
    """The CPU's routed experts (sort, looped GEMMs, gather back) against the tiled path: outputs
    and gradients of x, routing weights and expert weights, one expert without tokens."""
    import jax

    from dsjax.model.layers.moe import sorted_dispatch_combine, tiled_dispatch_combine

    rng = np.random.default_rng(5)
    N, K, E, D, F = 29, 3, 5, 8, 6
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    idx = jnp.asarray(rng.choice([0, 1, 1, 1, 3, 4], (N, K)), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1, (N, K)), jnp.float32)
    ws = [
        jnp.asarray(rng.standard_normal(s) / 3, jnp.float32) for s in [(E, D, F)] * 2 + [(E, F, D)]
    ]
    cot = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    ref = lambda x, w, *ws: (tiled_dispatch_combine(x, idx, w, *ws, 4) * cot).sum()  # noqa: E731
    new = lambda x, w, *ws: (sorted_dispatch_combine(x, idx, w, *ws) * cot).sum()  # noqa: E731
    a = jax.value_and_grad(ref, argnums=(0, 1, 2, 3, 4))(x, w, *ws)
    b = jax.value_and_grad(new, argnums=(0, 1, 2, 3, 4))(x, w, *ws)
    assert rel_err(b[0], a[0]) < 1e-6
    for ga, gb in zip(a[1], b[1], strict=True):
        assert rel_err(gb, ga) < 1e-5
