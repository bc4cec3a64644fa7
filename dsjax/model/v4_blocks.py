"""DeepSeek-V4's decoder block and MTP module (docs/spec.md §12), used by `Transformer` when
`cfg.arch == "v4"`.

    (post, comb, u) = HC_attn(X);  X <- post ⊗ Attn(RMSNorm(u)) + combᵀ X
    (post, comb, u) = HC_ffn(X);   X <- post ⊗ MoE(RMSNorm(u), tokens) + combᵀ X

X [B, T, n, D] are the mHC streams (`layers/mhc.py`). Every layer is MoE; the first
`num_hash_layers` route by the token-id table. Layers are unrolled (not scanned): their
attention types differ. In training each block is rematerialised under `cfg.remat`'s policy
(the transformer's `REMAT_POLICIES`): "full" keeps only each block's input streams.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from dsjax.model.config import SLIDING, ModelConfig
from dsjax.model.layers.mhc import HyperConnection, HyperHead, hc_merge
from dsjax.model.layers.mlp import Linear
from dsjax.model.layers.moe import MoE
from dsjax.model.layers.norms import RMSNorm
from dsjax.model.layers.v4_attention import V4Attention

STREAM_AXES = ("batch", "length", "hc", "embed")
# Names the remat policies save or offload (the same names as the V3 blocks').
ATTN_OUT, FFN_OUT, LAYER_IN = "attn_out", "ffn_out", "layer_in"


class V4Block(nn.Module):
    """`V4Block(cfg, layer_type, hashed, mode)(x_BTnD, tokens_BT, positions_BT, segment_ids_BT)
    -> (x_BTnD, MoE stats)`. Parameters: hc_attn, hc_ffn (mHC), attn_norm, ffn_norm, attn
    (`V4Attention`), moe."""

    cfg: ModelConfig
    layer_type: str = SLIDING
    hashed: bool = False
    mode: str = "train"

    @nn.compact
    def __call__(self, x_BTnD, tokens_BT, positions_BT, segment_ids_BT):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x_BTnD = checkpoint_name(nn.with_logical_constraint(x_BTnD, STREAM_AXES), LAYER_IN)
        post, comb, u = HyperConnection(cfg, name="hc_attn")(x_BTnD)
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="attn_norm")(u)
        a = V4Attention(cfg, self.layer_type, self.mode, name="attn")(
            h, positions_BT, segment_ids_BT
        )
        x_BTnD = hc_merge(x_BTnD, checkpoint_name(a, ATTN_OUT), post, comb)
        post, comb, u = HyperConnection(cfg, name="hc_ffn")(x_BTnD)
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="ffn_norm")(u)
        y, stats = MoE(cfg, hashed=self.hashed, name="moe")(h, segment_ids_BT > 0, tokens_BT)
        y = checkpoint_name(y, FFN_OUT)
        return nn.with_logical_constraint(hc_merge(x_BTnD, y, post, comb), STREAM_AXES), stats


class V4MTP(nn.Module):
    """DeepSeek-V4's MTP module (official inference code's `MTPBlock`): from the main model's
    streams X (after the last layer) and the embedding of the token one ahead,
    `X0_j = W_e RMSNorm(e) + W_h RMSNorm(X_j)`, one sliding-window, routed-MoE block, then its own
    HyperHead and norm. Returns (streams [B,T,n,D], head input [B,T,D], stats). Parameters:
    enorm, hnorm, e_proj, h_proj [D, D], block, hc_head, norm."""

    cfg: ModelConfig
    mode: str = "train"

    @nn.compact
    def __call__(self, x_BTnD, emb_next_BTD, tokens_next_BT, positions_BT, segment_ids_BT):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        D = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=pdtype, init_std=cfg.init_std, fp8=cfg.fp8)
        e = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="enorm")(emb_next_BTD)
        hx = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="hnorm")(x_BTnD)
        e = Linear(D, D, (None, "embed"), name="e_proj", **kw)(e)
        hx = Linear(D, D, (None, "embed"), name="h_proj", **kw)(hx)
        x0 = hx + e[:, :, None, :]
        x1, stats = V4Block(cfg, SLIDING, False, self.mode, name="block")(
            x0, tokens_next_BT, positions_BT, segment_ids_BT
        )
        h = HyperHead(cfg, name="hc_head")(x1)
        normed = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="norm")(h)
        return x1, normed, stats


def v4_layers(
    cfg: ModelConfig, mode: str, x_BTD, tokens_BT, positions_BT, segment_ids_BT, policy=None
) -> tuple[jax.Array, dict[str, Any]]:
    """The main stack (called inside `Transformer.__call__`): embeddings [B,T,D] copied into
    n streams, the `layers_{i}` blocks (each under `nn.remat` with `policy` when one is given).
    Returns (streams [B,T,n,D], {"counts": [L_routed, E],
    "balance": [L_routed]} over the top-k routed layers (hash layers' routing is fixed))."""
    x = jnp.broadcast_to(x_BTD[:, :, None, :], (*x_BTD.shape[:2], cfg.hc_mult, x_BTD.shape[-1]))
    counts, balance = [], []
    block = V4Block if policy is None else nn.remat(V4Block, policy=policy)
    for i, layer_type in enumerate(cfg.layer_types):
        hashed = i < cfg.num_hash_layers
        x, stats = block(cfg, layer_type, hashed, mode, name=f"layers_{i}")(
            x, tokens_BT, positions_BT, segment_ids_BT
        )
        if not hashed:
            counts.append(stats["counts"])
            balance.append(stats["balance"])
    out: dict[str, Any] = {}
    if counts:
        out = {"counts": jnp.stack(counts), "balance": jnp.stack(balance)}
    return x, out
