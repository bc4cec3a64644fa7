"""Linear projection with logical axes, and the SwiGLU feed-forward `down(silu(gate(u)) * up(u))`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


class Linear(nn.Module):
    """Bias-free `x @ kernel` with kernel [in, out] (a torch weight transposed)."""

    in_features: int
    out_features: int
    axes: tuple[str | None, str | None]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.006

    def setup(self):
        self.kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            (self.in_features, self.out_features),
            self.param_dtype,
        )

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.dot(x.astype(self.dtype), self.kernel.astype(self.dtype))


class SwiGLU(nn.Module):
    """Dense gated feed-forward of width `features`."""

    hidden: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.006

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
        gate = Linear(self.hidden, self.features, ("embed", "mlp"), name="gate", **kw)(x_BTD)
        up = Linear(self.hidden, self.features, ("embed", "mlp"), name="up", **kw)(x_BTD)
        h_BTF = jax.nn.silu(gate) * up
        if h_BTF.ndim == 3:
            h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        return Linear(self.features, self.hidden, ("mlp", "embed"), name="down", **kw)(h_BTF)
