"""Context parallelism: the zig-zag layout, and loss, gradients and MoE statistics on a
context-parallel mesh equal to the same step on one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from dsjax.model import sharding
from dsjax.model.layers.attention import reference_attention
from dsjax.model.layers.context import to_context_layout, tokens_ahead, zigzag_order
from dsjax.model.layers.latent_flash import latent_flash_attention
from dsjax.model.transformer import Transformer
from dsjax.testing import synthetic_batch, tiny_config
from dsjax.train import step as ts

T = 16


def test_zigzag_order_balances_causal_work():
    order = zigzag_order(T, 4)  # 8 blocks of 2: chip c holds blocks c and 7 - c
    expected = [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    np.testing.assert_array_equal(order, expected)
    # every chip's queries see the same number of (query, key) pairs under the causal mask
    work = [(order[c * 4 : (c + 1) * 4] + 1).sum() for c in range(4)]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="2 x 3 = 6 equal blocks"):
        zigzag_order(T, 3)


def test_layout_moves_every_array_and_finds_the_tokens_ahead():
    cfg = ts.model_config(tiny.get_config())
    batch = synthetic_batch(cfg, 2, T, seed=4)
    out = to_context_layout(batch, 4, 2, ts.mtp_weights)
    order = zigzag_order(T, 4)
    for key in ("inputs", "targets", "segment_ids", "positions", "weights"):
        np.testing.assert_array_equal(out[key], batch[key][:, order])
    np.testing.assert_array_equal(out["token_index"], np.broadcast_to(order, (2, T)))
    for k in (1, 2):  # depth k at original position i: targets[i + k], zero weight at the end
        t = np.asarray(out["mtp_targets"][:, k - 1])
        w = np.asarray(out["mtp_weights"][:, k - 1])
        for slot, i in enumerate(order):
            if i + k < T:
                np.testing.assert_array_equal(t[:, slot], batch["targets"][:, i + k])
            else:
                assert (w[:, slot] == 0).all()
        ahead = np.asarray(tokens_ahead(out["inputs"], out["token_index"], k))
        np.testing.assert_array_equal(ahead, batch["inputs"][:, np.minimum(order + k, T - 1)])


def test_latent_flash_equals_expanded_reference_attention():
    """Values and gradients (q, latent, k_pe, kv_b) against the plain expanded attention, with
    packed segments, a permuted key order and sizes that do not divide the chunk."""
    B, Tq, S, h, dn, dr, dv, C = 2, 11, 21, 3, 4, 2, 5, 6
    rng = np.random.RandomState(0)
    q, lat, kpe, w = (
        rng.randn(*shape).astype(np.float32)
        for shape in ((B, Tq, h, dn + dr), (B, S, C), (B, S, dr), (C, h, dn + dv))
    )
    k_idx = np.stack([rng.permutation(S) for _ in range(B)]).astype(np.int32)
    q_idx = k_idx[:, rng.choice(S, Tq, replace=False)]
    k_seg = (k_idx >= 9).astype(np.int32) + 1  # two packed documents
    q_seg = (q_idx >= 9).astype(np.int32) + 1
    kw = dict(q_idx_BT=q_idx, k_idx_BS=k_idx, q_seg_BT=q_seg, k_seg_BS=k_seg, scale=0.3)

    def reference(q, lat, kpe, w):
        kv = jnp.einsum("bsc,chn->bshn", lat, w)
        k = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(kpe[:, :, None], (B, S, h, dr))], -1)
        return reference_attention(q[:, :, :, None], k, kv[..., dn:], **kw)[:, :, :, 0]

    flash = lambda *a: latent_flash_attention(*a, chunk=4, **kw)  # noqa: E731
    cot = rng.randn(B, Tq, h, dv).astype(np.float32)
    ref_out, ref_vjp = jax.vjp(reference, q, lat, kpe, w)
    out, vjp = jax.vjp(flash, q, lat, kpe, w)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, r in zip(vjp(cot), ref_vjp(cot), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def _loss_and_grads(config, mesh, batch, layout_chips: int = 1):
    """(loss, main CE, MTP CE, balance, expert counts, grads) of `loss_fn` under `mesh`, as
    `train_step` computes them (`prepare_batch`); `layout_chips` > 1 forces the zig-zag layout
    on a mesh without a context axis."""
    model = Transformer(ts.model_config(config))
    tx, _ = ts.make_optimizer(config)
    loss = functools.partial(ts.loss_fn, model=model, train_cfg=ts.train_options(config))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, _, _ = ts.create_sharded_state(jax.random.key(0), model, tx, mesh, T)

        def f(params, moe_bias, b):
            b = ts.prepare_batch(b, model)
            if layout_chips > 1:
                b = to_context_layout(b, layout_chips, model.cfg.num_mtp_layers, ts.mtp_weights)
            (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, moe_bias, b)
            counts = ts.expert_counts_tree(moe_bias, aux["out"])
            return value, aux["main_ce"], aux["mtp_ce"], aux["balance"], counts, grads

        b = jax.device_put(batch, sharding.batch_sharding(mesh))
        return jax.tree.map(np.asarray, jax.jit(f)(state.params, state.moe_bias, b))


@pytest.fixture(scope="module")
def reference():
    config = tiny.get_config()
    config.data.seq_len = T
    batch = synthetic_batch(ts.model_config(config), 4, T, seed=1)
    single = sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    return config, batch, _loss_and_grads(config, single, batch)


def _assert_same(got, ref):
    for name, g, r in zip(("loss", "main_ce", "mtp_ce", "balance"), got[:4], ref[:4], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(
        got[4]["moe_layers"]["moe"]["bias"], ref[4]["moe_layers"]["moe"]["bias"]
    )
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(got[5]), jax.tree.leaves(ref[5]), strict=True
    ):
        scale = np.abs(r).max() + 1e-30
        assert np.abs(g - r).max() / scale < 1e-5, jax.tree_util.keystr(path)


def test_zigzag_layout_alone_changes_nothing(reference):
    """The permuted layout on one device: causal masks by token index, MTP finds the tokens
    ahead through the permutation, the losses are per-token sums."""
    config, batch, ref = reference
    single = sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    _assert_same(_loss_and_grads(config, single, batch, layout_chips=4), ref)


@pytest.mark.parametrize(
    "mesh_sizes", [dict(data=1, fsdp=2, context=4), dict(data=2, context=2, tensor=2)]
)
def test_context_parallel_equals_one_device(reference, mesh_sizes):
    config, batch, ref = reference
    mesh = sharding.make_mesh(**mesh_sizes)
    _assert_same(_loss_and_grads(config, mesh, batch), ref)


def test_context_parallel_config_errors():
    config = tiny.get_config()
    config.data.seq_len = 20
    config.mesh.context = 4
    with pytest.raises(
        ValueError, match=r"seq_len=20 must divide into 2 x config.mesh.context = 8 equal"
    ):
        ts.validate_config(config, None)
    config.data.seq_len = 32
    config.model.index_topk = 8
    with pytest.raises(ValueError, match="DSA layers"):
        ts.validate_config(config, None)


def _avals(jaxpr):
    """Every intermediate's shape in `jaxpr` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield from (tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


@pytest.mark.parametrize("context", [1, 4])
def test_layer_scan_keeps_no_per_chunk_pair_buffers(context):
    """The masks and probabilities of the attention's (query chunk, key chunk) pairs are built
    one pair at a time: the gradient of the scanned layers never holds them for all pairs (JAX
    would hoist the mask work, which depends only on the token indices, out of the layer loop)."""
    cfg = tiny_config(attention_chunk=4, attention_impl="chunked", num_mtp_layers=0)
    B, Tq = 4, 32
    nq, nk = Tq // context // 4, Tq // 4
    mesh = sharding.make_mesh(data=1, fsdp=2 if context > 1 else 1, context=context,
                              devices=jax.devices()[: 2 * context if context > 1 else 1])  # fmt: skip
    model = Transformer(cfg)
    tokens = jnp.zeros((B, Tq), jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
        loss = lambda v: model.apply(v, tokens).logits.sum()  # noqa: E731
        shapes = set(_avals(jax.make_jaxpr(jax.grad(loss))(variables).jaxpr))
    per_pair = {s for s in shapes if len(s) >= 5 and s[:2] in ((nq, nk), (nk, nq))}
    assert not per_pair, per_pair
