"""DeepSeek-V4's scanned layer groups (`v4_blocks.layer_groups`): a stack with repeated layer
kinds (hash-routed window layers, CSA/HCA pairs) scans them, and gives the same loss, gradients
and expert counts as the same model unrolled layer by layer; a checkpoint of such a stack loads
from transformers (logits equal to HF's), and its export round-trips bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import tiny_v4
from dsjax.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint
from dsjax.model import v4_blocks
from dsjax.model.config import CSA, HCA, SLIDING
from dsjax.model.transformer import Transformer, init_variables
from dsjax.train import step as ts
from tests import v4_fixtures as fx

LAYERS = (SLIDING, SLIDING, CSA, HCA, CSA, HCA, CSA)
T = 20


@pytest.fixture(scope="module")
def setup():
    config = tiny_v4.get_config()
    config.model.update(layer_types=list(LAYERS), num_hidden_layers=len(LAYERS),
                        num_hash_layers=2)  # fmt: skip
    config.train.remat = "full"
    cfg = ts.model_config(config)
    variables = init_variables(cfg, jax.random.key(0))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (2, T + 1)).astype(np.int32)
    seg = np.ones((2, T), np.int32)
    seg[1, 12:] = 2
    batch = {
        "inputs": tokens[:, :T], "targets": tokens[:, 1:], "segment_ids": seg,
        "positions": np.concatenate([np.arange(12), np.arange(T - 12)])[None].repeat(2, 0),
        "weights": np.ones((2, T), np.float32),
    }  # fmt: skip
    return config, cfg, variables, batch


def _loss_grads(config, cfg, variables, batch):
    def f(params):
        loss, aux = ts.loss_fn(params, variables["moe_bias"], batch, model=Transformer(cfg),
                               train_cfg=ts.train_options(config))  # fmt: skip
        return loss, ts.expert_counts_tree(variables["moe_bias"], aux["out"])

    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])


def _unstacked(cfg, tree):
    """A scanned-layout tree (params or counts) as the unrolled `layers_{i}` layout."""
    out = {k: v for k, v in tree.items() if not k.startswith("blocks_")}
    for i in range(len(cfg.layer_types)):
        path, k = v4_blocks.layer_slot(cfg, i)
        if k is None or path[0] not in tree or path[1] not in tree[path[0]]:
            continue
        node = tree
        for p in path:
            node = node[p]
        out[f"layers_{i}"] = jax.tree.map(lambda x, k=k: x[k], node)
    return out


def test_groups_of_the_released_layouts():
    groups = v4_blocks.layer_groups(ts.model_config(_released("deepseek_v4_flash")))
    assert [(g.name, len(g.kinds), g.repeats) for g in groups] == [
        ("blocks_0", 1, 2), ("layers_2", 1, 1), ("blocks_3", 2, 20)
    ]  # fmt: skip
    assert groups[2].kinds == ((HCA, False), (CSA, False))


def _released(name):
    import importlib

    return importlib.import_module(f"configs.{name}").get_config()


def test_scanned_equals_unrolled_loss_grads_and_counts(setup, monkeypatch):
    config, cfg, variables, batch = setup
    names = [g.name for g in v4_blocks.layer_groups(cfg)]
    assert names == ["blocks_0", "blocks_2", "layers_6"]
    assert variables["params"]["blocks_2"]["block_1"]["attn"]["wkv"]["kernel"].shape[0] == 2
    (loss, counts), grads = _loss_grads(config, cfg, variables, batch)

    unrolled_vars = {c: _unstacked(cfg, variables[c]) for c in ("params", "moe_bias")}
    singles = [
        v4_blocks.LayerGroup(i, ((t, i < cfg.num_hash_layers),), 1)
        for i, t in enumerate(cfg.layer_types)
    ]
    monkeypatch.setattr(v4_blocks, "layer_groups", lambda _: singles)
    (loss_u, counts_u), grads_u = _loss_grads(config, cfg, unrolled_vars, batch)
    monkeypatch.undo()

    assert abs(float(loss) - float(loss_u)) <= 1e-6 * abs(float(loss_u))
    got, want = _unstacked(cfg, counts), counts_u
    assert set(got) == set(want) == {"layers_2", "layers_3", "layers_4", "layers_5", "layers_6",
                                     "mtp_0"}  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, got, want)
    g, gu = _unstacked(cfg, grads), grads_u
    assert jax.tree.structure(g) == jax.tree.structure(gu)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(gu))
    worst = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gu), strict=True)
    )
    assert worst <= 1e-5 * scale, (worst, scale)


def test_cache_shapes_are_the_prefill_init_cache(setup):
    """The planner's V4 decode cache (`v4_blocks.cache_shapes`, nothing traced) is the tree
    `Transformer.init` makes in prefill mode: scanned groups with a leading repeat axis."""
    cfg = setup[1]
    tokens = jax.ShapeDtypeStruct((3, 64), jnp.int32)
    init = jax.eval_shape(
        lambda t: Transformer(cfg).init(jax.random.key(0), t, mode="prefill", run_mtp=True),
        tokens,
    )["cache"]
    shapes = v4_blocks.cache_shapes(cfg, 3, 64)
    assert jax.tree.structure(init) == jax.tree.structure(shapes)
    assert all(jax.tree.leaves(jax.tree.map(
        lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), init, shapes)))  # fmt: skip
    assert shapes["blocks_2"]["block_0"]["attn"]["v4"].compressor.entries.shape == (2, 3, 16, 32)


def test_scanned_checkpoint_matches_transformers_and_round_trips(tmp_path):
    types = [SLIDING, SLIDING, CSA, HCA, CSA, HCA]
    ids = fx.token_ids()
    model, hf_logits = fx.tie_free_model(
        ids, num_hidden_layers=len(types), layer_types=types,
        mlp_layer_types=["hash_moe"] * 2 + ["moe"] * 4,
    )  # fmt: skip
    model.save_pretrained(tmp_path / "hf")
    cfg, variables = load_hf_checkpoint(tmp_path / "hf", jnp.float32)
    assert {"blocks_0", "blocks_2"} <= set(variables["params"])
    assert variables["moe_bias"]["blocks_0"]["block_0"]["moe"]["tid2eid"].shape[0] == 2
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, run_mtp=False).logits)(
            variables, jnp.asarray(ids.numpy())
        )
    err = np.abs(np.asarray(out) - hf_logits).max() / np.abs(hf_logits).max()
    assert err <= 1e-4, err
    save_hf_checkpoint(tmp_path / "out", cfg, variables)
    _, back = load_hf_checkpoint(tmp_path / "out", jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    with torch.no_grad():
        again = type(model).from_pretrained(tmp_path / "out", attn_implementation="eager")
        np.testing.assert_allclose(again.eval()(ids).logits.numpy(), hf_logits, rtol=0, atol=1e-6)
