"""Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, jax 0.10.2)
behind `dsjax.model.layers.attention.attention(impl="splash")`.

Scope: causal self-attention over packed documents (training and prefill), the expanded MLA
layout `q_BTGHK` [B, T, G, H, K], `k_BTGK` [B, T, G, K], `v_BTGV` [B, T, G, V] (V3: G = 128
heads, H = 1, K = 192, V = 128). Splash builds its block mask statically from the shapes
(`CausalMask((T, T))` per head), so it relies on the caller's promise that q_idx == k_idx ==
arange(T) (`attention(causal=True)`); packed documents come in as `SegmentIds` (query t sees key s
iff s <= t and both carry the same id).

How the layout maps onto the kernel (`make_splash_mha`, one call per batch row via `vmap`):
  * heads: query head g*H + h uses key/value head g (the kernel's q_heads_per_kv_head = H).
  * head dims: the kernel takes a value head dim separate from the q/k one (its v block is
    (bkv, V) and its output (heads, T, V)), so 192/128 go in as they are: no padding.
  * scale: the kernel applies none; q is multiplied by `scale` first (autodiff carries it into dq).
  * length: T is zero-padded at the end to a multiple of 128 (the kernel's lane width; its blocks
    must divide the length). Causality makes that exact: a real query never sees a later (padded)
    key, and padded queries (segment id -1, each sees itself) are sliced off.
  * blocks: the largest of 512/256/128 dividing the padded length, for the forward and for both
    backward kernels (separate dq and dk/dv kernels: the fused backward kernel keeps a
    [T/bkv, heads, T, K] dq buffer, quadratic in T).
  * gradients: splash's own custom VJP (Pallas dq and dk/dv kernels, recomputing from the saved
    log-sum-exp).
  * backends: compiled by Mosaic for TPU; anywhere else `interpret=True` (Pallas' interpreter:
    correct, very slow, small shapes only — that is how the tests run it on CPU). Which one is
    decided by the platform the program is built for (`target_platform`): the planner builds TPU
    programs on a CPU host under a mesh of abstract TPU devices.
  * meshes: under a mesh with automatic axes the kernel runs in `shard_map`, batch split over the
    batch axes present (data, fsdp, expert) and heads over `tensor` when they divide; the sequence
    stays whole on every chip (a `context` split of T is gathered by the shard_map's resharding;
    context-parallel training goes through `dsjax.model.layers.context` instead, which never calls
    splash). Inside an existing `shard_map` (manual axes) the kernel is called directly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)
from jax.sharding import PartitionSpec as P

LANES = 128  # the kernel's blocks are multiples of this
BLOCKS = (512, 256, 128)  # preferred first
_BATCH_AXES = ("data", "fsdp", "expert")  # dsjax.model.sharding.BATCH_AXES (not imported: no cycle)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_OLD_TPUS = ("TPU v2", "TPU v3")  # device kinds Mosaic cannot build the kernel for


def _target_device():
    """(platform, device kind) the program is built for: the current mesh's devices' (abstract
    TPU devices when compiled ahead of time on a CPU host), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None:
        return device.platform, str(device.device_kind)
    return jax.default_backend(), str(jax.devices()[0].device_kind)


def target_platform() -> str:
    """The platform the program is built for ("tpu" for a mesh of abstract TPU devices)."""
    return _target_device()[0]


def padded_length(T: int) -> int:
    """T rounded up to the kernel's lane width (128)."""
    return -(-T // LANES) * LANES


def block_size(T_padded: int) -> int:
    """The largest preferred block (512, 256, 128) dividing the padded length."""
    return next(b for b in BLOCKS if T_padded % b == 0)


def unusable_reason(q_BTGHK, k_BSGK, v_BSGV, *, causal: bool) -> str | None:
    """None when `splash_attention` can compute these inputs exactly, else why not (a sentence).

    Off TPU the kernel runs in Pallas' interpreter; on TPU it needs v4 or later (Mosaic for
    TPU v2/v3 rejects the kernel's bf16 matmuls: "Unsupported matmul RHS type")."""
    platform, kind = _target_device()
    if platform == "tpu" and kind in _OLD_TPUS:
        return f"splash needs TPU v4 or later (Mosaic rejects its matmuls on {kind})"
    if not causal:
        return (
            "splash needs causal=True (the caller's promise that q_idx == k_idx == arange(T)); "
            "its mask is built from the shapes, not from traced indices"
        )
    T, S = q_BTGHK.shape[1], k_BSGK.shape[1]
    if T != S:
        return f"splash is self-attention only: query length {T} != key length {S}"
    if k_BSGK.shape[2] != q_BTGHK.shape[2] or v_BSGV.shape[2] != q_BTGHK.shape[2]:
        return f"key/value heads {k_BSGK.shape[2]}/{v_BSGV.shape[2]} != q's G={q_BTGHK.shape[2]}"
    dtypes = {jnp.dtype(q_BTGHK.dtype), jnp.dtype(k_BSGK.dtype), jnp.dtype(v_BSGV.dtype)}
    if len(dtypes) != 1 or not dtypes <= set(_DTYPES):
        return f"dtypes {sorted(map(str, dtypes))}: splash needs one of float32/bfloat16"
    return None


def _make_kernel(num_heads: int, T: int, block: int, interpret: bool):
    """A splash MHA kernel for [num_heads, T, .] queries, causal, one block size everywhere."""
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T))] * num_heads)
    sizes = splash_kernel.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash_kernel.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _local(
    q_BTGHK, k_BTGK, v_BTGV, q_seg_BT, k_seg_BT, *, scale: float, block: int, interpret: bool
):
    """The kernel on one shard's (or the whole) arrays; T is already a multiple of `block`."""
    B, T, G, H, K = q_BTGHK.shape
    V = v_BTGV.shape[-1]
    q_BNTK = jnp.transpose(q_BTGHK * jnp.asarray(scale, q_BTGHK.dtype), (0, 2, 3, 1, 4))
    q_BNTK = q_BNTK.reshape(B, G * H, T, K)  # head n = g*H + h -> key/value head n // H = g
    k_BGTK = jnp.transpose(k_BTGK, (0, 2, 1, 3))
    v_BGTV = jnp.transpose(v_BTGV, (0, 2, 1, 3))
    kernel = _make_kernel(G * H, T, block, interpret)

    if q_seg_BT is None:
        out_BNTV = jax.vmap(kernel)(q_BNTK, k_BGTK, v_BGTV)
    else:
        out_BNTV = jax.vmap(
            lambda q, k, v, sq, sk: kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(sq, sk))
        )(q_BNTK, k_BGTK, v_BGTV, q_seg_BT, k_seg_BT)
    return jnp.transpose(out_BNTV.reshape(B, G, H, T, V), (0, 3, 1, 2, 4))


def _mesh_specs(mesh, B: int, G: int):
    """(batch axes, head axis) to split over in shard_map: only axes of size > 1 that divide and
    are not already manual (inside an enclosing shard_map, e.g. the pipeline's over `stage`)."""
    free = [a for a in mesh.axis_names if a not in mesh.manual_axes and mesh.shape[a] > 1]
    names = [a for a in _BATCH_AXES if a in free]
    batch = tuple(names) if B % math.prod(mesh.shape[a] for a in names) == 0 else ()
    tensor = "tensor" in free
    heads = "tensor" if tensor and G % mesh.shape["tensor"] == 0 else None
    return (batch or None), heads


def splash_attention(
    q_BTGHK,
    k_BTGK,
    v_BTGV,
    *,
    q_seg_BT=None,
    k_seg_BS=None,
    scale: float,
    interpret: bool | None = None,
    block: int | None = None,
):
    """Causal splash attention -> [B, T, G, H, V] in v's dtype (see the module docstring).

    q_seg_BT / k_seg_BS: [B, T] int segment ids (packed documents; both or neither) or None.
    `interpret` defaults to "not built for TPU" (`target_platform`). `block` overrides the block
    size (a multiple of 128; T is padded to a multiple of it).
    """
    why = unusable_reason(q_BTGHK, k_BTGK, v_BTGV, causal=True)
    if why is not None:
        raise ValueError(f"splash_attention: {why}")
    if interpret is None:
        interpret = target_platform() != "tpu"
    B, T, G, H, _ = q_BTGHK.shape
    if block is None:
        Tp = padded_length(T)
        block = block_size(Tp)
    else:
        if block % LANES:
            raise ValueError(f"splash block {block} must be a multiple of {LANES}")
        Tp = -(-T // block) * block
    if Tp != T:  # padded keys come after every real query: causally invisible to them
        pad = lambda x, value=0: jnp.pad(  # noqa: E731
            x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2), constant_values=value
        )
        q_BTGHK, k_BTGK, v_BTGV = pad(q_BTGHK), pad(k_BTGK), pad(v_BTGV)
        if q_seg_BT is not None:  # a padded query sees itself (same id -1): no empty row
            q_seg_BT, k_seg_BS = pad(q_seg_BT, -1), pad(k_seg_BS, -1)
    if q_seg_BT is not None:
        q_seg_BT, k_seg_BS = q_seg_BT.astype(jnp.int32), k_seg_BS.astype(jnp.int32)
    local = lambda q, k, v, sq=None, sk=None: _local(  # noqa: E731
        q, k, v, sq, sk, scale=float(scale), block=block, interpret=bool(interpret)
    )
    mesh = jax.sharding.get_abstract_mesh()
    # Mosaic kernels cannot be partitioned automatically: under a mesh the kernel runs in a
    # shard_map over every axis that is not manual already (all manual: call it as it is).
    if mesh.empty or set(mesh.axis_names) <= set(mesh.manual_axes):
        out = local(q_BTGHK, k_BTGK, v_BTGV, q_seg_BT, k_seg_BS)
    else:
        batch, heads = _mesh_specs(mesh, B, G)
        q_spec, kv_spec = P(batch, None, heads, None, None), P(batch, None, heads, None)
        if q_seg_BT is None:
            fn = jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(q_spec, kv_spec, kv_spec),
                out_specs=q_spec,
                check_vma=False,  # splash's pallas_calls declare no varying axes
            )
            out = fn(q_BTGHK, k_BTGK, v_BTGV)
        else:
            fn = jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(q_spec, kv_spec, kv_spec, P(batch, None), P(batch, None)),
                out_specs=q_spec,
                check_vma=False,  # splash's pallas_calls declare no varying axes
            )
            out = fn(q_BTGHK, k_BTGK, v_BTGV, q_seg_BT, k_seg_BS)
    return out[:, :T].astype(v_BTGV.dtype)
