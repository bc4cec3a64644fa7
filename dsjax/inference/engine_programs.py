"""The engine's jitted programs over one `decode.DecodeState` of all slots whose caches are page
pools (dsjax/inference/engine.py drives them from its host loop): `admit` (a whole prompt into a
slot's pages), `prompt_chunk` and `start_decoding` (a long or partly cached prompt chunk by
chunk, then its first token), `step` (one decode step over the active slots).

Paged cache (SPEC §14): a paged cache leaf of the state is a pool of pages, the slot axis of
the contiguous layout (`model.cache_batch_axis`) replaced by a page axis and the sequence axis
by the position within a page: scanned stacks [L, N, page, ...], MTP [N, page, ...]. The other
leaves keep one row per slot. A program receives the page tables of its rows ([R, P] int32 page
ids, `scheduler.Scheduler.tables`; entries past a row's pages point at `page_pool.TRASH`). V3's
chunk and step programs pass them to the model (`layers.paged.Pages`: each layer writes its new
tokens' pages in place and reads them through the gather path or the Pallas kernel); `admit`
prefills a contiguous [1, P] cache and writes its pages. Shared prefix pages lie wholly before
the positions a program writes, so no program writes a page another row reads. Writes to TRASH
are garbage nobody reads unmasked (a position p sees only slots <= p, all the row's own).

DeepSeek-V4 (docs/design.md departures) pages only what grows with the context: its
compressed entries and indexer keys (`_paged_leaves`; a page of `page` positions holds
page / rate entries of a layer compressing at `rate`, the engine's page size a multiple of
every rate, so entry w lives on the page of its window's positions). Its window rings,
compressor partial-window buffers and MTP ring (fixed size) keep one row per slot. Its programs
run the unchanged decode core on contiguous views (`_views`: the rows' pages gathered, their
per-slot leaves sliced out; the XLA gather path, no kernel) and write them back (`_write_back`:
the view's pages, the per-slot rows). Every V4 cache slot and entry is addressed by absolute
position and what a slot holds at or after a forward's first new token is ignored
(`model/layers/v4_decode.py`; entry w is read only from position (w+1)·rate − 1 on, after the
request wrote it), so a reused slot or page needs no clearing.

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


def _every_page(table_RP):
    """[R, P] page indices 0..P-1 of each row (`_write`: write back every page of the view)."""
    return jnp.broadcast_to(jnp.arange(table_RP.shape[1], dtype=jnp.int32), table_RP.shape)


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


def _paged_leaves(cfg, state):
    """(main, mtp) trees of bools, one per cache leaf: whether the leaf is a page pool. A V3
    cache is paged whole; DeepSeek-V4 pages what grows with the context, its compressed entries
    and indexer keys (`v4_cache.CompressorCache.entries`), and keeps its window rings,
    compressor buffers and MTP ring (fixed size) one row per slot."""

    def mark(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not cfg.is_v4 or getattr(path[-1], "name", None) == "entries", tree
        )

    return mark(state.cache), mark(state.mtp_cache)


def _views(cfg, state, table_RP, start, rows: int):
    """(main, mtp) caches of slots start..start+rows-1 as contiguous caches: the paged leaves
    gathered through the rows' page tables `table_RP`, the per-slot leaves sliced out."""
    axes, paged = _pool_axes(state), _paged_leaves(cfg, state)

    def view(x, b, is_paged):
        if is_paged:
            return _gather(x, table_RP, b)
        return jax.lax.dynamic_slice_in_dim(x, start, rows, b)

    main = jax.tree.map(view, state.cache, axes[0], paged[0])
    mtp = jax.tree.map(view, state.mtp_cache, axes[1], paged[1])
    return main, mtp


def _write_back(cfg, state, main, mtp, table_RP, pages_RK, start):
    """`state` with the rows' caches (main, mtp; mtp None: unchanged) written back: of a paged
    leaf the pages pages_RK of each row's view, to its pool pages; a per-slot leaf at slot
    `start` on (a DeepSeek-V4 prompt's buffers have the state's fixed sizes)."""
    axes, paged = _pool_axes(state), _paged_leaves(cfg, state)

    def put(x, v, b, is_paged):
        if is_paged:
            return _write(x, v, table_RP, pages_RK, b)
        idx = [jnp.int32(0)] * x.ndim
        idx[b] = jnp.asarray(start, jnp.int32)
        return jax.lax.dynamic_update_slice(x, v.astype(x.dtype), idx)

    cache = jax.tree.map(put, state.cache, main, axes[0], paged[0])
    if state.mtp_cache is not None and mtp is not None:
        mtp = jax.tree.map(put, state.mtp_cache, mtp, axes[1], paged[1])
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


def pool_state(cfg, state, pages: int):
    """`state` (traced shapes, its caches of one page per slot: `cache_len` = page size) with
    its paged leaves (`_paged_leaves`) replaced by zero pools of `pages` pages (page 0 = TRASH
    included) and its per-slot leaves by zeros."""
    axes, paged = _pool_axes(state), _paged_leaves(cfg, state)

    def pool(x, b, is_paged):
        shape = x.shape[:b] + (pages,) + x.shape[b + 1 :] if is_paged else x.shape
        return jnp.zeros(shape, x.dtype)

    main = jax.tree.map(pool, state.cache, axes[0], paged[0])
    mtp = jax.tree.map(pool, state.mtp_cache, axes[1], paged[1])
    return state.replace(cache=main, mtp_cache=mtp)


def pool_bytes(cfg, state) -> int:
    """Bytes of `state`'s paged cache leaves (the page pools)."""
    paged = jax.tree.leaves(_paged_leaves(cfg, state))
    leaves = jax.tree.leaves((state.cache, state.mtp_cache))
    return sum(x.nbytes for x, p in zip(leaves, paged, strict=True) if p)


@functools.partial(jax.jit, static_argnames=("cfg",))
def row_view(cfg, state, table_1P, slot):
    """Row `slot` of `state` as a one-row state whose caches are gathered from its pages
    table_1P (contiguous, positions 0..P*page-1; for inspection)."""
    main, mtp = _views(cfg, state, table_1P, slot, 1)
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
    to its pages table_1K (K pages cover P; DeepSeek-V4's per-slot leaves to slot `slot`) and
    its other leaves to row `slot`; returns (state, StepOutput of the row). Prompts longer than
    decode.PREFILL_CHUNK run chunk by chunk inside this one program (bounded activations)."""
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
    state = _write_back(cfg, state, row.cache, row.mtp_cache, table_1K, _every_page(table_1K), slot)
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
    place (and MTP module 0's cache with `speculative`); `impl`: `layers.paged.IMPLS`
    (DeepSeek-V4: the gather path around the decode core, `_views`, its window's pages written
    back). Positions >= length_1 are padding (the engine passes the end of the chunk's real
    tokens).

    `first`: the first chunk from position 0 (`decode.prefill_first_chunk`, prefill mode,
    positions >= length_1 are padding). Otherwise `decode.prefill_next_chunk` (absorbed decode
    forward over the row's cache: the earlier chunks, or a cached prefix). The first chunk the
    row runs parks it (done, position `PARKED`) so the decode steps until the last chunk leave it
    alone. Returns (state, logits_1V, hidden_1D) at chunk offset `last` (the prompt's last token
    when this is the last chunk).
    """
    table_1P = jnp.asarray(table_1P, jnp.int32)
    if cfg.is_v4:
        pages = None
        main, mtp = _views(cfg, state, table_1P, slot, 1)
    else:
        pages = Pages(table_1P, impl=impl)
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
    if cfg.is_v4:
        state = _write_back(cfg, state, main, mtp, table_1P, _every_page(table_1P), slot)
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
    False are held done and write only to TRASH.
    `allowed_RW`: the rows' packed allowed-token masks, or None. `impl`: how attention reads
    the pages (`layers.paged.IMPLS`). `shards`: the mesh axes the rows and the pools' pages
    split over, table_RP then holding each row's chip-local page ids
    (`layers.paged.Pages.shards`; rows = all slots). DeepSeek-V4: the gather path around the
    decode core (`_views`), the window's pages written back (what it gathered)."""
    table_RP = jnp.where(live_R[:, None], jnp.asarray(table_RP, jnp.int32), TRASH)
    if cfg.is_v4:
        pages = None
        main, mtp = _views(cfg, state, table_RP, 0, rows)
    else:
        pages = Pages(table_RP, impl=impl, shards=shards)
        main, mtp = state.cache, state.mtp_cache
    sub = _rows(state, 0, rows).replace(cache=main, mtp_cache=mtp)
    sub = sub.replace(done_B=sub.done_B | ~live_R)
    sub, out = decode.step(
        cfg, variables, sub, speculative=speculative, top_n=top_n, allowed_BW=allowed_RW,
        pages=pages,
    )  # fmt: skip
    if cfg.is_v4:
        state = _write_back(
            cfg, state, sub.cache, sub.mtp_cache, table_RP, _every_page(table_RP), 0
        )
    else:
        state = state.replace(cache=sub.cache, mtp_cache=sub.mtp_cache)
    return _set_rows(state, sub, 0), out
