import dataclasses
import json

import pytest

from configs import deepseek_v2_lite, deepseek_v3, small, tiny
from dsjax.model.config import ModelConfig
from dsjax.model.transformer import count_params


def test_v3_scale_and_mscale_match_spec():
    cfg = ModelConfig(**deepseek_v3.get_config().model)
    # docs/spec.md §3: m^2 = 1.873854, scale = 0.135234 for V3; 1.589626 for V2-Lite.
    assert cfg.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert cfg.softmax_scale * 192**0.5 == pytest.approx(1.873854, abs=1e-6)
    lite = ModelConfig(**deepseek_v2_lite.get_config().model)
    assert lite.softmax_scale * 192**0.5 == pytest.approx(1.589626, abs=1e-6)
    assert cfg.rope_cos_sin_scale == 1.0 and lite.rope_cos_sin_scale == 1.0


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("n_group", 3, "n_group"),
        ("topk_group", 9, "topk_group"),
        ("num_experts_per_tok", 300, "num_experts_per_tok"),
        ("qk_rope_head_dim", 63, "qk_rope_head_dim"),
        ("scoring_func", "relu", "scoring_func"),
        ("first_k_dense_replace", 62, "first_k_dense_replace"),
        ("hidden_size", 0, "hidden_size"),
        ("remat", "sometimes", "remat"),
        ("moe_capacity_factor", -1.0, "moe_capacity_factor"),
        ("moe_capacity_factor", True, "moe_capacity_factor"),
        ("moe_fp8_dispatch", 1, "moe_fp8_dispatch"),
        ("moe_exchange_block", -1, "moe_exchange_block"),
    ],
)
def test_validation_names_field(field, value, match):
    kw = dict(deepseek_v3.get_config().model)
    kw[field] = value
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_noaux_needs_sigmoid_and_enough_kept_experts():
    kw = dict(deepseek_v3.get_config().model)
    with pytest.raises(ValueError, match="sigmoid"):
        ModelConfig(**{**kw, "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="kept groups"):
        ModelConfig(**{**kw, "topk_group": 1, "num_experts_per_tok": 40})


def test_hashable_and_frozen():
    cfg = ModelConfig(**tiny.get_config().model)
    assert hash(cfg) == hash(ModelConfig(**tiny.get_config().model))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3


V3_HF = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def test_from_hf_legacy_and_current_dialects_agree_with_config_file():
    legacy = ModelConfig.from_hf(V3_HF, dtype="bfloat16", init_std=0.006)
    expected = ModelConfig(**deepseek_v3.get_config().model)
    assert legacy == expected
    current = ModelConfig.from_hf(json.loads(json.dumps(legacy.to_hf())), init_std=0.006)
    assert current == legacy


def test_from_hf_v2_lite_defaults():
    hf = {
        k: v for k, v in V3_HF.items() if k not in ("scoring_func", "topk_method", "norm_topk_prob")
    }
    hf.update(
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=None,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=0,
    )
    hf["rope_scaling"] = {**hf["rope_scaling"], "mscale": 0.707, "mscale_all_dim": 0.707}
    cfg = ModelConfig.from_hf(hf, dtype="bfloat16", init_std=0.006)
    assert cfg == ModelConfig(**deepseek_v2_lite.get_config().model)
    assert cfg.to_hf()["model_type"] == "deepseek_v2"


def test_from_hf_errors():
    with pytest.raises(ValueError, match="model_type='llama'"):
        ModelConfig.from_hf({**V3_HF, "model_type": "llama"})
    with pytest.raises(ValueError, match="kv_lora_rank"):
        ModelConfig.from_hf({k: v for k, v in V3_HF.items() if k != "kv_lora_rank"})
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        ModelConfig.from_hf({**V3_HF, "rope_scaling": {"type": "dynamic", "factor": 2}})
    # JSON of the wrong type: one line naming the field, before any arithmetic on it
    for key, value, want in [
        ("num_hidden_layers", None, "an integer"),
        ("q_lora_rank", "64", "an integer or null"),
        ("n_routed_experts", 4.0, "an integer or null"),
        ("first_k_dense_replace", True, "an integer or null"),
        ("rms_norm_eps", "1e-6", "a number or null"),
    ]:
        with pytest.raises(ValueError, match=f"config.json {key}=.*: must be {want}$"):
            ModelConfig.from_hf({**V3_HF, key: value})
    with pytest.raises(ValueError, match=r"rope_scaling.factor='4': must be a number"):
        ModelConfig.from_hf({**V3_HF, "rope_scaling": {**V3_HF["rope_scaling"], "factor": "4"}})
    # null optional numbers are their defaults, as when absent
    absent = {k: v for k, v in V3_HF.items() if k not in ("rms_norm_eps", "routed_scaling_factor")}
    nulls = {**V3_HF, "rms_norm_eps": None, "routed_scaling_factor": None}
    assert ModelConfig.from_hf(nulls) == ModelConfig.from_hf(absent)


def test_parameter_counts_match_published_sizes():
    v3 = count_params(ModelConfig(**deepseek_v3.get_config().model))
    # Independent hand count (docs/spec.md §1): routed experts 58 layers x 256 x 3 x 7168 x 2048.
    routed = 58 * 256 * 3 * 7168 * 2048
    assert v3["total"] == pytest.approx(671e9, rel=0.01)
    assert v3["activated"] == v3["total"] - 129280 * 7168 - routed + routed * 8 // 256
    assert v3["activated"] == pytest.approx(37e9, rel=0.011)  # 36.63B
    assert v3["mtp"] + 2 * 129280 * 7168 == pytest.approx(14e9, rel=0.05)  # on-disk MTP layer
    lite = count_params(ModelConfig(**deepseek_v2_lite.get_config().model))
    assert lite["total"] == pytest.approx(15.7e9, rel=0.01)
    assert lite["activated"] == pytest.approx(2.4e9, rel=0.025)  # 2.455B
    assert lite["mtp"] == 0


def test_small_config_has_every_feature():
    cfg = ModelConfig(**small.get_config().model)
    assert cfg.q_lora_rank and cfg.use_yarn and cfg.num_dense_layers >= 1
    assert cfg.num_moe_layers >= 2 and cfg.n_group > 1 and cfg.n_shared_experts
    assert 8 <= cfg.n_routed_experts <= 16 and cfg.num_mtp_layers == 1
