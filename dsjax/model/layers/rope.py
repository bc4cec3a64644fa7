"""Rotary position embedding with YaRN frequency scaling, interleaved pairs (docs/spec.md §4).

DeepSeek's released weights expect pair (2i, 2i+1) rotated by frequency i, so rotating interleaved
pairs here means a checkpoint loads without permuting any weight row.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsjax.model.config import ModelConfig


def yarn_correction_range(cfg: ModelConfig, theta: float | None = None) -> tuple[float, float]:
    """The [low, high] pair indices between which YaRN blends interpolation and extrapolation
    (for base `theta`, default `cfg.rope_theta`)."""
    dim, orig = cfg.qk_rope_head_dim, cfg.rope_original_max_position
    base = cfg.rope_theta if theta is None else theta

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low: float = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    return low, high


def rope_frequencies(
    cfg: ModelConfig, base: float | None = None, yarn: bool | None = None
) -> np.ndarray:
    """Per-pair angular frequencies θ'_i (float32, shape [d_r / 2]) for base `base` (default
    `cfg.rope_theta`), YaRN-scaled when `yarn` (default `cfg.use_yarn`)."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta if base is None else base
    yarn = cfg.use_yarn if yarn is None else yarn
    theta = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if yarn and cfg.rope_factor is not None:
        low, high = yarn_correction_range(cfg, base)
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


def v4_rope_frequencies(cfg: ModelConfig, compressed: bool) -> np.ndarray:
    """DeepSeek-V4's two rotary tables (docs/spec.md §12): "main" (sliding-window-only layers,
    `rope_theta`, no YaRN) and "compress" (every rotation in CSA/HCA layers: their window
    branch, compressors and indexer; `compress_rope_theta` with YaRN when configured)."""
    if compressed:
        return rope_frequencies(cfg, cfg.compress_rope_theta, cfg.use_yarn)
    return rope_frequencies(cfg, cfg.rope_theta, False)


def rotate_trailing(x, positions, inv_freq: np.ndarray, inverse: bool = False):
    """Rotates interleaved pairs of the last `2 * len(inv_freq)` channels of x (DeepSeek-V4's
    `[nope | rope]` layout) by `position * θ_i` (by minus that when `inverse`); no cos/sin scale.

    x [..., T, (heads...), d] with positions [..., T] broadcastable against x's leading axes
    up to T: pass positions shaped like x.shape[:-1] minus trailing head axes (they are added).
    Computed in float32, returned in x's dtype."""
    r = 2 * inv_freq.shape[0]
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    extra = x.ndim - 1 - positions.ndim  # head axes between T and the channel axis
    angle = angle.reshape(angle.shape[:-1] + (1,) * extra + angle.shape[-1:])
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if inverse:
        sin = -sin
    rot = x[..., -r:].astype(jnp.float32)
    x_even, x_odd = rot[..., 0::2], rot[..., 1::2]
    y = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
    y = y.reshape(rot.shape).astype(x.dtype)
    return jnp.concatenate([x[..., :-r], y], axis=-1)
