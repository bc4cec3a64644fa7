"""Rotary position embedding with YaRN frequency scaling, interleaved pairs (docs/spec.md §4).

DeepSeek's released weights expect pair (2i, 2i+1) rotated by frequency i, so rotating interleaved
pairs here means a checkpoint loads without permuting any weight row.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsjax.model.config import ModelConfig


def yarn_correction_range(cfg: ModelConfig) -> tuple[float, float]:
    """The [low, high] pair indices between which YaRN blends interpolation and extrapolation."""
    dim, base, orig = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_original_max_position

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low: float = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    return low, high


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair angular frequencies θ'_i (float32, shape [d_r / 2])."""
    dim = cfg.qk_rope_head_dim
    theta = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if cfg.rope_factor is not None:  # cfg.use_yarn
        low, high = yarn_correction_range(cfg)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        theta = theta * ((1.0 - ramp) + ramp / cfg.rope_factor)
    return theta.astype(np.float32)


def apply_rope(x_BTHR: jnp.ndarray, positions_BT: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """Rotates interleaved pairs of the last axis by angle `position * θ'_i`.

    x_BTHR [B, T, H, R=qk_rope_head_dim] (H may be 1, e.g. MLA's shared key), positions_BT [B, T]
    int -> [B, T, H, R] in x's dtype (computed in float32; YaRN's cos/sin scale applied).
    """
    inv_freq = jnp.asarray(rope_frequencies(cfg))
    angle_BTP = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    mscale = cfg.rope_cos_sin_scale
    cos = (jnp.cos(angle_BTP) * mscale)[:, :, None, :]
    sin = (jnp.sin(angle_BTP) * mscale)[:, :, None, :]
    x = x_BTHR.astype(jnp.float32)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    y_even = x_even * cos - x_odd * sin
    y_odd = x_even * sin + x_odd * cos
    return jnp.stack([y_even, y_odd], axis=-1).reshape(x_BTHR.shape).astype(x_BTHR.dtype)
