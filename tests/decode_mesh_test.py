"""The decode layout (`dsjax.model.sharding.logical_rules("decode")`, `DecodeMesh`) on 8 CPU
devices: generate's tokens and the absorbed decode forward's logits equal single-device decode,
and the compiled decode step (the planner's program) all-gathers no weight and no cache, where
the FSDP layout gathers weights every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dsjax.inference.decode import decode_forward, zeros_cache
from dsjax.inference.generate import generate, main_cache
from dsjax.inference.meshes import DecodeMesh
from dsjax.model import sharding
from dsjax.model.transformer import init_variables
from dsjax.plan import hlo_stats, planner
from dsjax.testing import tiny_config

HLO_DTYPES = {"float32": "f32", "bfloat16": "bf16", "int32": "s32"}
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [3, 3, 3, 3, 3, 3, 3]]


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()  # 4 heads, 8 experts top-2
    return cfg, init_variables(cfg, jax.random.key(0))


def test_layout_rules_place_weights_by_expert_and_tensor():
    rules = sharding.logical_rules("decode")
    spec = lambda names: nn.logical_to_mesh_axes(names, rules)  # noqa: E731
    assert spec(("expert", "embed", "mlp")) == jax.sharding.PartitionSpec("expert", None, "tensor")
    assert spec(("embed", "q_lora")) == jax.sharding.PartitionSpec(None, None)
    assert spec(("kv_lora", "heads")) == jax.sharding.PartitionSpec(None, "tensor")
    assert spec(("vocab", "embed")) == jax.sharding.PartitionSpec("tensor", None)
    assert spec(("cache_batch", "length", "heads", None))[0] == sharding.DECODE_CACHE_AXES
    assert sharding.LOGICAL_RULES == sharding.logical_rules("fsdp")
    with pytest.raises(ValueError, match="layout='bogus'"):
        sharding.logical_rules("bogus")
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        DecodeMesh.parse("experts=2")


@pytest.mark.parametrize("spec", ["expert=2,tensor=4", "expert=4,tensor=2"])
def test_generate_on_decode_mesh_equals_single_device(model, spec):
    cfg, variables = model
    dm = DecodeMesh.parse(spec)
    placed = dm.place(cfg, variables)
    gate = placed["params"]["moe_layers"]["moe"]["experts"]["gate"]
    assert tuple(gate.sharding.spec)[1:] == ("expert", None, "tensor")  # [L, E, D, F]
    want = generate(cfg, variables, PROMPTS, 8)
    assert generate(cfg, placed, PROMPTS, 8, mesh=dm).tokens == want.tokens
    if spec == "expert=2,tensor=4":  # MTP drafting and verification on the mesh too
        got = generate(cfg, placed, PROMPTS, 8, mesh=dm, speculative=True)
        assert got.tokens == want.tokens


def _assert_decode_logits_match(cfg, variables, dm, placed, B=8, S=16):
    """One decode step over a random cache: logits on the mesh (`placed`) equal one device's."""
    cache = main_cache(zeros_cache(cfg, B, S))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    cache = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), cache)
    tokens = jax.random.randint(jax.random.key(2), (B, 1), 0, cfg.vocab_size)
    positions = jax.random.randint(jax.random.key(3), (B, 1), 1, S)
    step = jax.jit(lambda v, c, t, p: decode_forward(cfg, v, c, t, p)[0])
    want = step(variables, cache, tokens, positions)
    with dm.context():
        got = step(placed, cache, tokens, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_decode_forward_logits_on_decode_mesh_equal_single_device(model):
    cfg, variables = model
    dm = DecodeMesh.parse("expert=2,tensor=4")
    _assert_decode_logits_match(cfg, variables, dm, dm.place(cfg, variables))


def _gathered_state(cfg, layout, mesh_sizes):
    """(all-gather result shapes, weight and cache shapes) of the planner's decode step."""
    mesh = sharding.make_mesh(**mesh_sizes)
    lowered, abs_vars, abs_cache = planner.lower_decode(cfg, mesh, layout, batch=8, cache_len=32)
    gathered = hlo_stats.result_shapes(lowered.compile().as_text(), "all-gather")
    stored = set()
    for leaf in jax.tree.leaves((abs_vars, abs_cache)):
        dtype = HLO_DTYPES[jnp.dtype(leaf.dtype).name]
        if leaf.ndim >= 2:  # whole, or one layer's of a scanned stack
            stored |= {(dtype, tuple(leaf.shape)), (dtype, tuple(leaf.shape[1:]))}
    return gathered, stored


def test_decode_step_gathers_no_weights_on_decode_mesh():
    cfg = tiny_config()
    gathered, stored = _gathered_state(cfg, "decode", dict(data=1, expert=2, tensor=4))
    assert gathered  # routing counts and sampled rows still travel
    assert not [s for s in gathered if s in stored], gathered
    # The FSDP layout of the same weights gathers them every step.
    gathered, stored = _gathered_state(cfg, "fsdp", dict(data=1, fsdp=2, expert=4))
    assert [s for s in gathered if s in stored]


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_engine_on_decode_mesh_equals_generate(model, impl):
    """8 slots on 8 chips: each chip holds its row's pages (shard-local tables) and the decode
    steps read them in shard_map, by the gather path or the Pallas kernel (interpreted)."""
    from dsjax.inference.engine import Engine
    from dsjax.inference.sampling import SamplingParams

    cfg, variables = model
    dm = DecodeMesh.parse("expert=2,tensor=4")
    want = generate(cfg, variables, PROMPTS, 6).tokens
    kw = dict(slots=8, max_len=32, min_batch=8, min_window=32, speculative=False, page_size=8)
    with Engine(cfg, variables, mesh=dm, paged_attention=impl, **kw) as eng:
        assert eng._shards == sharding.DECODE_CACHE_AXES and eng.paged_attention == impl
        gate = eng._variables["params"]["moe_layers"]["moe"]["experts"]["gate"]
        assert tuple(gate.sharding.spec)[1:] == ("expert", None, "tensor")
        got = [eng.generate(p, SamplingParams(max_tokens=6), timeout=600)[0] for p in PROMPTS]
        eng._sched.pools[0].check()
    assert got == want


def test_planner_decode_step_updates_the_cache_in_place():
    """The planner's decode step (page pools, shard-local pages) aliases the donated pools to
    its output and holds no second copy: temporaries stay below one cache (the per-layer
    gathered view is a third of it here). The old step, which split the cache by layer into the
    scan and wrote a new one, needed 937 KB of temporaries for a 590 KB cache at this shape (608 KB with TRASH pages)."""
    cfg = tiny_config()
    mesh = sharding.make_mesh(data=1, expert=2, tensor=4)
    lowered, _, abs_cache = planner.lower_decode(cfg, mesh, "decode", batch=8, cache_len=2048)
    memory = lowered.compile().memory_analysis()
    cache = planner.shard_bytes(abs_cache)  # per chip: 1 row's 32 pages of 64 + its TRASH
    assert memory.alias_size_in_bytes == cache
    assert memory.temp_size_in_bytes < cache


@pytest.fixture(scope="module")
def kept_fp8(tmp_path_factory):
    """A tiny V3 FP8 release (the FP8 export of random weights) loaded with keep_fp8. Hidden 256
    and the experts' width 512 give 128x128 blocks: on expert=2,tensor=4 the experts' scales
    split over tensor with their weights (512 = 4 shards of one block), the attention's
    (heads 4 x 16 = 64 columns, one block) stay whole beside weights split four ways."""
    from dsjax.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint

    cfg = tiny_config(hidden_size=256, moe_intermediate_size=512, num_mtp_layers=0)
    path = tmp_path_factory.mktemp("fp8") / "release"
    save_hf_checkpoint(path, cfg, init_variables(cfg, jax.random.key(4)), fp8=True)
    return load_hf_checkpoint(path, keep_fp8=True)


def test_kept_fp8_decodes_on_decode_mesh_as_on_one_device(kept_fp8):
    cfg, variables = kept_fp8
    experts = variables["params"]["moe_layers"]["moe"]["experts"]
    assert experts["gate"].dtype == jnp.float8_e4m3fn
    assert experts["gate_scale_inv"].shape[-2:] == (2, 4)  # [L, E, 256/128, 512/128]
    dm = DecodeMesh.parse("expert=2,tensor=4")
    placed = dm.place(cfg, variables)
    experts = placed["params"]["moe_layers"]["moe"]["experts"]
    for name, spec in (("gate", ("expert", None, "tensor")), ("down", ("expert", "tensor", None))):
        assert tuple(experts[name].sharding.spec)[1:] == spec
        assert tuple(experts[f"{name}_scale_inv"].sharding.spec)[1:] == spec  # [L, E, grid]
    q_b = placed["params"]["moe_layers"]["attn"]["q_b"]
    assert tuple(q_b["kernel"].sharding.spec)[-1] == "tensor"  # 64 columns, 4 ways
    assert tuple(q_b["kernel_scale_inv"].sharding.spec)[1:] == (None, None)  # one block: whole
    want = generate(cfg, variables, PROMPTS, 8)
    assert generate(cfg, placed, PROMPTS, 8, mesh=dm).tokens == want.tokens

    _assert_decode_logits_match(cfg, variables, dm, placed)
