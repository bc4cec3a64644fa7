"""The engine's jitted programs over one `decode.DecodeState` of all slots whose caches are page
pools (dsjax/inference/engine.py drives them from its host loop): `admit` (a whole prompt into a
slot's pages), `prompt_chunk` and `start_decoding` (a long or partly cached prompt chunk by
chunk, then its first token), `step` (one decode step over the active slots).

Paged cache (SPEC §14): every cache leaf of the state is a pool of pages, the slot axis of the
contiguous layout (`model.cache_batch_axis`) replaced by a page axis and the sequence axis by the
position within a page: scanned stacks [L, N, page, ...], MTP [N, page, ...]. The other leaves
keep one row per slot. A program receives the page tables of its rows ([R, P] int32 page ids,
`scheduler.Scheduler.tables`; entries past a row's pages point at `page_pool.TRASH`), gathers
each row's pages into a contiguous view ([L, R, P * page, ...], the XLA gather path), runs the
unchanged decode core on it (`decode`), and writes back only the pages the program wrote: a
prompt's or chunk's pages, or in a decode step the pages of the positions a step can write (the
MTP catch-up entry n-1 or n-2 through the verified n+1). Shared prefix pages lie wholly before
those positions, so no program writes a page another row reads. Writes to TRASH are garbage
nobody reads unmasked (a position p sees only slots <= p, all the row's own).

DeepSeek-V4 (`table` None in every program): its caches are per slot, not paged (docs/design.md
departures): every leaf keeps one row per slot, window rings and compressor buffers of fixed
size and compressed entries / indexer keys for the slot's `max_len` positions. A program takes
its rows' caches out of the state (`_take_slots`), runs the same decode core on them and puts
them back (`_put_slots`). Every V4 cache slot is addressed by absolute position and ignores
whatever it holds at or after a forward's first new token (`model/layers/v4_decode.py`), so a
slot reused by a new request (or a preempted one readmitted) needs no clearing.

Each program takes the state donated. The programs that sample (`admit`, `start_decoding`,
`step`) take an optional packed allowed-token mask per row (`allowed_*W`, see `decode`); None
compiles the unconstrained program.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dsjax.inference import decode
from dsjax.inference.page_pool import TRASH
from dsjax.model.layers.paged import Pages
from dsjax.model.transformer import cache_batch_axis

__all__ = ["PARKED", "admit", "pool_state", "prompt_chunk", "row_view", "start_decoding", "step"]


# ====================================================================== pages
def _pool_axes(state: decode.DecodeState):
    """Page axis of every leaf of (state.cache, state.mtp_cache) (the position axis follows)."""
    main = {k: jax.tree.map(lambda _, k=k: cache_batch_axis(k), v) for k, v in state.cache.items()}
    mtp = jax.tree.map(lambda _: cache_batch_axis("mtp_0"), state.mtp_cache)
    return main, mtp


def _gather(pool, table_RP, b: int):
    """Rows' pages as contiguous caches: pool [.., N, page, ..] -> [.., R, P * page, ..]."""
    g = jnp.take(pool, table_RP, axis=b)
    R, P = table_RP.shape
    return g.reshape(pool.shape[:b] + (R, P * pool.shape[b + 1]) + pool.shape[b + 2 :])


def _write(pool, view, table_RP, pages_RK, b: int):
    """Writes page pages_RK[r, k] of row r of `view` [.., R, S, ..] (S <= P * page) to its pool
    page table_RP[r, pages_RK[r, k]]; entries outside [0, P) go to TRASH."""
    page = pool.shape[b + 1]
    R, P = table_RP.shape
    S = view.shape[b + 1]
    if S < P * page:  # pad the view to whole pages
        widths = [(0, 0)] * view.ndim
        widths[b + 1] = (0, P * page - S)
        view = jnp.pad(view, widths)
    pages = view.reshape(view.shape[:b] + (R, P, page) + view.shape[b + 2 :])
    k = jnp.clip(pages_RK, 0, P - 1)
    rows = jnp.arange(R)[:, None]
    lead = (slice(None),) * b
    vals = pages[lead + (rows, k)]  # [.., R, K, page, ..]
    ids = jnp.where((pages_RK >= 0) & (pages_RK < P), table_RP[rows, k], TRASH)
    K = pages_RK.shape[1]
    vals = vals.reshape(vals.shape[:b] + (R * K,) + vals.shape[b + 2 :])
    return pool.at[lead + (ids.reshape(-1),)].set(vals.astype(pool.dtype))


def _views(state, table_RP):
    """(main, mtp) caches of the rows whose page tables are `table_RP`, contiguous."""
    axes = _pool_axes(state)
    main = jax.tree.map(lambda x, b: _gather(x, table_RP, b), state.cache, axes[0])
    mtp = jax.tree.map(lambda x, b: _gather(x, table_RP, b), state.mtp_cache, axes[1])
    return main, mtp


def _write_back(state, main, mtp, table_RP, pages_RK):
    """`state` with the pages pages_RK of the rows' views (main, mtp) written to the pools."""
    axes = _pool_axes(state)
    write = functools.partial(_write, table_RP=table_RP, pages_RK=pages_RK)
    cache = jax.tree.map(lambda x, v, b: write(x, v, b=b), state.cache, main, axes[0])
    if state.mtp_cache is not None and mtp is not None:
        mtp = jax.tree.map(lambda x, v, b: write(x, v, b=b), state.mtp_cache, mtp, axes[1])
    else:
        mtp = state.mtp_cache
    return state.replace(cache=cache, mtp_cache=mtp)


def _take_slots(state, start, count: int):
    """(main, mtp) per-slot caches (DeepSeek-V4) of rows start..start+count-1."""
    axes = _pool_axes(state)
    main = jax.tree.map(
        lambda x, b: jax.lax.dynamic_slice_in_dim(x, start, count, b), state.cache, axes[0]
    )
    mtp = jax.tree.map(
        lambda x, b: jax.lax.dynamic_slice_in_dim(x, start, count, b), state.mtp_cache, axes[1]
    )
    return main, mtp


def _put_slots(state, main, mtp, start):
    """`state` with the per-slot caches (main, mtp) of some rows written from row `start` on
    (mtp None: unchanged). A leaf may be shorter than the state's past the row axis (a
    prompt's [1, P] cache: P // rate entries); it fills the leading entries (entry w at w)."""

    def put(x, v, b):
        idx = [jnp.int32(0)] * x.ndim
        idx[b] = jnp.asarray(start, jnp.int32)
        return jax.lax.dynamic_update_slice(x, v.astype(x.dtype), idx)

    axes = _pool_axes(state)
    cache = jax.tree.map(put, state.cache, main, axes[0])
    if state.mtp_cache is not None and mtp is not None:
        mtp = jax.tree.map(put, state.mtp_cache, mtp, axes[1])
    else:
        mtp = state.mtp_cache
    return state.replace(cache=cache, mtp_cache=mtp)


def _set_rows(state, part, start):
    """`state`'s per-slot leaves (all but the caches) with `part`'s rows at row `start`."""
    updates = {}
    for f in dataclasses.fields(state):
        if f.name in ("cache", "mtp_cache"):
            continue
        x, v = getattr(state, f.name), getattr(part, f.name)
        idx = (jnp.asarray(start, jnp.int32),) + (jnp.int32(0),) * (x.ndim - 1)
        updates[f.name] = jax.lax.dynamic_update_slice(x, v.astype(x.dtype), idx)
    return state.replace(**updates)


def _rows(state, start, count: int):
    """`state`'s per-slot leaves of rows start..start+count-1 (caches left out: None)."""
    part = state.replace(cache=None, mtp_cache=None)
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, count, 0), part)


def pool_state(state, pages: int, page_size: int):
    """`state` (any traced shapes) with its caches replaced by zero page pools of `pages`
    pages of `page_size` positions (page 0 = TRASH included)."""
    main = jax.tree.map(
        lambda x, b: jnp.zeros(x.shape[:b] + (pages, page_size) + x.shape[b + 2 :], x.dtype),
        state.cache,
        _pool_axes(state)[0],
    )
    mtp = jax.tree.map(
        lambda x: jnp.zeros((pages, page_size) + x.shape[2:], x.dtype), state.mtp_cache
    )
    return state.replace(cache=main, mtp_cache=mtp)


@jax.jit
def row_view(state, table_1P, slot):
    """Row `slot` of `state` as a one-row state whose caches are gathered from its pages
    table_1P (contiguous, positions 0..P*page-1; for inspection)."""
    main, mtp = _views(state, table_1P)
    return _rows(state, slot, 1).replace(cache=main, mtp_cache=mtp)


# ====================================================================== programs
@functools.partial(
    jax.jit, static_argnames=("cfg", "speculative", "top_n"), donate_argnames=("state",)
)
def admit(
    cfg, variables, state, tokens_1P, length_1, req, slot, table_1K, allowed_1W=None,
    *, speculative, top_n,
):  # fmt: skip
    """Prefills one prompt into a fresh [1, P] state, samples token 0, writes the row's cache
    to its pages table_1K (K pages cover P; None: to the slot's own caches, DeepSeek-V4) and
    its other leaves to row `slot`; returns (state, StepOutput of the row). Prompts longer than decode.PREFILL_CHUNK run chunk by chunk inside
    this one program (bounded activations)."""
    row, first = decode.prefill(
        cfg,
        variables,
        tokens_1P,
        length_1,
        req,
        cache_len=tokens_1P.shape[1],
        speculative=speculative,
        top_n=top_n,
        prefill_chunk=decode.PREFILL_CHUNK,  # activation memory bounded by the chunk
        allowed_BW=allowed_1W,
    )
    if table_1K is None:
        state = _put_slots(state, row.cache, row.mtp_cache, slot)
    else:
        pages_1K = jnp.arange(table_1K.shape[1], dtype=jnp.int32)[None]
        state = _write_back(state, row.cache, row.mtp_cache, table_1K, pages_1K)
    return _set_rows(state, row, slot), first


# Position of a slot whose prompt is being prefilled incrementally: beyond every cache, so the
# decode steps' writes for that row (at it, at it + 1, and the MTP's at it - 1, - 2) are dropped.
PARKED = 2**30


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "speculative", "first", "impl"),
    donate_argnames=("state",),
)
def prompt_chunk(
    cfg, variables, state, tokens_1T, next_1T, start, length_1, last, slot, table_1P,
    *, speculative, first, impl="xla",
):  # fmt: skip
    """One prompt chunk of the request in row `slot` at positions start..start+T-1, over the
    row's pages table_1P (its positions 0..P*page-1, the attention window), written to them in
    place (and MTP module 0's cache with `speculative`); `impl`: `layers.paged.IMPLS`. With
    table_1P None (DeepSeek-V4) over the slot's own caches. Positions >= length_1 are padding
    (the engine passes the end of the chunk's real tokens).

    `first`: the first chunk from position 0 (`decode.prefill_first_chunk`, prefill mode,
    positions >= length_1 are padding). Otherwise `decode.prefill_next_chunk` (absorbed decode
    forward over the row's cache: the earlier chunks, or a cached prefix). The first chunk the
    row runs parks it (done, position `PARKED`) so the decode steps until the last chunk leave it
    alone. Returns (state, logits_1V, hidden_1D) at chunk offset `last` (the prompt's last token
    when this is the last chunk).
    """
    if table_1P is None:  # per-slot caches (DeepSeek-V4)
        pages = None
        main, mtp = _take_slots(state, slot, 1)
    else:
        pages = Pages(jnp.asarray(table_1P, jnp.int32), impl=impl)
        main, mtp = state.cache, state.mtp_cache
    mtp = mtp if speculative else None
    if first:
        main, mtp, logits_1TV, hidden_1TD = decode.prefill_first_chunk(
            cfg, variables, main, mtp, tokens_1T, next_1T, length_1, pages=pages
        )
    else:
        main, mtp, logits_1TV, hidden_1TD = decode.prefill_next_chunk(
            cfg, variables, main, mtp, tokens_1T, next_1T, start, length_1, pages=pages
        )
    if pages is None:
        state = _put_slots(state, main, mtp, slot)
    else:
        state = state.replace(cache=main, mtp_cache=mtp if speculative else state.mtp_cache)
    row = _rows(state, slot, 1)
    row = row.replace(
        positions_B=jnp.full_like(row.positions_B, PARKED), done_B=jnp.ones_like(row.done_B)
    )
    return _set_rows(state, row, slot), logits_1TV[:, last], hidden_1TD[:, last]


@functools.partial(jax.jit, static_argnames=("speculative", "top_n"), donate_argnames=("state",))
def start_decoding(
    state, logits_1V, hidden_1D, last_token_1, length_1, req, slot, allowed_1W=None,
    *, speculative, top_n,
):  # fmt: skip
    """After the last prompt chunk: samples token 0 (`decode.first_state`, as the one-shot
    admit does) and writes row `slot`'s non-cache state (unparking it); returns (state,
    StepOutput of the row)."""
    row, first = decode.first_state(
        cache=None,
        mtp_cache=None,
        logits_BV=logits_1V,
        hidden_BD=hidden_1D,
        last_tokens_B=last_token_1,
        lengths_B=length_1,
        req=req,
        speculative=speculative,
        top_n=top_n,
        allowed_BW=allowed_1W,
    )
    return _set_rows(state, row, slot), first


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "speculative", "top_n", "rows", "impl", "shards"),
    donate_argnames=("state",),
)
def step(
    cfg, variables, state, table_RP, live_R, allowed_RW=None, *, speculative, top_n, rows,
    impl="xla", shards=(),
):  # fmt: skip
    """One decode step over slots 0..rows-1, each over its pages table_RP (positions
    0..P*page-1, covering every active position), read and written in place; rows with live_R
    False are held done and write only to TRASH (DeepSeek-V4's done rows write nothing).
    `allowed_RW`: the rows' packed allowed-token masks, or None. `impl`: how attention reads
    the pages (`layers.paged.IMPLS`). `shards`: the mesh axes the rows and the pools' pages
    split over, table_RP then holding each row's chip-local page ids
    (`layers.paged.Pages.shards`; rows = all slots). table_RP None (DeepSeek-V4): over the
    slots' own caches."""
    if table_RP is None:  # per-slot caches (DeepSeek-V4)
        pages = None
        main, mtp = _take_slots(state, 0, rows)
    else:
        table_RP = jnp.where(live_R[:, None], jnp.asarray(table_RP, jnp.int32), TRASH)
        pages = Pages(table_RP, impl=impl, shards=shards)
        main, mtp = state.cache, state.mtp_cache
    sub = _rows(state, 0, rows).replace(cache=main, mtp_cache=mtp)
    sub = sub.replace(done_B=sub.done_B | ~live_R)
    sub, out = decode.step(
        cfg, variables, sub, speculative=speculative, top_n=top_n, allowed_BW=allowed_RW,
        pages=pages,
    )  # fmt: skip
    if pages is None:
        state = _put_slots(state, sub.cache, sub.mtp_cache, 0)
    else:
        state = state.replace(cache=sub.cache, mtp_cache=sub.mtp_cache)
    return _set_rows(state, sub, 0), out
