"""The embedding lookup under a mesh (`dsjax.model.layers.embed`) equals `jnp.take` on one device, in
value and in the table's gradient, for meshes whose D group covers fsdp/expert/context and with
the vocabulary split over tensor; and it moves token ids and one all-to-all, never a [B, T, D]
all-reduce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.model.layers.embed import embed_lookup
from dsjax.model.sharding import BATCH_AXES, LOGICAL_RULES, make_mesh

V, D, B, T = 48, 16, 4, 8
MESHES = {
    "fsdp2_expert2_context2": dict(data=1, fsdp=2, expert=2, context=2),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "expert2_context4": dict(data=1, expert=2, context=4),
}


def _loss(lookup):
    def f(table, tokens, cot):
        return (lookup(table, tokens).astype(jnp.float32) * cot).sum()

    return jax.value_and_grad(f)


@pytest.mark.parametrize("name", list(MESHES))
def test_embed_lookup_equals_take_under_a_mesh(name):
    rng = np.random.RandomState(0)
    table = jnp.asarray(rng.randn(V, D).astype(np.float32))
    tokens = jnp.asarray(rng.randint(0, V, (B, T)).astype(np.int32))
    cot = jnp.asarray(rng.randn(B, T, D).astype(np.float32))
    want_y, want_g = jax.jit(_loss(lambda t, i: jnp.take(t, i, axis=0)))(table, tokens, cot)

    mesh = make_mesh(**MESHES[name])
    spec = nn.logical_to_mesh_axes(("vocab", "embed"), LOGICAL_RULES)
    with jax.set_mesh(mesh):
        table_s = jax.device_put(table, NamedSharding(mesh, spec))
        tokens_s = jax.device_put(tokens, NamedSharding(mesh, P(BATCH_AXES, "context")))
        cot_s = jax.device_put(cot, NamedSharding(mesh, P(BATCH_AXES, "context")))
        fn = jax.jit(_loss(lambda t, i: embed_lookup(t, i, jnp.float32)))
        hlo = fn.lower(table_s, tokens_s, cot_s).compile().as_text()
        y, g = fn(table_s, tokens_s, cot_s)
    np.testing.assert_allclose(float(y), float(want_y), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want_g), rtol=1e-6, atol=1e-6)
    assert "all-to-all" in hlo
    # no chip builds every token's embedding: nothing of the global [B, T, D] size is reduced
    assert f"f32[{B},{T},{D}]" not in hlo
