"""Context parallelism: the sequence split over the `context` mesh axis, attention fed by the latent.

Under a mesh whose `context` axis has more than one chip, activations' `length` dimension splits
over it (`dsjax.model.sharding`): every per-token computation (projections, norms, FFN, MoE routing and
dispatch, the head) runs on the chip's own tokens. Attention is the one place a query needs other
chips' tokens, and MLA makes that cheap: `context_attention` all-gathers only the normalised KV
latent and the rotated shared key, kv_lora_rank + qk_rope_head_dim values per token (V3: 576),
then expands per-head keys and values locally with `kv_b`. Shipping expanded keys and values
instead would move H (dn + dr + dv) / (C + dr) times more (V3: 71x). In the backward pass the
same holds in reverse: each chip folds its keys' and values' gradients back through `kv_b`
locally, and only the latent's gradient is reduce-scattered. The keys and values of the whole
sequence never exist at once either: `dsjax.model.layers.latent_flash` expands them one key block at a
time inside its loops.

Load balance (zig-zag): causal attention makes late tokens expensive (they see every key) and
early ones cheap. `zigzag_order(T, C)` splits the sequence into 2C blocks and gives chip c blocks
c and 2C-1-c, so every chip holds one early and one late block and does the same work.
`to_context_layout` permutes a training batch into that order and records each slot's original
index (`token_index`), which attention masks by (causal by original index) and which the MTP
modules use to find the token k ahead. Per-token losses do not care about order.

Limits (each raises a clear error where it would apply): DSA layers (their indexer would need the
same exchange), `dsa_stage` training, and FP8 for the K/V up-projection are not context-parallel
yet; the sequence must divide into 2 * context blocks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsjax.model.fp8 import match_varying
from dsjax.model.layers.latent_flash import latent_flash_attention
from dsjax.model.sharding import BATCH_AXES

AXIS = "context"


def context_size(mesh=None) -> int:
    """Chips on the `context` axis of `mesh` (default: the mesh in scope), 1 without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[AXIS])


def splits_over_context(B: int, T: int, mesh=None) -> bool:
    """Whether [B, T] activations split evenly over (batch axes, context) with context > 1: the
    condition for context-parallel attention (not met by e.g. the batch-1 parameter-init trace,
    which then runs the plain path)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    C = context_size(mesh)
    if C == 1:
        return False
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)
    return B % shards == 0 and T % C == 0


def zigzag_order(T: int, C: int) -> np.ndarray:
    """int32 [T]: the original index held at each layout slot. Slots [c T/C, (c+1) T/C) (chip c's
    share) hold blocks c and 2C-1-c of the 2C equal blocks of the sequence."""
    if T % (2 * C):
        raise ValueError(
            f"context parallelism over {C} chips needs the sequence length ({T}) to divide "
            f"into 2 x {C} = {2 * C} equal blocks (zig-zag load balance)"
        )
    blocks = np.arange(T, dtype=np.int32).reshape(2 * C, T // (2 * C))
    order = [i for c in range(C) for i in (c, 2 * C - 1 - c)]
    return blocks[order].reshape(T)


def shift_ahead(x_BT, k: int, fill=0):
    """[B, T] -> [B, T]: position i holds x[i + k]; the last k positions hold `fill`."""
    tail = jnp.full((x_BT.shape[0], k), fill, x_BT.dtype)
    return jnp.concatenate([x_BT[:, k:], tail], axis=1)


def to_context_layout(batch: dict, C: int, mtp_depths: int, mtp_weights) -> dict:
    """A training batch ([B, T] arrays in sequence order) in the zig-zag layout for `C` chips.

    Adds `token_index` [B, T] (the original index of every slot) and, for MTP depth k = 1..D,
    `mtp_targets` / `mtp_weights` [B, D, T]: depth k at original position i predicts
    targets[i+k] with weight `mtp_weights(batch, k)` (computed in sequence order, zero for the
    last k positions).
    """
    B, T = batch["inputs"].shape
    order = zigzag_order(T, C)
    out = dict(batch)
    if mtp_depths:
        depths = range(1, mtp_depths + 1)
        out["mtp_targets"] = jnp.stack([shift_ahead(batch["targets"], k) for k in depths], 1)
        out["mtp_weights"] = jnp.stack([mtp_weights(batch, k) for k in depths], 1)
    out = jax.tree.map(lambda x: jnp.take(x, order, axis=-1), out)
    out["token_index"] = jnp.broadcast_to(jnp.asarray(order), (B, T))
    return out


def fold_context(*arrays_BT):
    """[B, T, ...] arrays split over `context` on T -> [B*C, T/C, ...], each chip's share of a
    sequence its own row (unchanged without a context split). For per-token sums whose chunked
    loops (the cross-entropy) must not run across the split axis, which would gather it."""
    mesh = jax.sharding.get_abstract_mesh()
    B, T = arrays_BT[0].shape[:2]
    if not splits_over_context(B, T, mesh):
        return arrays_BT
    C = context_size(mesh)
    rows = tuple(a for a in (*BATCH_AXES, AXIS) if a in mesh.axis_names and mesh.shape[a] > 1)

    def fold(x):
        x = x.reshape(B * C, T // C, *x.shape[2:])
        return jax.lax.with_sharding_constraint(x, P(rows, *([None] * (x.ndim - 1))))

    return tuple(fold(x) for x in arrays_BT)


def tokens_ahead(tokens_BT, token_index_BT, k: int):
    """In any layout: each slot's token k places ahead in sequence order (the last k positions
    of the sequence get the token at T-1, a placeholder whose predictions carry no weight)."""
    T = tokens_BT.shape[1]
    inverse = jnp.argsort(token_index_BT, axis=1)  # sequence position -> slot
    wanted = jnp.minimum(token_index_BT + k, T - 1)
    slot = jnp.take_along_axis(inverse, wanted, axis=1)
    return jnp.take_along_axis(tokens_BT, slot, axis=1)


def _axes(mesh, names) -> tuple[str, ...] | str | None:
    kept = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    return kept if len(kept) > 1 else (kept[0] if kept else None)


def context_attention(
    q_BTHK, latent_BTC, k_pe_BTR, kv_b_CN, token_index_BT, segment_ids_BT, *, cfg
):  # fmt: skip
    """Expanded MLA attention with queries split over `context` and keys from every chip.

    q_BTHK [B, T, H, dn+dr] (rotated); latent_BTC [B, T, C] (normalised); k_pe_BTR [B, T, dr]
    (rotated); kv_b_CN [C, H*(dn+dv)] the up-projection in the compute dtype; token_index_BT /
    segment_ids_BT [B, T] (causal by token index, within equal segment ids) -> out [B, T, H, dv].
    All split over (batch axes, context) on B, T and over tensor on H; inside, each chip
    all-gathers the latent, k_pe, indices and segment ids over `context` only.
    """
    mesh = jax.sharding.get_abstract_mesh()
    H, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    batch, heads = _axes(mesh, BATCH_AXES), _axes(mesh, ("tensor",))
    tensor = mesh.shape["tensor"] if heads else 1
    if H % tensor:
        raise ValueError(f"context parallelism: {H} heads do not split over tensor={tensor}")
    rows = P(batch, AXIS)
    specs = (P(batch, AXIS, heads, None), P(batch, AXIS, None), P(batch, AXIS, None))
    specs += (P(None, heads), rows, rows)

    def local(q, latent, k_pe, w, t_idx, seg):
        gather = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)  # noqa: E731
        # kv_b enters replicated: cast to varying like the rest, so its gradient is psum'd
        q, latent, k_pe, w = match_varying(q, gather(latent), gather(k_pe), w)
        return latent_flash_attention(
            q, latent, k_pe, w.reshape(w.shape[0], H // tensor, dn + dv),
            q_idx_BT=t_idx, k_idx_BS=gather(t_idx), q_seg_BT=seg, k_seg_BS=gather(seg),
            scale=cfg.softmax_scale, chunk=cfg.attention_chunk,
        )  # fmt: skip

    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(batch, AXIS, heads, None))
    dtype = q_BTHK.dtype
    return fn(
        q_BTHK, latent_BTC.astype(dtype), k_pe_BTR.astype(dtype), kv_b_CN.astype(dtype),
        token_index_BT, segment_ids_BT,
    )  # fmt: skip


def check_context_parallel(cfg, seq_len: int, C: int) -> None:
    """Raises ValueError naming what a `context`=C mesh cannot run for this model and length."""
    if C <= 1:
        return
    if cfg.use_dsa:
        raise ValueError(
            "config.mesh.context > 1 with DSA layers (index_topk > 0) is not supported yet: the "
            "lightning indexer's keys are not exchanged over the context axis"
        )
    if cfg.fp8:
        raise ValueError(
            "config.mesh.context > 1 with config.model.fp8 is not supported yet (the K/V "
            "up-projection runs unquantised on the gathered latent)"
        )
    if seq_len % (2 * C):
        raise ValueError(
            f"config.data.seq_len={seq_len} must divide into 2 x config.mesh.context = {2 * C} "
            "equal blocks (the zig-zag load balance of context parallelism)"
        )
