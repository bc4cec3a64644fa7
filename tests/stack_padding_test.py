"""Stage counts that do not divide the MoE layers (SPEC §13): each rank's block of the stored
MoE stack is padded to an equal size with zero rows no chunk reads. A train step on them gives
stage=1's; the padding rows stay zero and never reach a checkpoint."""

from __future__ import annotations

import dataclasses
import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from dsjax.checkpoints.orbax_io import Checkpointer
from dsjax.model import sharding
from dsjax.model.transformer import Transformer
from dsjax.train import pipeline
from dsjax.train import step as ts
from dsjax.train.stack_layout import stack_layout

B, T, M = 8, 16, 4
MOE_LAYERS = 5  # stage=2: ranks hold 3 and 2 layers; DualPipe chunks 2, 1 | 1, 1


@pytest.fixture(scope="module")
def setup():
    config = tiny.get_config()
    config.model.num_hidden_layers = 1 + MOE_LAYERS
    config.train.pipeline_schedule, config.train.microbatches = "dualpipe", M
    config.train.batch_size = B
    model, (tx, lr) = Transformer(ts.model_config(config)), ts.make_optimizer(config)
    rng = np.random.default_rng(0)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, 512, (B, T)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, 512, (B, T)), jnp.int32),
        "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1)),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "weights": jnp.asarray(rng.uniform(0.5, 1.0, (B, T)), jnp.float32),
    }
    return config, model, tx, lr, batch


def _pad_rows(layout):
    return [i for i, layer in enumerate(layout.order) if layer < 0]


def test_layout_pads_each_rank_to_an_equal_block():
    s = pipeline.ps.make_schedule("dualpipe", 4, 8)
    order = pipeline.stack_order(s, 58)  # V3 on 4 stages: ranks hold 15, 15, 14, 14
    assert pipeline.chunk_sizes(s, 58) == (8, 8, 7, 7, 7, 7, 7, 7)
    assert len(order) == 60 and sorted(order[order >= 0]) == list(range(58))
    assert list(np.flatnonzero(order < 0)) == [44, 59]  # the last row of ranks 2 and 3
    cfg = ts.model_config(tiny.get_config()).replace(num_hidden_layers=4)  # 3 MoE layers
    with pytest.raises(ValueError, match=r"mesh.stage=4 exceeds the model's 3 MoE layers"):
        pipeline.check_pipeline(cfg, 4, "dualpipe", 8)


def test_train_step_on_padded_stack_matches_stage_1(setup):
    """One DualPipe step at stage=2 (5 MoE layers, the stored stack 6 rows) against stage=1's
    grad_accum=M step: loss, updated parameters and biases; the padding rows of the parameters
    and moments stay zero."""
    config, model, tx, lr, batch = setup
    out = []
    for sizes, accum in ((dict(data=2, expert=2), M), (dict(stage=2, data=2, expert=2), 1)):
        config = config.copy_and_resolve_references()
        config.train.grad_accum = accum
        n = int(np.prod(list(sizes.values())))
        mesh = sharding.make_mesh(**sizes, devices=jax.devices()[:n])
        train_cfg = ts.train_options(config)
        layout = stack_layout(model.cfg, train_cfg, mesh.shape["stage"])
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
            state, _, _ = ts.create_sharded_state(jax.random.key(0), model, tx, mesh, T,
                                                  layout=layout)  # fmt: skip
            step = functools.partial(
                ts.train_step, model=model, tx=tx, schedule=lr, train_cfg=train_cfg
            )
            # Compared on the host (numpy): on-device gathers of every leaf in flight at once
            # aborted XLA:CPU's fake devices in CI (tests/pipeline_test.py does the same).
            gate = state.params["moe_layers"]["moe"]["experts"]["gate"]
            assert gate.addressable_shards[0].data.shape[0] == gate.shape[0] // mesh.shape["stage"]
            new, m = jax.device_get(jax.jit(step)(state, batch))
            if layout.order is not None:
                gate = new.params["moe_layers"]["moe"]["experts"]["gate"]
                assert gate.shape[0] == 6
                for leaf in jax.tree.leaves((new.params["moe_layers"], new.opt_state)):
                    if getattr(leaf, "ndim", 0) and leaf.shape[0] == 6:
                        assert not np.asarray(leaf)[_pad_rows(layout)].any()
            out.append((layout.model(new), m))
    (a, ma), (b, mb) = out
    for k in ("loss", "main_ce", "grad_norm", "tokens"):
        np.testing.assert_allclose(mb[k], ma[k], rtol=1e-5, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, atol=1e-7), a.moe_bias, b.moe_bias)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, atol=1e-5), a.params, b.params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, atol=1e-5), a.opt_state,
                 b.opt_state)  # fmt: skip


def test_checkpoint_of_padded_stack_restores_at_stage_1(setup, tmp_path):
    """A state initialised at stage=4 (5 MoE layers: blocks of 2 rows, 3 of them padding) saves
    as the loop does (`StackLayout.model`), restores at stage=1 equal to stage=1's own init, and
    back at stage=4 into the stored order with zero padding rows."""
    config, model, tx, _, _ = setup
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    train_cfg = dataclasses.replace(ts.train_options(config), microbatches=8)
    meshes = sharding.make_mesh(stage=4, data=2), sharding.make_mesh(data=8)
    layout = stack_layout(model.cfg, train_cfg, 4)
    assert len(layout.order) == 8 and len(_pad_rows(layout)) == 3
    with jax.set_mesh(meshes[0]):
        state, abstract4, shardings4 = ts.create_sharded_state(
            jax.random.key(3), model, tx, meshes[0], T, layout=layout
        )
        ck = Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
        ck.save(1, layout.model(state, to_host=True), data_iter, config, force=True)
        ck.close()
    with jax.set_mesh(meshes[1]):
        fresh, abstract1, _ = ts.create_sharded_state(jax.random.key(3), model, tx, meshes[1], T)
        restored = Checkpointer(str(tmp_path), every=1, keep=2).restore(1, abstract1, data_iter)
    assert restored.params["moe_layers"]["moe"]["experts"]["gate"].shape[0] == MOE_LAYERS
    for x, y in zip(jax.tree.leaves(fresh), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with jax.set_mesh(meshes[0]):
        back = Checkpointer(str(tmp_path), every=1, keep=2).restore(1, abstract4, data_iter)
        back = layout.stored(back, shardings4)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    gate = back.params["moe_layers"]["moe"]["experts"]["gate"]
    assert gate.addressable_shards[0].data.shape[0] == 2
    assert not np.asarray(gate)[_pad_rows(layout)].any()
