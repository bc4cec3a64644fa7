"""DeepSeek-V4: config translation, logits against transformers' DeepseekV4ForCausalLM (fp32),
checkpoint import/export (official naming, FP8 / FP4, MTP, hash tables), bit-exact round trips."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from dsjax.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint
from dsjax.checkpoints.hf_fp8 import dequantize_variables
from dsjax.checkpoints.hf_table_v4 import float32_leaf, v4_tensor_table
from dsjax.checkpoints.safetensors_io import SafetensorsFile
from dsjax.model.config import CSA, HCA, SLIDING, ModelConfig
from dsjax.model.transformer import Transformer, count_params
from tests import v4_fixtures as fx


def released_flash() -> dict:
    """DeepSeek-V4-Flash's config.json as released (legacy field names included)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
        "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
        "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
        "sliding_window": 128, "n_routed_experts": 256, "num_experts_per_tok": 6,
        "n_shared_experts": 1, "moe_intermediate_size": 2048, "num_hash_layers": 3,
        "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0, "max_position_embeddings": 1048576,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "topk_method": "noaux_tc",
        "compress_ratios": [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0],
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        "expert_dtype": "fp4", "bos_token_id": 0, "eos_token_id": 1,
    }  # fmt: skip


def test_config_from_released_flash_and_back_through_transformers():
    released = released_flash()
    cfg = ModelConfig.from_hf(released)
    assert cfg.is_v4 and cfg.num_mtp_layers == 1 and cfg.num_hash_layers == 3
    assert cfg.layer_types[:3] == (SLIDING, SLIDING, CSA) and cfg.layer_types[3] == HCA
    assert cfg.layer_types.count(CSA) == 21 and cfg.layer_types.count(HCA) == 20
    assert (cfg.rope_factor, cfg.rope_original_max_position) == (16.0, 65536)
    assert cfg.qk_rope_head_dim == 64 and cfg.softmax_scale == 512**-0.5
    hf_cfg = DeepseekV4Config(**{k: v for k, v in released.items() if k != "quantization_config"})
    assert ModelConfig.from_hf(hf_cfg.to_dict()) == cfg
    back = DeepseekV4Config(**cfg.to_hf())
    assert back.layer_types == hf_cfg.layer_types
    assert back.mlp_layer_types == hf_cfg.mlp_layer_types
    keys = (
        "rope_type",
        "rope_theta",
        "partial_rotary_factor",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
    )
    for label in ("main", "compress"):
        a, b = back.rope_parameters[label], hf_cfg.rope_parameters[label]
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, label
    assert back.rope_parameters["compress"]["attention_factor"] == 1.0
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_flash_and_pro_configs_match_the_release():
    from configs import deepseek_v4_flash, deepseek_v4_pro

    flash = ModelConfig(**deepseek_v4_flash.get_config().model.to_dict())
    assert ModelConfig.from_hf(flash.to_hf()) == flash
    want = ModelConfig.from_hf(released_flash())
    arch = lambda c: c.replace(dtype="float32", param_dtype="float32", remat="full")  # noqa: E731
    assert arch(flash).to_hf() == arch(want).to_hf()
    counts = count_params(flash)  # the release: 284B total, 13B activated
    assert 284.0e9 < counts["total"] < 284.7e9 and 13.0e9 < counts["activated"] < 13.5e9
    pro = ModelConfig(**deepseek_v4_pro.get_config().model.to_dict())
    assert pro.layer_types[:2] == (HCA, HCA) and pro.layer_types.count(CSA) == 30
    assert (pro.hidden_size, pro.n_routed_experts, pro.index_topk) == (7168, 384, 1024)


def test_config_rejects_bad_v4_fields():
    hf = {**released_flash(), "num_key_value_heads": 2}
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_hf(hf)
    with pytest.raises(ValueError, match="compress_ratios"):
        ModelConfig.from_hf({**released_flash(), "compress_ratios": [0, 5] + [4] * 42})
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf({**released_flash(), "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(ValueError, match="mlp_layer_types"):
        ModelConfig.from_hf(
            {**released_flash(), "mlp_layer_types": ["moe", "hash_moe"] + ["moe"] * 41}
        )


@pytest.fixture(scope="module")
def ids():
    return fx.token_ids()


@pytest.fixture(scope="module")
def hf_pair(ids):
    return fx.tie_free_model(ids)


@pytest.fixture(scope="module")
def hf_model(hf_pair):
    return hf_pair[0]


@pytest.fixture(scope="module")
def hf_logits(hf_pair):
    return hf_pair[1]


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("v4") / "hf"
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return load_hf_checkpoint(hf_dir, jnp.float32)


def test_logits_match_transformers(loaded, ids, hf_logits):
    cfg, variables = loaded
    assert cfg.layer_types == tuple(fx.TINY["layer_types"]) and cfg.num_hash_layers == 2
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, run_mtp=False).logits)(
            variables, jnp.asarray(ids.numpy())
        )
    err = np.abs(np.asarray(out) - hf_logits).max() / np.abs(hf_logits).max()
    assert err <= 1e-4, err


def test_export_loads_in_transformers(loaded, ids, hf_logits, tmp_path):
    cfg, variables = loaded
    save_hf_checkpoint(tmp_path / "out", cfg, variables)
    model = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        logits = model.eval()(ids).logits.numpy()
    np.testing.assert_allclose(logits, hf_logits, rtol=0, atol=1e-6)


def _tiny_mtp_cfg(loaded_cfg: ModelConfig) -> ModelConfig:
    return loaded_cfg.replace(num_mtp_layers=1)


def _leaves(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _random_variables(cfg: ModelConfig):
    """Random variables of `cfg`'s shapes (from the tensor table: nothing to compile); hash
    tables hold distinct expert ids per token; V4's float32 leaves stay float32."""
    rng = np.random.default_rng(0)
    out: dict = {}
    for e in v4_tensor_table(cfg):
        node = out.setdefault(e.collection, {})
        for part in e.path[:-1]:
            node = node.setdefault(part, {})
        if e.path[-1] in node:
            continue
        if e.path[-1] == "tid2eid":
            ids = [
                rng.permutation(cfg.n_routed_experts)[: e.leaf_shape[1]]
                for _ in range(e.leaf_shape[0])
            ]
            node[e.path[-1]] = np.stack(ids).astype(np.int32)
        else:
            dt = (
                np.float32
                if float32_leaf(e.path) or e.collection == "moe_bias"
                else cfg.param_dtype
            )
            node[e.path[-1]] = (rng.standard_normal(e.leaf_shape) * 0.05).astype(jnp.dtype(dt))
    return out


def test_bf16_round_trip_is_bit_exact_with_mtp(loaded, tmp_path):
    cfg = _tiny_mtp_cfg(loaded[0]).replace(param_dtype="bfloat16", dtype="bfloat16")
    variables = _random_variables(cfg)
    save_hf_checkpoint(tmp_path / "a", cfg, variables)
    keys = SafetensorsFile(tmp_path / "a" / "model.safetensors").tensors
    assert "mtp.0.e_proj.weight" in keys and "layers.0.ffn.gate.tid2eid" in keys
    assert "layers.2.ffn.gate.bias" in keys and "layers.1.attn.indexer.compressor.ape" in keys
    cfg2, back = load_hf_checkpoint(tmp_path / "a", None)
    assert cfg2 == cfg
    a, b = _leaves(variables), _leaves(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


FP4_TABLE = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


def _read_all(path):
    f = SafetensorsFile(path / "model.safetensors")
    return {k: np.asarray(f.read(k, extra=True)) for k in f.tensors}


def test_fp8_fp4_release_layout_round_trips_bit_exactly(loaded, tmp_path):
    cfg = _tiny_mtp_cfg(loaded[0])
    variables = _random_variables(cfg)
    save_hf_checkpoint(tmp_path / "q", cfg, variables, fp8=True, fp4_experts=True)
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    assert hf["quantization_config"]["scale_fmt"] == "ue8m0"
    raw = _read_all(tmp_path / "q")
    w1, s1 = raw["layers.2.ffn.experts.3.w1.weight"], raw["layers.2.ffn.experts.3.w1.scale"]
    assert w1.dtype == np.int8 and w1.shape == (32, 32) and s1.shape == (32, 2)
    assert raw["layers.0.attn.wq_a.weight"].dtype.name == "float8_e4m3fn"
    assert raw["layers.0.attn.wq_a.scale"].dtype.name == "float8_e8m0fnu"
    assert raw["layers.1.attn.compressor.wkv.weight"].dtype == np.float32  # BF16/F32 in the release
    # FP4 decoding by hand: low nibble first, the release's e2m1 table, power-of-two scales.
    b = w1.view(np.uint8)
    codes = np.stack([b & 15, b >> 4], -1).reshape(32, 64)
    want = np.asarray(FP4_TABLE, np.float32)[codes] * np.repeat(s1.astype(np.float32), 32, 1)
    cfg2, back = load_hf_checkpoint(tmp_path / "q", jnp.float32)
    got = np.asarray(back["params"]["layers_2"]["moe"]["experts"]["gate"][3]).T
    np.testing.assert_array_equal(got, want)
    ref = np.asarray(variables["params"]["layers_2"]["moe"]["experts"]["gate"][3]).T
    assert np.abs(got - ref).max() <= np.abs(ref).max() / 4  # e2m1: 1 mantissa bit
    save_hf_checkpoint(tmp_path / "q2", cfg2, back, fp8=True, fp4_experts=True)
    again = _read_all(tmp_path / "q2")
    assert again.keys() == raw.keys()
    for k in raw:
        assert raw[k].dtype == again[k].dtype and raw[k].tobytes() == again[k].tobytes(), k


def test_keep_fp8_keeps_fp8_and_fp4_weights_and_exports_bit_exactly(loaded, ids, tmp_path):
    """keep_fp8 on a release-layout checkpoint: FP8 blocks stay float8 (128x128 scales), FP4
    experts float4_e2m1fn (32x1 scales), the rest high precision; the forward (dequantising on
    the fly) equals the dequantised load's exactly; export rewrites the same bytes; a plain
    export of the kept weights equals the dequantised load."""
    cfg = _tiny_mtp_cfg(loaded[0])
    save_hf_checkpoint(tmp_path / "q", cfg, _random_variables(cfg), fp8=True, fp4_experts=True)
    cfg_k, kept = load_hf_checkpoint(tmp_path / "q", jnp.float32, keep_fp8=True)
    _, deq = load_hf_checkpoint(tmp_path / "q", jnp.float32)
    assert cfg_k == cfg
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    attn = kept["params"]["layers_1"]["attn"]
    assert attn["wq_a"]["kernel"].dtype == jnp.float8_e4m3fn
    assert attn["wq_a"]["kernel_scale_inv"].shape == (1, 1)
    assert attn["indexer"]["wq_b"]["kernel"].dtype == jnp.float8_e4m3fn
    assert attn["compressor"]["wkv"]["kernel"].dtype == jnp.float32  # high precision
    assert kept["params"]["mtp_0"]["e_proj"]["kernel"].dtype == jnp.float8_e4m3fn
    moe = kept["params"]["layers_2"]["moe"]
    assert moe["experts"]["gate"].dtype == jnp.float4_e2m1fn
    assert moe["experts"]["gate_scale_inv"].shape == (E, D // 32, F)
    assert moe["experts"]["down_scale_inv"].shape == (E, F // 32, D)
    assert moe["shared"]["gate"]["kernel"].dtype == jnp.float8_e4m3fn
    assert moe["router"]["kernel"].dtype == jnp.float32
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    print(f"keep_fp8: {nbytes(kept)} bytes vs {nbytes(deq)} dequantised (float32)")

    tokens = jnp.asarray(ids.numpy())
    fwd = jax.jit(lambda v: Transformer(cfg).apply(v, tokens, run_mtp=False).logits)
    np.testing.assert_array_equal(fwd(kept), fwd(deq))

    save_hf_checkpoint(tmp_path / "again", cfg, kept, fp8=True, fp4_experts=True)
    raw, again = _read_all(tmp_path / "q"), _read_all(tmp_path / "again")
    assert again.keys() == raw.keys()
    for k in raw:
        assert raw[k].dtype == again[k].dtype and raw[k].tobytes() == again[k].tobytes(), k
    save_hf_checkpoint(tmp_path / "plain", cfg, kept)
    _, plain = load_hf_checkpoint(tmp_path / "plain", jnp.float32)
    b = _leaves(deq)
    for a in (_leaves(plain), _leaves(dequantize_variables(kept))):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
