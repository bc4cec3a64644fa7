"""The rule table's divisibility fallback (`dsjax.model.sharding.fit_spec`): a dimension its
rule's mesh axes do not divide splits over the longest leading run of them that does, else
stays whole, wherever shardings are made (train state, decode placement, pipeline pins).
No compiles: shapes and shardings only."""

from __future__ import annotations

import jax
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.model import sharding
from dsjax.model.transformer import Transformer, abstract_variables
from dsjax.testing import tiny_config
from dsjax.train import pipeline, step

EMBED = ("fsdp", "expert", "context")


@pytest.fixture(scope="module")
def mesh():
    """expert 2 x context 4: the embed / q_lora rules split over 1 x 2 x 4 = 8 ways."""
    return sharding.make_mesh(data=1, fsdp=1, expert=2, context=4)


@pytest.fixture(scope="module")
def cfg():
    """q_lora_rank 12: 8 does not divide it, fsdp x expert = 2 does."""
    return tiny_config(q_lora_rank=12)


def test_fit_spec_cuts_to_the_longest_leading_run_that_divides():
    mesh = jax.sharding.AbstractMesh((1, 1, 1, 8, 128, 1), sharding.MESH_AXES)
    # V4-Pro's q_lora (1,536) on v5p-1024's expert 8 x context 128: 1,024 does not divide it.
    assert sharding.fit_spec(P(None, EMBED), (2, 1536), mesh) == P(None, ("fsdp", "expert"))
    # Dimensions that divide keep their spec, whatever its form.
    assert sharding.fit_spec(P(None, EMBED), (2, 2048), mesh) == P(None, EMBED)
    assert sharding.fit_spec(P("expert", None), (16, 3), mesh) == P("expert", None)
    assert sharding.fit_spec(P(), (3, 5), mesh) == P()
    # A single axis that does not divide, and a run none of whose prefixes do: whole.
    assert sharding.fit_spec(P("expert"), (12,), mesh) == P(None)
    assert sharding.fit_spec(P(("context", "expert")), (24,), mesh) == P(None)
    assert sharding.fit_spec(P(("expert", "context")), (24,), mesh) == P("expert")


def test_unfit_spec_is_what_fails_without_the_fallback(mesh):
    """The refusal V4-Pro hit on v5p-1024 (a [2, 1536] parameter split 1,024 ways), at 8."""
    unfit = NamedSharding(mesh, P(None, EMBED))
    with pytest.raises(ValueError, match="partitioned 8 times, but the dimension size is 12"):
        unfit.shard_shape((2, 12))
    fitted = NamedSharding(mesh, sharding.fit_spec(unfit.spec, (2, 12), mesh))
    assert fitted.shard_shape((2, 12)) == (2, 6)


def _q_lora_specs(tree, shardings):
    """The set of mesh axes the 12 (q_lora) dimension of each leaf that has one splits over:
    ("fsdp", "expert") where the fallback cut the rule's run, None where the leaf's embed dim
    took those axes (q_a [embed, q_lora])."""
    out = []
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        if 12 in leaf.shape:
            spec = list(sh.spec) + [None] * (leaf.ndim - len(sh.spec))
            out.append(spec[leaf.shape.index(12)])
    return set(out)


def test_train_state_shardings_fall_back_on_q_lora(cfg, mesh):
    tx = optax.adamw(1e-3)
    abstract, shardings = step.state_shardings(Transformer(cfg), tx, mesh, seq_len=8)
    q_lora = _q_lora_specs(abstract.params, shardings.params)
    assert q_lora == {("fsdp", "expert"), None}
    # The AdamW moments are placed like their parameters.
    mu = abstract.opt_state[0].mu
    assert _q_lora_specs(mu, jax.tree.map(lambda a: a.sharding, mu)) == q_lora
    # Dimensions that divide keep the table's full split (the embed dim, 32 over 8).
    kernel = abstract.params["embed"]["embedding"]
    assert kernel.sharding.spec[1] == EMBED


def test_decode_placement_and_pipeline_pins_fall_back(cfg, mesh):
    boxed = abstract_variables(cfg)
    variables = nn.unbox(boxed)
    placed = sharding.variable_shardings(nn.get_partition_spec(boxed), variables, mesh)
    assert _q_lora_specs(variables, placed) == {("fsdp", "expert"), None}
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        pins = pipeline.param_specs(cfg, variables["params"], mesh)
    pinned = jax.tree.map(
        lambda s: NamedSharding(mesh, s), pins, is_leaf=lambda x: isinstance(x, P)
    )
    assert _q_lora_specs(variables["params"], pinned) == {("fsdp", "expert"), None}
