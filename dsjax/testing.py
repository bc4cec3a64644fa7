"""Helpers shared by the tests and the benchmarks: tiny configs, random variables built from
shapes, float64 references, synthetic batches, a tool-call tokenizer and a tiny HF checkpoint
writer.

Nothing here imports torch, transformers or pytest (the torch-built Hugging Face references
stay in tests/hf_fixtures.py and tests/v4_fixtures.py). `import dsjax` does not load this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dsjax.model.config import ModelConfig
from dsjax.model.transformer import abstract_variables
from dsjax.text.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, Tokenizer, train_bpe
from dsjax.text.tool_calls import MARKERS

# Prompts of three lengths (5, 1 and 13 tokens) inside tiny_config's vocabulary.
PROMPTS = [[5, 9, 14, 3, 7], [11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


# ====================================================================== configs and variables
def tiny_config(**overrides) -> ModelConfig:
    """A 3-layer float32 model (dense, MoE, MoE; 8 experts top-2; one MTP module; YaRN) with
    `overrides` applied: the shapes most tests compile."""
    base: dict[str, Any] = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        rope_factor=4.0,
        rope_original_max_position=16,
        max_position_embeddings=256,
        num_mtp_layers=1,
        dtype="float32",
        param_dtype="float32",
        init_std=0.02,
        remat="none",
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_variables(cfg: ModelConfig, seed: int = 0, gain: float = 1.5, std: float | None = None):
    """Random variables built from shapes alone (no init compile).

    By default with well-separated logits: kernels N(0, (gain / sqrt(fan_in))^2), embeddings
    N(0, 1), norm scales 1 + 0.2 N(0, 1), routing biases U[0, 0.3], LayerNorm biases 0.1 N(0, 1),
    other vectors (V4's sinks, mHC bases) 0.5 N(0, 1). With `std`, a training init: everything
    N(0, std^2), norm scales 1, routing biases 0. Hash-routing tables (V4's `tid2eid`) hold
    distinct real expert ids per token either way.
    """
    shapes = nn.unbox(abstract_variables(cfg))
    rng = np.random.default_rng(seed)

    def make(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['tid2eid']"):
            ids = [rng.permutation(cfg.n_routed_experts)[: s.shape[1]] for _ in range(s.shape[0])]
            return jnp.asarray(np.stack(ids), s.dtype)
        if std is not None:
            if "moe_bias" in name:
                return jnp.zeros(s.shape, s.dtype)
            if name.endswith("['scale']"):
                return jnp.ones(s.shape, s.dtype)
            return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)
        if "moe_bias" in name:
            return jnp.asarray(rng.uniform(0, 0.3, s.shape), s.dtype)
        if name.endswith("['scale']"):
            return jnp.asarray(1 + 0.2 * rng.standard_normal(s.shape), s.dtype)
        if name.endswith("['bias']"):  # LayerNorm bias (the DSA indexer's k_norm)
            return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)
        if "embedding" in name:
            return jnp.asarray(rng.standard_normal(s.shape), s.dtype)
        if len(s.shape) == 1:
            return jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype)
        fan_in = s.shape[-2]
        return jnp.asarray(gain / math.sqrt(fan_in) * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


def drafter_variables(cfg: ModelConfig, seed: int, residual: float):
    """A model whose MTP module nearly copies the main model's next prediction.

    Main blocks' output projections are scaled by `residual` (so hidden ~ embedding and the main
    model is almost a bigram model); the MTP block's projections are zero and eh_proj passes the
    normed embedding of t_{i+1} through, so MTP's logits at i ~ the main model's logits at i+1.
    """
    v = random_variables(cfg, seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x * residual if any(k in jax.tree_util.keystr(p) for k in ("['o']", "['down']")) else x
        ),
        v["params"],
    )
    mtp = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jnp.zeros_like(x)
            if any(k in jax.tree_util.keystr(p) for k in ("['o']", "['down']"))
            else x
        ),
        params["mtp_0"],
    )
    D = cfg.hidden_size
    mtp["eh_proj"]["kernel"] = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))], 0)
    for norm in ("enorm", "hnorm"):
        mtp[norm]["scale"] = jnp.ones((D,))
    mtp["head_norm"]["scale"] = params["final_norm"]["scale"]
    return {"params": {**params, "mtp_0": mtp}, "moe_bias": v["moe_bias"]}


def scale_params(variables, factor: float):
    """Multiplies every non-norm parameter: random-init logits become well separated."""

    def scale(path, x):
        keys = [getattr(p, "key", "") for p in path]
        return x if "scale" in keys else x * factor

    params = jax.tree_util.tree_map_with_path(scale, variables["params"])
    return {**variables, "params": params}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def np_attention(q, k, v, q_idx, k_idx, q_seg, k_seg, scale):
    """float64 reference for q [B,T,G,H,K], k [B,S,G,K], v [B,S,G,V]."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("btghk,bsgk->bghts", q, k) * scale
    mask = k_idx[:, None, :] <= q_idx[:, :, None]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    s = np.where(mask[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bghts,bsgv->btghv", p, v)


# ====================================================================== batches and outputs
def synthetic_batch(cfg, B, T, seed=0):
    rng = np.random.RandomState(seed)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2 :] = 2
    seg[0, -3:] = 0  # some padding
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0)
    return {
        "inputs": rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32),
        "targets": rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32),
        "segment_ids": seg,
        "positions": pos.astype(np.int32),
        "weights": (seg > 0).astype(np.float32),
    }


def tokens_of(events: Iterable[Any]) -> list[int]:
    """The token ids of a stream of engine events (`TokenEvent.tokens`), in order."""
    return [t for ev in events for t in ev.tokens]


def save_random_hf_checkpoint(path: str | Path, cfg: ModelConfig, seed: int = 0, gain: float = 1.5):
    """Writes a Hugging Face directory (config.json + safetensors) of `random_variables(cfg,
    seed, gain)` with dsjax's own writer; returns the variables (on the host)."""
    from dsjax.checkpoints.hf import save_hf_checkpoint

    variables = jax.device_get(random_variables(cfg, seed, gain=gain))
    save_hf_checkpoint(path, cfg, variables)
    return variables


# ====================================================================== JSON mode / tool calls
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}
CHOICE = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", 10, 1]},
        "score": {"type": ["number", "null"]},
        "where": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
        },
    },
    "required": ["color", "where", "score"],
}
LIST = {"type": "array", "items": {"type": "integer"}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def tool_tokenizer() -> Tokenizer:
    """A small byte-level BPE with DeepSeek's tool-call markers as special tokens."""
    corpus = ['{"name": "the quick brown fox", "age": 12, "tags": ["a", "b"], "ok": true}'] * 30
    trained = train_bpe(corpus + ["hello world, what is the weather in Paris?"] * 10, 400)
    trained.backend.add_special_tokens(list(MARKERS))
    return Tokenizer(trained.backend, bos_token="<|bos|>", eos_token="<|eos|>")


# A minimal chat template: `<role>content` lines, then `<assistant>` for the reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_tokenizer() -> Tokenizer:
    """A 300-token byte-level BPE with bos/eos/pad and `CHAT_TEMPLATE`, for serving tests."""
    corpus = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(100)]
    trained = train_bpe(corpus * 3 + ["hello world, how are you?"] * 20, 300)
    return Tokenizer(
        trained.backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
