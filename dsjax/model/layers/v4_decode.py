"""DeepSeek-V4 attention over its decode caches (docs/spec.md §12 "Decode caches"): the pure
functions behind `V4Attention`, `Compressor` and `Indexer` in "prefill"/"decode" mode.

A forward writes T new tokens at `positions_BT`; `valid_BT` marks the real ones (padding and
a skipped MTP catch-up slot are not), which are consecutive positions first_B..last_B. Cache
slots holding a position >= first_B are stale (a rejected draft, a finished row's repeated
step, another request's leftovers in a reused slot) and are ignored: the new tokens replace
them. Hence a forward from position 0 needs no cleared cache, and rolling back is just not
advancing the position.

  window:     keys = [the ring's W slots ; the T new tokens], query t sees t - W < s <= t
  entries:    HCA: every cached entry, masked to the visible ones; CSA: the indexer scores
              every visible cached key and the query attends to its top-k entries, gathered
              ([B, T, k, d]: O(k) attention per query, as in training's `v4_core`)
  compressor: window w (entry w) closes with token (w+1)m - 1; every window closing among the
              new tokens is pooled from the buffer slots and the new tokens (at most
              (T-1)//m + 1 per forward) and written at index w; entry w is visible from token
              (w+1)m - 1 on, exactly as in the full forward (`v4_compressor.EntryInfo`)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.model.layers.v4_core import sink_attention

_NONE = -(2**30)  # position of an empty or stale slot: visible to no query


def chunk_bounds(positions_BT, valid_BT):
    """(first_B, last_B): the first and last valid position of each row (first = 2**30, last
    = -1 when a row has none)."""
    big = jnp.int32(2**30)
    first = jnp.min(jnp.where(valid_BT, positions_BT, big), axis=1)
    last = jnp.max(jnp.where(valid_BT, positions_BT, -1), axis=1)
    return first, last


def live_positions(pos1_BK, first_B):
    """Positions held by cache slots ([B, K] int32), `_NONE` where empty or stale."""
    pos = pos1_BK - 1
    return jnp.where((pos >= 0) & (pos < first_B[:, None]), pos, _NONE)


def write_slots(buf_BKC, pos1_BK, x_BTC, positions_BT, valid_BT, last_B):
    """Writes the valid new tokens among the last K positions at slot `position mod K` (distinct
    slots); returns (buffer, pos1)."""
    B, K = pos1_BK.shape
    keep = valid_BT & (positions_BT > last_B[:, None] - K)
    slot = jnp.where(keep, positions_BT % K, K)  # K: dropped
    rows = jnp.arange(B)[:, None]
    buf = buf_BKC.at[rows, slot].set(x_BTC.astype(buf_BKC.dtype), mode="drop")
    pos1 = pos1_BK.at[rows, slot].set(positions_BT + 1, mode="drop")
    return buf, pos1


def _gather(src_BSC, src_pos_BS, want_BJ):
    """Rows of `src` at positions `want` ([B, J, C]) and whether each was found ([B, J])."""
    match = src_pos_BS[:, None, :] == want_BJ[:, :, None]
    idx = jnp.argmax(match, axis=-1)
    out = jnp.take_along_axis(src_BSC, idx[..., None], axis=1)
    return out, jnp.any(match, axis=-1)


def compress_chunk(cache, kv_BTC, gate_BTC, positions_BT, valid_BT, *, rate: int, overlap: bool):
    """Pools every window closing among the new tokens. cache: the `CompressorCache`; kv_BTC / gate_BTC: the new tokens'
    projections (gate float32 with ape added), width 2c with overlap else c.

    Returns (pooled [B, J, c] float32, window index [B, J] int32, emitted [B, J] bool, cache
    with kv/gate/pos updated; entries untouched)."""
    B, T, width = kv_BTC.shape
    m = rate
    c = width // 2 if overlap else width
    first, last = chunk_bounds(positions_BT, valid_BT)
    J = (T - 1) // m + 1
    w_BJ = jnp.clip(first, 0, None)[:, None] // m + jnp.arange(J, dtype=jnp.int32)[None]
    emit = (w_BJ + 1) * m - 1 <= last[:, None]

    old_pos = live_positions(cache.pos, first)
    new_pos = jnp.where(valid_BT, positions_BT, _NONE)
    src_pos = jnp.concatenate([old_pos, new_pos], 1)
    src_kv = jnp.concatenate([cache.kv, kv_BTC.astype(cache.kv.dtype)], 1)
    src_gate = jnp.concatenate([cache.gate, gate_BTC.astype(jnp.float32)], 1)

    own = w_BJ[:, :, None] * m + jnp.arange(m)[None, None]  # [B, J, m]
    kv_own, _ = _gather(src_kv, src_pos, own.reshape(B, J * m))
    gate_own, _ = _gather(src_gate, src_pos, own.reshape(B, J * m))
    kv_own = kv_own.reshape(B, J, m, width)
    gate_own = gate_own.reshape(B, J, m, width)
    if overlap:
        prev = own - m
        kv_prev, found = _gather(src_kv, src_pos, prev.reshape(B, J * m))
        gate_prev, _ = _gather(src_gate, src_pos, prev.reshape(B, J * m))
        found = found.reshape(B, J, m, 1)
        kv_prev = jnp.where(found, kv_prev.reshape(B, J, m, width), 0)
        gate_prev = jnp.where(found, gate_prev.reshape(B, J, m, width), -jnp.inf)
        kv_slots = jnp.concatenate([kv_prev[..., :c], kv_own[..., c:]], axis=2)
        gate_slots = jnp.concatenate([gate_prev[..., :c], gate_own[..., c:]], axis=2)
    else:
        kv_slots, gate_slots = kv_own, gate_own
    weights = jax.nn.softmax(gate_slots, axis=2)
    pooled = jnp.sum(kv_slots.astype(jnp.float32) * weights, axis=2)

    kv, pos1 = write_slots(cache.kv, cache.pos, kv_BTC, positions_BT, valid_BT, last)
    gate, _ = write_slots(cache.gate, cache.pos, gate_BTC, positions_BT, valid_BT, last)
    return pooled, w_BJ, emit, cache.replace(kv=kv, gate=gate, pos=pos1)


def write_entries(entries_BNC, values_BJC, w_BJ, emit_BJ):
    """Writes the emitted entries at their window index (others dropped)."""
    B, N, _ = entries_BNC.shape
    idx = jnp.where(emit_BJ, w_BJ, N)
    rows = jnp.arange(B)[:, None]
    return entries_BNC.at[rows, idx].set(values_BJC.astype(entries_BNC.dtype), mode="drop")


def entries_visible(positions_BT, n_entries: int, rate: int):
    """[B, T, N] bool: entry w is visible to the query at position t iff (w+1)*rate - 1 <= t."""
    closes = (jnp.arange(n_entries, dtype=jnp.int32) + 1) * rate - 1
    return closes[None, None, :] <= positions_BT[:, :, None]


def cached_window_attention(
    q_BTHd, keys_BKd, key_pos_BK, comp, comp_visible, sinks_H, *, window, scale, positions_BT,
):  # fmt: skip
    """One softmax per query over its window keys among `keys_BKd` (positions `key_pos_BK`,
    `_NONE` for none: t - W < s <= t), its compressed entries and its head's sink. `comp`: every
    cached entry [B, N, d] (HCA, `comp_visible` [B, T, N]) or each query's chosen ones
    [B, T, k, d] (CSA, `comp_visible` [B, T, k]). Returns [B, T, H, d] in the keys' dtype."""
    rel = positions_BT[:, :, None] - key_pos_BK[:, None, :]
    sources = [(keys_BKd, (rel >= 0) & (rel < window))]
    if comp.shape[-2]:
        sources.append((comp, comp_visible))
    return sink_attention(q_BTHd, sources, sinks_H, scale)


def cached_topk(q_BTHc, w_BTH, keys_BNc, visible_BTN, topk: int):
    """The lightning indexer's choice among the cached keys (docs/spec.md §12): (entry ids
    [B, T, k] int32, chosen-and-visible [B, T, k] bool), k = min(topk, N), by
    I[t, w] = Σ_h w[t, h] ReLU(q[t, h]·K_w) / sqrt(c_I) over the visible entries."""
    c = q_BTHc.shape[-1]
    dots = jnp.einsum("bthc,bnc->bthn", q_BTHc, keys_BNc, preferred_element_type=jnp.float32)
    scores = jnp.einsum("bth,bthn->btn", w_BTH, jax.nn.relu(dots) * c**-0.5)
    _, top = jax.lax.top_k(jnp.where(visible_BTN, scores, -jnp.inf), min(topk, keys_BNc.shape[1]))
    return top, jnp.take_along_axis(visible_BTN, top, axis=2)


def window_keys(window_BWd, window_pos1_BW, kv_BTd, positions_BT, valid_BT, first_B):
    """(keys [B, W+T, d], their positions [B, W+T]): the ring's live slots then the new tokens."""
    old = live_positions(window_pos1_BW, first_B)
    new = jnp.where(valid_BT, positions_BT, _NONE)
    keys = jnp.concatenate([window_BWd, kv_BTd.astype(window_BWd.dtype)], 1)
    return keys, jnp.concatenate([old, new], 1)
