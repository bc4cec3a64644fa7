"""Whole-model properties: gradients, packing, MTP shapes, segment positions."""

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model.transformer import Transformer, init_variables, segment_positions
from dsjax.testing import rel_err, scale_params, tiny_config


def test_segment_positions_restart_per_document():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_gradients_reach_every_param_and_never_the_routing_bias():
    cfg = tiny_config(remat="full")
    model = Transformer(cfg)
    variables = scale_params(init_variables(cfg, jax.random.key(0)), 4.0)
    variables["moe_bias"] = jax.tree.map(lambda b: b + 0.1, variables["moe_bias"])
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)))

    def loss(variables):
        out = model.apply(variables, tokens)
        main = jax.nn.log_softmax(out.logits).mean()
        mtp = jax.nn.log_softmax(out.mtp_logits[0]).mean()
        return -(main + mtp) + out.balance_loss.sum() + out.mtp_balance_loss.sum()

    grads = jax.jit(jax.grad(loss))(variables)
    for path, g in jax.tree_util.tree_leaves_with_path(grads["params"]):
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
    for path, g in jax.tree_util.tree_leaves_with_path(grads["moe_bias"]):
        assert float(jnp.abs(g).max()) == 0, jax.tree_util.keystr(path)


def test_packed_documents_equal_each_document_alone():
    cfg = tiny_config()
    model = Transformer(cfg)
    v = scale_params(init_variables(cfg, jax.random.key(1)), 6.0)
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, cfg.vocab_size, 7), rng.randint(0, cfg.vocab_size, 9)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    seg = jnp.asarray([[1] * 7 + [2] * 9])
    apply = jax.jit(model.apply)
    out = apply(v, packed, None, seg)
    alone_a = apply(v, jnp.asarray(a[None]))
    alone_b = apply(v, jnp.asarray(b[None]))
    assert rel_err(out.logits[:, :7], alone_a.logits) < 1e-5
    assert rel_err(out.logits[:, 7:], alone_b.logits) < 1e-5
    # MTP position i uses token i+1: positions fully inside one document match too.
    assert rel_err(out.mtp_logits[0][:, :6], alone_a.mtp_logits[0][:, :6]) < 1e-5
    assert rel_err(out.mtp_logits[0][:, 7:15], alone_b.mtp_logits[0][:, :8]) < 1e-5


def test_output_shapes_and_statistics():
    cfg = tiny_config(num_mtp_layers=2)
    v = init_variables(cfg, jax.random.key(2))
    seg = jnp.asarray([[1] * 6 + [0] * 4, [1] * 10])
    out = jax.jit(Transformer(cfg).apply)(v, jnp.zeros((2, 10), jnp.int32), None, seg)
    assert out.logits.shape == (2, 10, cfg.vocab_size) and out.logits.dtype == jnp.float32
    # Every MTP depth keeps all T slots; its last k positions are placeholders.
    assert [m.shape for m in out.mtp_logits] == [(2, 10, 64), (2, 10, 64)]
    assert out.expert_counts.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    # Padding (segment 0) is not counted: 16 real tokens x k experts per layer.
    np.testing.assert_allclose(out.expert_counts.sum(-1), 16 * cfg.num_experts_per_tok)
    assert out.mtp_expert_counts.shape == (2, cfg.n_routed_experts)
    # Depth k counts the real tokens that have a token k ahead: 6 + 9 at k = 1, 6 + 8 at k = 2.
    np.testing.assert_allclose(
        out.mtp_expert_counts.sum(-1), np.array([15, 14]) * cfg.num_experts_per_tok
    )
