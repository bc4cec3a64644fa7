"""DeepSeek-V4 under context parallelism (docs/spec.md §12): with the sequence split over the
`context` axis, the sliding window, the CSA entries and their indexer, and the HCA entries see
the keys of the other chips, so the loss and every gradient equal the same step on one device."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny_v4
from configs.deepseek_v4_flash import CSA, HCA, SWA
from dsjax.model import sharding
from dsjax.model.transformer import Transformer
from dsjax.train import step as ts

T = 64


def _batch(cfg, B: int):
    """Random tokens, two packed documents (the second starting at 40, a multiple of both
    compression rates) and some padding."""
    rng = np.random.RandomState(3)
    seg = np.ones((B, T), np.int32)
    seg[:, 40:] = 2
    seg[0, -3:] = 0
    pos = np.concatenate([np.arange(40), np.arange(T - 40)])[None].repeat(B, 0)
    return {
        "inputs": rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32),
        "targets": rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32),
        "segment_ids": seg,
        "positions": pos.astype(np.int32),
        "weights": (seg > 0).astype(np.float32),
    }


def _loss_and_grads(config, mesh, batch, params=None):
    """(loss, MTP CE, grads) on `mesh`; `params` (params, moe_bias), else initialised there."""
    model = Transformer(ts.model_config(config))
    tx, _ = ts.make_optimizer(config)
    loss = functools.partial(ts.loss_fn, model=model, train_cfg=ts.train_options(config))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        if params is None:
            state, _, _ = ts.create_sharded_state(jax.random.key(0), model, tx, mesh, T)
            params = (state.params, state.moe_bias)
        else:  # the same values placed as the mesh's init would place them (one compile fewer)
            _, shardings = ts.state_shardings(model, tx, mesh, T)
            params = jax.device_put(params, (shardings.params, shardings.moe_bias))

        def f(params, moe_bias, b):
            b = ts.prepare_batch(b, model)
            (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, moe_bias, b)
            return value, aux["mtp_ce"], grads

        b = jax.device_put(batch, sharding.batch_sharding(mesh))
        out = jax.tree.map(np.asarray, jax.jit(f)(*params, b))
    return out, jax.device_get(params)


@pytest.fixture(scope="module")
def config():
    """tiny_v4 with one layer of each kind (window with the hash-routed MoE, CSA, HCA)."""
    c = tiny_v4.get_config()
    c.data.seq_len = T
    c.model.num_hidden_layers, c.model.layer_types = 3, [SWA, CSA, HCA]
    return c


@pytest.fixture(scope="module")
def reference(config):
    batch = _batch(ts.model_config(config), 4)
    single = sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    return batch, *_loss_and_grads(config, single, batch)


def test_v4_context_parallel_equals_one_device(config, reference):
    """context 2 x data 2 x expert 2 on 8 devices. Gradients are compared against the largest
    gradient of the tree (fp32 noise of a leaf whose own gradients are ~0, such as a hash
    layer's router, is as large under data x expert parallelism without `context`)."""
    batch, (ref_loss, ref_mtp, ref_grads), params = reference
    mesh = sharding.make_mesh(data=2, expert=2, context=2)
    (loss, mtp, grads), _ = _loss_and_grads(config, mesh, batch, params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(mtp, ref_mtp, rtol=1e-5)
    scale = max(np.abs(r).max() for r in jax.tree.leaves(ref_grads))
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        assert np.abs(g - r).max() <= 1e-5 * scale, jax.tree_util.keystr(path)
