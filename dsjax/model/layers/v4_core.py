"""DeepSeek-V4's attention core for long sequences (docs/spec.md §12): query chunks, the CSA
entries gathered by the indexer's top-k, and context parallelism.

    out = v4_attention_core(q, kv, segment_ids, entries, entry_last, entry_segment, sinks,
                            index=(q_I, w_I, keys_I) for CSA layers, window=W, scale=.., ...)

The queries run in chunks of `chunk` (a `lax.scan` whose body is rematerialised, so no
[T, H, keys] buffer exists for the whole sequence): chunk [s, s+Q) reads the window keys
kv[s-W, s+Q) (Q+W of them, masked to each query's own W), the compressed entries, and its
head's sink, under one softmax. HCA layers attend to every visible entry (T/m' of them, masked);
CSA layers to the `index_topk` entries the lightning indexer picked, gathered ([Q, K, d]), so
neither the [T, N] mask nor [T, H, N] logits are ever built. The indexer's scores are made
chunk by chunk and head by head ([Q, N] at a time) in a first pass without gradient
(`indexer_topk`; the selection has none).

Context parallelism (the `context` mesh axis, contiguous shards of T/C tokens): every chip runs
the core on its own queries inside `shard_map`. The window needs the W keys before its first
token: the previous chip's last W (a `ppermute`; chip 0 gets keys that do not exist, masked by
their negative index). The compressed entries, the indexer's keys and their segments are
computed outside (per-window pooling on each chip's own tokens) and gathered whole (T/m entries:
at 1M tokens and d = 512, 256 MiB in bf16 for CSA). Entry visibility and causality use global
token indices: chip c's queries start at c T/C.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax.model.fp8 import match_varying
from dsjax.model.sharding import BATCH_AXES

AXIS = "context"
_MASKED = -1e30


def _chunks(x, n: int, Q: int, fill=0):
    """[B, T, ...] -> [n, B, Q, ...] (padded at the end with `fill`)."""
    B, T = x.shape[:2]
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n * Q - T)
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape(B, n, Q, *x.shape[2:]), 1, 0)


def sink_attention(q_BTHd, sources, sinks_H, scale: float):
    """[B, T, H, d] in the first source's dtype: one softmax per query and head over the keys of
    every source and the head's sink logit (whose share is dropped), keys doubling as values.
    `sources`: (keys, visible) pairs, keys [B, K, d] shared by a row's queries or [B, T, K, d]
    per query, visible [B, T, K] bool."""
    B, T, H, _ = q_BTHd.shape
    spec = lambda keys: "t" * (keys.ndim == 4) + "kd"  # noqa: E731
    logits = [
        jnp.where(
            vis[:, :, None, :],
            jnp.einsum(f"bthd,b{spec(k)}->bthk", q_BTHd, k, preferred_element_type=jnp.float32)
            * scale,
            _MASKED,
        )
        for k, vis in sources
    ]
    sink = jnp.broadcast_to(sinks_H.astype(jnp.float32)[None, None, :, None], (B, T, H, 1))
    probs = jax.nn.softmax(jnp.concatenate([*logits, sink], axis=-1), axis=-1)
    outs, start = [], 0
    for k, _ in sources:
        p = probs[..., start : start + k.shape[-2]].astype(k.dtype)
        start += k.shape[-2]
        outs.append(jnp.einsum(f"bthk,b{spec(k)}->bthd", p, k, preferred_element_type=jnp.float32))
    return sum(outs[1:], outs[0]).astype(sources[0][0].dtype)


def _visible(entry_last_N, entry_seg_BN, q_idx_Q, seg_BQ):
    """[B, Q, N]: entry closed by the query (global index) and from its document."""
    closed = entry_last_N[None, None, :] <= q_idx_Q[None, :, None]
    return closed & (entry_seg_BN[:, None, :] == seg_BQ[:, :, None])


def indexer_topk(q_BTHc, w_BTH, keys_BNc, seg_BT, entry_last_N, entry_seg_BN, *, offset,
                 topk: int, chunk: int):  # fmt: skip
    """The lightning indexer's choice: (entry ids [B, T, k] int32, chosen-and-visible [B, T, k]
    bool), k = min(topk, N), by I[t, w] = Σ_h w[t, h] ReLU(q[t, h]·K_w) / sqrt(c_I) over the
    visible entries (docs/spec.md §12). No gradient flows through it."""
    q_BTHc, w_BTH, keys_BNc = jax.lax.stop_gradient((q_BTHc, w_BTH, keys_BNc))
    B, T, H, c = q_BTHc.shape
    N = keys_BNc.shape[1]
    k = min(topk, N)
    Q = min(chunk, T)
    n = -(-T // Q)

    def body(_, xs):
        i, q_c, w_c, seg_c = xs

        def head(acc, hx):
            q_h, w_h = hx  # [B, Q, c], [B, Q]
            dots = jnp.einsum("bqc,bnc->bqn", q_h, keys_BNc, preferred_element_type=jnp.float32)
            return acc + w_h[..., None] * (jax.nn.relu(dots) * c**-0.5), None

        zero = match_varying(jnp.zeros((B, Q, N), jnp.float32), q_c, w_c, keys_BNc)[0]
        scores, _ = jax.lax.scan(head, zero, (jnp.moveaxis(q_c, 2, 0), jnp.moveaxis(w_c, 2, 0)))
        visible = _visible(entry_last_N, entry_seg_BN, offset + i * Q + jnp.arange(Q), seg_c)
        _, top = jax.lax.top_k(jnp.where(visible, scores, -jnp.inf), k)
        return None, (top, jnp.take_along_axis(visible, top, axis=2))

    xs = (jnp.arange(n), _chunks(q_BTHc, n, Q), _chunks(w_BTH, n, Q), _chunks(seg_BT, n, Q, -1))
    _, (top, ok) = jax.lax.scan(body, None, xs)
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, n * Q, k)[:, :T]  # noqa: E731
    return unchunk(top), unchunk(ok)


def local_core(q_BTHd, kv_BTd, seg_BT, kv_prev_BWd, seg_prev_BW, entries_BNd, entry_last_N,
               entry_seg_BN, sinks_H, index, *, offset, window: int, scale: float, topk: int,
               chunk: int):  # fmt: skip
    """The core on one chip's queries (global indices offset..offset+T-1): window keys from
    `kv_prev` (the W tokens before) and `kv`, the visible entries (all, or with `index` =
    (q_I [B,T,H_I,c_I], w_I [B,T,H_I] f32, keys_I [B,N,c_I]) the indexer's top-k), the sink.
    Returns [B, T, H, d] in kv's dtype."""
    B, T, H, d = q_BTHd.shape
    W, N = window, entries_BNd.shape[1]
    Q = min(chunk, T)
    n = -(-T // Q)
    kv_ext = jnp.concatenate([kv_prev_BWd, jnp.pad(kv_BTd, ((0, 0), (0, n * Q - T), (0, 0)))], 1)
    seg_ext = jnp.concatenate([seg_prev_BW, jnp.pad(seg_BT, ((0, 0), (0, n * Q - T)), constant_values=-1)], 1)  # fmt: skip
    xs = [jnp.arange(n), _chunks(q_BTHd, n, Q), _chunks(seg_BT, n, Q, -1)]
    sparse = index is not None and N > 0
    if sparse:
        iq, iw, ikeys = index
        top, ok = indexer_topk(iq, iw, ikeys, seg_BT, entry_last_N, entry_seg_BN,
                               offset=offset, topk=topk, chunk=chunk)  # fmt: skip
        xs += [_chunks(top, n, Q), _chunks(ok, n, Q, False)]

    @jax.checkpoint
    def body(_, xs):
        i, q_c, seg_c = xs[:3]
        s = i * Q
        keys = jax.lax.dynamic_slice_in_dim(kv_ext, s, Q + W, axis=1)  # tokens s-W .. s+Q-1
        kseg = jax.lax.dynamic_slice_in_dim(seg_ext, s, Q + W, axis=1)
        rel = jnp.arange(Q)[:, None] + W - jnp.arange(Q + W)[None, :]
        near = (rel >= 0) & (rel < W) & (offset + s + jnp.arange(Q + W) - W >= 0)[None, :]
        vis_w = near[None] & (seg_c[:, :, None] == kseg[:, None, :])  # [B, Q, Q+W]
        sources = [(keys, vis_w)]
        if N:
            if sparse:  # CSA: the chosen entries, gathered per query
                top, ok = xs[3:]
                ent = jnp.take_along_axis(entries_BNd[:, None], top[..., None], axis=2)
                sources.append((ent, ok))
            else:  # HCA: every entry, masked
                ok = _visible(entry_last_N, entry_seg_BN, offset + s + jnp.arange(Q), seg_c)
                sources.append((entries_BNd, ok))
        return None, sink_attention(q_c, sources, sinks_H, scale)

    _, out = jax.lax.scan(body, None, tuple(xs))
    return jnp.moveaxis(out, 0, 1).reshape(B, n * Q, H, d)[:, :T]


def _axes(mesh, names):
    kept = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    return kept if len(kept) > 1 else (kept[0] if kept else None)


def context_chips(B: int, T: int) -> int:
    """Chips on the `context` axis of the mesh in scope when [B, T] splits evenly over (batch
    axes, context); else 1 (one device, or a trace such as the batch-1 initialisation)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names or mesh.shape[AXIS] == 1:
        return 1
    C = mesh.shape[AXIS]
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)
    return C if B % shards == 0 and T % C == 0 else 1


def v4_attention_core(q_BTHd, kv_BTd, seg_BT, entries_BNd, entry_last_N, entry_seg_BN, sinks_H,
                      index=None, *, window: int, scale: float, topk: int, chunk: int):  # fmt: skip
    """[B, T, H, d]: the V4 attention core over the whole sequence (module docstring); under a
    mesh with `context` > 1 each chip computes its own T/C queries (contiguous shards)."""
    B, T, H, d = q_BTHd.shape
    kw: dict[str, Any] = dict(window=window, scale=scale, topk=topk, chunk=chunk)
    W = window
    C = context_chips(B, T)
    if C == 1:
        prev = jnp.zeros((B, W, d), kv_BTd.dtype), jnp.full((B, W), -2, seg_BT.dtype)
        return local_core(q_BTHd, kv_BTd, seg_BT, *prev, entries_BNd, entry_last_N,
                          entry_seg_BN, sinks_H, index, offset=0, **kw)  # fmt: skip
    if T // C < W:
        raise ValueError(
            f"context parallelism: each of the {C} chips holds {T // C} tokens, fewer than the "
            f"sliding window ({W}); use a longer sequence or fewer context chips"
        )
    mesh = jax.sharding.get_abstract_mesh()
    batch, heads = _axes(mesh, BATCH_AXES), _axes(mesh, ("tensor",))
    if heads and H % mesh.shape["tensor"]:
        raise ValueError(f"context parallelism: {H} heads do not split over tensor")
    q_spec, row = P(batch, AXIS, heads, None), P(batch, AXIS)
    whole = P(batch, None, None)
    specs = [q_spec, P(batch, AXIS, None), row, whole, P(None), P(batch, None), P(heads)]
    args = [q_BTHd, kv_BTd, seg_BT, entries_BNd, entry_last_N, entry_seg_BN, sinks_H]
    if index is not None:
        specs += [P(batch, AXIS, None, None), P(batch, AXIS, None), whole]
        args += list(index)

    def local(q, kv, seg, ent, last, eseg, sinks, *idx):
        c = jax.lax.axis_index(AXIS)
        shift = [(i, i + 1) for i in range(C - 1)]
        kv_prev = jax.lax.ppermute(kv[:, -W:], AXIS, shift)
        seg_prev = jax.lax.ppermute(seg[:, -W:], AXIS, shift)
        q, kv, kv_prev, ent, sinks = match_varying(q, kv, kv_prev, ent, sinks)
        return local_core(q, kv, seg, kv_prev, seg_prev, ent, last, eseg, sinks,
                          tuple(idx) if idx else None, offset=c * (T // C), **kw)  # fmt: skip

    fn = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec)
    return fn(*args)
