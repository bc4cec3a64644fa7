"""The engine's jitted programs over one `decode.DecodeState` of all slots (dsjax/inference/engine.py
drives them from its host loop): `admit` (a whole prompt into a slot), `prompt_chunk` and
`start_decoding` (a long prompt chunk by chunk, then its first token), `step` (one decode step
over the active slots and positions). Each takes the state donated and the cache layout `axes`
(`decode.state_axes`: per leaf, the batch and sequence axes) as a static argument. The programs
that sample (`admit`, `start_decoding`, `step`) take an optional packed allowed-token mask per row
(`allowed_*W`, see `decode`); None compiles the unconstrained program.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dsjax.inference import decode


def put_rows(full, part, batch_axes, start: int | jax.Array):
    """Writes `part` (fewer rows / positions) into `full` at row `start`, position 0."""

    def put(x, v, a):
        idx = [jnp.int32(0)] * x.ndim
        idx[a] = jnp.asarray(start, jnp.int32)
        return jax.lax.dynamic_update_slice(x, v.astype(x.dtype), idx)

    return jax.tree.map(put, full, part, batch_axes)


@functools.partial(
    jax.jit, static_argnames=("cfg", "speculative", "top_n", "axes"), donate_argnames=("state",)
)
def admit(
    cfg, variables, state, tokens_1P, length_1, req, slot, allowed_1W=None,
    *, speculative, top_n, axes,
):  # fmt: skip
    """Prefills one prompt into a fresh [1, P] state, samples token 0 and copies the row into
    row `slot` of `state`; returns (state, StepOutput of the row). Prompts longer than
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
    batch_axes = jax.tree.unflatten(jax.tree.structure(state), list(axes[0]))
    return put_rows(state, row, batch_axes, slot), first


# Position of a slot whose prompt is being prefilled incrementally: beyond every cache, so the
# decode steps' writes for that row (at it, at it + 1, and the MTP's at it - 1, - 2) are dropped.
PARKED = 2**30


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "speculative", "axes", "window", "first"),
    donate_argnames=("state",),
)
def prompt_chunk(
    cfg, variables, state, tokens_1T, next_1T, start, length_1, last, slot,
    *, speculative, axes, window, first,
):  # fmt: skip
    """One prompt chunk of the request in row `slot` at positions start..start+T-1, written into
    that row's cache positions 0..window-1 (and MTP module 0's cache with `speculative`).

    `first`: the first chunk (`decode.prefill_first_chunk`, prefill mode from position 0,
    positions >= length_1 are padding); it also parks the row (done, position `PARKED`) so the
    decode steps until the last chunk leave it alone. Otherwise `decode.prefill_next_chunk`
    (absorbed decode forward over the row's cache). Returns (state, logits_1V, hidden_1D) at
    chunk offset `last` (the prompt's last token when this is the last chunk).
    """
    tree = jax.tree.structure(state)
    batch_axes = jax.tree.unflatten(tree, list(axes[0]))
    seq_axes = jax.tree.unflatten(tree, list(axes[1]))

    def view(x, b, s):
        x = jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=b)
        return x if s < 0 else jax.lax.slice_in_dim(x, 0, window, axis=s)

    row = jax.tree.map(view, state, batch_axes, seq_axes)
    mtp_cache = row.mtp_cache if speculative else None
    if first:
        main, mtp_cache, logits_1TV, hidden_1TD = decode.prefill_first_chunk(
            cfg, variables, row.cache, mtp_cache, tokens_1T, next_1T, length_1
        )
        row = row.replace(
            positions_B=jnp.full_like(row.positions_B, PARKED),
            done_B=jnp.ones_like(row.done_B),
        )
    else:
        main, mtp_cache, logits_1TV, hidden_1TD = decode.prefill_next_chunk(
            cfg, variables, row.cache, mtp_cache, tokens_1T, next_1T, start
        )
    row = row.replace(cache=main, mtp_cache=mtp_cache if speculative else row.mtp_cache)
    return put_rows(state, row, batch_axes, slot), logits_1TV[:, last], hidden_1TD[:, last]


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
    updates = {
        f.name: getattr(state, f.name).at[slot].set(getattr(row, f.name)[0])
        for f in dataclasses.fields(row)
        if f.name not in ("cache", "mtp_cache")
    }
    return state.replace(**updates), first


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "speculative", "top_n", "axes", "rows", "window"),
    donate_argnames=("state",),
)
def step(cfg, variables, state, live_R, allowed_RW=None, *, speculative, top_n, axes, rows, window):
    """One decode step over slots 0..rows-1 and cache positions 0..window-1 (every active slot
    and position is among them); rows with live_R False are held done. `allowed_RW`: the rows'
    packed allowed-token masks, or None."""
    tree = jax.tree.structure(state)
    batch_axes = jax.tree.unflatten(tree, list(axes[0]))
    seq_axes = jax.tree.unflatten(tree, list(axes[1]))

    def view(x, b, s):
        x = jax.lax.slice_in_dim(x, 0, rows, axis=b)
        return x if s < 0 else jax.lax.slice_in_dim(x, 0, window, axis=s)

    sub = jax.tree.map(view, state, batch_axes, seq_axes)
    sub = sub.replace(done_B=sub.done_B | ~live_R)
    sub, out = decode.step(
        cfg, variables, sub, speculative=speculative, top_n=top_n, allowed_BW=allowed_RW
    )
    return put_rows(state, sub, batch_axes, 0), out
