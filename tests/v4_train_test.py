"""DeepSeek-V4 training: the train step learns on the tiny V4 config, leaves the hash tables
alone while the routing biases move, and runs the same on an expert-parallel mesh (the expert
all-to-all) as on one device. Packed documents: a row holding two documents gives each the
logits it gets alone. FP8 (docs/spec.md §8): every V4 linear the release stores in FP8 runs the
recipe, and FP8 train steps track the float32 ones."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny_v4
from dsjax.model import sharding
from dsjax.model.config import CSA, HCA, SLIDING
from dsjax.model.transformer import Transformer, init_variables
from dsjax.train import step as ts

T = 32


def _batch(cfg, B: int, seed: int):
    """Rows of a repeating token pattern (learnable) with two packed documents and padding."""
    rng = np.random.RandomState(seed)
    period = 5
    base = rng.randint(0, cfg.vocab_size, (B, period))
    tokens = np.tile(base, (1, (T + 1) // period + 1))[:, : T + 1].astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, 20:] = 2
    seg[0, -2:] = 0
    pos = np.concatenate([np.arange(20), np.arange(T - 20)])[None].repeat(B, 0).astype(np.int32)
    return {
        "inputs": tokens[:, :T],
        "targets": tokens[:, 1:],
        "segment_ids": seg,
        "positions": pos,
        "weights": (seg > 0).astype(np.float32),
    }


def _run(config, mesh, batches):
    cfg = ts.model_config(config)
    model = Transformer(cfg)
    tx, schedule = ts.make_optimizer(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, _, shardings = ts.create_sharded_state(jax.random.key(0), model, tx, mesh, T)
        step = jax.jit(
            functools.partial(
                ts.train_step, model=model, tx=tx, schedule=schedule, train_cfg=config.train
            ),
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
        )
        first = state
        losses = []
        for b in batches:
            state, m = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
            losses.append(float(m["loss"]))
            assert np.isfinite(float(m["grad_norm"])), (len(losses), m)
    return losses, first, state


@pytest.fixture(scope="module")
def config():
    """tiny_v4 with one layer of each kind (window with the hash-routed MoE, CSA, HCA)."""
    c = tiny_v4.get_config()
    c.data.seq_len = T
    c.model.num_hidden_layers, c.model.layer_types = 3, [SLIDING, CSA, HCA]
    c.optim.warmup_steps = 1
    c.optim.lr = 1e-2
    return c


@pytest.fixture(scope="module")
def single_run(config):
    """12 steps on one device over two alternating batches: (batches, losses, first, last)."""
    cfg = ts.model_config(config)
    batches = [_batch(cfg, 8, seed=s % 2) for s in range(12)]
    single = sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    return (batches, *_run(config, single, batches))


def test_v4_train_step_learns_and_keeps_hash_tables(single_run):
    _, losses, first, last = single_run
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2]), losses
    np.testing.assert_array_equal(
        first.moe_bias["layers_0"]["moe"]["tid2eid"], last.moe_bias["layers_0"]["moe"]["tid2eid"]
    )
    assert np.abs(np.asarray(last.moe_bias["layers_1"]["moe"]["bias"])).max() > 0
    assert "mtp_0" in last.params


def test_v4_expert_parallel_equals_single_device(config, single_run):
    batches, ref, _, _ = single_run
    mesh = sharding.make_mesh(data=2, fsdp=1, expert=4, tensor=1)
    got, _, state = _run(config, mesh, batches[:2])
    np.testing.assert_allclose(got, ref[:2], rtol=2e-5)
    gate = state.params["layers_1"]["moe"]["experts"]["gate"]
    assert gate.sharding.spec[0] == "expert"


def test_packed_documents_see_only_themselves(config):
    cfg = ts.model_config(config).replace(num_mtp_layers=0)
    variables = init_variables(cfg, jax.random.key(2), seq_len=T)
    rng = np.random.RandomState(0)
    a, b = rng.randint(0, cfg.vocab_size, (1, 24)), rng.randint(0, cfg.vocab_size, (1, 8))
    model = Transformer(cfg)
    apply = jax.jit(lambda v, t, s: model.apply(v, t, segment_ids_BT=s).logits)
    # Document b starts at row index 24, a multiple of both compression rates (4, 8), so its
    # windows line up with those of b alone (CSA's overlap slots from document a gated out).
    packed = apply(
        variables, jnp.asarray(np.concatenate([a, b], 1)), jnp.asarray([[1] * 24 + [2] * 8])
    )
    alone_a = apply(variables, jnp.asarray(a), jnp.ones((1, 24), jnp.int32))
    alone_b = apply(variables, jnp.asarray(b), jnp.ones((1, 8), jnp.int32))
    np.testing.assert_allclose(packed[:, :24], alone_a, atol=2e-5)
    np.testing.assert_allclose(packed[:, 24:], alone_b, atol=2e-5)


def _fp8_scopes(cfg):
    """The module path of every FP8 custom-VJP call in the forward's jaxpr (traced, not compiled)."""
    tokens = jnp.zeros((1, T), jnp.int32)
    model = Transformer(cfg)
    variables = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, tokens).logits)(variables)
    scopes = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name.startswith("custom_vjp"):
                scopes.append(str(eqn.source_info.name_stack))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return scopes


def test_fp8_covers_the_v4_linears_the_release_stores_in_fp8(config):
    cfg = ts.model_config(config).replace(fp8=True)
    scopes = _fp8_scopes(cfg)
    count = lambda part: sum(s.endswith(part) for s in scopes)  # noqa: E731
    blocks = len(cfg.layer_types) + cfg.num_mtp_layers
    for proj in ("wq_a", "wq_b", "wkv", "wo_b", "shared/gate", "shared/up", "shared/down"):
        assert count(f"attn/{proj}" if proj[0] == "w" else proj) == blocks, (proj, scopes)
    assert count("/attn") == blocks  # wo_a: the grouped output projection, one grouped GEMM
    assert count("indexer/wq_b") == cfg.layer_types.count(CSA)
    assert count("e_proj") == count("h_proj") == cfg.num_mtp_layers
    assert sum("experts.routed" in s for s in scopes) >= 3 * blocks  # gate, up, down per block
    # High precision as in the release: compressors, the indexer's weights_proj, router, mHC.
    for part in ("compressor", "weights_proj", "router", "hc_"):
        assert not any(part in s for s in scopes), (part, scopes)


def test_fp8_train_steps_track_float32(config, single_run):
    """The FP8 recipe on tiny_v4 (V4 attention projections, grouped wo_a, indexer wq_b,
    routed and shared experts, MTP projections): three steps on the float32 run's batches;
    losses within 0.25 % of float32 (the paper's bar), gradients finite (`_run` checks every
    step's grad norm)."""
    batches, ref, _, _ = single_run
    c = config.copy_and_resolve_references()
    c.model.fp8 = True
    single = sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    got, first, last = _run(c, single, batches[:3])
    print("fp8 vs float32 losses:", got, ref[:3])
    np.testing.assert_allclose(got, ref[:3], rtol=2.5e-3)
    assert got != ref[:3]  # FP8 really ran
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(last.params))
