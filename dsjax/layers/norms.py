"""RMSNorm: `w * x / sqrt(mean(x^2) + eps)`, computed in float32."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis; the scale starts at one."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x_BTD.shape[-1],),
            self.param_dtype,
        )
        x32 = x_BTD.astype(jnp.float32)
        normed = x32 * jnp.reciprocal(
            jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        )
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)
