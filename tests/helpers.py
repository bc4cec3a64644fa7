"""Small shared test utilities: a tiny config and float64 references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dsjax.model.config import ModelConfig
from dsjax.model.transformer import abstract_variables


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
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


def random_variables(cfg: ModelConfig, seed: int, gain: float = 1.5):
    """Random variables with well-separated logits, built from shapes (no init compile).

    Kernels ~ N(0, (gain / sqrt(fan_in))^2), embeddings N(0, 1), norm scales 1 + 0.2 N(0, 1),
    routing biases U[0, 0.3], LayerNorm biases 0.1 N(0, 1).
    """
    shapes = nn.unbox(abstract_variables(cfg))
    rng = np.random.default_rng(seed)

    def make(path, s):
        name = jax.tree_util.keystr(path)
        if "moe_bias" in name:
            return jnp.asarray(rng.uniform(0, 0.3, s.shape), s.dtype)
        if name.endswith("['scale']"):
            return jnp.asarray(1 + 0.2 * rng.standard_normal(s.shape), s.dtype)
        if name.endswith("['bias']"):  # LayerNorm bias (the DSA indexer's k_norm)
            return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)
        if "embedding" in name:
            return jnp.asarray(rng.standard_normal(s.shape), s.dtype)
        fan_in = s.shape[-2]
        return jnp.asarray(gain / math.sqrt(fan_in) * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)
