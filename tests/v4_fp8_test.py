"""DeepSeek-V4 under the FP8 recipe on the release's own weights (keep_fp8, docs/spec.md §12):
the stored FP8 blocks, the grouped wo_a's included (o_lora_rank % 128 == 0), and the FP4
experts (re-encoded exactly as FP8 blocks) are used as stored, never re-quantised: the forward
equals the recipe run on the exact dequantised weights (activations quantised alike), also with
the routed experts expert-parallel; gradients are finite and the stored weights frozen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny_v4
from dsjax.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint
from dsjax.model import fp8, sharding
from dsjax.model.transformer import Transformer
from dsjax.testing import random_variables
from dsjax.train import step as ts

TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 33)), jnp.int32)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(fp8 cfg, kept variables, dequantised variables) of a release-layout tiny_v4 checkpoint
    (FP8 128x128 blocks, FP4 experts) with o_lora_rank 128: wo_a's blocks line up with its
    groups."""
    cfg = ts.model_config(tiny_v4.get_config()).replace(o_lora_rank=128)
    path = tmp_path_factory.mktemp("v4fp8") / "q"
    save_hf_checkpoint(path, cfg, random_variables(cfg), fp8=True, fp4_experts=True)
    cfg, kept = load_hf_checkpoint(path, jnp.float32, keep_fp8=True)
    _, deq = load_hf_checkpoint(path, jnp.float32)
    assert kept["params"]["layers_1"]["attn"]["wo_a"]["kernel"].dtype == jnp.float8_e4m3fn
    assert kept["params"]["layers_2"]["moe"]["experts"]["gate"].dtype == jnp.float4_e2m1fn
    return cfg.replace(fp8=True), kept, deq


MESHES = (dict(data=8), dict(data=2, expert=4))


def _on(mesh_axes, f):
    if mesh_axes is None:
        return f()
    with (
        jax.set_mesh(sharding.make_mesh(**mesh_axes)),
        nn.logical_axis_rules(sharding.LOGICAL_RULES),
    ):
        return f()


def _logits(cfg, variables):
    return Transformer(cfg).apply(variables, TOKENS[:, :-1]).logits


def _loss(params, rest, cfg):
    logits = _logits(cfg, {"params": params, **rest}).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1).mean(), logits


def _unit_scales(w, block: int = fp8.BLOCK):
    """`quantize_blocks` keeping w exact (unit scales): the recipe on exact weights."""
    blocks = (*w.shape[:-2], -(-w.shape[-2] // block), -(-w.shape[-1] // block))
    return w.astype(jnp.float32), jnp.ones(blocks, jnp.float32)


def test_fp8_on_kept_weights_uses_the_stored_blocks(release, monkeypatch):
    cfg, kept, deq = release
    # Structural: tracing the forward on the kept weights quantises no weight at all (every
    # recipe linear of V4 is stored FP8 or FP4 in the release), also under a mesh (routed
    # experts in shard_map: per-shard dispatch, expert all-to-all); the dequantised ones are.
    shapes = []
    quantize = fp8.quantize_blocks
    monkeypatch.setattr(fp8, "quantize_blocks", lambda w: (shapes.append(w.shape), quantize(w))[1])
    for mesh in (None, *MESHES):
        _on(mesh, lambda: jax.make_jaxpr(lambda v: _logits(cfg, v))(kept))
        assert shapes == [], mesh
    # Shards that cut the experts' 128-blocks (F = 32 over tensor 4) re-quantise those alone.
    _on(dict(data=2, tensor=4), lambda: jax.make_jaxpr(lambda v: _logits(cfg, v))(kept))
    assert shapes and {s[0] for s in shapes} == {cfg.n_routed_experts}, shapes
    shapes.clear()
    jax.make_jaxpr(lambda v: _logits(cfg, v))(deq)
    g, E, D, F = cfg.o_groups, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    wo_a = (g, cfg.num_attention_heads * cfg.head_dim // g, cfg.o_lora_rank)  # per group
    assert wo_a in shapes and (E, D, F) in shapes, shapes  # (the FP4 experts dequantised)

    # Values, on the expert-parallel mesh (a train step's setting): the kept forward (and its
    # gradients) vs the recipe on the exact dequantised weights (unit weight scales, the
    # activations quantised as in the kept run). Re-quantising any stored weight with other
    # scales moves these logits by ~1e-2 of their max. (Across meshes FP8 logits differ by
    # more: a different summation order can flip an activation's e4m3 rounding.)
    params, rest = kept["params"], {k: v for k, v in kept.items() if k != "params"}
    step = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=2)
    (loss, got), grads = _on(MESHES[1], lambda: step(params, rest, cfg))
    monkeypatch.setattr(fp8, "quantize_blocks", _unit_scales)
    want = _on(MESHES[1], lambda: jax.jit(lambda v: _logits(cfg, v))(deq))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(np.asarray(want)).max())

    # Gradients: finite; zero on the stored weights and their scales (frozen); alive on every
    # other leaf in the loss's path (the MTP module is not; the indexer only picks its top-k).
    assert np.isfinite(float(loss))
    key = jax.tree_util.keystr
    leaves = jax.tree_util.tree_leaves_with_path
    frozen = {key(path) for path, p in leaves(params) if fp8.is_fp8(p) or fp8.is_fp4(p)}
    assert len(frozen) > 40
    for path, grad in leaves(grads):
        name, grad = key(path), np.asarray(grad, np.float32)
        assert np.isfinite(grad).all(), name
        if name.replace("_scale_inv']", "']") in frozen:
            assert not grad.any(), name
        elif "mtp_0" not in name and "indexer" not in name:
            assert grad.any(), name
