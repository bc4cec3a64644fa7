"""The decode core shared by `generate` (a `lax.while_loop`) and the engine (a host loop).

State and programs:

- `RowRequest`: per-row request parameters as arrays (sampling, seed words and row index,
  max_new, stop ids, speculate flag, valid). Built on the host by `row_requests` from
  `SamplingParams`, the same way for `generate` and the engine.
- `DecodeState` (flax.struct.dataclass): the latent cache (main stacks; MTP module 0's cache when
  speculating), per row the last sampled token t_{n+1} (not yet in the cache) and its position,
  t_n and the hidden states (h_{n-1}, h_n) for the MTP drafter, the catch-up flag, counts, done
  and stop flags, per-row sampling parameters and key data, and statistics.
- `prefill(...)`: runs the prompts (expanded MLA), fills a fresh cache, samples token 0. Its
  pieces are exposed for callers that prefill incrementally (the engine interleaves prompt chunks
  with decode steps): `prefill_first_chunk` (expanded attention from position 0),
  `prefill_next_chunk` (absorbed decode forward over the cache filled so far), `first_state`
  (the state after the prompt and token 0).
- `step(...)`: ONE decode step: absorbed-MLA forward over the latent cache, sampling, MTP draft
  and verification (speculative), stop rules (stop ids incl. eos, length). Emits 0, 1 or 2 tokens
  per row (`StepOutput`).

Speculative step (MTP depth 1): the MTP module drafts t_{n+2} from h_n and Emb(t_{n+1}); one main
forward over [t_{n+1}, draft] at [n+1, n+2] verifies it (`sampling.verify_draft`: greedy rows
accept iff the draft is the argmax, sampled rows with probability min(1, p/q) and a residual draw
otherwise); after an acceptance a bonus token is drawn at n+2. Rejected tokens are rolled back by
not advancing the position: their slots are overwritten before any query can see them. The MTP
entry of an accepted draft (position n-1 of the next step) is written at the start of the next
step ("catch-up"); without one, the first MTP entry repeats the second (same slot, same values),
so no scratch slot is needed. Rows with `spec_B` False run in the same program but always take
the plain sample of the first verification position (exactly the plain step's token).

Allowed-token masks (constrained decoding): `prefill`, `first_state` and `step` take an optional
`allowed_BW` (uint32 [B, ceil(V/32)], `sampling.pack_allowed`): each row's next token is drawn
from its logits with every other token at -inf. In a speculative step the mask (the host's, for
the token after t_{n+1}) applies to the draft, to the target distribution it is verified
against and to the residual draw, so an accepted or a replacement token both respect it; the
bonus token would need the mask after the draft, which only the host's automaton knows, so a
masked row (one whose mask excludes some token) never takes it: after an acceptance it moves on
exactly as after a rejection whose replacement is the draft (the draft's cache entry, written
by the verification, is rewritten by the next step with the same values).

Cache layout: declared by `model.cache_batch_axis` (scanned stacks [L, B, S, ...], MTP
[B, S, ...]); `state_axes` gives every state leaf's batch and sequence axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsjax.inference import sampling as smp
from dsjax.inference.scheduler import bucket_length
from dsjax.model.config import ModelConfig
from dsjax.model.transformer import MTPModule, Transformer, cache_batch_axis, init_cache
from dsjax.model.v4_blocks import V4MTP

__all__ = [
    "DecodeState",
    "RowRequest",
    "StepOutput",
    "bucket_length",
    "decode_forward",
    "first_state",
    "prefill",
    "prefill_first_chunk",
    "prefill_next_chunk",
    "prompt_next_tokens",
    "row_requests",
    "state_axes",
    "step",
    "zeros_cache",
]


# ====================================================================== shapes
def zeros_cache(cfg: ModelConfig, batch: int, length: int, mtp: bool = True):
    """A zero cache like `init_cache(cfg, batch, length)` (traceable); `mtp=False` leaves out
    the MTP modules' caches."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, length))
    if not mtp:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("mtp_")}
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# ====================================================================== state
@struct.dataclass
class RowRequest:
    """Per-row request parameters (arrays, leading axis B)."""

    temperature_B: Any  # float32
    top_k_B: Any  # int32
    top_p_B: Any  # float32
    seeds_B2: Any  # uint32 (low, high) seed words
    rows_B: Any  # uint32 row index folded into the seed key
    max_new_B: Any  # int32 tokens to generate at most
    stop_ids_BK: Any  # int32 stop token ids (eos included unless ignored), -1 padded
    spec_B: Any  # bool: speculate with MTP
    valid_B: Any  # bool: a real row (not batch padding)
    start_B: Any  # int32 tokens generated before (a preempted request resumed; else 0)


def row_requests(
    params: Sequence[smp.SamplingParams],
    rows: Sequence[int],
    eos_id: int | None,
    stop_width: int,
    default_seed: int = 0,
    speculative_default: bool = False,
    pad_to: int | None = None,
) -> RowRequest:
    """Host-side (NumPy) `RowRequest` for `params` (validated by the caller); `rows[i]` is the
    row index folded into row i's seed key; `pad_to` adds invalid rows."""
    n = len(params)
    B = pad_to or n
    req = RowRequest(
        temperature_B=np.zeros(B, np.float32),
        top_k_B=np.zeros(B, np.int32),
        top_p_B=np.ones(B, np.float32),
        seeds_B2=np.zeros((B, 2), np.uint32),
        rows_B=np.zeros(B, np.uint32),
        max_new_B=np.ones(B, np.int32),
        stop_ids_BK=np.full((B, stop_width), -1, np.int32),
        spec_B=np.zeros(B, bool),
        valid_B=np.arange(B) < n,
        start_B=np.zeros(B, np.int32),
    )
    for i, p in enumerate(params):
        req.temperature_B[i], req.top_k_B[i], req.top_p_B[i] = p.temperature, p.top_k, p.top_p
        req.seeds_B2[i] = smp.seed_words(default_seed if p.seed is None else p.seed)
        req.rows_B[i] = rows[i] % 2**32
        req.max_new_B[i] = p.max_tokens
        stops = list(dict.fromkeys(p.stop_token_ids))
        if eos_id is not None and not p.ignore_eos and eos_id not in stops:
            stops.append(eos_id)
        if len(stops) > stop_width:
            raise ValueError(
                f"stop_token_ids: {len(stops)} stop ids (eos included) exceed the limit "
                f"{stop_width}"
            )
        req.stop_ids_BK[i, : len(stops)] = stops
        req.spec_B[i] = speculative_default if p.speculative is None else p.speculative
    return req


@struct.dataclass
class DecodeState:
    """Everything a decode step reads and writes (a pytree; leading axis B unless noted)."""

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime

        def replace(self, **changes: Any) -> Self: ...

    cache: Any  # main cache pytree (layout: model.cache_batch_axis)
    mtp_cache: Any  # MTP module 0's cache [B, S, ...] or None (not speculating)
    tokens_B: jax.Array  # last sampled token t_{n+1}, not yet in the cache
    positions_B: jax.Array  # its position n+1
    prev_tokens_B: jax.Array  # t_n (the MTP drafter's catch-up input)
    hidden_B2D: jax.Array  # (h_{n-1}, h_n), main hidden states before the final norm
    catch_B: jax.Array  # MTP entry n-1 still to be written (last draft accepted)
    counts_B: jax.Array  # tokens generated so far
    done_B: jax.Array
    stopped_B: jax.Array  # ended by a stop token (else by length)
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    key_data_B: jax.Array  # raw PRNG key data of each row
    max_new_B: jax.Array
    stop_ids_BK: jax.Array
    spec_B: jax.Array
    drafted_B: jax.Array  # statistics: drafts verified, drafts accepted, decode forwards
    accepted_B: jax.Array
    forwards_B: jax.Array

    @property
    def sampling(self) -> smp.RowSampling:
        return smp.RowSampling(
            self.temperature_B,
            self.top_k_B,
            self.top_p_B,
            jax.random.wrap_key_data(self.key_data_B),
        )


@struct.dataclass
class StepOutput:
    """Tokens emitted by a step: `tokens_B2[:, :n_B]`; log-probs when requested (else None):
    `logprobs_B2`, `top_ids_B2N`, `top_logprobs_B2N` (N = top_n)."""

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime

        def replace(self, **changes: Any) -> Self: ...

    tokens_B2: jax.Array
    n_B: jax.Array
    done_B: jax.Array
    stopped_B: jax.Array
    logprobs_B2: Any = None
    top_ids_B2N: Any = None
    top_logprobs_B2N: Any = None
    drafted_B: Any = None  # speculative steps: a draft was verified / accepted this step
    accepted_B: Any = None


def state_axes(state: DecodeState) -> tuple[DecodeState, DecodeState]:
    """(batch axes, sequence axes) of every leaf of `state` (sequence -1: none), from the layout
    declared with the cache (`model.cache_batch_axis`)."""
    zeros = jax.tree.map(lambda _: 0, state)
    none = jax.tree.map(lambda _: -1, state)
    cache_b = {
        k: jax.tree.map(lambda _, k=k: cache_batch_axis(k), v) for k, v in state.cache.items()
    }
    cache_s = jax.tree.map(lambda a: a + 1, cache_b)
    mtp_b = jax.tree.map(lambda _: cache_batch_axis("mtp_0"), state.mtp_cache)
    mtp_s = jax.tree.map(lambda a: a + 1, mtp_b)
    return (
        zeros.replace(cache=cache_b, mtp_cache=mtp_b),
        none.replace(cache=cache_s, mtp_cache=mtp_s),
    )


# ====================================================================== model calls
def _model_vars(variables) -> dict[str, Any]:
    return {k: variables[k] for k in ("params", "moe_bias") if k in variables}


def _hidden(cfg: ModelConfig, out):
    """The MTP drafter's input from a model output: the hidden state before the final norm
    [B, T, D] (V3), or DeepSeek-V4's mHC streams flattened to [B, T, n*D]."""
    if cfg.is_v4:
        return out.streams.reshape(*out.streams.shape[:2], -1)
    return out.hidden


def decode_forward(
    cfg: ModelConfig, variables, cache, tokens_BT, positions_BT, valid_BT=None, pages=None
):  # fmt: skip
    """Absorbed-attention decode forward writing the T new tokens at their positions
    (`valid_BT`: which tokens are real, default all; DeepSeek-V4's caches skip the others, a
    V3 latent cache writes every slot). `pages` (`layers.paged.Pages`): `cache` is a paged V3
    cache read and written through them.

    Returns (logits_BTV float32, hidden (`_hidden`), updated main cache).
    """
    valid = jnp.ones(tokens_BT.shape, bool) if valid_BT is None else valid_BT
    out, upd = Transformer(cfg).apply(
        {**_model_vars(variables), "cache": cache},
        tokens_BT,
        positions_BT,
        valid.astype(jnp.int32),
        mode="decode",
        run_mtp=False,
        pages=pages,
        mutable=["cache"],
    )
    return out.logits, _hidden(cfg, out), upd["cache"]


def _embed(cfg, variables, tokens_BT):
    return Transformer(cfg).apply(
        {"params": variables["params"]}, tokens_BT, method=lambda m, t: m.lookup(t)
    )


def _head(cfg, variables, normed_BTD):
    return Transformer(cfg).apply(
        {"params": variables["params"]}, normed_BTD, method=lambda m, x: m.head(x)
    )


def _mtp_draft_logits(cfg, variables, state: DecodeState, pages=None):
    """MTP module 0 over (catch-up entry, entry n): returns (draft logits_BV, new MTP cache)."""
    B = state.tokens_B.shape[0]
    pos = state.positions_B
    catch = state.catch_B
    # Entry 0 catches up position n-1 (h_{n-1}, t_n) or repeats entry 1 (same slot, same values).
    tok2 = jnp.stack([jnp.where(catch, state.prev_tokens_B, state.tokens_B), state.tokens_B], 1)
    h_first = jnp.where(catch[:, None], state.hidden_B2D[:, 0], state.hidden_B2D[:, 1])
    h2 = jnp.stack([h_first, state.hidden_B2D[:, 1]], 1)
    mtp_pos = jnp.stack([jnp.where(catch, pos - 2, pos - 1), pos - 1], 1)
    if cfg.is_v4:
        # V4's window ring must not see one position twice: a repeated entry is skipped (and
        # a done row writes nothing, `_written`).
        valid = jnp.stack([catch, jnp.ones_like(catch)], 1) & ~state.done_B[:, None]
    else:
        valid = jnp.ones((B, 2), bool)
    normed, cache = _mtp_apply(
        cfg, variables, "decode", state.mtp_cache, h2, tok2, mtp_pos, valid, pages
    )
    return _head(cfg, variables, normed[:, 1:2])[:, 0], cache


def _is_stop(tokens_B, stop_ids_BK):
    return jnp.any(tokens_B[:, None] == stop_ids_BK, axis=-1)


def _logprobs(logits_BTV, tokens_BT, top_n):
    outs = [smp.token_logprobs(logits_BTV[:, t], tokens_BT[:, t], top_n) for t in range(2)]
    if logits_BTV.shape[1] == 1:
        outs = [outs[0], outs[0]]
    return tuple(jnp.stack(x, 1) for x in zip(*outs, strict=True))


# ====================================================================== programs
def _mtp_vars(variables, cache):
    mvars = {"params": variables["params"]["mtp_0"], "cache": cache}
    bias = variables.get("moe_bias", {})
    if "mtp_0" in bias:
        mvars["moe_bias"] = bias["mtp_0"]
    return mvars


def _oneshot_prefill(cfg, variables, tokens_BP, lengths_B, cache_len, speculative):
    """The whole prompt in one expanded-attention forward: (cache, logits_BPV, hidden_BPD)."""
    B, P = tokens_BP.shape
    cache = zeros_cache(cfg, B, cache_len, mtp=speculative)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    segment_ids_BP = (positions_BP < lengths_B[:, None]).astype(jnp.int32)
    out, upd = Transformer(cfg).apply(
        {**_model_vars(variables), "cache": cache},
        tokens_BP,
        positions_BP,
        segment_ids_BP,
        mode="prefill",
        run_mtp=speculative,
        mutable=["cache"],
    )
    return upd["cache"], out.logits, _hidden(cfg, out)


def _pick_last(x_BTX, start, last_B, prev_BX):
    """Row b's entry at absolute position last_B[b] if it lies in [start, start + T), else prev."""
    T = x_BTX.shape[1]
    off_B = last_B - start
    here = (off_B >= 0) & (off_B < T)
    val = x_BTX[jnp.arange(x_BTX.shape[0]), jnp.clip(off_B, 0, T - 1)]
    return jnp.where(here[:, None], val.astype(prev_BX.dtype), prev_BX)


def _mtp_apply(
    cfg, variables, mode, mtp_cache, hidden_BTX, next_BT, positions_BT, valid_BT, pages=None
):  # fmt: skip
    """MTP module 0 over (hidden, Emb(next)) at `positions_BT` (`_hidden`'s layout; a paged
    cache with `pages`, V3): returns (head input [B, T, D], its updated cache)."""
    emb = _embed(cfg, variables, next_BT)
    seg = valid_BT.astype(jnp.int32)
    mvars = _mtp_vars(variables, mtp_cache)
    if cfg.is_v4:
        streams = hidden_BTX.reshape(*hidden_BTX.shape[:2], cfg.hc_mult, cfg.hidden_size)
        (_, normed, _), upd = V4MTP(cfg, mode).apply(
            mvars, streams, emb, next_BT, positions_BT, seg, mutable=["cache"]
        )
    else:
        (_, normed, _), upd = MTPModule(cfg, mode).apply(
            mvars, hidden_BTX, emb, positions_BT, seg, pages=pages, mutable=["cache"]
        )
    return normed, upd["cache"]


def _mtp_fill(
    cfg, variables, mode, mtp_cache, hidden_BTD, next_BT, positions_BT, valid_BT=None, pages=None
):  # fmt: skip
    """MTP module 0 over (h_t, Emb(t+1)) at `positions_BT`: writes its cache; returns it."""
    valid = jnp.ones(next_BT.shape, bool) if valid_BT is None else valid_BT
    return _mtp_apply(
        cfg, variables, mode, mtp_cache, hidden_BTD, next_BT, positions_BT, valid, pages
    )[1]


def prefill_first_chunk(
    cfg, variables, main, mtp_cache, tokens_BT, next_BT, lengths_B, pages=None
):  # fmt: skip
    """The first prompt chunk, positions 0..T-1, in prefill mode (expanded attention among these
    tokens only; positions >= lengths_B are padding, masked by segment id) written into the main
    cache `main` (and, when `mtp_cache` is not None, MTP module 0's cache, whose entry t reads
    next_BT[:, t] = token t+1). Caches: any length S >= T (traceable), or paged (`pages`).

    Returns (main, mtp_cache, logits_BTV float32, hidden_BTD pre final norm).
    """
    B, T = tokens_BT.shape
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out, upd = Transformer(cfg).apply(
        {**_model_vars(variables), "cache": main},
        tokens_BT,
        pos_BT,
        (pos_BT < lengths_B[:, None]).astype(jnp.int32),
        mode="prefill",
        run_mtp=False,
        pages=pages,
        mutable=["cache"],
    )
    hidden = _hidden(cfg, out)
    if mtp_cache is not None:
        valid = pos_BT < lengths_B[:, None] if cfg.is_v4 else None
        mtp_cache = _mtp_fill(
            cfg, variables, "prefill", mtp_cache, hidden, next_BT, pos_BT, valid, pages
        )
    return upd["cache"], mtp_cache, out.logits, hidden


def prefill_next_chunk(
    cfg, variables, main, mtp_cache, tokens_BT, next_BT, start, lengths_B=None, pages=None
):  # fmt: skip
    """A later prompt chunk at positions start..start+T-1 (`start` a traced scalar): the absorbed
    decode forward over the cache filled so far (every position < start written), MTP module 0's
    cache too when `mtp_cache` is not None (next_BT as in `prefill_first_chunk`). `lengths_B`
    (optional): positions at or beyond a row's length are padding, which DeepSeek-V4's
    fixed-size caches must not store. `pages`: the caches are paged.

    Returns (main, mtp_cache, logits_BTV float32, hidden_BTD pre final norm).
    """
    B, T = tokens_BT.shape
    pos_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    valid = None if lengths_B is None or not cfg.is_v4 else pos_BT < lengths_B[:, None]
    logits_BTV, hidden_BTD, main = decode_forward(
        cfg, variables, main, tokens_BT, pos_BT, valid, pages=pages
    )
    if mtp_cache is not None:
        mtp_cache = _mtp_fill(
            cfg, variables, "decode", mtp_cache, hidden_BTD, next_BT, pos_BT, valid, pages
        )
    return main, mtp_cache, logits_BTV, hidden_BTD


def _chunked_prefill(cfg, variables, tokens_BP, lengths_B, cache_len, speculative, chunk):
    """The prompt chunk by chunk: the first (P mod chunk, or chunk) tokens in prefill mode
    (`prefill_first_chunk`, expanded attention from position 0), every later chunk with the
    absorbed decode forward over the cache filled so far (`prefill_next_chunk` in a `lax.scan`:
    one compiled chunk program). Activations are bounded by the chunk. Returns
    (cache, logits_BV, hidden_BD) at each row's last token."""
    B, P = tokens_BP.shape
    n = -(-P // chunk)
    first = P - (n - 1) * chunk
    cache = zeros_cache(cfg, B, cache_len, mtp=speculative)
    main = {k: v for k, v in cache.items() if not k.startswith("mtp_")}
    mtp_cache = cache["mtp_0"] if speculative else None
    # MTP position t reads token t+1; the prompt's last position sees a placeholder (its slot
    # is rewritten by the first decode step's catch-up entry), as in the one-shot prefill.
    next_BP = prompt_next_tokens(tokens_BP)
    last_B = lengths_B.astype(jnp.int32) - 1

    main, mtp_cache, logits_BTV, hidden_BTD = prefill_first_chunk(
        cfg, variables, main, mtp_cache, tokens_BP[:, :first], next_BP[:, :first], lengths_B
    )
    D, V = hidden_BTD.shape[-1], logits_BTV.shape[-1]
    logits_BV = _pick_last(logits_BTV, 0, last_B, jnp.zeros((B, V), jnp.float32))
    hidden_BD = _pick_last(hidden_BTD, 0, last_B, jnp.zeros((B, D), hidden_BTD.dtype))

    def body(carry, xs):
        main, mtp_cache, logits_BV, hidden_BD = carry
        tok_Bc, nxt_Bc, start = xs
        main, mtp_cache, logits_BcV, hidden_BcD = prefill_next_chunk(
            cfg, variables, main, mtp_cache, tok_Bc, nxt_Bc, start, lengths_B
        )
        logits_BV = _pick_last(logits_BcV, start, last_B, logits_BV)
        hidden_BD = _pick_last(hidden_BcD, start, last_B, hidden_BD)
        return (main, mtp_cache, logits_BV, hidden_BD), None

    def split(x_BP):  # [B, first + (n-1)*chunk] -> [n-1, B, chunk]
        return jnp.moveaxis(x_BP[:, first:].reshape(B, n - 1, chunk), 1, 0)

    starts = first + chunk * jnp.arange(n - 1, dtype=jnp.int32)
    (main, mtp_cache, logits_BV, hidden_BD), _ = jax.lax.scan(
        body, (main, mtp_cache, logits_BV, hidden_BD), (split(tokens_BP), split(next_BP), starts)
    )
    if speculative:
        main = {**main, "mtp_0": mtp_cache}
    return main, logits_BV, hidden_BD


def prompt_next_tokens(tokens_BP):
    """MTP inputs of a prompt: entry t is token t+1; the last entry repeats the last token (a
    placeholder: that MTP slot is rewritten by the first decode step's catch-up entry). Works on
    jax and NumPy arrays."""
    xp = jnp if isinstance(tokens_BP, jax.Array) else np
    return xp.concatenate([tokens_BP[:, 1:], tokens_BP[:, -1:]], 1)


# Prompts longer than this are prefilled chunk by chunk by default (generate and the engine).
PREFILL_CHUNK = 512


def prefill(
    cfg: ModelConfig,
    variables,
    tokens_BP,
    lengths_B,
    req: RowRequest,
    *,
    cache_len: int,
    speculative: bool,
    top_n: int | None = None,
    prefill_chunk: int | None = None,
    allowed_BW=None,
) -> tuple[DecodeState, StepOutput]:
    """Runs right-padded prompts from position 0 into a fresh cache of `cache_len` slots and
    samples token 0 of each row (traceable; call under jit).

    Padding writes slots beyond a row's length, which no query of that row sees before they are
    overwritten. With `speculative`, the MTP module's cache is filled too. Prompts longer than
    `prefill_chunk` (None: no limit) run chunk by chunk (`_chunked_prefill`), bounding the
    activation memory by the chunk; the result equals the one-shot prefill up to rounding.
    """
    B, P = tokens_BP.shape
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk}: must be a positive integer or None")
    if P > cache_len:
        raise ValueError(f"prompt length {P} exceeds cache_len {cache_len}")
    rows = jnp.arange(B)
    last_B = lengths_B - 1
    if prefill_chunk is None or P <= prefill_chunk:
        cache, logits_BPV, hidden_BPD = _oneshot_prefill(
            cfg, variables, tokens_BP, lengths_B, cache_len, speculative
        )
        logits_BV, hidden_BD = logits_BPV[rows, last_B], hidden_BPD[rows, last_B]
    else:
        cache, logits_BV, hidden_BD = _chunked_prefill(
            cfg, variables, tokens_BP, lengths_B, cache_len, speculative, prefill_chunk
        )
    return first_state(
        cache={k: v for k, v in cache.items() if not k.startswith("mtp_")},
        mtp_cache=cache["mtp_0"] if speculative else None,
        logits_BV=logits_BV,
        hidden_BD=hidden_BD,
        last_tokens_B=tokens_BP[rows, last_B],
        lengths_B=lengths_B,
        req=req,
        speculative=speculative,
        top_n=top_n,
        allowed_BW=allowed_BW,
    )


def first_state(
    *,
    cache,
    mtp_cache,
    logits_BV,
    hidden_BD,
    last_tokens_B,
    lengths_B,
    req: RowRequest,
    speculative: bool,
    top_n: int | None = None,
    allowed_BW=None,
) -> tuple[DecodeState, StepOutput]:
    """The decode state after a prefill and token 0 of each row (traceable): samples token 0 from
    the last prompt token's logits_BV [B, V] (float32), hidden_BD [B, D] its hidden state (pre
    final norm), last_tokens_B that token, lengths_B the prompt lengths. `cache` / `mtp_cache`
    are stored as given (the engine passes None and keeps the caches it filled in place).
    `allowed_BW`: the rows' allowed first tokens (see the module docstring), or None."""
    B = logits_BV.shape[0]
    keys = smp.keys_from_seeds(jnp.asarray(req.seeds_B2), jnp.asarray(req.rows_B))
    zeros = jnp.zeros((B,), jnp.int32)
    state = DecodeState(
        cache=cache,
        mtp_cache=mtp_cache,
        tokens_B=zeros,
        positions_B=lengths_B.astype(jnp.int32),
        prev_tokens_B=last_tokens_B.astype(jnp.int32),
        hidden_B2D=jnp.stack([jnp.zeros_like(hidden_BD), hidden_BD], 1),
        catch_B=jnp.zeros((B,), bool),
        counts_B=zeros,
        done_B=jnp.zeros((B,), bool),
        stopped_B=jnp.zeros((B,), bool),
        temperature_B=jnp.asarray(req.temperature_B),
        top_k_B=jnp.asarray(req.top_k_B),
        top_p_B=jnp.asarray(req.top_p_B),
        key_data_B=jax.random.key_data(keys),
        max_new_B=jnp.asarray(req.max_new_B),
        stop_ids_BK=jnp.asarray(req.stop_ids_BK),
        spec_B=jnp.asarray(req.spec_B) & speculative,
        drafted_B=zeros,
        accepted_B=zeros,
        forwards_B=zeros,
    )
    allowed = None if allowed_BW is None else smp.unpack_allowed(allowed_BW, logits_BV.shape[-1])
    masked_BV = _mask(logits_BV, allowed)
    start = jnp.asarray(req.start_B, jnp.int32)  # this is token `start` of the row's output
    first = state.sampling.sample(masked_BV, start)
    valid = jnp.asarray(req.valid_B)
    stopped = valid & _is_stop(first, state.stop_ids_BK)
    done = ~valid | stopped | (state.max_new_B <= start + 1)
    state = state.replace(
        tokens_B=first, counts_B=jnp.where(valid, start + 1, 0), done_B=done, stopped_B=stopped
    )
    emitted = StepOutput(
        tokens_B2=jnp.stack([first, first], 1),
        n_B=valid.astype(jnp.int32),
        done_B=done,
        stopped_B=stopped,
    )
    if top_n is not None:
        lp, ids, top = _logprobs(masked_BV[:, None], first[:, None], top_n)
        emitted = emitted.replace(logprobs_B2=lp, top_ids_B2N=ids, top_logprobs_B2N=top)
    return state, emitted


def step(
    cfg: ModelConfig,
    variables,
    state: DecodeState,
    *,
    speculative: bool,
    top_n: int | None = None,
    allowed_BW=None,
    pages=None,
) -> tuple[DecodeState, StepOutput]:
    """One decode step for every row not done (traceable; see the module docstring).
    `allowed_BW`: each row's allowed next tokens (uint32 words), or None (no constraint).
    `pages` (`layers.paged.Pages`): the state's caches are paged, read and written in place
    through the rows' page tables."""
    allowed = None if allowed_BW is None else smp.unpack_allowed(allowed_BW, cfg.vocab_size)
    if speculative:
        return _speculative_step(cfg, variables, state, top_n, allowed, pages)
    return _plain_step(cfg, variables, state, top_n, allowed, pages)


def _mask(logits_BV, allowed_BV):
    """`logits_BV` with the tokens outside `allowed_BV` at -inf (unchanged when None)."""
    return logits_BV if allowed_BV is None else smp.mask_logits(logits_BV, allowed_BV)


def _written(cfg, active_B, T: int):
    """Which of a step's T new tokens per row a DeepSeek-V4 cache stores: none of a done row's
    (its slot may hold another request's state: an engine slot being prefilled); None for a
    V3 cache (done rows write where no query of theirs looks, or to TRASH pages)."""
    return jnp.broadcast_to(active_B[:, None], (active_B.shape[0], T)) if cfg.is_v4 else None


def _plain_step(cfg, variables, s: DecodeState, top_n, allowed_BV=None, pages=None):
    active = ~s.done_B
    logits, _, cache = decode_forward(
        cfg, variables, s.cache, s.tokens_B[:, None], s.positions_B[:, None],
        _written(cfg, active, 1), pages=pages,
    )  # fmt: skip
    masked_BV = _mask(logits[:, 0], allowed_BV)
    nxt = s.sampling.sample(masked_BV, s.counts_B)
    count = s.counts_B + active
    stop = active & _is_stop(nxt, s.stop_ids_BK)
    done = s.done_B | stop | (count >= s.max_new_B)
    new = s.replace(
        cache=cache,
        tokens_B=jnp.where(active, nxt, s.tokens_B),
        positions_B=jnp.where(active, s.positions_B + 1, s.positions_B),
        counts_B=count,
        done_B=done,
        stopped_B=s.stopped_B | stop,
        forwards_B=s.forwards_B + active,
    )
    out = StepOutput(jnp.stack([nxt, nxt], 1), active.astype(jnp.int32), done, new.stopped_B)
    if top_n is not None:
        lp, ids, top = _logprobs(masked_BV[:, None], nxt[:, None], top_n)
        out = out.replace(logprobs_B2=lp, top_ids_B2N=ids, top_logprobs_B2N=top)
    return new, out


def _speculative_step(cfg, variables, s: DecodeState, top_n, allowed_BV=None, pages=None):
    active = ~s.done_B
    sampling = s.sampling
    pos, count, greedy = s.positions_B, s.counts_B, sampling.greedy_B

    draft_logits, mtp_cache = _mtp_draft_logits(cfg, variables, s, pages)
    q_filtered = sampling.filter(_mask(draft_logits, allowed_BV))
    draft = smp.sample_tokens(sampling.keys(count, smp.DRAFT), q_filtered, greedy)

    # Verify [t_{n+1}, draft] at [n+1, n+2].
    logits, hidden, cache = decode_forward(
        cfg,
        variables,
        s.cache,
        jnp.stack([s.tokens_B, draft], 1),
        jnp.stack([pos, pos + 1], 1),
        _written(cfg, active, 2),
        pages=pages,
    )
    masked_BV = _mask(logits[:, 0], allowed_BV)
    p_filtered = sampling.filter(masked_BV)
    accept, resampled = smp.verify_draft(
        sampling.keys(count, smp.ACCEPT),
        sampling.keys(count, smp.RESIDUAL),
        p_filtered,
        q_filtered,
        draft,
        greedy,
    )
    plain = smp.sample_tokens(sampling.keys(count, smp.SAMPLE), p_filtered, greedy)
    accept = accept & s.spec_B
    resampled = jnp.where(s.spec_B, resampled, plain)
    bonus = smp.sample_tokens(
        sampling.keys(count + 1, smp.BONUS), sampling.filter(logits[:, 1]), greedy
    )
    first = jnp.where(accept, draft, resampled)
    if allowed_BV is not None:  # masked rows take no bonus (see the module docstring)
        accept_bonus = accept & jnp.all(allowed_BV, axis=-1)
    else:
        accept_bonus = accept

    # Emit one or two tokens.
    count1 = count + active
    stop1 = _is_stop(first, s.stop_ids_BK)
    end1 = stop1 | (count1 >= s.max_new_B)
    second = active & ~end1 & accept_bonus
    stop2 = second & _is_stop(bonus, s.stop_ids_BK)
    count2 = count1 + second
    stopped = (active & stop1) | stop2
    done = s.done_B | (active & end1) | (second & (stop2 | (count2 >= s.max_new_B)))

    # Next state: accepted -> last token bonus at n+3; rejected (or a masked row's accepted
    # draft) -> `first` at n+2.
    move = active & ~done
    acc = accept_bonus[:, None]
    h2 = jnp.where(acc[..., None], hidden, jnp.stack([s.hidden_B2D[:, 1], hidden[:, 0]], 1)).astype(
        s.hidden_B2D.dtype
    )
    new = s.replace(
        cache=cache,
        mtp_cache=mtp_cache,
        tokens_B=jnp.where(move, jnp.where(accept_bonus, bonus, first), s.tokens_B),
        prev_tokens_B=jnp.where(move, jnp.where(accept_bonus, draft, s.tokens_B), s.prev_tokens_B),
        positions_B=jnp.where(move, pos + 1 + accept_bonus, pos),
        hidden_B2D=jnp.where(move[:, None, None], h2, s.hidden_B2D),
        catch_B=jnp.where(move, accept_bonus, s.catch_B),
        counts_B=count2,
        done_B=done,
        stopped_B=s.stopped_B | stopped,
        drafted_B=s.drafted_B + (active & s.spec_B),
        accepted_B=s.accepted_B + (active & accept),
        forwards_B=s.forwards_B + active,
    )
    out = StepOutput(
        jnp.stack([first, bonus], 1),
        count2 - count,
        done,
        new.stopped_B,
        drafted_B=active & s.spec_B,
        accepted_B=active & accept,
    )
    if top_n is not None:
        # The first token's under the masked distribution it was drawn from; the bonus's
        # under the raw logits (a masked row never takes one).
        lp, ids, top = _logprobs(
            jnp.stack([masked_BV, logits[:, 1]], 1), jnp.stack([first, bonus], 1), top_n
        )
        out = out.replace(logprobs_B2=lp, top_ids_B2N=ids, top_logprobs_B2N=top)
    return new, out
