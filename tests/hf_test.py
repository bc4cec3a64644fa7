"""Hugging Face checkpoint import/export (dsjax.checkpoints.hf) against transformers' DeepseekV3ForCausalLM.

Tiny random HF models are built and saved with transformers itself; dsjax loads them and must
reproduce HF's logits, including YaRN beyond the original context, q LoRA on and off, group-
limited routing, dense/MoE stacks, FP8 block-quantised weights, the legacy rope dialect, sharded
files, MTP layers, and the reverse direction (dsjax -> HF).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import DeepseekV3ForCausalLM

import dsjax.checkpoints.hf as hf
import dsjax.checkpoints.hf_load as hf_load
import dsjax.checkpoints.hf_save as hf_save
from dsjax.checkpoints.hf import hf_tensor_table, load_hf_checkpoint, save_hf_checkpoint
from dsjax.model import transformer
from dsjax.model.config import ModelConfig
from tests import hf_fixtures as fx

T_LONG = 40  # > original_max_position_embeddings (16): YaRN's long-context regime
BATCH = 2

PARITY_CONFIGS = {
    # q LoRA, YaRN, 2 groups keep 1, norm_topk_prob on, one dense + one MoE layer.
    "base": {},
    # Plain q projection, norm_topk_prob off, 4 groups keep 2, top-3, YaRN with mscale 0.707.
    "no_q_lora": dict(
        q_lora_rank=None,
        norm_topk_prob=False,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        routed_scaling_factor=1.5,
        rope_parameters={**fx.YARN, "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 0.707},
        max_position_embeddings=128,
    ),
    # Two dense layers then one MoE layer, two shared experts, plain RoPE (no YaRN).
    "dense_stack": dict(
        num_hidden_layers=3,
        first_k_dense_replace=2,
        n_shared_experts=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # YaRN cos/sin attention factor != 1 (mscale != mscale_all_dim), tied embeddings.
    "tied_attention_factor": dict(
        rope_parameters={**fx.YARN, "mscale": 1.0, "mscale_all_dim": 0.5},
        tie_word_embeddings=True,
        n_group=1,
        topk_group=1,
    ),
}

FP8_CONFIG = dict(  # hidden 160 and intermediate 272: ragged 128x128 edge blocks, dims > 128
    vocab_size=96,
    hidden_size=160,
    intermediate_size=272,
    moe_intermediate_size=48,
    q_lora_rank=144,
    kv_lora_rank=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)


# ====================================================================== helpers
@functools.cache
def _apply_fn(cfg):
    from dsjax.model.transformer import Transformer

    model = Transformer(cfg.replace(remat="none"))  # same numerics, faster to compile
    return jax.jit(lambda variables, toks: model.apply(variables, toks))


def dsjax_outputs(cfg, variables, toks):
    """The dsjax model's output."""
    return _apply_fn(cfg)(variables, np.asarray(toks, np.int32))


def flat_leaves(variables) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        out["/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(leaf)
    return out


def assert_trees_equal(a, b) -> None:
    fa, fb = flat_leaves(a), flat_leaves(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert np.array_equal(fa[k], fb[k]), k


def rel_err(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |ours - ref|, that divided by max |ref|)."""
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - ref)))
    return err, err / float(np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """Lazily built {name: (hf_model, checkpoint path)} for the parity configs."""
    cache: dict[str, tuple[DeepseekV3ForCausalLM, Path]] = {}

    def get(name: str):
        if name not in cache:
            model = fx.make_hf_model(seed=len(cache) + 1, **PARITY_CONFIGS[name])
            path = fx.save_hf_model(model, tmp_path_factory.mktemp(name) / "ckpt")
            cache[name] = (model, path)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def base(hf_checkpoints):
    return hf_checkpoints("base")


@pytest.fixture(scope="module")
def mtp_checkpoint(base, tmp_path_factory):
    """The base checkpoint plus one MTP layer (index 2): (hf_model, MtpModules, path)."""
    model, src = base
    work = tmp_path_factory.mktemp("mtp")
    path = work / "ckpt"
    shutil.copytree(src, path)
    mods = fx.add_mtp_layer(path, model, seed=7, tmp=work)
    return model, mods, path


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """(hf float32 model, FP8 checkpoint path, dequantised float32 checkpoint path, reference)."""
    work = tmp_path_factory.mktemp("fp8")
    model = fx.make_hf_model(seed=11, **FP8_CONFIG)
    src = fx.save_hf_model(model, work / "f32")
    reference = fx.quantize_checkpoint_fp8(src, work / "fp8")
    deq = work / "deq"
    shutil.copytree(src, deq)
    fx.write_tensors(deq, reference)
    return model, work / "fp8", deq, reference


# ====================================================================== structure and values
def test_loaded_leaves_are_the_torch_weights(base):
    model, path = base
    cfg, v = load_hf_checkpoint(path)
    p, m = v["params"], model.model
    fm = cfg.moe_intermediate_size

    def t(x):
        return x.detach().numpy()

    assert cfg.num_mtp_layers == 0 and cfg.dtype == cfg.param_dtype == "float32"
    np.testing.assert_array_equal(p["embed"]["embedding"], t(m.embed_tokens.weight))
    np.testing.assert_array_equal(p["lm_head"]["kernel"], t(model.lm_head.weight).T)
    np.testing.assert_array_equal(p["final_norm"]["scale"], t(m.norm.weight))
    dense, moe = p["dense_layers"], p["moe_layers"]
    attn0 = m.layers[0].self_attn
    np.testing.assert_array_equal(dense["attn"]["q_a"]["kernel"][0], t(attn0.q_a_proj.weight).T)
    np.testing.assert_array_equal(
        dense["attn"]["kv_a_norm"]["scale"][0], t(attn0.kv_a_layernorm.weight)
    )
    np.testing.assert_array_equal(
        dense["mlp"]["down"]["kernel"][0], t(m.layers[0].mlp.down_proj.weight).T
    )
    mlp1 = m.layers[1].mlp
    np.testing.assert_array_equal(
        moe["attn"]["o"]["kernel"][0], t(m.layers[1].self_attn.o_proj.weight).T
    )
    np.testing.assert_array_equal(moe["moe"]["router"]["kernel"][0], t(mlp1.gate.weight).T)
    gate_up = t(mlp1.experts.gate_up_proj)  # HF fuses experts in memory: [E, 2F, D]
    for e in (0, 3, 7):
        np.testing.assert_array_equal(moe["moe"]["experts"]["gate"][0, e], gate_up[e, :fm].T)
        np.testing.assert_array_equal(moe["moe"]["experts"]["up"][0, e], gate_up[e, fm:].T)
        np.testing.assert_array_equal(
            moe["moe"]["experts"]["down"][0, e], t(mlp1.experts.down_proj)[e].T
        )
    np.testing.assert_array_equal(
        moe["moe"]["shared"]["up"]["kernel"][0], t(mlp1.shared_experts.up_proj.weight).T
    )
    bias = v["moe_bias"]["moe_layers"]["moe"]["bias"]
    assert bias.dtype == np.float32
    np.testing.assert_array_equal(bias[0], t(mlp1.gate.e_score_correction_bias))
    assert float(np.min(bias)) > 0.0


def test_tree_matches_model_init(mtp_checkpoint, tmp_path):
    model_mod = transformer
    from flax import linen as nn

    cfg, v = load_hf_checkpoint(mtp_checkpoint[2])
    assert cfg.num_mtp_layers == 1
    abstract = nn.unbox(model_mod.abstract_variables(cfg))
    want = {k: (s.shape, np.dtype(s.dtype)) for k, s in flat_leaves_abstract(abstract).items()}
    got = {k: (a.shape, a.dtype) for k, a in flat_leaves(v).items()}
    assert got == want
    # Boxed (nn.Partitioned, as straight from Transformer.init) variables save unchanged.
    boxed = jax.tree_util.tree_map(lambda x: nn.Partitioned(x, (None,) * x.ndim), v)
    save_hf_checkpoint(tmp_path / "boxed", cfg, boxed)
    assert_trees_equal(load_hf_checkpoint(tmp_path / "boxed")[1], v)


def flat_leaves_abstract(tree) -> dict:
    return {
        "/".join(str(getattr(p, "key", p)) for p in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_every_file_tensor_lands_in_its_slot(mtp_checkpoint):
    _, _, path = mtp_checkpoint
    cfg, v = load_hf_checkpoint(path)
    tensors = fx.read_tensors(path)
    table = hf_tensor_table(cfg)
    assert {e.key for e in table} == set(tensors)
    for e in table:
        node = v[e.collection]
        for part in e.path:
            node = node[part]
        got = np.asarray(node)[e.index]
        np.testing.assert_array_equal(got.T if e.transpose else got, tensors[e.key], err_msg=e.key)


# ====================================================================== 1. parity
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers(hf_checkpoints, name):
    model, path = hf_checkpoints(name)
    cfg, v = load_hf_checkpoint(path)
    toks = fx.tokens(BATCH, T_LONG, cfg.vocab_size, seed=3)
    ref = fx.hf_logits(model, toks)
    out = dsjax_outputs(cfg, v, toks)
    assert out.logits.shape == ref.shape
    err, rel = rel_err(out.logits, ref)
    print(f"parity[{name}]: max|err|={err:.3e} max|logit|={np.abs(ref).max():.3f} rel={rel:.3e}")
    assert rel <= 1e-4


# ====================================================================== 2. FP8
def test_fp8_checkpoint_is_really_fp8(fp8_checkpoints):
    _, fp8, _, _ = fp8_checkpoints
    with safe_open(str(fp8 / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.gate_proj.weight")  # [272, 160]
        s = f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and tuple(s.shape) == (3, 2)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
        assert "model.layers.1.mlp.gate.weight_scale_inv" not in f.keys()


def test_fp8_dequantisation_is_exact(fp8_checkpoints):
    _, fp8, deq, reference = fp8_checkpoints
    cfg8, v8 = load_hf_checkpoint(fp8)
    cfg32, v32 = load_hf_checkpoint(deq)
    assert cfg8 == cfg32
    assert_trees_equal(v8, v32)  # FP8 * block scale == float64 reference rounded to float32
    # And directly, for a ragged tensor: kv_a_proj_with_mqa is [40, 160] -> scales [1, 2].
    got = np.asarray(v8["params"]["moe_layers"]["attn"]["kv_a"]["kernel"][0]).T
    np.testing.assert_array_equal(
        got, reference["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    )


def test_fp8_logits_match_transformers(fp8_checkpoints):
    _, fp8, deq, _ = fp8_checkpoints
    cfg, v = load_hf_checkpoint(fp8)
    ref_model = DeepseekV3ForCausalLM.from_pretrained(deq, attn_implementation="eager").eval()
    toks = fx.tokens(BATCH, T_LONG, cfg.vocab_size, seed=4)
    ref = fx.hf_logits(ref_model, toks)
    err, rel = rel_err(dsjax_outputs(cfg, v, toks).logits, ref)
    print(f"parity[fp8]: max|err|={err:.3e} rel={rel:.3e}")
    assert rel <= 1e-4


def test_dequantize_fp8_ragged_blocks():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, 130)).astype(np.float32)
    w8, scale = fx.quantize_block_fp8(w)
    assert scale.shape == (3, 2)
    got = hf.dequantize_fp8(w8, scale, (128, 128))
    np.testing.assert_array_equal(got, fx.dequantize_reference(w8, scale))
    assert np.max(np.abs(got - w)) <= 0.07 * np.max(np.abs(w))  # e4m3: 3 mantissa bits


@settings(max_examples=30, deadline=None)
@given(
    out_dim=st.integers(1, 70),
    in_dim=st.integers(1, 70),
    b0=st.sampled_from([1, 8, 16, 32]),
    b1=st.sampled_from([1, 8, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_dequantize_fp8_any_block_size(out_dim, in_dim, b0, b1, seed):
    rng = np.random.default_rng(seed)
    w8 = (rng.standard_normal((out_dim, in_dim)) * 100).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(1e-4, 2.0, (-(-out_dim // b0), -(-in_dim // b1))).astype(np.float32)
    got = hf.dequantize_fp8(w8, scale, (b0, b1))
    np.testing.assert_array_equal(got, fx.dequantize_reference(w8, scale, (b0, b1)))


# ====================================================================== 3. legacy dialect
def test_legacy_rope_scaling_dialect(base, tmp_path):
    model, src = base
    path = tmp_path / "legacy"
    shutil.copytree(src, path)
    config = fx.read_config(path)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    fx.write_config(path, config)
    cfg_new, v_new = load_hf_checkpoint(src)
    cfg_old, v_old = load_hf_checkpoint(path)
    assert cfg_old == cfg_new and cfg_old.use_yarn and cfg_old.rope_factor == 4.0
    assert_trees_equal(v_old, v_new)
    toks = fx.tokens(BATCH, T_LONG, cfg_old.vocab_size, seed=5)
    ours = dsjax_outputs(cfg_old, v_old, toks).logits
    np.testing.assert_array_equal(ours, dsjax_outputs(cfg_new, v_new, toks).logits)
    assert rel_err(ours, fx.hf_logits(model, toks))[1] <= 1e-4


# ====================================================================== 4. sharding
def test_sharded_checkpoint_equals_single_file(mtp_checkpoint, tmp_path):
    _, _, src = mtp_checkpoint
    cfg, v = load_hf_checkpoint(src)
    save_hf_checkpoint(tmp_path / "sharded", cfg, v, max_shard_bytes=16 << 10)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((tmp_path / "sharded" / hf.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    keys = set()
    for s in shards:  # the files are valid safetensors for the reference reader
        with safe_open(str(s), "np") as f:
            keys |= set(f.keys())
    assert keys == set(fx.read_tensors(src)) == set(index["weight_map"])
    cfg2, v2 = load_hf_checkpoint(tmp_path / "sharded")
    assert cfg2 == cfg
    assert_trees_equal(v2, v)


# ====================================================================== 5. export
def test_export_loads_in_transformers(hf_checkpoints, tmp_path):
    for name in ("base", "tied_attention_factor"):
        model, path = hf_checkpoints(name)
        cfg, v = load_hf_checkpoint(path)
        save_hf_checkpoint(tmp_path / name, cfg, v)
        exported = DeepseekV3ForCausalLM.from_pretrained(
            tmp_path / name, attn_implementation="eager"
        ).eval()
        toks = fx.tokens(BATCH, T_LONG, cfg.vocab_size, seed=6)
        err, rel = rel_err(fx.hf_logits(exported, toks), fx.hf_logits(model, toks))
        assert rel <= 1e-5, (name, err, rel)


def test_export_reimport_is_bit_exact_with_mtp(mtp_checkpoint, tmp_path):
    model, _, src = mtp_checkpoint
    cfg, v = load_hf_checkpoint(src)
    save_hf_checkpoint(tmp_path / "out", cfg, v)
    # transformers loads it too (it reports and skips the MTP layer's keys).
    exported = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    toks = fx.tokens(1, 8, cfg.vocab_size, seed=9)
    np.testing.assert_array_equal(fx.hf_logits(exported.eval(), toks), fx.hf_logits(model, toks))
    cfg2, v2 = load_hf_checkpoint(tmp_path / "out")
    assert cfg2 == cfg
    assert_trees_equal(v2, v)
    original, written = fx.read_tensors(src), fx.read_tensors(tmp_path / "out")
    assert written.keys() == original.keys()  # MTP copies of embedding and head included
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)


def test_export_bfloat16(base, tmp_path):
    _, src = base
    cfg, v = load_hf_checkpoint(src)
    save_hf_checkpoint(tmp_path / "bf16", cfg, v, dtype="bfloat16")
    assert fx.read_config(tmp_path / "bf16")["torch_dtype"] == "bfloat16"
    cfg2, v2 = load_hf_checkpoint(tmp_path / "bf16", dtype=None)
    assert cfg2.param_dtype == "bfloat16"
    f1, f2 = flat_leaves(v), flat_leaves(v2)
    for k in f1:
        want = f1[k] if k.startswith("moe_bias") else f1[k].astype(ml_dtypes.bfloat16)
        assert f2[k].dtype == want.dtype, k
        np.testing.assert_array_equal(f2[k], want, err_msg=k)


# ====================================================================== host memory
MEMORY_CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=2,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    num_mtp_layers=1,
    dtype="float32",
    param_dtype="float32",
)


def test_host_memory_peaks_at_one_model_copy(tmp_path):
    """Load: leaves preallocated and filled in place (peak ~ 1 copy, not dict + stack).
    Save: streamed tensor by tensor (peak ~ 1 tensor)."""
    cfg = ModelConfig(**MEMORY_CONFIG)
    rng = np.random.default_rng(0)
    flat = {
        slot: rng.standard_normal(shape, dtype=np.float32)
        for slot, shape in hf.leaf_shapes(cfg).items()
    }
    variables = hf_load._nest(flat)
    total = sum(a.nbytes for a in flat.values())
    assert total > 8 << 20

    tracemalloc.start()
    try:
        save_hf_checkpoint(tmp_path / "ckpt", cfg, variables, dtype="bfloat16")
        save_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        base_mem = tracemalloc.get_traced_memory()[0]
        cfg2, loaded = load_hf_checkpoint(tmp_path / "ckpt", place=lambda leaf: leaf)
        load_peak = tracemalloc.get_traced_memory()[1] - base_mem
    finally:
        tracemalloc.stop()
    print(
        f"memory: model {total / 2**20:.1f} MiB, save peak {save_peak / 2**20:.2f} MiB, "
        f"load peak {load_peak / 2**20:.2f} MiB"
    )
    assert save_peak < 0.1 * total
    assert load_peak < 1.1 * total
    assert cfg2 == cfg
    for slot, leaf in flat.items():
        node = loaded[slot[0]]
        for part in slot[1]:
            node = node[part]
        want = leaf if slot[0] == "moe_bias" else leaf.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(node, want)


# ====================================================================== 6. MTP
def test_mtp_logits_match_hf_modules(mtp_checkpoint):
    model, mods, path = mtp_checkpoint
    cfg, v = load_hf_checkpoint(path)
    toks = fx.tokens(BATCH, T_LONG, cfg.vocab_size, seed=8)
    ref = fx.mtp_reference_logits(model, mods, toks)  # [B, T-1, V]
    out = dsjax_outputs(cfg, v, toks)
    assert len(out.mtp_logits) == 1
    ours = np.asarray(out.mtp_logits[0])[:, : T_LONG - 1]
    assert ours.shape == ref.shape
    err, rel = rel_err(ours, ref)
    print(f"parity[mtp]: max|err|={err:.3e} rel={rel:.3e}")
    assert rel <= 1e-4
    assert rel_err(out.logits, fx.hf_logits(model, toks))[1] <= 1e-4  # MTP tensors ignored by HF


def test_mtp_load_options(mtp_checkpoint, base, tmp_path):
    _, _, path = mtp_checkpoint
    cfg, v = load_hf_checkpoint(path, load_mtp=False)
    assert cfg.num_mtp_layers == 0 and not any(k.startswith("mtp_") for k in v["params"])
    assert_trees_equal(v, load_hf_checkpoint(base[1])[1])
    # MTP tensors present but num_nextn_predict_layers = 0: ignored.
    shutil.copytree(path, tmp_path / "zero")
    config = fx.read_config(tmp_path / "zero")
    config["num_nextn_predict_layers"] = 0
    fx.write_config(tmp_path / "zero", config)
    cfg0, v0 = load_hf_checkpoint(tmp_path / "zero")
    assert cfg0.num_mtp_layers == 0
    assert_trees_equal(v0, v)
    # num_nextn_predict_layers = 1 without MTP tensors (what HF's save_pretrained writes).
    shutil.copytree(base[1], tmp_path / "no_mtp")
    config = fx.read_config(tmp_path / "no_mtp")
    config["num_nextn_predict_layers"] = 1
    fx.write_config(tmp_path / "no_mtp", config)
    with pytest.raises(ValueError, match=r"MTP tensor\(s\) model\.layers\.2\..*load_mtp=False"):
        load_hf_checkpoint(tmp_path / "no_mtp", load_mtp=True)
    assert load_hf_checkpoint(tmp_path / "no_mtp", load_mtp=False)[0].num_mtp_layers == 0


# ====================================================================== 7. errors and atomicity
def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = fx.read_tensors(dst)
    config = fx.read_config(dst)
    edit(tensors, config)
    fx.write_tensors(dst, tensors)
    fx.write_config(dst, config)
    return dst


def _drop(key):
    return lambda tensors, config: tensors.pop(key)


def _reshape(key, shape):
    return lambda tensors, config: tensors.__setitem__(key, np.zeros(shape, np.float32))


def _add(key):
    return lambda tensors, config: tensors.__setitem__(key, np.zeros((4,), np.float32))


def _config(field, value):
    return lambda tensors, config: config.__setitem__(field, value)


def _fp8_without_scale(tensors, config):
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


ERROR_CASES = {
    "missing": (
        _drop("model.layers.1.mlp.experts.7.up_proj.weight"),
        r"missing tensor model\.layers\.1\.mlp\.experts\.7\.up_proj\.weight in .*ckpt",
    ),
    "shape": (
        _reshape("model.layers.0.self_attn.kv_b_proj.weight", (64, 15)),
        r"model\.layers\.0\.self_attn\.kv_b_proj\.weight has shape \(64, 15\) but config "
        r"implies \(64, 16\)",
    ),
    "unexpected": (
        _add("model.layers.0.self_attn.q_proj.bias"),
        r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias",
    ),
    "model_type": (_config("model_type", "llama"), r"model_type='llama' is not supported"),
    "architecture": (
        _config("architectures", ["DeepseekV3ForSequenceClassification"]),
        r"architectures=\['DeepseekV3ForSequenceClassification'\] is not supported",
    ),
    "rope_type": (
        _config("rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
        r"rope type 'dynamic'",
    ),
    "quant_method": (
        _config("quantization_config", {"quant_method": "gptq"}),
        r"quant_method='gptq'",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_load_errors_name_the_culprit(base, tmp_path, case):
    edit, pattern = ERROR_CASES[case]
    path = _edit_checkpoint(base[1], tmp_path / "ckpt", edit)
    with pytest.raises(ValueError, match=pattern):
        load_hf_checkpoint(path)


def test_fp8_tensor_without_scale_is_rejected(fp8_checkpoints, tmp_path):
    _, fp8, _, _ = fp8_checkpoints
    shutil.copytree(fp8, tmp_path / "ckpt")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is F8_E4M3"):
        load_hf_checkpoint(tmp_path / "ckpt")


def test_v2_checkpoint_without_router_bias_loads_zero_bias(base, tmp_path):
    def to_v2(tensors, config):
        del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
        config.update(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy")

    path = _edit_checkpoint(base[1], tmp_path / "ckpt", to_v2)
    cfg, v = load_hf_checkpoint(path)
    assert cfg.scoring_func == "softmax"
    np.testing.assert_array_equal(v["moe_bias"]["moe_layers"]["moe"]["bias"], np.zeros((1, 8)))
    save_hf_checkpoint(tmp_path / "out", cfg, v)
    assert set(fx.read_tensors(tmp_path / "out")) == set(fx.read_tensors(path))


def test_save_rejects_wrong_variables(base, tmp_path):
    cfg, v = load_hf_checkpoint(base[1])
    v["params"]["final_norm"]["scale"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"params/final_norm/scale has shape \(5,\)"):
        save_hf_checkpoint(tmp_path / "x", cfg, v)
    v["params"]["final_norm"]["scale"] = np.zeros(cfg.hidden_size, np.float32)
    v["params"]["extra"] = {"w": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"params/extra/w has no Hugging Face tensor"):
        save_hf_checkpoint(tmp_path / "x", cfg, v)
    assert not (tmp_path / "x").exists()


def test_failed_save_keeps_the_old_checkpoint(base, tmp_path, monkeypatch):
    cfg, v = load_hf_checkpoint(base[1])
    target = tmp_path / "ckpt"
    save_hf_checkpoint(target, cfg, v, max_shard_bytes=16 << 10)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    zeroed = jax.tree_util.tree_map(np.zeros_like, v)

    real_write = hf_save._write_shard
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(hf_save, "_write_shard", failing_write)
    with pytest.raises(OSError, match="simulated"):
        save_hf_checkpoint(target, cfg, zeroed, max_shard_bytes=16 << 10)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left over
    assert_trees_equal(load_hf_checkpoint(target)[1], v)

    monkeypatch.setattr(hf_save, "_write_shard", real_write)
    save_hf_checkpoint(target, cfg, zeroed)  # a successful save replaces it entirely
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_trees_equal(load_hf_checkpoint(target)[1], zeroed)


# ====================================================================== load_mtp="auto"
def test_transformers_checkpoint_without_mtp_tensors_loads_with_one_warning(tmp_path):
    """transformers saves num_nextn_predict_layers=1 in config.json but no MTP tensors."""
    model = fx.make_hf_model(seed=3, num_nextn_predict_layers=1)
    path = fx.save_hf_model(model, tmp_path / "ckpt")
    assert fx.read_config(path)["num_nextn_predict_layers"] == 1
    assert not any(k.startswith("model.layers.2.") for k in fx.read_tensors(path))
    with pytest.warns(UserWarning) as record:
        cfg, v = load_hf_checkpoint(path)
    assert len(record) == 1, [str(r.message) for r in record]
    assert "num_nextn_predict_layers=1" in str(record[0].message)
    assert "no MTP tensors" in str(record[0].message)
    assert cfg.num_mtp_layers == 0 and not any(k.startswith("mtp_") for k in v["params"])
    np.testing.assert_array_equal(
        np.asarray(v["params"]["embed"]["embedding"]),
        model.model.embed_tokens.weight.detach().numpy(),
    )


def test_auto_mtp_loads_a_complete_layer_and_names_a_partial_one(mtp_checkpoint, tmp_path):
    _, _, path = mtp_checkpoint
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, v = load_hf_checkpoint(path)  # "auto" with all MTP tensors present: no warning
    assert cfg.num_mtp_layers == 1 and "mtp_0" in v["params"]
    partial = _edit_checkpoint(
        path,
        tmp_path / "ckpt",
        lambda t, c: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.self_attn")],
    )
    with pytest.raises(ValueError, match=r"MTP tensor\(s\) model\.layers\.2\.self_attn\."):
        load_hf_checkpoint(partial)
    with pytest.raises(ValueError, match="load_mtp must be"):
        load_hf_checkpoint(path, load_mtp="yes")


# ====================================================================== malformed files
def _safetensors_bytes(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


HEADER_CASES = {
    "header_list": ([1, 2], r"header: a JSON list, not an object"),
    "entry_string": ({"a": "x"}, r"tensor 'a' in the safetensors header of .* is a str"),
    "no_offsets": ({"a": {"dtype": "F32", "shape": [1]}}, r"tensor 'a' .* has no 'data_offsets'"),
    "bad_shape": (
        {"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}},
        r"shape \['1'\] is not a list of integers",
    ),
    "span": (
        {"a": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 0]}},
        r"span 0 bytes but shape \[1000000000\] of F32 needs 4000000000",
    ),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_malformed_safetensors_header_names_the_file(base, tmp_path, case):
    header, pattern = HEADER_CASES[case]
    path = tmp_path / "ckpt"
    shutil.copytree(base[1], path)
    (path / "model.safetensors").write_bytes(_safetensors_bytes(header))
    with pytest.raises(ValueError, match=pattern) as err:
        load_hf_checkpoint(path)
    assert "model.safetensors" in str(err.value)


JSON_CASES = {
    "config_list": ("config.json", b"[1, 2]", r"config\.json must hold a JSON object, not a list"),
    "config_not_json": ("config.json", b"{oops", r"config\.json is not a valid .*JSON"),
    "config_not_utf8": ("config.json", b'{"a": "\xff\xfe"}', r"config\.json is not a UTF-8"),
    "index_no_weight_map": (
        "model.safetensors.index.json",
        b'{"metadata": {}}',
        r"index\.json has no \"weight_map\"",
    ),
    "index_not_json": ("model.safetensors.index.json", b"\x00\x01", r"index\.json is not"),
    "index_escape": (
        "model.safetensors.index.json",
        b'{"weight_map": {"a": "../model.safetensors"}}',
        r"outside its directory",
    ),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_malformed_config_or_index_names_the_file(base, tmp_path, case):
    name, content, pattern = JSON_CASES[case]
    path = tmp_path / "ckpt"
    shutil.copytree(base[1], path)
    (path / name).write_bytes(content)
    with pytest.raises(ValueError, match=pattern):
        load_hf_checkpoint(path)


def _peak_rss_growth(fn) -> int:
    """Peak bytes allocated (Python objects and numpy buffers) while running `fn`."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("num_hidden_layers", 10**6, r"num_hidden_layers=1000000.* implies \d+ tensors"),
        ("n_routed_experts", 10**7, r"n_routed_experts=10000000.* implies \d+ tensors"),
        ("vocab_size", 10**9, r"model\.embed_tokens\.weight has shape \(64, 32\) but config"),
    ],
)
def test_huge_config_is_checked_against_the_files_first(base, tmp_path, field, value, pattern):
    path = tmp_path / "ckpt"
    shutil.copytree(base[1], path)
    config = fx.read_config(path)
    config[field] = value
    fx.write_config(path, config)
    t0 = time.perf_counter()

    def load():
        with pytest.raises(ValueError, match=pattern):
            load_hf_checkpoint(path)

    assert _peak_rss_growth(load) < 200 << 20
    assert time.perf_counter() - t0 < 10


def test_huge_vocab_consistent_with_the_header_is_refused_before_allocation(base, tmp_path):
    """A 10**9-token embedding and head whose headers and (sparse) file sizes agree with
    config.json: the parameters need more host memory than there is, said before allocating."""
    path = tmp_path / "ckpt"
    shutil.copytree(base[1], path)
    config = fx.read_config(path)
    vocab, d = 10**9, config["hidden_size"]
    config["vocab_size"] = vocab
    fx.write_config(path, config)
    tensors = fx.read_tensors(path)
    header, offset, blobs = {}, 0, []
    for key, arr in tensors.items():
        shape = (vocab, d) if key in ("model.embed_tokens.weight", "lm_head.weight") else arr.shape
        nbytes = math.prod(shape) * 4
        offsets = [offset, offset + nbytes]
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": offsets}
        blobs.append((offset, None if shape != arr.shape else arr.astype(np.float32).tobytes()))
        offset += nbytes
    head = _safetensors_bytes(header)
    with open(path / "model.safetensors", "wb") as f:
        f.write(head)
        for start, blob in blobs:
            if blob is not None:
                f.seek(len(head) + start)
                f.write(blob)
        f.truncate(len(head) + offset)  # the 2 x 128 GB of the huge tensors stay sparse
    t0 = time.perf_counter()

    def load():
        with pytest.raises(ValueError, match=r"needs \d+\.\d GiB of host memory"):
            load_hf_checkpoint(path)

    assert _peak_rss_growth(load) < 200 << 20
    assert time.perf_counter() - t0 < 10


HOSTILE_VALUES = [-(10**30), -1, 0, 10**30, 1.5, float("nan"), True, "", "x", None, [], {}, [1, 2]]


def test_any_config_json_value_loads_or_is_one_value_error(base, tmp_path):
    """Every config.json field set to each hostile value: a load or a ValueError, fast."""
    import warnings

    path = tmp_path / "ckpt"
    shutil.copytree(base[1], path)
    config = fx.read_config(path)
    t0 = time.perf_counter()
    unnamed: list[str] = []
    for key in config:
        for value in HOSTILE_VALUES:
            fx.write_config(path, {**config, key: value})
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    load_hf_checkpoint(path)
            except ValueError as err:
                if "field of the wrong type" in str(err):  # the loader's last resort
                    unnamed.append(f"{key}={value!r}: {err}")
    assert time.perf_counter() - t0 < 60
    assert not unnamed, "errors that do not name the field:\n" + "\n".join(unnamed)
