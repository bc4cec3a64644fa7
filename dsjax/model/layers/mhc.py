"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4, docs/spec.md §12): the residual stream is
`hc_mult` parallel streams X [B, T, n, D]. Per token, a one-layer perceptron of the unweighted-
RMS-normed flattened streams gives three mixings: `pre` (collapses the n streams into the block
input), `post` (spreads the block output back over the streams) and `comb` (mixes the streams
among themselves, projected onto the doubly-stochastic matrices by Sinkhorn-Knopp):

    X' = post ⊗ block(Σ_j pre_j X_j) + combᵀ X          (X'_k = post_k y + Σ_j comb[j, k] X_j)

`HyperHead` collapses the streams once more (pre only) before the final norm. Everything runs
in float32, as in the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.model.config import ModelConfig


def unweighted_rms(x, eps: float):
    """`x / sqrt(mean(x^2) + eps)` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def sinkhorn(logits_NN, iters: int, eps: float):
    """Row softmax + eps, a column normalisation, then (iters - 1) x (row, column)
    normalisations: the doubly-stochastic `comb` of mHC ([..., n, n], float32)."""
    comb = jax.nn.softmax(logits_NN, axis=-1) + eps
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + eps)
        comb = comb / (comb.sum(-2, keepdims=True) + eps)
    return comb


def _param(module: nn.Module, name: str, shape, init, axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class HyperConnection(nn.Module):
    """`HyperConnection(cfg)(x_BTnD) -> (post [B,T,n] f32, comb [B,T,n,n] f32, u [B,T,D])`:
    u = Σ_j pre_j X_j (the block input, x's dtype). Parameters (float32): fn [n*D, (2+n)*n]
    (columns: pre n, post n, comb n*n row-major), base [(2+n)*n], scale [3]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTnD):
        cfg = self.cfg
        n = cfg.hc_mult
        B, T, _, D = x_BTnD.shape
        fn = _param(self, "fn", (n * D, (2 + n) * n), nn.initializers.normal(cfg.init_std),
                    ("hc_in", "hc_mix"))  # fmt: skip
        base = _param(self, "base", ((2 + n) * n,), nn.initializers.zeros, ("hc_mix",))
        scale = _param(self, "scale", (3,), nn.initializers.ones, (None,))
        flat = unweighted_rms(x_BTnD.reshape(B, T, n * D), cfg.rms_norm_eps)
        mix = jnp.dot(flat, fn, preferred_element_type=jnp.float32)
        pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + cfg.hc_eps
        post = 2.0 * jax.nn.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb_logits = mix[..., 2 * n :] * scale[2] + base[2 * n :]
        comb = sinkhorn(comb_logits.reshape(B, T, n, n), cfg.hc_sinkhorn_iters, cfg.hc_eps)
        u = jnp.einsum("btn,btnd->btd", pre, x_BTnD.astype(jnp.float32))
        return post, comb, u.astype(x_BTnD.dtype)


def hc_merge(x_BTnD, y_BTD, post_BTn, comb_BTnn):
    """The streams after a block: `post_k y + Σ_j comb[j, k] X_j` ([B, T, n, D], x's dtype)."""
    dtype = x_BTnD.dtype
    mixed = jnp.einsum("btjk,btjd->btkd", comb_BTnn.astype(dtype), x_BTnD)
    return post_BTn.astype(dtype)[..., None] * y_BTD[:, :, None, :].astype(dtype) + mixed


class HyperHead(nn.Module):
    """`HyperHead(cfg)(x_BTnD) -> [B, T, D]`: Σ_j pre_j X_j with pre = σ(scale·(fn·v) + base)
    + eps. Parameters (float32): hc_fn [n*D, n], hc_base [n], hc_scale [1]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTnD):
        cfg = self.cfg
        n = cfg.hc_mult
        B, T, _, D = x_BTnD.shape
        fn = _param(self, "hc_fn", (n * D, n), nn.initializers.normal(cfg.init_std),
                    ("hc_in", None))  # fmt: skip
        base = _param(self, "hc_base", (n,), nn.initializers.zeros, (None,))
        scale = _param(self, "hc_scale", (1,), nn.initializers.ones, (None,))
        flat = unweighted_rms(x_BTnD.reshape(B, T, n * D), cfg.rms_norm_eps)
        mix = jnp.dot(flat, fn, preferred_element_type=jnp.float32)
        pre = jax.nn.sigmoid(mix * scale[0] + base) + cfg.hc_eps
        out = jnp.einsum("btn,btnd->btd", pre, x_BTnD.astype(jnp.float32))
        return out.astype(x_BTnD.dtype)
