"""DeepSeek-V4's decoder block and MTP module (docs/spec.md §12), used by `Transformer` when
`cfg.arch == "v4"`.

    (post, comb, u) = HC_attn(X);  X <- post ⊗ Attn(RMSNorm(u)) + combᵀ X
    (post, comb, u) = HC_ffn(X);   X <- post ⊗ MoE(RMSNorm(u), tokens) + combᵀ X

X [B, T, n, D] are the mHC streams (`layers/mhc.py`). Every layer is MoE; the first
`num_hash_layers` route by the token-id table. Layers differ in kind (attention type, hashed),
so the stack is cut into groups (`layer_groups`): a run of two or more repeats of one or two
kinds (V4-Flash's 20 HCA/CSA pairs) is scanned (`blocks_{start}`, each leaf with a leading
repeat axis, logical "layers"; inside, `block_{j}` for the j-th layer of the period), any other
layer stays unrolled (`layers_{i}`). The compiled program then no longer grows with depth.
In training each block is rematerialised under `cfg.remat`'s policy (the transformer's
`REMAT_POLICIES`): "full" keeps only each block's input streams.
"""

from __future__ import annotations

import dataclasses
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
from dsjax.model.v4_cache import layer_cache_shapes

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


Kind = tuple[str, bool]  # (layer type, hash-routed)


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Layers `start ..` of the stack: `kinds` (one period) repeated `repeats` times. One
    unrolled layer `layers_{start}` when `repeats == 1`, else the scanned `blocks_{start}`."""

    start: int
    kinds: tuple[Kind, ...]
    repeats: int

    @property
    def name(self) -> str:
        return f"layers_{self.start}" if self.repeats == 1 else f"blocks_{self.start}"

    @property
    def layers(self) -> range:
        return range(self.start, self.start + len(self.kinds) * self.repeats)


def layer_groups(cfg: ModelConfig) -> list[LayerGroup]:
    """The stack cut into groups, in order: at each layer the period of 1 or 2 kinds that
    repeats over the most layers (at least twice) is scanned, else the layer is unrolled."""
    kinds = [(t, i < cfg.num_hash_layers) for i, t in enumerate(cfg.layer_types)]
    groups, i = [], 0
    while i < len(kinds):
        best = (1, 1)  # (period, repeats)
        for p in (1, 2):
            r = 0
            while kinds[i + r * p : i + (r + 1) * p] == kinds[i : i + p]:
                r += 1
            if r >= 2 and p * r > best[0] * best[1]:
                best = (p, r)
        p, r = best
        groups.append(LayerGroup(i, tuple(kinds[i : i + p]), r))
        i += p * r
    return groups


def layer_slot(cfg: ModelConfig, i: int) -> tuple[tuple[str, ...], int | None]:
    """Where layer i's variables live: (tree path, index on the leading repeat axis or None)."""
    for g in layer_groups(cfg):
        if i in g.layers:
            if g.repeats == 1:
                return (g.name,), None
            k, j = divmod(i - g.start, len(g.kinds))
            return (g.name, f"block_{j}"), k
    raise ValueError(f"layer {i} is outside the {len(cfg.layer_types)}-layer stack")


class V4Period(nn.Module):
    """One period of a scanned group (scan calling convention): the blocks `block_{j}` of
    `kinds` in order. Returns (streams, {"counts": [P, E], "balance": [P]} over its P
    top-k routed blocks, {} when all are hash-routed)."""

    cfg: ModelConfig
    kinds: tuple[Kind, ...]
    mode: str = "train"
    policy: Any = None

    @nn.compact
    def __call__(self, x_BTnD, tokens_BT, positions_BT, segment_ids_BT):
        block = (
            V4Block
            if self.policy is None
            else nn.remat(V4Block, policy=self.policy, prevent_cse=False)
        )
        counts, balance = [], []
        for j, (layer_type, hashed) in enumerate(self.kinds):
            x_BTnD, stats = block(self.cfg, layer_type, hashed, self.mode, name=f"block_{j}")(
                x_BTnD, tokens_BT, positions_BT, segment_ids_BT
            )
            if not hashed:
                counts.append(stats["counts"])
                balance.append(stats["balance"])
        out = {"counts": jnp.stack(counts), "balance": jnp.stack(balance)} if counts else {}
        return x_BTnD, out


def v4_layers(
    cfg: ModelConfig, mode: str, x_BTD, tokens_BT, positions_BT, segment_ids_BT, policy=None
) -> tuple[jax.Array, dict[str, Any]]:
    """The main stack (called inside `Transformer.__call__`): embeddings [B,T,D] copied into
    n streams, then the `layer_groups` (each block under `nn.remat` with `policy` when one is
    given). Returns (streams [B,T,n,D], {"counts": [L_routed, E], "balance": [L_routed]} over
    the top-k routed layers in layer order (hash layers' routing is fixed))."""
    x = jnp.broadcast_to(x_BTD[:, :, None, :], (*x_BTD.shape[:2], cfg.hc_mult, x_BTD.shape[-1]))
    counts, balance = [], []
    block = V4Block if policy is None else nn.remat(V4Block, policy=policy)
    for g in layer_groups(cfg):
        if g.repeats == 1:
            ((layer_type, hashed),) = g.kinds
            x, stats = block(cfg, layer_type, hashed, mode, name=g.name)(
                x, tokens_BT, positions_BT, segment_ids_BT
            )
            if not hashed:
                counts.append(stats["counts"][None])
                balance.append(stats["balance"][None])
        else:
            scanned = nn.scan(
                V4Period,
                variable_axes={"params": 0, "moe_bias": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 3,
                length=g.repeats,
                unroll=min(cfg.scan_unroll, g.repeats),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, stats = scanned(cfg, g.kinds, mode, policy, name=g.name)(
                x, tokens_BT, positions_BT, segment_ids_BT
            )
            # [repeats, P, ...] in layer order: repeat-major, then position in the period
            if stats:
                counts.append(stats["counts"].reshape(-1, *stats["counts"].shape[2:]))
                balance.append(stats["balance"].reshape(-1))
    out: dict[str, Any] = {}
    if counts:
        out = {"counts": jnp.concatenate(counts), "balance": jnp.concatenate(balance)}
    return x, out


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int, mtp: bool = True) -> dict[str, Any]:
    """The `cache` collection of `cfg` for `batch` rows of `max_len` positions, as
    jax.ShapeDtypeStructs, built from `v4_cache.layer_cache_shapes` per layer (nothing traced:
    a 1M-token cache costs no prefill trace). Same tree as `Transformer.init(..., mode="prefill")`
    makes: `layers_{i}/attn/v4`, `blocks_{s}/block_{j}/attn/v4` with a leading repeat axis, and
    `mtp_{k}/block/attn/v4` when `mtp`."""

    def one(layer_type: str, repeats: int = 0):
        shapes = layer_cache_shapes(cfg, layer_type, batch, max_len)
        if repeats:
            shapes = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct((repeats, *s.shape), s.dtype), shapes
            )
        return {"attn": {"v4": shapes}}

    tree: dict[str, Any] = {}
    for g in layer_groups(cfg):
        if g.repeats == 1:
            tree[g.name] = one(g.kinds[0][0])
        else:
            tree[g.name] = {f"block_{j}": one(t, g.repeats) for j, (t, _) in enumerate(g.kinds)}
    for k in range(cfg.num_mtp_layers if mtp else 0):
        tree[f"mtp_{k}"] = {"block": one(SLIDING)}
    return tree
