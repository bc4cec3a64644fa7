"""RMSNorm: `w * x / sqrt(mean(x^2) + eps)`, computed in float32."""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
from flax import linen as nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis; the scale starts at one.

    x [..., D] (any dtype) -> [..., D] in `dtype`, computed in float32. Parameter scale [D] with
    logical axis `axis_name` ("embed" for the hidden size, "q_lora"/"kv_lora" for MLA's latents).
    """

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        # Flax returns the unboxed array (the logical-axes box is only in the variables).
        scale = cast(
            jax.Array,
            self.param(
                "scale",
                nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                (x_BTD.shape[-1],),
                self.param_dtype,
            ),
        )
        x32 = x_BTD.astype(jnp.float32)
        normed = x32 * jnp.reciprocal(
            jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        )
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)
