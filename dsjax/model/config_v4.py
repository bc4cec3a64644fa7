"""DeepSeek-V4's config.json dialect (HF `model_type: deepseek_v4`) <-> ModelConfig fields.

Follows transformers' `DeepseekV4Config.__post_init__`: every field has a default (V4-Flash's);
`layer_types` comes from `layer_types`, else the legacy `compress_ratios` (0 / 4 / 128 per layer,
the released config.json's, with one extra entry for the MTP layer), else HF's default schedule;
`mlp_layer_types` from the first `num_hash_layers` (default 3) layers being `hash_moe`;
the rotary dim from `partial_rotary_factor` or the legacy `qk_rope_head_dim`; `rope_parameters`
either nested `{"main", "compress"}` or flat (legacy `rope_scaling`), in which case YaRN applies to
the compressed layers' rope only, with no magnitude correction (`attention_factor` 1).
"""

from __future__ import annotations

from typing import Any

from dsjax.model.config import CSA, HCA, SLIDING, V4_LAYER_TYPES

_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
    num_attention_heads=64, head_dim=512, q_lora_rank=1024, num_experts_per_tok=6,
    n_routed_experts=256, n_shared_experts=1, scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5, max_position_embeddings=1048576, rope_theta=10000.0,
    compress_rope_theta=160000.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
    swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024, index_n_heads=64,
    index_head_dim=128, index_topk=512, num_nextn_predict_layers=1, rms_norm_eps=1e-6,
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)  # fmt: skip


def _get(hf: dict[str, Any], key: str) -> Any:
    value = hf.get(key)
    return _DEFAULTS[key] if value is None else value


def _layer_types(hf: dict[str, Any], n: int) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if types is None and hf.get("compress_ratios") is not None:
        ratios = hf["compress_ratios"]
        unknown = [r for r in ratios if r not in _RATIO_TO_TYPE]
        if unknown:
            raise ValueError(f"config.json compress_ratios has {unknown[0]!r}; expected 0, 4, 128")
        types = [_RATIO_TO_TYPE[r] for r in ratios]
    if types is None:  # transformers' default schedule (matches neither Flash nor Pro)
        types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    types = list(types)[:n]
    bad = [t for t in types if t not in V4_LAYER_TYPES]
    if bad or len(types) != n:
        raise ValueError(
            f"config.json layer_types must give one of {V4_LAYER_TYPES} for each of the {n} "
            f"layers; got {types}"
        )
    return tuple(types)


def _num_hash_layers(hf: dict[str, Any], n: int) -> int:
    mlp = hf.get("mlp_layer_types")
    if mlp is None:
        k = hf.get("num_hash_layers")
        return min(n, 3 if k is None else int(k))
    mlp = list(mlp)[:n]
    k = sum(1 for t in mlp if t == "hash_moe")
    if mlp != ["hash_moe"] * k + ["moe"] * (len(mlp) - k) or len(mlp) != n:
        raise ValueError(
            f"config.json mlp_layer_types={mlp}: only a prefix of hash_moe layers followed by "
            "moe layers (the released schedule) is supported"
        )
    return k


def _rope(hf: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """(main theta, compress theta, compress YaRN fields or {})."""
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, compress = rp["main"], rp["compress"]
    else:
        flat = {k: v for k, v in rp.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": _get(hf, "rope_theta")}
        compress = {**flat, "rope_theta": _get(hf, "compress_rope_theta")}
    kinds = {label: d.get("rope_type", d.get("type", "default")) for label, d in
             (("main", main), ("compress", compress))}  # fmt: skip
    if kinds["main"] != "default" or kinds["compress"] not in ("default", "yarn"):
        raise ValueError(
            f"config.json rope types {kinds}: main must be default, compress default or yarn"
        )
    yarn: dict[str, Any] = {}
    if kinds["compress"] == "yarn":
        factor = compress.get("attention_factor", 1.0)
        if factor not in (None, 1.0, 1):
            raise ValueError(
                f"config.json compress rope attention_factor={factor}: DeepSeek-V4 uses 1.0"
            )
        yarn = dict(
            rope_factor=float(compress["factor"]),
            rope_original_max_position=int(compress.get("original_max_position_embeddings", 4096)),
            rope_beta_fast=float(compress.get("beta_fast") or 32),
            rope_beta_slow=float(compress.get("beta_slow") or 1),
        )
    return (
        float(main.get("rope_theta", _get(hf, "rope_theta"))),
        float(compress.get("rope_theta", _get(hf, "compress_rope_theta"))),
        yarn,
    )


def v4_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments for a deepseek_v4 config.json dict."""
    if (hf.get("num_key_value_heads") or 1) != 1:
        raise ValueError("config.json num_key_value_heads must be 1 for deepseek_v4")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only silu is supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("config.json attention_bias / mlp_bias are not supported (V4 has none)")
    if (hf.get("n_shared_experts") or 1) != 1:
        raise ValueError("config.json n_shared_experts must be 1 for deepseek_v4")
    n = int(_get(hf, "num_hidden_layers"))
    head_dim = int(_get(hf, "head_dim"))
    prf = hf.get("partial_rotary_factor")
    if prf is None:
        rope_dim = int(hf.get("qk_rope_head_dim") or 64)
    else:
        rope_dim = int(head_dim * float(prf))
    rates = dict(hf.get("compress_rates") or {})
    csa = int(hf.get("compress_rate_csa") or rates.get(CSA) or 4)
    hca = int(hf.get("compress_rate_hca") or rates.get(HCA) or 128)
    main_theta, compress_theta, yarn = _rope(hf)
    eos = _get(hf, "eos_token_id")
    kw: dict[str, Any] = dict(
        arch="v4",
        vocab_size=int(_get(hf, "vocab_size")),
        hidden_size=int(_get(hf, "hidden_size")),
        intermediate_size=0,
        moe_intermediate_size=int(_get(hf, "moe_intermediate_size")),
        num_hidden_layers=n,
        first_k_dense_replace=0,
        num_attention_heads=int(_get(hf, "num_attention_heads")),
        head_dim=head_dim,
        qk_rope_head_dim=rope_dim,
        q_lora_rank=int(_get(hf, "q_lora_rank")),
        o_groups=int(_get(hf, "o_groups")),
        o_lora_rank=int(_get(hf, "o_lora_rank")),
        sliding_window=int(_get(hf, "sliding_window")),
        layer_types=_layer_types(hf, n),
        compress_rate_csa=csa,
        compress_rate_hca=hca,
        n_routed_experts=int(_get(hf, "n_routed_experts")),
        n_shared_experts=1,
        num_experts_per_tok=int(_get(hf, "num_experts_per_tok")),
        n_group=1,
        topk_group=1,
        routed_scaling_factor=float(_get(hf, "routed_scaling_factor")),
        norm_topk_prob=True,  # transformers' V4 router always renormalises
        scoring_func=str(_get(hf, "scoring_func")),
        topk_method="noaux_tc",
        num_hash_layers=_num_hash_layers(hf, n),
        swiglu_limit=float(_get(hf, "swiglu_limit")),
        hc_mult=int(_get(hf, "hc_mult")),
        hc_sinkhorn_iters=int(_get(hf, "hc_sinkhorn_iters")),
        hc_eps=float(_get(hf, "hc_eps")),
        index_topk=int(_get(hf, "index_topk")),
        index_n_heads=int(_get(hf, "index_n_heads")),
        index_head_dim=int(_get(hf, "index_head_dim")),
        rope_theta=main_theta,
        compress_rope_theta=compress_theta,
        rope_factor=None,
        rope_mscale=None,
        rope_mscale_all_dim=None,
        max_position_embeddings=int(_get(hf, "max_position_embeddings")),
        rms_norm_eps=float(_get(hf, "rms_norm_eps")),
        num_mtp_layers=int(hf.get("num_nextn_predict_layers", 1) or 0),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings")),
        bos_token_id=hf.get("bos_token_id", 0),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
    )
    kw.update(yarn)
    return kw


def v4_to_hf(cfg: Any) -> dict[str, Any]:
    """The deepseek_v4 config.json dict of a ModelConfig with arch "v4" (transformers' modern
    field names; the compressed layers' YaRN as nested `rope_parameters` with attention_factor 1)."""
    prf = cfg.qk_rope_head_dim / cfg.head_dim
    main = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": prf}
    compress: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": cfg.compress_rope_theta,
        "partial_rotary_factor": prf,
    }
    if cfg.use_yarn:
        compress.update(
            rope_type="yarn",
            factor=cfg.rope_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
            beta_fast=cfg.rope_beta_fast,
            beta_slow=cfg.rope_beta_slow,
            attention_factor=1.0,
        )
    n = cfg.num_hidden_layers
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": n,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": 1,
        "head_dim": cfg.head_dim,
        "partial_rotary_factor": prf,
        "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "compress_rates": {CSA: cfg.compress_rate_csa, HCA: cfg.compress_rate_hca},
        "mlp_layer_types": ["hash_moe"] * cfg.num_hash_layers + ["moe"] * (n - cfg.num_hash_layers),
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "scoring_func": cfg.scoring_func,
        "norm_topk_prob": True,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "swiglu_limit": cfg.swiglu_limit,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta,
        "rope_parameters": {"main": main, "compress": compress},
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "num_nextn_predict_layers": cfg.num_mtp_layers,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": "bfloat16" if cfg.param_dtype == "bfloat16" else "float32",
    }
