"""DeepSeek-V4 training: the train step learns on the tiny V4 config, leaves the hash tables
alone while the routing biases move, and runs the same on an expert-parallel mesh (the expert
all-to-all) as on one device. Packed documents: a row holding two documents gives each the
logits it gets alone."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny_v4
from dsjax.model import sharding
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
    return losses, first, state


@pytest.fixture(scope="module")
def config():
    c = tiny_v4.get_config()
    c.data.seq_len = T
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
