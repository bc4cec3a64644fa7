"""The MoE under a mesh (shard_map dispatch, expert all-to-all) equals the single-device MoE.

8 fake CPU devices; outputs, per-expert counts and gradients (input, router, experts, shared) are
compared with the single-device program for meshes covering data/fsdp/expert/context/tensor, with random
routing and with a routing bias that sends every token to expert 0 and none to experts 4-7.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.model.layers.moe import MoE, exchange_group, exchange_padded, exchange_rows
from dsjax.model.sharding import BATCH_AXES, logical_to_sharding, make_mesh
from dsjax.testing import rel_err, tiny_config

B, T = 8, 4  # 32 tokens: 4 per shard on 8 shards
# name: (mesh, MoE.exchange, the exchange group it must use)
MESHES = {
    "data2_fsdp2_expert2": (dict(data=2, fsdp=2, expert=2), "auto", ("fsdp", "expert")),
    "fsdp8": (dict(data=1, fsdp=8), "auto", ("fsdp",)),
    "expert8": (dict(data=1, expert=8), "auto", ("expert",)),
    "fsdp2_expert2_tensor2": (dict(data=1, fsdp=2, expert=2, tensor=2), "expert", ("expert",)),
    "data2_fsdp4_no_exchange": (dict(data=2, fsdp=4), "none", ()),
    # context parallelism: tokens split over context too (x's T axis)
    "expert2_context4": (
        dict(data=1, expert=2, context=4),
        "expert_context",
        ("expert", "context"),
    ),
    "fsdp2_context4_gathered": (dict(data=1, fsdp=2, context=4), "none", ()),
}


def _loss_fn(module):
    def loss(params, bias, x, valid, cot):
        y, stats = module.apply({"params": params, "moe_bias": bias}, x, valid)
        return (y * cot).sum(), (y, stats["counts"])

    def step(params, bias, x, valid, cot):
        (_, (y, counts)), grads = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(
            params, bias, x, valid, cot
        )
        return y, counts, grads

    return step


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()  # sigmoid / noaux_tc, 8 experts top-2, 2 groups keep 1
    module = MoE(cfg)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(B, T, cfg.hidden_size).astype(np.float32))
    valid = jnp.asarray(rng.rand(B, T) > 0.2)
    cot = jnp.asarray(rng.randn(B, T, cfg.hidden_size).astype(np.float32))
    variables = module.init(jax.random.key(0), x, valid)
    # Larger weights: routing logits well separated, outputs far from zero.
    params = jax.tree.map(lambda a: a * 20.0, nn.meta.unbox(variables["params"]))
    uneven = {"bias": jnp.asarray([5.0] + [0.0] * (cfg.n_routed_experts - 1))}
    biases = {"random": {"bias": jnp.zeros(cfg.n_routed_experts)}, "uneven": uneven}
    step = _loss_fn(module)
    reference = {name: jax.jit(step)(params, b, x, valid, cot) for name, b in biases.items()}
    counts = np.asarray(reference["uneven"][1])
    assert counts[0] == int(valid.sum()) and (counts[4:] == 0).all()  # the load is as intended
    return dict(
        cfg=cfg, module=module, variables=variables, params=params, biases=biases, x=x,
        valid=valid, cot=cot, step=step, reference=reference,
    )  # fmt: skip


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_moe_equals_single_device(setup, mesh_name):
    mesh_sizes, exchange, group = MESHES[mesh_name]
    hlo = _check_against_reference(setup, make_mesh(**mesh_sizes), setup["cfg"], exchange, group)
    if group:
        assert "all_to_all" in hlo  # the expert exchange, not a gather of all tokens


def test_exchange_in_blocks_that_do_not_divide_the_shard(setup):
    """`moe_exchange_block`: each shard's 4 tokens cross in blocks of 3 (the second padded with
    2 tokens that go nowhere): outputs, counts and gradients equal one device's."""
    cfg = setup["cfg"].replace(moe_exchange_block=3)
    mesh_sizes, exchange, group = MESHES["data2_fsdp2_expert2"]
    hlo = _check_against_reference(setup, make_mesh(**mesh_sizes), cfg, exchange, group)
    rows = exchange_rows(cfg, 4, 3)  # one block's receive buffer: 4 shards x 3 tokens x 2
    assert rows == 24 and f"tensor<{rows}x{cfg.hidden_size}xf32>" in hlo


def _check_against_reference(s, mesh, cfg, exchange, group):
    """The MoE of `cfg` on `mesh` (exchange `group`) against the single-device program, for both
    routing biases; returns the lowered program's text."""
    assert exchange_group(cfg, mesh, B * T // 8, exchange) == group
    specs = nn.get_partition_spec(s["variables"])["params"]
    param_shardings = logical_to_sharding(specs, mesh)
    batch = NamedSharding(mesh, P(BATCH_AXES, "context"))
    with jax.set_mesh(mesh):
        params = jax.device_put(s["params"], param_shardings)
        x, valid, cot = (jax.device_put(s[k], batch) for k in ("x", "valid", "cot"))
        fn = jax.jit(_loss_fn(MoE(cfg, exchange=exchange)))
        bias0 = jax.device_put(s["biases"]["random"], NamedSharding(mesh, P()))
        hlo = fn.lower(params, bias0, x, valid, cot).as_text()
        for name, bias in s["biases"].items():
            y, counts, (g_params, g_x) = fn(params, bias, x, valid, cot)
            ry, rcounts, (rg_params, rg_x) = s["reference"][name]
            assert rel_err(y, ry) < 1e-5, (name, "y")
            np.testing.assert_array_equal(np.asarray(counts), np.asarray(rcounts))
            assert rel_err(g_x, rg_x) < 1e-5, (name, "grad x")
            flat = jax.tree_util.tree_leaves_with_path(g_params)
            ref_flat = jax.tree.leaves(rg_params)
            for (path, got), want in zip(flat, ref_flat, strict=True):
                err = rel_err(got, want)
                assert err < 1e-5, (name, jax.tree_util.keystr(path), err)
    return hlo


def test_init_trace_with_indivisible_tokens_under_mesh(setup):
    """The batch-1 init trace (3 tokens on 8 shards) takes the global path and still works."""
    mesh = make_mesh(data=1, fsdp=2, expert=4)
    with jax.set_mesh(mesh):
        shapes = jax.eval_shape(
            setup["module"].init,
            jax.random.key(0),
            jnp.zeros((1, 3, setup["cfg"].hidden_size)),
            jnp.ones((1, 3), bool),
        )
    assert shapes["params"]["experts"]["gate"].value.shape == (8, 32, 16)


def test_padded_exchange_matches_ragged_all_to_all_semantics():
    """exchange_padded against a NumPy model of ragged_all_to_all (uneven and empty chunks)."""
    mesh = make_mesh(data=1, expert=4, devices=jax.devices()[:4])
    rng = np.random.RandomState(1)
    n_dev, M, R, D = 4, 6, 9, 2
    send = rng.randint(0, 3, (n_dev, n_dev))  # send[i, j]: rows i sends j (sum over i <= R)
    send[:, 2] = 0  # device 2 receives nothing
    x = rng.randn(n_dev, M, D).astype(np.float32)
    in_off = np.concatenate([np.zeros((n_dev, 1), int), np.cumsum(send, 1)[:, :-1]], 1)
    out_off = np.concatenate([np.zeros((1, n_dev), int), np.cumsum(send, 0)[:-1]], 0) + 1
    want = np.full((n_dev, R, D), -1.0, np.float32)
    for i in range(n_dev):
        for j in range(n_dev):
            k = send[i, j]
            want[j, out_off[i, j] : out_off[i, j] + k] = x[i, in_off[i, j] : in_off[i, j] + k]
    as_i32 = lambda a: jnp.asarray(a, jnp.int32).reshape(-1)  # noqa: E731

    def per_device(x, out, in_off, send, out_off, recv):
        return exchange_padded(x, out, in_off, send, out_off, recv, "expert")

    spec = P("expert")
    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))
    got = fn(
        jnp.asarray(x.reshape(-1, D)),
        jnp.full((n_dev * R, D), -1.0),
        as_i32(in_off), as_i32(send), as_i32(out_off), as_i32(send.T),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got).reshape(n_dev, R, D), want)


def test_exchange_group_choice_at_v3_widths():
    """At V3 widths the expert weights dominate: pure FSDP exchanges tokens over fsdp rather than
    all-gathering 256 experts; fsdp x expert exchanges over expert; bad choices say why."""
    cfg = tiny_config(
        hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256,
        num_experts_per_tok=8, n_group=8, topk_group=4,
    )  # fmt: skip
    mesh = lambda **s: jax.sharding.AbstractMesh(tuple(s.values()), tuple(s))  # noqa: E731
    assert exchange_group(cfg, mesh(data=1, fsdp=8, expert=1, tensor=1), 4096) == ("fsdp",)
    assert exchange_group(cfg, mesh(data=1, fsdp=32, expert=8, tensor=1), 4096) == ("expert",)
    assert exchange_group(cfg, mesh(data=8, fsdp=1, expert=1, tensor=1), 4096) == ()
    # V3's DualPipe plan (issue 22): at 4,096 tokens per shard the dropless buffers of one round
    # outweigh gathering all experts; in rounds of 1,024 tokens the exchange wins.
    dualpipe = mesh(stage=2, data=1, fsdp=2, expert=64, tensor=1)
    assert exchange_group(cfg, dualpipe, 4096) == ()
    assert exchange_group(cfg.replace(moe_exchange_block=1024), dualpipe, 4096) != ()
    with pytest.raises(ValueError, match="n_routed_experts=256 must divide by 512"):
        exchange_group(cfg, mesh(data=1, fsdp=64, expert=8, tensor=1), 4096, "fsdp_expert")
    with pytest.raises(ValueError, match="MoE.exchange='bogus'"):
        exchange_group(cfg, mesh(data=1, fsdp=8, expert=1, tensor=1), 4096, "bogus")


def _capacity_reference(x, idx, w, experts, n_shards, R):
    """NumPy: each receiver keeps the first R rows of its slices ordered (local expert, sender),
    each sender's slice in its stable sorted order; kept assignments' SwiGLU outputs, summed with
    the routing weights; dropped ones contribute zero."""
    gate, up, down = (np.asarray(a, np.float64) for a in experts)
    E = gate.shape[0]
    E_l = E // n_shards
    n, K = idx.shape[0] // n_shards, idx.shape[1]
    keep = np.zeros(idx.shape, bool)
    for r in range(n_shards):
        pos = 0
        for e in range(r * E_l, (r + 1) * E_l):
            for p in range(n_shards):
                rows = [
                    (t, k) for t in range(p * n, (p + 1) * n) for k in range(K) if idx[t, k] == e
                ]
                for t, k in rows:
                    keep[t, k] = pos < R
                    pos += 1
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for k in range(K):
            if keep[t, k]:
                e = idx[t, k]
                g, u = x[t] @ gate[e], x[t] @ up[e]
                y[t] += w[t, k] * ((g / (1 + np.exp(-g)) * u) @ down[e])
    return y, keep


def test_expert_all_to_all_with_a_capacity_drops_past_it():
    """moe_capacity_factor: the receiver buffer is c·n·K rows; the clip is the one a NumPy model
    predicts (uneven load: most assignments to experts 0-1), and without a capacity nothing is
    dropped. Forward and the gradient with respect to x against the NumPy model."""
    from dsjax.model.layers.moe import expert_all_to_all

    n_shards, n, D, F, E, K = 4, 6, 8, 4, 8, 2
    mesh = make_mesh(data=1, expert=n_shards, devices=jax.devices()[:n_shards])
    rng = np.random.RandomState(3)
    x = rng.randn(n_shards * n, D)
    hot = rng.rand(n_shards * n) < 0.7  # most tokens choose experts 0 and 1
    idx = np.where(hot[:, None], [[0, 1]], np.stack([rng.permutation(E)[:K] for _ in hot]))
    w = rng.rand(n_shards * n, K)
    experts = [rng.randn(E, D, F) * 0.5, rng.randn(E, D, F) * 0.5, rng.randn(E, F, D) * 0.5]
    for factor in (0.0, 0.5):
        cfg = tiny_config(n_routed_experts=E, num_experts_per_tok=K, moe_capacity_factor=factor)
        R = exchange_rows(cfg, n_shards, n)
        assert R == (n_shards * n * K if factor == 0 else 8)  # ceil(0.5 * 6 * 2) -> 8 rows
        want, keep = _capacity_reference(x, idx, w, experts, n_shards, R)
        assert keep.all() == (factor == 0)

        def local(x, idx, w, wg, wu, wd, cfg=cfg):
            return expert_all_to_all(x, idx, w, wg, wu, wd, cfg, "expert", "cpu")

        tok, ex = P("expert"), P("expert")
        fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, ex, ex, ex), out_specs=tok)
        args = [jnp.asarray(a, jnp.float32) for a in (x, idx, w, *experts)]
        args[1] = args[1].astype(jnp.int32)
        got = jax.jit(fn)(*args)
        assert rel_err(got, want) < 1e-5, factor
        cot = rng.randn(*x.shape)
        loss = lambda a, fn=fn, rest=args[1:], c=cot: (fn(a, *rest) * c).sum()  # noqa: E731
        g_x = jax.jit(jax.grad(loss))(args[0])
        eps, want_g = 1e-6, np.zeros_like(x)  # central differences of the NumPy model, per x[t]
        for t in range(x.shape[0]):
            for d in range(D):
                xp, xm = x.copy(), x.copy()
                xp[t, d] += eps
                xm[t, d] -= eps
                yp = _capacity_reference(xp, idx, w, experts, n_shards, R)[0]
                ym = _capacity_reference(xm, idx, w, experts, n_shards, R)[0]
                want_g[t, d] = ((yp - ym) * cot).sum() / (2 * eps)
        assert rel_err(g_x, want_g) < 1e-4, factor


@pytest.mark.parametrize("mesh_name", ["expert8", "fsdp2_expert2_tensor2", "data2_fsdp2_expert2"])
def test_fp8_dispatch_equals_bf16_dispatch(setup, mesh_name):
    """FP8 training with expert parallelism ships FP8 rows + scales (`_fp8_dispatch_fn`) instead
    of bf16 rows quantised on arrival. Quantisation is per token row, so both put the same FP8
    values in front of the same GEMMs: outputs and every gradient equal the bf16-payload path on
    the same mesh; without a tensor split, outputs and input gradients also equal one device's
    FP8 MoE (weight gradients do not: dW re-quantises 128-row tiles of another buffer layout)."""
    s = setup
    cfg = s["cfg"].replace(fp8=True, moe_impl="ragged_dot")
    mesh_sizes, exchange, _ = MESHES[mesh_name]
    step = _loss_fn(MoE(cfg, exchange=exchange))
    bias = s["biases"]["random"]
    one_device = jax.jit(step)(s["params"], bias, s["x"], s["valid"], s["cot"])
    mesh = make_mesh(**mesh_sizes)
    specs = nn.get_partition_spec(s["variables"])["params"]
    batch = NamedSharding(mesh, P(BATCH_AXES, "context"))
    runs = {}
    with jax.set_mesh(mesh):
        params = jax.device_put(s["params"], logical_to_sharding(specs, mesh))
        x, valid, cot = (jax.device_put(s[k], batch) for k in ("x", "valid", "cot"))
        for fp8_payload in (True, False):
            module = MoE(cfg.replace(moe_fp8_dispatch=fp8_payload), exchange=exchange)
            fn = jax.jit(_loss_fn(module))
            hlo = fn.lower(params, bias, x, valid, cot).as_text()
            # FP8 rows with their f32 scales appended cross as bytes: 32 + 4 per row.
            assert ("x36xui8>" in hlo) == fp8_payload
            runs[fp8_payload] = fn(params, bias, x, valid, cot)
    (y, counts, (g_params, g_x)), ref = runs[True], runs[False]
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(one_device[1]))
    if "tensor" not in mesh_sizes:  # a tensor split cuts the down GEMM's 1x128 input tiles
        assert rel_err(y, one_device[0]) < 1e-5 and rel_err(g_x, one_device[2][1]) < 1e-5
    assert rel_err(y, ref[0]) < 1e-5 and rel_err(g_x, ref[2][1]) < 1e-5
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(g_params), jax.tree.leaves(ref[2][0]), strict=True
    ):
        assert rel_err(got, want) < 1e-5, (jax.tree_util.keystr(path), rel_err(got, want))
