"""ModelConfig: every hyperparameter of a DeepSeek-V3-style model, validated, HF-convertible.

`ModelConfig` is a frozen (hashable) dataclass: it is the only thing the Flax modules see, and it
can be a static argument of `jax.jit`. `from_hf` reads a Hugging Face `config.json` dict in both
dialects (`rope_parameters` and the legacy `rope_theta` + `rope_scaling`), `to_hf` writes one back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
REMAT_POLICIES = ("none", "full", "offload", "dots", "dots_no_batch", "save_attn", "save_attn_ffn")
ATTENTION_IMPLS = ("auto", "reference", "chunked", "cudnn", "splash")
MOE_IMPLS = ("auto", "ragged_dot", "tiled", "looped")
DTYPES = ("float32", "bfloat16", "float16")
# The sizes every config names (a V3-family config.json must hold each; all positive).
_CORE_DIMS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)  # fmt: skip
SUPPORTED_HF_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2", "deepseek_v32", "deepseek_v4")
ARCHS = ("v3", "v4")
# DeepSeek-V4 attention layer types (HF `layer_types`): sliding window only, compressed sparse
# (CSA: 4:1 overlapping compression + lightning indexer top-k), heavily compressed (HCA: 128:1).
SLIDING, CSA, HCA = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)
V4_LAYER_TYPES = (SLIDING, CSA, HCA)


def yarn_mscale(factor: float | None, mscale: float = 1.0) -> float:
    """YaRN magnitude correction `0.1 * mscale * ln(factor) + 1` (1 without YaRN or when
    factor <= 1)."""
    if factor is None or factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 / V2 hyperparameters (names follow HF config.json where one exists)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int = 1536  # 0 means a plain query projection (HF `q_lora_rank: null`)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256  # 0 makes every layer dense
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    rope_theta: float = 10000.0
    # YaRN (rope_type "yarn" when rope_factor is not None).
    rope_factor: float | None = 40.0
    rope_original_max_position: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = 1.0
    rope_mscale_all_dim: float | None = 1.0
    rope_attention_factor: float | None = None  # explicit HF `attention_factor` override
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    num_mtp_layers: int = 1  # HF num_nextn_predict_layers
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # Numerics and implementation choices (not part of the HF format).
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    init_std: float = 0.006
    remat: str = "full"
    attention_impl: str = "auto"
    attention_chunk: int = 512
    moe_impl: str = "auto"  # grouped matmul: auto | ragged_dot | tiled | looped
    moe_tile: int = 0  # rows per tile of the "tiled" impl; 0 = per platform (CPU 128, GPU 512)
    # Expert parallelism's receive buffer: 0 = dropless (worst case G*n*min(K, E/G) rows per
    # chip); c > 0 = ceil(c*n*K) rows, assignments past it dropped (a memory lever for 671B).
    moe_capacity_factor: float = 0.0
    # Expert parallelism in token blocks: c > 0 runs each shard's n tokens through the exchange
    # c at a time (n/c rounds of dispatch -> grouped SwiGLU -> combine, the last block padded),
    # each with a receive buffer of G*c*min(K, E/G) rows instead of G*n*min(K, E/G); the same
    # traffic and outputs, one more forward per block in the backward. 0 = the whole shard.
    moe_exchange_block: int = 0
    # Under `fp8` with expert parallelism (ragged_dot): ship the dispatch payload as FP8 rows +
    # scales (half the bytes; DeepSeek-V3's recipe) instead of bf16 rows quantised on arrival.
    # Off by default: V3 on v5p-256 measured 7.3 GiB more temporaries per chip with it.
    moe_fp8_dispatch: bool = False
    # Layers per iteration of the scanned layer stacks: 1 = a rolled loop (compile time flat in
    # depth); >= the depth = straight-line code, which saves stacking every layer's saved
    # activations into [L, ...] buffers (measured: the 4-layer CPU train step ~12% faster).
    scan_unroll: int = 1
    # FP8 training (docs/spec.md §8, model/fp8.py): every linear layer and expert matmul in E4M3,
    # 1x128 / 128x128 scaling and FP32 accumulation. Not part of the HF format.
    fp8: bool = False
    # DeepSeek Sparse Attention (V3.2, docs/spec.md §10; HF deepseek_v32): each query attends to the
    # `index_topk` keys its lightning indexer (index_n_heads x index_head_dim) scores highest.
    # index_topk = 0 is dense MLA (V3). V3.2: 2048, 64 heads, head dim 128.
    index_topk: int = 0
    index_n_heads: int = 64
    index_head_dim: int = 128
    # Training stage of the indexer (not part of the HF format; set from config.train.dsa_stage):
    # "off" | "warmup" (dense attention, indexer KL over all keys) | "sparse" (KL over top-k).
    dsa_stage: str = "off"
    # DeepSeek-V4 (HF deepseek_v4, docs/spec.md §12), used when arch == "v4": shared key=value attention
    # of head_dim (RoPE on its last qk_rope_head_dim dims), per-head sinks, grouped low-rank
    # output (o_groups x o_lora_rank), a sliding window in every layer plus per-layer compressed
    # branches (`layer_types`: CSA at compress_rate_csa with the lightning indexer's index_topk /
    # index_n_heads / index_head_dim, HCA at compress_rate_hca), compressed layers' RoPE at
    # compress_rope_theta with the YaRN fields above (main RoPE: rope_theta, no YaRN), mHC
    # residual streams (hc_mult, Sinkhorn iterations, eps), MoE in every layer with the first
    # num_hash_layers routed by a token-id table, and SwiGLU clamped at swiglu_limit (0 = none).
    arch: str = "v3"
    head_dim: int = 512
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    compress_rope_theta: float = 160000.0
    num_hash_layers: int = 0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 0.0

    def __post_init__(self):
        if not isinstance(self.layer_types, tuple):  # lists from JSON / ml_collections
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(field: str, rule: str):
            raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {rule}")

        positive = (*_CORE_DIMS, "max_position_embeddings")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in positive:
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        for name in (
            "q_lora_rank",
            "n_routed_experts",
            "n_shared_experts",
            "num_mtp_layers",
            "first_k_dense_replace",
        ):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be a non-negative integer")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (rotary pairs)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail(
                "first_k_dense_replace", f"cannot exceed num_hidden_layers={self.num_hidden_layers}"
            )
        if self.num_dense_layers and self.intermediate_size <= 0:
            fail("intermediate_size", "must be positive when there are dense layers")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"must be one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"must be one of {TOPK_METHODS}")
        if self.n_routed_experts:
            if self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", "must be positive when n_routed_experts > 0")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                fail(
                    "num_experts_per_tok",
                    f"must be in [1, n_routed_experts={self.n_routed_experts}]",
                )
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                fail("n_group", f"must be >= 1 and divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                fail("topk_group", f"must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
                fail(
                    "n_group",
                    "noaux_tc group scores sum the top-2 experts: need >= 2 experts per group",
                )
            if self.topk_group * per_group < self.num_experts_per_tok:
                fail(
                    "num_experts_per_tok",
                    f"exceeds the experts in the kept groups (topk_group*experts_per_group="
                    f"{self.topk_group * per_group})",
                )
            if self.topk_method == "noaux_tc" and self.scoring_func == "softmax":
                fail("topk_method", "noaux_tc requires scoring_func 'sigmoid' or 'sqrtsoftplus'")
        if self.rope_factor is not None:
            if self.rope_factor <= 0:
                fail("rope_factor", "must be positive")
            if self.rope_original_max_position <= 0:
                fail("rope_original_max_position", "must be positive")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                fail(name, f"must be one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            fail("remat", f"must be one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"must be one of {ATTENTION_IMPLS}")
        if self.attention_chunk <= 0:
            fail("attention_chunk", "must be positive")
        if self.moe_impl not in MOE_IMPLS:
            fail("moe_impl", f"must be one of {MOE_IMPLS}")
        if not isinstance(self.moe_tile, int) or self.moe_tile < 0:
            fail("moe_tile", "must be a non-negative integer (0 = per platform)")
        cf = self.moe_capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not 0 <= cf < math.inf:
            fail("moe_capacity_factor", "must be a number >= 0 (0 = dropless)")
        if not is_int(self.moe_exchange_block) or self.moe_exchange_block < 0:
            fail("moe_exchange_block", "must be a non-negative integer (0 = the whole shard)")
        if not isinstance(self.moe_fp8_dispatch, bool):
            fail("moe_fp8_dispatch", "must be true or false")
        if not is_int(self.scan_unroll) or self.scan_unroll < 1:
            fail("scan_unroll", "must be a positive integer (1 = a rolled loop over layers)")
        if not isinstance(self.fp8, bool):
            fail("fp8", "must be a bool")
        if not is_int(self.index_topk) or self.index_topk < 0:
            fail("index_topk", "must be a non-negative integer (0 = dense MLA)")
        if self.dsa_stage not in ("off", "warmup", "sparse"):
            fail("dsa_stage", "must be one of ('off', 'warmup', 'sparse')")
        if self.dsa_stage != "off" and not self.index_topk:
            fail("dsa_stage", "trains the DSA lightning indexer: needs index_topk > 0")
        if self.arch not in ARCHS:
            fail("arch", f"must be one of {ARCHS}")
        if self.arch == "v4":
            self._validate_v4(fail, is_int)
        elif self.index_topk:
            if not self.q_lora_rank:
                fail("q_lora_rank", "DeepSeek Sparse Attention (index_topk > 0) needs q LoRA")
            if not is_int(self.index_n_heads) or self.index_n_heads <= 0:
                fail("index_n_heads", "must be a positive integer when index_topk > 0")
            if not is_int(self.index_head_dim) or self.index_head_dim < self.qk_rope_head_dim:
                fail(
                    "index_head_dim",
                    f"must be an integer >= qk_rope_head_dim={self.qk_rope_head_dim} "
                    "(RoPE rotates its first qk_rope_head_dim dims)",
                )

    def _validate_v4(self, fail, is_int) -> None:
        """DeepSeek-V4's own rules (see the field comments)."""
        for name in (
            "head_dim", "o_groups", "o_lora_rank", "sliding_window", "compress_rate_csa",
            "compress_rate_hca", "hc_mult", "hc_sinkhorn_iters", "q_lora_rank",
            "n_routed_experts", "index_n_heads", "index_head_dim", "index_topk",
        ):  # fmt: skip
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer for arch='v4'")
        if self.first_k_dense_replace:
            fail("first_k_dense_replace", "must be 0 for arch='v4' (every layer is MoE)")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"needs one entry per layer ({self.num_hidden_layers})")
        bad = [t for t in self.layer_types if t not in V4_LAYER_TYPES]
        if bad:
            fail("layer_types", f"entries must be in {V4_LAYER_TYPES}; got {bad[0]!r}")
        if self.qk_rope_head_dim > min(self.head_dim, self.index_head_dim):
            fail("qk_rope_head_dim", "must not exceed head_dim nor index_head_dim")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            fail("o_groups", "must divide num_attention_heads * head_dim")
        if self.num_attention_heads % self.o_groups:
            fail("o_groups", "must divide num_attention_heads (heads are grouped whole)")
        if (
            not is_int(self.num_hash_layers)
            or not 0 <= self.num_hash_layers <= self.num_hidden_layers
        ):
            fail("num_hash_layers", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.n_group != 1:
            fail("n_group", "must be 1 for arch='v4' (no group-limited routing)")
        if self.swiglu_limit < 0:
            fail("swiglu_limit", "must be >= 0 (0 = no clamp)")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "is not supported for arch='v4'")

    # ------------------------------------------------------------------ derived
    @property
    def is_v4(self) -> bool:
        return self.arch == "v4"

    @property
    def num_dense_layers(self) -> int:
        return self.num_hidden_layers if self.n_routed_experts == 0 else self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def mtp_is_moe(self) -> bool:
        """MTP blocks sit at layer index num_hidden_layers, so they are MoE whenever MoE exists."""
        return self.n_routed_experts > 0 and self.num_hidden_layers >= self.first_k_dense_replace

    @property
    def use_dsa(self) -> bool:
        """DeepSeek Sparse Attention (a lightning indexer and top-k keys per query) is on."""
        return self.index_topk > 0 and not self.is_v4

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def use_yarn(self) -> bool:
        return self.rope_factor is not None

    @property
    def softmax_scale(self) -> float:
        """`(d_n + d_r)^-0.5 * m^2`, m = YaRN mscale with mscale_all_dim (docs/spec.md §3); V4:
        head_dim^-0.5 (no YaRN magnitude correction anywhere, docs/spec.md §12)."""
        if self.is_v4:
            return self.head_dim**-0.5
        scale = self.qk_head_dim**-0.5
        if self.use_yarn and self.rope_mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def rope_cos_sin_scale(self) -> float:
        """HF's YaRN `attention_factor` applied to cos/sin (1.0 for every released config)."""
        if not self.use_yarn or self.is_v4:
            return 1.0
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)
        if self.rope_mscale and self.rope_mscale_all_dim:
            return yarn_mscale(self.rope_factor, self.rope_mscale) / yarn_mscale(
                self.rope_factor, self.rope_mscale_all_dim
            )
        return yarn_mscale(self.rope_factor)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Builds a ModelConfig from a Hugging Face config.json dict (deepseek_v3 / deepseek_v2)."""
        model_type = hf.get("model_type", "deepseek_v3")
        if model_type not in SUPPORTED_HF_TYPES:
            raise ValueError(
                f"config.json model_type={model_type!r} is not supported; "
                f"expected one of {SUPPORTED_HF_TYPES}"
            )
        hf = check_hf_field_types(hf)
        if model_type == "deepseek_v4":
            from dsjax.model.config_v4 import v4_fields_from_hf

            return cls(**{**v4_fields_from_hf(hf), **overrides})
        missing = [k for k in _CORE_DIMS if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required field(s) {missing}")
        is_v2 = model_type == "deepseek_v2"
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ValueError(
                f"config.json rope type {rope_type!r} is not supported (default or yarn)"
            )
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        yarn = rope_type == "yarn"
        n_routed = hf.get("n_routed_experts") or 0
        kw: dict[str, Any] = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 0),
            moe_intermediate_size=hf.get("moe_intermediate_size", 0) if n_routed else 0,
            num_hidden_layers=hf["num_hidden_layers"],
            first_k_dense_replace=min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"]),
            num_attention_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            n_routed_experts=n_routed,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            num_experts_per_tok=hf.get("num_experts_per_tok") or 1,
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", not is_v2)),
            scoring_func=hf.get("scoring_func", "softmax" if is_v2 else "sigmoid"),
            topk_method=hf.get("topk_method", "greedy" if is_v2 else "noaux_tc"),
            rope_theta=float(theta),
            rope_factor=float(rope["factor"]) if yarn else None,
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 4096)),
            rope_beta_fast=float(rope.get("beta_fast") or 32),
            rope_beta_slow=float(rope.get("beta_slow") or 1),
            rope_mscale=rope.get("mscale") if yarn else None,
            rope_mscale_all_dim=rope.get("mscale_all_dim") if yarn else None,
            rope_attention_factor=rope.get("attention_factor") if yarn else None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            num_mtp_layers=hf.get("num_nextn_predict_layers", 0) or 0,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_first(hf.get("eos_token_id")),
        )
        if model_type == "deepseek_v32":
            kw.update(
                index_topk=hf.get("index_topk", 2048),
                index_n_heads=hf.get("index_n_heads", 64),
                index_head_dim=hf.get("index_head_dim", 128),
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only silu is supported")
        if hf.get("attention_bias"):
            raise ValueError("config.json attention_bias=true is not supported (DeepSeek has none)")
        if hf.get("rope_interleave") is False:
            raise ValueError(
                "config.json rope_interleave=false is not supported: DeepSeek weights "
                "use interleaved rotary pairs"
            )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config.json dict (current `rope_parameters` dialect): deepseek_v4 for
        arch "v4", else deepseek_v3 / deepseek_v2 / deepseek_v32."""
        if self.is_v4:
            from dsjax.model.config_v4 import v4_to_hf

            return v4_to_hf(self)
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.use_yarn:
            rope.update(
                rope_type="yarn",
                factor=self.rope_factor,
                original_max_position_embeddings=self.rope_original_max_position,
                beta_fast=self.rope_beta_fast,
                beta_slow=self.rope_beta_slow,
            )
            for key, value in (
                ("mscale", self.rope_mscale),
                ("mscale_all_dim", self.rope_mscale_all_dim),
                ("attention_factor", self.rope_attention_factor),
            ):
                if value is not None:
                    rope[key] = value
        v2 = self.scoring_func == "softmax"
        arch, model_type = (
            ("DeepseekV2ForCausalLM", "deepseek_v2")
            if v2
            else ("DeepseekV3ForCausalLM", "deepseek_v3")
        )
        dsa: dict[str, Any] = {}
        if self.use_dsa:
            arch, model_type = "DeepseekV32ForCausalLM", "deepseek_v32"
            dsa = dict(
                index_topk=self.index_topk,
                index_n_heads=self.index_n_heads,
                index_head_dim=self.index_head_dim,
            )
        return {
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "first_k_dense_replace": self.num_dense_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank or None,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts or None,
            "n_shared_experts": self.n_shared_experts or None,
            "num_experts_per_tok": self.num_experts_per_tok if self.n_routed_experts else None,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "norm_topk_prob": self.norm_topk_prob,
            "scoring_func": self.scoring_func,
            "topk_method": self.topk_method,
            "rope_parameters": rope,
            "rope_interleave": True,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "torch_dtype": "bfloat16" if self.param_dtype == "bfloat16" else "float32",
            **dsa,
        }


# config.json fields read as numbers, by kind: "int" must be a JSON integer, "number" an integer
# or a float; null is allowed (the field's default) except for the required ones.
_HF_REQUIRED_INTS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
)  # fmt: skip
_HF_INTS = (
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
    "moe_intermediate_size", "first_k_dense_replace", "q_lora_rank", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
    "num_nextn_predict_layers", "index_topk", "index_n_heads", "index_head_dim", "head_dim",
    "o_groups", "o_lora_rank", "sliding_window", "num_hash_layers", "hc_mult",
    "hc_sinkhorn_iters", "compress_rate_csa", "compress_rate_hca",
)  # fmt: skip
_HF_NUMBERS = (
    "routed_scaling_factor", "rms_norm_eps", "rope_theta", "swiglu_limit", "hc_eps",
    "compress_rope_theta",
)  # fmt: skip
_HF_ROPE_NUMBERS = (
    "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim", "attention_factor", "rope_theta",
)  # fmt: skip


def check_hf_field_types(hf: dict[str, Any]) -> dict[str, Any]:
    """One line naming the first config.json field whose JSON type cannot be what it means
    (`"num_hidden_layers": null`, `"rms_norm_eps": "1e-6"`), before any arithmetic on it.
    Returns `hf` without the optional numeric fields that are null (null = the default)."""

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def bad(where: str, key: str, value, want: str):
        raise ValueError(f"config.json {where}{key}={value!r}: must be {want}")

    for key in _HF_REQUIRED_INTS:
        if key in hf and not is_int(hf[key]):
            bad("", key, hf[key], "an integer")
    for key in _HF_INTS:
        if hf.get(key) is not None and not is_int(hf[key]):
            bad("", key, hf[key], "an integer or null")
    for key in _HF_NUMBERS:
        if hf.get(key) is not None and not (is_int(hf[key]) or isinstance(hf[key], float)):
            bad("", key, hf[key], "a number or null")
    for name in ("rope_parameters", "rope_scaling"):
        rope = hf.get(name)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            bad("", name, rope, "an object or null")
        for key in _HF_ROPE_NUMBERS:
            value = rope.get(key)
            if value is not None and not (is_int(value) or isinstance(value, float)):
                bad(f"{name}.", key, value, "a number or null")
    return {k: v for k, v in hf.items() if v is not None or k not in _HF_INTS + _HF_NUMBERS}


def _first(value):
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value
