"""FP8 training recipe (model/fp8.py, docs/spec.md §8): quantisation bounds, the 3 GEMMs against a
float64 NumPy version of the same recipe, the whole model's gradients against float32, the
high-precision exceptions (jaxpr inspection), stored FP8 weights, and FP8 train steps."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from dsjax.model import fp8, sharding
from dsjax.model.transformer import Transformer, init_cache
from dsjax.run_config import TrainOptions
from dsjax.testing import tiny_config
from dsjax.train import step as ts

E4M3_NP = ml_dtypes.float8_e4m3fn


# ----------------------------------------------------------------------------- NumPy reference
def np_quant(x, axis):
    """1x128 tiles along `axis`, in the same float32 arithmetic (s = amax/448, q = e4m3(x/s));
    returns the dequantised float64 array."""
    x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    n = x.shape[-1]
    nt = -(-n // 128)
    xp = np.zeros((*x.shape[:-1], nt * 128), np.float32)
    xp[..., :n] = x
    xt = xp.reshape(*x.shape[:-1], nt, 128)
    amax = np.abs(xt).max(-1, keepdims=True)
    s = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
    q = (xt / s).astype(E4M3_NP).astype(np.float64) * s.astype(np.float64)
    return np.moveaxis(q.reshape(*x.shape[:-1], nt * 128)[..., :n], -1, axis)


def np_quant_blocks(w):
    w = np.asarray(w, np.float32)
    n_in, n_out = w.shape
    ni, no = -(-n_in // 128), -(-n_out // 128)
    wp = np.zeros((ni * 128, no * 128), np.float32)
    wp[:n_in, :n_out] = w
    wb = wp.reshape(ni, 128, no, 128)
    amax = np.abs(wb).max((1, 3), keepdims=True)
    s = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
    q = (wb / s).astype(E4M3_NP).astype(np.float64) * s.astype(np.float64)
    return q.reshape(ni * 128, no * 128)[:n_in, :n_out]


def np_recipe(x_MK, w_KN, dy_MN):
    """(y, dx, dW) of the recipe in float64: y = Q(x) Q(W); dx = Q(dy) Q(W)ᵀ; dW = Q'(Q(x))ᵀ Q'(dy)
    with Q 1x128 along the contraction, Q' 128x1 along tokens."""
    xq = np_quant(x_MK, 1)
    wq = np_quant_blocks(w_KN)
    y = xq @ wq
    dx = np_quant(dy_MN, 1) @ wq.T
    dw = np_quant(xq, 0).T @ np_quant(dy_MN, 0)
    return y, dx, dw


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- quantisation
def test_quantize_tiles_error_within_e4m3_bound_and_zero_tiles():
    rng = np.random.RandomState(0)
    # K = 300: two full tiles and a padded short one; magnitudes over 6 decades.
    x = rng.randn(6, 300).astype(np.float32) * 10.0 ** rng.uniform(-3, 3, (6, 300))
    x[2, :128] = 0.0  # an all-zero tile
    q, s = fp8.quantize_tiles(jnp.asarray(x), axis=1)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape and s.shape == (6, 3)
    assert float(s[2, 0]) == 1.0 and not np.any(np.asarray(q[2, :128], np.float32))
    deq = np.asarray(fp8.dequantize_tiles(q, s, axis=1), np.float64)
    s_full = np.repeat(np.asarray(s, np.float64), 128, axis=1)[:, :300]
    # 3 mantissa bits: half an ulp is 2^-4 relative for normals; subnormal spacing 2^-9 * s.
    bound = np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * s_full) * (1 + 1e-6)
    assert np.all(np.abs(deq - x) <= bound)
    # every tile's max maps to exactly ±448
    assert np.allclose(np.abs(np.asarray(q[:, :128], np.float32)).max(1)[[0, 1, 3, 4, 5]], 448)
    # 128x1 tiles (axis 0) and 128x128 blocks with leading expert / layer axes
    w = rng.randn(2, 3, 200, 130).astype(np.float32)
    qb, sb = fp8.quantize_blocks(jnp.asarray(w))
    assert qb.shape == w.shape and sb.shape == (2, 3, 2, 2)
    sb_full = np.repeat(np.repeat(np.asarray(sb), 128, -2), 128, -1)[..., :200, :130]
    err = np.abs(np.asarray(fp8.dequantize_weight(qb, sb), np.float64) - w)
    assert np.all(err <= np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * sb_full) * (1 + 1e-6))
    with pytest.raises(ValueError, match="scale_inv"):
        fp8.dequantize_weight(qb, sb[..., :1])


FP4_VALUES = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6]


def test_fp4_to_fp8_blocks_is_exact_within_the_documented_span():
    """V4's FP4 experts as FP8 blocks: exact while a block's 32-group scales lie within 2^11 of
    its largest (power-of-two block scales, partial blocks included); a group 2^20 below rounds
    to e4m3's subnormal grid, under amax * 2^-17."""
    rng = np.random.RandomState(4)
    codes = rng.choice(np.asarray(FP4_VALUES, np.float32), (2, 160, 200))
    scales = 2.0 ** rng.randint(-14, -2, (2, 5, 200)).astype(np.float32)  # span 2^11
    w4 = jnp.asarray(codes, jnp.float4_e2m1fn)
    q, s = fp8.fp4_to_fp8_blocks(w4, jnp.asarray(scales))
    assert q.dtype == jnp.float8_e4m3fn and q.shape == codes.shape and s.shape == (2, 2, 2)
    assert np.all(np.frexp(np.asarray(s))[0] == 0.5)  # powers of two
    want = np.asarray(fp8.dequantize_weight(w4, jnp.asarray(scales)))
    np.testing.assert_array_equal(np.asarray(fp8.dequantize_weight(q, s)), want)
    scales[0, 0] = 2.0**-34  # 2^20 below the rest of block (0, 0)
    q, s = fp8.fp4_to_fp8_blocks(w4, jnp.asarray(scales))
    want = np.asarray(fp8.dequantize_weight(w4, jnp.asarray(scales)))
    err = np.abs(np.asarray(fp8.dequantize_weight(q, s)) - want)
    assert 0 < err.max() < np.abs(want[0, :128, :128]).max() * 2.0**-17
    np.testing.assert_array_equal(err[:, 32:], 0)


def test_outlier_channel_only_coarsens_its_own_tile():
    rng = np.random.RandomState(1)
    x = rng.randn(64, 512).astype(np.float32)
    x[:, 5] *= 1e4  # one outlier channel (in tile 0), as in LLM activations
    q, s = fp8.quantize_tiles(jnp.asarray(x), axis=1)
    tiled = np.asarray(fp8.dequantize_tiles(q, s, axis=1))
    s_t = np.abs(x).max() / 448.0  # per-tensor scaling of the same data
    per_tensor = (x / s_t).astype(E4M3_NP).astype(np.float32) * s_t
    other = slice(128, 512)  # tiles without the outlier
    elem = lambda d: float(np.mean(np.abs(d - x)[:, other] / np.abs(x[:, other])))  # noqa: E731
    err_tiles, err_tensor = elem(tiled), elem(per_tensor)
    assert err_tiles < 0.04, err_tiles  # mean per-element relative error
    print(f"outlier: error on the other tiles {err_tiles:.4f} (1x128) vs {err_tensor:.4f} (tensor)")
    assert err_tensor > 5 * err_tiles, (err_tensor, err_tiles)
    # the outlier's own tile is coarse either way: its small values share the outlier's scale
    own = float(np.mean(np.abs(tiled - x)[:, 6:128] / np.abs(x[:, 6:128])))
    assert own > 2 * err_tiles, own


# ----------------------------------------------------------------------------- the GEMMs
@pytest.fixture(scope="module")
def dot_case():
    rng = np.random.RandomState(2)
    x = rng.randn(2, 130, 200).astype(np.float32)  # M = 260 tokens (3 token tiles), K = 200
    w = (rng.randn(200, 300) * 0.05).astype(np.float32)
    dy = rng.randn(2, 130, 300).astype(np.float32)
    return x, w, dy


def _value_and_vjp(f):
    def run(x, w, dy):
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(dy))

    return run


def test_fp8_dot_three_gemms_match_float64_recipe(dot_case):
    x, w, dy = dot_case
    y, dx, dw = jax.jit(_value_and_vjp(fp8.fp8_dot))(x, w, dy)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32 and dx.shape == x.shape
    y_ref, dx_ref, dw_ref = np_recipe(x.reshape(260, 200), w, dy.reshape(260, 300))
    # same quantised operands, f32 vs f64 accumulation only
    assert rel(y.reshape(260, 300), y_ref) < 1e-5
    assert rel(dx.reshape(260, 200), dx_ref) < 1e-5
    assert rel(dw, dw_ref) < 1e-5
    # against the unquantised product: E4M3 rounding of both operands (<= 2^-4 each, ~2^-6 rms)
    # leaves a few percent relative error in Frobenius norm
    x64, dy64 = (a.astype(np.float64).reshape(260, -1) for a in (x, dy))
    w64 = w.astype(np.float64)
    loose = (
        rel(y.reshape(260, 300), x64 @ w64),
        rel(dx.reshape(260, 200), dy64 @ w64.T),
        rel(dw, x64.T @ dy64),
    )
    print("fp8_dot vs unquantised (y, dx, dW):", [f"{e:.4f}" for e in loose])
    assert max(loose) < 0.05, loose


def test_fp8_dot_hlo_keeps_the_fp8_tensors(dot_case):
    """The optimization barrier keeps XLA from folding f32 -> e4m3 -> f32 away."""
    x, w, dy = dot_case
    hlo = jax.jit(_value_and_vjp(fp8.fp8_dot)).lower(x, w, dy).compile().as_text()
    assert "f8e4m3fn" in hlo


@pytest.mark.parametrize("kind", ["ragged", "tiled"])
def test_grouped_dot_matches_float64_recipe_per_expert(kind):
    """Grouped expert matmul: each expert's rows follow the dense recipe with its own 128x128
    blocks (groups are whole 128-row tiles here, so the 128x1 token tiles align)."""
    rng = np.random.RandomState(3)
    sizes = [128, 0, 256]
    E, K, N = 3, 160, 136
    x = rng.randn(sum(sizes), K).astype(np.float32)
    w = (rng.randn(E, K, N) * 0.05).astype(np.float32)
    dy = rng.randn(sum(sizes), N).astype(np.float32)
    if kind == "ragged":
        aux = jnp.asarray(sizes, jnp.int32)
        xa, dya = x, dy
    else:  # one expert per 128-row tile
        aux = jnp.asarray([0, 2, 2], jnp.int32)
        xa, dya = x.reshape(3, 128, K), dy.reshape(3, 128, N)
    f = functools.partial(fp8.fp8_grouped_dot, kind)
    y, dx, dw = jax.jit(_value_and_vjp(lambda a, b: f(a, b, aux)))(xa, w, dya)
    y, dx = np.asarray(y).reshape(-1, N), np.asarray(dx).reshape(-1, K)
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        start += n
        if n == 0:
            assert not np.any(np.asarray(dw[e]))
            continue
        y_ref, dx_ref, dw_ref = np_recipe(x[rows], w[e], dy[rows])
        assert rel(y[rows], y_ref) < 1e-5
        assert rel(dx[rows], dx_ref) < 1e-5
        assert rel(dw[e], dw_ref) < 1e-5


def test_fp8_swiglu_backward_recomputes_from_fp8_inputs():
    rng = np.random.RandomState(4)
    g, u, dh = (rng.randn(6, 200).astype(np.float32) * 2 for _ in range(3))
    h, dg, du = jax.jit(_value_and_vjp(fp8.fp8_swiglu))(g, u, dh)
    gq, uq = np_quant(g, 1), np_quant(u, 1)  # the saved FP8 inputs
    sig = 1 / (1 + np.exp(-gq))
    np.testing.assert_allclose(h, g / (1 + np.exp(-g.astype(np.float64))) * u, rtol=1e-5)
    assert rel(dg, dh * uq * sig * (1 + gq * (1 - sig))) < 1e-5
    assert rel(du, dh * gq * sig) < 1e-5


# ----------------------------------------------------------------------------- whole model
B, T = 4, 16


def _batch(cfg, seed=0):
    rng = np.random.RandomState(seed)
    return {
        "inputs": rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32),
        "targets": rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.arange(T, dtype=np.int32)[None].repeat(B, 0),
        "weights": np.ones((B, T), np.float32),
    }


@pytest.fixture(scope="module")
def model_case():
    # MoE + MTP on, float32. Every token goes to every expert (k = E): a top-k choice between
    # nearly tied experts flips under a few percent of noise and moves that token's whole
    # gradient to another expert; with k = E the comparison measures the FP8 numerics only.
    cfg = tiny_config(num_experts_per_tok=8, n_group=1, topk_group=1)
    model = Transformer(cfg)
    batch = _batch(cfg)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["inputs"]))
    return cfg, batch, variables["params"], variables["moe_bias"]


def _grads(cfg, batch, params, moe_bias):
    model = Transformer(cfg)
    train_cfg = TrainOptions(mtp_weight=0.3, balance_loss_weight=1e-4)
    loss = lambda p: ts.loss_fn(p, moe_bias, batch, model=model, train_cfg=train_cfg)[0]  # noqa
    return jax.jit(jax.grad(loss))(params)


def test_model_gradient_fp8_vs_float32_cosine(model_case):
    cfg, batch, params, moe_bias = model_case
    g32 = _grads(cfg, batch, params, moe_bias)
    g8 = _grads(cfg.replace(fp8=True), batch, params, moe_bias)

    def cos(a, b):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    sims = {
        jax.tree_util.keystr(p): cos(a, b)
        for (p, a), b in zip(
            jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g8), strict=True
        )
    }
    worst = min(sims, key=sims.get)
    for k in sorted(sims, key=sims.get)[:8]:
        print(f"  {sims[k]:.5f} {k}")
    print(f"fp8 vs fp32 gradient cosine: min {sims[worst]:.5f} at {worst}")
    assert sims[worst] >= 0.99, sims
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g8), strict=True)
    )


# jaxpr inspection: which dots read values derived from FP8 tensors.
_DOTS = ("dot_general", "ragged_dot_general", "ragged_dot")
_CARRY = {
    "convert_element_type", "mul", "reshape", "broadcast_in_dim", "transpose", "slice", "pad",
    "gather", "dynamic_slice", "concatenate", "squeeze", "expand_dims", "copy", "copy_p",
    "optimization_barrier", "select_n", "repeat",
}  # fmt: skip


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for j in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(j, jax.extend.core.ClosedJaxpr):
                yield j.jaxpr
            elif isinstance(j, jax.extend.core.Jaxpr):
                yield j


def _walk(jaxpr, tainted_in, scope, dots, f8_outside):
    """Propagates "derived from an f8 tensor" through `jaxpr`; records every dot as
    (scope, lhs tainted, rhs tainted); returns the outvars' taint."""
    is_f8 = lambda v: getattr(v.aval, "dtype", None) == jnp.float8_e4m3fn  # noqa: E731
    tainted = {v for v, t in zip(jaxpr.invars, tainted_in, strict=True) if t}
    for eqn in jaxpr.eqns:
        name = str(eqn.source_info.name_stack) or scope
        ins = [not isinstance(v, jax.extend.core.Literal) and (v in tainted or is_f8(v))
               for v in eqn.invars]  # fmt: skip
        prim = eqn.primitive.name
        if prim in _DOTS:
            dots.append((name, ins[0], ins[1]))
            continue
        subs = list(_subjaxprs(eqn))
        out_t = False
        for sub in subs:
            inner = ins[len(ins) - len(sub.invars) :] if len(sub.invars) <= len(ins) else []
            inner = inner + [False] * (len(sub.invars) - len(inner))
            inside_fp8 = prim.startswith("custom_vjp")
            res = _walk(sub, inner, name, dots, f8_outside if not inside_fp8 else [])
            out_t = out_t or any(res)
        if not subs:
            out_t = prim in _CARRY and any(ins)
            if any(is_f8(v) for v in eqn.outvars):
                f8_outside.append((name, prim))
        if out_t:
            tainted.update(eqn.outvars)
    return [v in tainted for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)]


def test_fp8_covers_every_linear_and_expert_dot_and_nothing_else(model_case):
    cfg, batch, params, moe_bias = model_case
    cfg = cfg.replace(fp8=True)
    model = Transformer(cfg)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p, "moe_bias": moe_bias}, batch["inputs"]))(params)  # fmt: skip
    dots, f8_outside = [], []
    out_taint = _walk(jaxpr.jaxpr, [False] * len(jaxpr.jaxpr.invars), "", dots, f8_outside)
    assert not any(out_taint) and not f8_outside, f8_outside  # FP8 lives inside fp8.* only
    # attention core: the reference path's products (the chunked path's, btghk,bsgk / bghts,bsgv)
    exceptions = ("router", "head", "bghtk,bgsk", "bghts,bgsv", "btghk,bsgk", "bsgv", "nkd,nk->nd")
    for name, lhs, rhs in dots:
        if any(e in name for e in exceptions):
            assert not lhs and not rhs, f"high-precision dot {name} reads FP8"
        else:
            assert lhs and rhs, f"dot {name!r} is not FP8"
    high = [n for n, *_ in dots if any(e in n for e in exceptions)]
    assert sum("router" in n for n in high) == 2 and sum("head" in n for n in high) == 2
    assert sum("bghtk" in n for n in high) == 3  # attention core: dense, MoE and MTP blocks
    # MLA 5 per block (3 blocks), dense SwiGLU 3, shared + routed experts 6 per MoE block
    # (MoE stack + MTP block), eh_proj 1
    assert len(dots) - len(high) == 5 * 3 + 3 + 6 * 2 + 1


def _quantize_linear_kernels(params):
    """Every Linear kernel and routed-expert weight except the head and the routers (never FP8
    in the release) -> float8 + `<name>_scale_inv` blocks; returns (stored, dequantised) trees."""
    stored, deq = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            if key in ("lm_head", "router"):
                stored[key] = deq[key] = value
            else:
                stored[key], deq[key] = _quantize_linear_kernels(value)
        elif key in ("kernel", "gate", "up", "down"):
            q, s = fp8.quantize_blocks(value)
            stored[key], stored[f"{key}_scale_inv"] = q, s
            deq[key] = fp8.dequantize_weight(q, s)
        else:
            stored[key] = deq[key] = value
    return stored, deq


def test_fp8_stored_weights_match_dequantised_weights(model_case):
    cfg, batch, params, moe_bias = model_case
    stored, deq = _quantize_linear_kernels(params)
    assert stored["moe_layers"]["attn"]["q_a"]["kernel"].dtype == jnp.float8_e4m3fn
    assert stored["moe_layers"]["moe"]["experts"]["gate_scale_inv"].shape == (2, 8, 1, 1)
    assert stored["moe_layers"]["moe"]["router"]["kernel"].dtype == jnp.float32

    def logits(cfg, p, tokens=batch["inputs"]):
        model = Transformer(cfg)
        return jax.jit(lambda p: model.apply({"params": p, "moe_bias": moe_bias}, tokens).logits)(p)

    # without fp8: dequantised blockwise on the fly
    logits_stored = logits(cfg, stored)
    np.testing.assert_allclose(logits_stored, logits(cfg, deq), rtol=1e-5, atol=1e-6)
    # with fp8 the stored blocks are used directly: same as re-quantising the dequantised ones
    cfg8 = cfg.replace(fp8=True)
    np.testing.assert_allclose(logits(cfg8, stored), logits(cfg8, deq), rtol=1e-5, atol=1e-6)
    # absorbed decode (MLA reads kv_b through Linear.weight: dequantised) over an empty cache
    cfg_dec = cfg.replace(num_mtp_layers=0)
    no_mtp = {k: v for k, v in stored.items() if k != "mtp_0"}
    model = Transformer(cfg_dec)
    decode = jax.jit(functools.partial(model.apply, mode="decode", mutable=["cache"]))
    tokens = batch["inputs"][:1]
    out, _ = decode(
        {"params": no_mtp, "moe_bias": moe_bias, "cache": init_cache(cfg_dec, 1, T)},
        tokens,
        jnp.arange(T)[None],
    )
    # (the MTP modules do not change the main logits)
    np.testing.assert_allclose(out.logits, logits_stored[:1], rtol=1e-4, atol=1e-5)


def test_fp8_gathered_experts_equal_dispatched(model_case):
    """One token takes the decode-sized gathered path (k <= E assignments), two tokens the sorted
    dispatch: the FP8 results of the shared token agree (rows are quantised independently)."""
    cfg, batch, params, moe_bias = model_case
    model = Transformer(cfg.replace(fp8=True, num_mtp_layers=0))
    fwd = lambda t: model.apply({"params": params, "moe_bias": moe_bias}, t).logits  # noqa: E731
    one, two = batch["inputs"][:1, :1], batch["inputs"][:2, :1]
    np.testing.assert_allclose(jax.jit(fwd)(one)[0], jax.jit(fwd)(two)[0], rtol=1e-5, atol=1e-6)


def test_fp8_train_steps_reduce_the_loss():
    config = tiny.get_config()
    config.model = ml_collections.ConfigDict(dataclasses.asdict(tiny_config(fp8=True)))
    config.train.remat = "none"
    config.data.seq_len = 16
    config.optim.warmup_steps = 1
    cfg = ts.model_config(config)
    assert cfg.fp8
    batch = _batch(cfg, seed=1)
    model = Transformer(cfg)
    tx, schedule = ts.make_optimizer(config)
    mesh = sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, _, _ = ts.create_sharded_state(jax.random.key(0), model, tx, mesh, T)
        step = ts.jit_train_step(model, tx, schedule, config)
        losses = []
        for _ in range(4):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 1e-2, losses


def test_config_fp8_must_be_bool():
    with pytest.raises(ValueError, match="fp8"):
        tiny_config(fp8=1)
