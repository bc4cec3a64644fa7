"""Linear projection with logical axes, and the SwiGLU feed-forward `down(silu(gate(u)) * up(u))`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.model import fp8 as fp8_lib


class Linear(nn.Module):
    """Bias-free `x @ kernel` with kernel [in, out] (a torch weight transposed).

    `fp8`: the product runs in DeepSeek-V3's FP8 recipe (`dsjax.model.fp8.fp8_dot`: x in 1x128 tiles,
    the kernel in 128x128 blocks, FP32 accumulation, all three GEMMs).
    Stored FP8 weights: `params` may hold `kernel` as float8_e4m3fn [in, out] with a sibling
    `kernel_scale_inv` float32 [ceil(in/128), ceil(out/128)] (W[i,j] = kernel[i,j] *
    kernel_scale_inv[i//128, j//128]). With `fp8` the stored blocks are used directly (only x is
    quantised; the stored weight gets no gradient); otherwise they are dequantised on the fly.
    """

    in_features: int
    out_features: int
    axes: tuple[str | None, str | None]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.006
    fp8: bool = False

    def setup(self):
        self.kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            (self.in_features, self.out_features),
            self.param_dtype,
        )

    def scale_inv(self) -> jnp.ndarray | None:
        """The `kernel_scale_inv` blocks of an FP8-stored kernel, else None."""
        if self.has_variable("params", "kernel_scale_inv"):
            return self.get_variable("params", "kernel_scale_inv")
        return None

    def weight(self, dtype=None) -> jnp.ndarray:
        """The kernel [in, out] in `dtype` (default the compute dtype), dequantised if stored FP8."""
        dtype = dtype or self.dtype
        scale = self.scale_inv()
        if scale is not None:
            return fp8_lib.dequantize_weight(self.kernel, scale, dtype)
        return self.kernel.astype(dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.scale_inv()
        if self.fp8:
            x = x.astype(self.dtype)
            if scale is not None:
                return fp8_lib.fp8_dot_stored(x, self.kernel, scale)
            return fp8_lib.fp8_dot(x, self.kernel)
        return jnp.dot(x.astype(self.dtype), self.weight())


def swiglu(gate, up, limit: float = 0.0, fp8: bool = False):
    """`silu(gate) * up`; with `limit` > 0 DeepSeek-V4's clamp first (gate <= limit, up in
    [-limit, limit]); under `fp8` the backward keeps FP8 copies of gate/up (`fp8.fp8_swiglu`)."""
    if limit:
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
    return fp8_lib.fp8_swiglu(gate, up) if fp8 else jax.nn.silu(gate) * up


class SwiGLU(nn.Module):
    """Dense gated feed-forward of width `features`: x [..., hidden] -> [..., hidden].

    Parameters gate, up [hidden, features], down [features, hidden]; `limit` > 0 clamps the
    pre-activations (`swiglu`)."""

    hidden: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.006
    fp8: bool = False
    limit: float = 0.0

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        kw: dict[str, Any] = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std, fp8=self.fp8
        )
        gate = Linear(self.hidden, self.features, ("embed", "mlp"), name="gate", **kw)(x_BTD)
        up = Linear(self.hidden, self.features, ("embed", "mlp"), name="up", **kw)(x_BTD)
        h_BTF = swiglu(gate, up, self.limit)
        if h_BTF.ndim == 3:
            h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        return Linear(self.features, self.hidden, ("mlp", "embed"), name="down", **kw)(h_BTF)
