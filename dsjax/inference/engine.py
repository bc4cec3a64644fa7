"""Continuous-batching generation engine (used by serve.py), over the decode core.

The policy lives in `dsjax.inference.scheduler.Scheduler` (plain Python: queue, slots, chunk
plans, cache pages); this module runs its decisions on the device from one background thread
and delivers events. `slots` rows share one `decode.DecodeState` whose latent caches are page
pools (`dsjax.inference.engine_programs`: `cache_tokens` positions in pages of `page_size`, each
request's positions on its own pages through its page table; `slots` only bounds how many
requests decode together). The thread loops:

1. frees the slots and pages of finished or cancelled requests;
2. admits queued requests, first come first served, while a slot is free and the pool has
   the pages of the head request's prompt and first decode step (less the cached prefix pages
   it reuses); otherwise they wait. Pages are taken as tokens arrive; when the pool runs dry
   the youngest running request is preempted (it gives back its pages and slot, goes back to
   the head of the queue keeping its generated tokens, and on readmission prefills its prompt
   followed by them and continues: its output is unchanged; `scheduler`). Prefix cache: full
   prompt pages are keyed by a hash chain of their tokens (`page_pool.page_keys`); a prompt that starts with pages an earlier
   prompt prefilled reuses them and prefills only the rest. A prompt of at most `prefill_chunk`
   tokens without a cached prefix: one jitted program prefills it alone into a fresh [1, P]
   state (P = its bucketed length), samples its first token and writes the row to its slot (the
   cache to its pages). Other prompts are prefilled chunk by chunk (step 3) and their slot joins
   decoding when the prompt is in its cache;
3. runs ONE prefill chunk of the oldest incrementally prefilled prompt, straight into its slot's
   pages (`decode.prefill_first_chunk`: the first `n mod prefill_chunk` tokens, or a whole
   chunk, in prefill mode, padded to a bucket; then `decode.prefill_next_chunk`: whole chunks
   with the absorbed decode forward over the row's first W positions, W the smallest step window
   covering the chunk; after a cached prefix every chunk is of the second kind). After the last
   chunk, `decode.first_state` samples token 0 into the row exactly as the one-shot admit does.
   So one long prompt costs the running streams one chunk per decode step, not the whole prompt
   at once. While its prompt is being prefilled the slot is held done in the decode steps and
   its position is parked beyond the cache: no step writes for it or advances it. Once a prompt
   is in the cache its full pages enter the prefix cache;
4. runs one `decode.step` for every decoding slot: each slot with its own position, sampling
   parameters, PRNG key, stop ids and length limit (stop rules are decided on the device), and
   with MTP speculation when any active request speculates (`SamplingParams.speculative`,
   default: on when the checkpoint has an MTP module). The step runs over the first R slots and
   the first W positions only (R, W bucketed powers of two covering every active slot and
   position). New requests take the lowest free slot.

Rows never interact (attention is per row, MoE is dropless and per token), so a request's
output is the same whatever else is in the batch, and equals `generate`'s for the same seed and
row (the key rule is `dsjax.inference.sampling`'s; a long or partly cached prompt's cache up to
the rounding of a different chunk split). Stale contents of a page's previous owner are
harmless: slot s is visible to a query at position p only if s <= p, and every slot up to p has
been written by the current request (or is a cached prefix page holding the same tokens).

DeepSeek-V4 (`cfg.is_v4`): the same scheduler, page pool and programs. Its compressed entries
and indexer keys (what grows with the context) live in the pool's pages, page_size / rate
entries per page and layer (`page_size` a multiple of every compression rate); its window
rings, compressor partial-window buffers and MTP ring are fixed-size and stay one row per slot
(`engine_programs`). The programs read its pages through the XLA gather path (no paged kernel),
and there is no prefix cache: a reused prefix page would need the per-slot state at its end
(the window ring's last keys, CSA's previous-window projections), which pages do not store.
One device only (no `mesh`).

Constrained decoding: a request submitted with a `constraint` (a `TokenConstraint`, e.g.
`dsjax.inference.constrained.GrammarConstraint`) draws every token from its allowed set: before
each program that samples for it, the engine asks the constraint for its packed mask given the
tokens left (`allowed_words(remaining)`) and passes the masks of all rows (all-ones for the
others) to the program (`decode`: the mask covers plain draws, MTP drafts, their verification and
residual draws; masked rows take no bonus token). Emitted tokens are fed back (`advance`); when
the constraint says its output is complete (`finished`) the request ends with "stop". Batches
without a constrained request run the unconstrained programs.

Results are delivered through a callback (called on the engine thread; keep it cheap, e.g.
`loop.call_soon_threadsafe(queue.put_nowait, event)`); `stream()` wraps that as an async
iterator and `generate()` as a blocking call. `submit` raises `QueueFull` when `max_queue`
requests are waiting. No exception escapes the engine thread: a failing request gets an event
with finish_reason "error"; a failing callback ends its request with "error"; cancellation and
shutdown end requests with "cancelled".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.inference import decode
from dsjax.inference import engine_programs as programs
from dsjax.inference.meshes import DecodeMesh
from dsjax.inference.page_pool import TRASH
from dsjax.inference.sampling import MAX_LOGPROBS, SamplingParams
from dsjax.inference.scheduler import Scheduler, Seq
from dsjax.model import v4_cache
from dsjax.model.config import ModelConfig
from dsjax.model.layers import paged

__all__ = ["Engine", "QueueFull", "SamplingParams", "TokenConstraint", "TokenEvent"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's request queue is at `max_queue`; retry later."""


class TokenConstraint(Protocol):
    """What the engine needs of a per-request token constraint (see the module docstring)."""

    @property
    def finished(self) -> bool:
        """The output is complete: no further token may follow."""
        ...

    def allowed_words(self, remaining: int) -> np.ndarray:
        """Packed allowed next tokens (uint32 [ceil(V/32)], `sampling.pack_allowed`) when
        `remaining` tokens (this one included) may still be generated; never empty."""
        ...

    def advance(self, tokens: Sequence[int]) -> None:
        """Feeds the emitted tokens."""
        ...


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request; `finish_reason` is set on the request's last event.

    finish_reason: None (more to come), "stop" (eos / stop token), "length" (max_tokens),
    "cancelled" or "error" (then `error` holds the message).
    logprobs[i]: log-probability of tokens[i] under log_softmax of the logits (temperature 1)
    the token was drawn from: the raw logits, or under a constraint the logits with the
    disallowed tokens at -inf; top_logprobs[i]: the top-n (token, logprob) pairs of that
    distribution, descending. Both only when the request's `SamplingParams.logprobs` is not
    None.
    """

    request_id: int
    tokens: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


@dataclasses.dataclass(eq=False, kw_only=True)
class _Request(Seq):
    """A request and its progress (its scheduling state: `scheduler.Seq`)."""

    id: int
    params: SamplingParams
    callback: Callable[[TokenEvent], None]
    row: int
    cancelled: bool = False
    failed: str | None = None
    finished: bool = False
    constraint: TokenConstraint | None = None

    def allowed(self) -> np.ndarray | None:
        """This request's packed mask for its next token, or None (unconstrained)."""
        if self.constraint is None:
            return None
        return self.constraint.allowed_words(self.params.max_tokens - self.generated)


def _rows(words: np.ndarray | None) -> np.ndarray | None:
    """One row's packed mask as a [1, W] batch (None stays None)."""
    return None if words is None else np.asarray(words, np.uint32)[None]


# ====================================================================== engine
# Running totals `Engine.stats` always reports (finished_<reason> appear as requests finish).
_TOTALS = (
    "submitted", "prefills", "prefill_chunks", "steps", "step_us", "tokens", "generated_tokens",
    "forwards", "draft_tokens", "accepted_tokens",
)  # fmt: skip


class Engine:
    """Continuous batching over `slots` rows of one decode state; see the module docstring.

    Args:
      cfg: model config.
      variables: {"params", "moe_bias"}.
      slots: rows decoded together (the concurrency bound; memory is `cache_tokens`).
      max_len: positions per request (prompt + generated); default min(max_position_embeddings,
        4096).
      max_queue: waiting requests at most (submit raises QueueFull beyond).
      eos_id: token that ends a request (unless SamplingParams.ignore_eos).
      seed: engine seed for requests without their own seed (request id = row of the key).
      min_batch, min_window: a step runs over the first R slots and attends over the first W
        positions, R (W) the smallest of min_batch (min_window) * 2^k or slots (max_len) that
        covers every active slot (position). One compilation per (R, W) used.
      speculative: default of `SamplingParams.speculative` (None: on when the checkpoint has an
        MTP module, i.e. cfg.num_mtp_layers > 0 and variables["params"]["mtp_0"] exists).
      max_stop_ids: stop ids per request at most (eos included).
      prefill_chunk: prompts longer than this many tokens (default decode.PREFILL_CHUNK) are
        prefilled incrementally, one chunk of at most this many tokens per engine iteration,
        interleaved with the decode steps of the running requests (see the module docstring):
        a long prompt delays each running stream's next token by one chunk, not by the whole
        prompt. Shorter prompts are prefilled in one program. Chunk programs compile once per
        (first or later chunk, first chunk's bucketed length, attention window).
      mesh: decode on this `DecodeMesh` (weights placed by its layout, the slots' rows split as
        it splits requests when `slots` is a multiple of its `row_shards`); None: one device.
      page_size: positions per cache page (default 64, FlashMLA's block; DeepSeek-V4: a
        multiple of every compression rate, default the least multiple of 64 that is,
        `v4_cache.engine_page_size`).
      cache_tokens: positions in the page pool, rounded down to whole pages (default
        slots * max_len rounded up to pages: every slot can hold a max_len request). A request
        waits in the queue until its prompt's pages are available; running requests take
        pages as their tokens arrive, preempting the youngest when none is left.
      prefix_cache: reuse cached full prompt pages (see the module docstring).
      paged_attention: how decode steps' attention reads the pages (`layers.paged.IMPLS`):
        "auto" (default; the Pallas kernel on TPU, else the XLA gather path), "xla", "pallas",
        or "pallas_interpret" (the kernel in Pallas' interpreter, any backend). On a `mesh`
        whose row shards divide `slots` (and the pool's pages) each chip keeps its own rows'
        pages (`Scheduler(shards=)`: a pool per chip) and decode steps read them per chip in
        shard_map (`layers.paged.Pages.shards`; every step runs all slots); otherwise the pool
        spans the chips and only the gather path can read it."""

    def __init__(
        self,
        cfg: ModelConfig,
        variables,
        *,
        slots: int = 8,
        max_len: int | None = None,
        max_queue: int = 64,
        eos_id: int | None = None,
        seed: int = 0,
        min_batch: int = 1,
        min_window: int = 256,
        speculative: bool | None = None,
        max_stop_ids: int = 16,
        prefill_chunk: int = decode.PREFILL_CHUNK,
        mesh: DecodeMesh | None = None,
        page_size: int | None = None,
        cache_tokens: int | None = None,
        prefix_cache: bool = True,
        paged_attention: str = "auto",
    ):
        if slots < 1:
            raise ValueError(f"slots={slots}: must be >= 1")
        if min_window < 1 or min_batch < 1:
            raise ValueError(f"min_window={min_window}, min_batch={min_batch}: must be >= 1")
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue}: must be >= 1")
        if max_stop_ids < 1:
            raise ValueError(f"max_stop_ids={max_stop_ids}: must be >= 1")
        if not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk!r}: must be a positive integer")
        if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
            raise ValueError(f"eos_id={eos_id}: must be in [0, vocab_size={cfg.vocab_size})")
        max_len = max_len or min(cfg.max_position_embeddings, 4096)
        if not 2 <= max_len <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={max_len}: must be in [2, max_position_embeddings="
                f"{cfg.max_position_embeddings}]"
            )
        has_mtp = cfg.num_mtp_layers > 0 and "mtp_0" in variables.get("params", {})
        if speculative and not has_mtp:
            raise ValueError("speculative=True needs an MTP module (cfg.num_mtp_layers >= 1)")
        if page_size is not None and page_size < 1:
            raise ValueError(f"page_size={page_size}: must be >= 1")
        impl = paged.resolve_impl(paged_attention)
        if cfg.is_v4:  # see the module docstring
            if mesh is not None:
                raise ValueError("DeepSeek-V4 in the engine runs on one device: pass mesh=None")
            if paged_attention not in ("auto", "xla"):
                raise ValueError(
                    f"paged_attention={paged_attention!r}: DeepSeek-V4's pages are read through "
                    "the XLA gather path (no paged kernel); use 'auto' or 'xla'"
                )
            page_size = v4_cache.engine_page_size(cfg, page_size)
            impl, prefix_cache = "xla", False
        page_size = page_size or 64
        if cache_tokens is None:
            cache_tokens = slots * -(-max_len // page_size) * page_size
        # On a mesh whose row shards divide the slots (and the pool's pages) each chip keeps
        # its own rows' pages (`Scheduler(shards=)`) and decode steps read them in shard_map.
        n = 1 if mesh is None else mesh.row_shards
        local = n > 1 and slots % n == 0 and cache_tokens // page_size >= n
        self._shards: tuple[str, ...] = ()
        if local:
            assert mesh is not None
            self._shards = mesh.row_axes
        elif mesh is not None and impl != "xla":
            if paged_attention != "auto":
                raise ValueError(
                    f"paged_attention={paged_attention!r} on a mesh needs slots (and cache "
                    f"pages) a multiple of its {n} row shards (pages local to their rows' "
                    f"chips); got slots={slots}"
                )
            impl = "xla"
        self.paged_attention = impl
        self.cfg, self.slots, self.max_len, self.max_queue = cfg, slots, max_len, max_queue
        self.eos_id, self.seed = eos_id, seed
        self._mesh = mesh  # decode on a mesh: weights placed by its layout, programs under it
        self._variables = variables if mesh is None else mesh.place(cfg, variables)
        self._can_speculate = has_mtp
        self._spec_default = has_mtp if speculative is None else bool(speculative)
        self._stop_width = max_stop_ids
        self.prefill_chunk = int(prefill_chunk)
        self._sched = Scheduler(
            slots=slots,
            max_len=max_len,
            prefill_chunk=self.prefill_chunk,
            min_batch=min_batch,
            min_window=min_window,
            page_size=page_size,
            cache_tokens=cache_tokens,
            prefix_cache=prefix_cache,
            shards=n if local else 1,
        )
        self.page_size = page_size
        self._state = self._new_state()
        # Cache bytes per position: the page pools' (TRASH pages included) over their positions.
        held = self._sched.pool_pages * page_size
        self._bytes_per_token = programs.pool_bytes(cfg, self._state) // held

        self._cv = threading.Condition()
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counters: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ lifecycle
    def _new_state(self) -> decode.DecodeState:
        """An all-done state of `slots` rows with zero page pools (DeepSeek-V4: and zero
        per-slot windows and buffers; shapes traced once)."""
        req = decode.row_requests([], [], None, self._stop_width, pad_to=self.slots)

        def empty(variables, req):
            tokens = jnp.zeros((self.slots, 1), jnp.int32)
            state, _ = decode.prefill(
                self.cfg,
                variables,
                tokens,
                jnp.ones((self.slots,), jnp.int32),
                req,
                cache_len=self.page_size,  # one page per slot, then one pool of pages
                speculative=self._can_speculate,
            )
            return programs.pool_state(self.cfg, state, self._sched.pool_pages)

        shapes = jax.eval_shape(empty, self._variables, req)
        state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        state = state.replace(done_B=jnp.ones((self.slots,), bool))
        if self._mesh is not None:  # slot rows (and pool pages) split as requests are split
            state = self._mesh.place_rows(state, decode.state_axes(state)[0])
        return state

    def _context(self):
        """The mesh and its layout's rules while the engine traces and runs its programs."""
        return contextlib.nullcontext() if self._mesh is None else self._mesh.context()

    def start(self) -> Engine:
        """Starts the background thread (idempotent); returns self."""
        with self._cv:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="dsjax-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread; pending and active requests get a "cancelled" event."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in list(self._requests.values()):
            self._finish(req, "cancelled")

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def warmup(
        self,
        prompt_lengths: Sequence[int] = (1,),
        *,
        logprobs: bool = False,
        speculative: bool | None = None,
        all_windows: bool = False,
    ) -> None:
        """Compiles, before service, every program the engine can run for these prompts.

        The prefill (admit) program for the bucket of each of `prompt_lengths` (longer than
        `prefill_chunk`: the chunk programs it runs and the program that starts its decoding),
        and the decode step for EVERY row bucket (staggered requests move the step from
        R=min_batch up to `slots` rows) at the attention window(s) each prompt length starts in
        (`all_windows`: every window up to `max_len`), in plain and, when the checkpoint has an
        MTP module, speculative form (`speculative` True/False: only that form), with log-probs
        too when `logprobs`. Runs on a scratch all-done state writing only the TRASH page (one
        extra state in memory meanwhile), so it is safe while the engine serves; the compiled
        programs are the ones service calls. Prompts with a cached prefix run chunk programs
        that may still compile on first use.
        """
        for n in prompt_lengths:
            if not 1 <= n < self.max_len:
                raise ValueError(f"prompt_lengths: {n} must be in [1, max_len={self.max_len})")
        with self._context():
            self._warmup(prompt_lengths, logprobs, speculative, all_windows)

    def _warmup(self, prompt_lengths, logprobs, speculative, all_windows) -> None:
        top_ns = (None, MAX_LOGPROBS) if logprobs else (None,)
        if speculative is None:
            forms = (False, True) if self._can_speculate else (False,)
        elif speculative and not self._can_speculate:
            raise ValueError("speculative=True needs an MTP module (cfg.num_mtp_layers >= 1)")
        else:
            forms = (bool(speculative),)
        sched = self._sched
        trash = np.zeros((sched.slots, sched.max_pages), np.int32)  # every page TRASH
        short = [n for n in prompt_lengths if n <= self.prefill_chunk]
        buckets = sorted({min(decode.bucket_length(n), self.max_len) for n in short})
        state = self._new_state()
        req = decode.row_requests([SamplingParams(max_tokens=1)], [0], None, self._stop_width)
        chunks = {  # (start > 0, length, window) -> one (start, prompt length) that runs it
            (start > 0, T, window): (start, n)
            for n in prompt_lengths
            if n > self.prefill_chunk
            for start, T, window in sched.chunk_plan(n)
        }
        for (_, T, window), (start, n) in chunks.items():
            state, logits, hidden = self._run_chunk(
                state, [0] * n, 0, start, T, window, trash, start + T
            )
        if chunks:
            for top_n in top_ns:
                state, _ = self._run_start_decoding(state, [0], req, 0, logits, hidden, top_n)
        for P in buckets:
            for top_n in top_ns:
                state, _ = programs.admit(
                    self.cfg,
                    self._variables,
                    state,
                    np.zeros((1, P), np.int32),
                    np.ones((1,), np.int32),
                    req,
                    np.int32(0),
                    self._columns(trash, slice(0, 1), P),
                    None,  # no mask: passed as the service passes it (one compiled program)
                    speculative=self._can_speculate,
                    top_n=top_n,
                )
        if all_windows:
            windows = list(sched.windows)
        else:  # the window a step uses first after admitting a prompt of length n (cf. _step)
            windows = sorted(
                {
                    next((w for w in sched.windows if w > n + spec), self.max_len)
                    for n in prompt_lengths
                    for spec in forms
                }
            )
        state = state.replace(done_B=jnp.ones_like(state.done_B))
        for rows in sched.row_buckets:
            live = np.zeros(rows, bool)
            for window in windows:
                for spec in forms:
                    for top_n in top_ns:
                        state, out = programs.step(
                            self.cfg,
                            self._variables,
                            state,
                            self._columns(trash, slice(0, rows), window),
                            live,
                            None,
                            speculative=spec,
                            top_n=top_n,
                            rows=rows,
                            impl=self.paged_attention,
                            shards=self._shards,
                        )
        jax.block_until_ready(state)

    def _local_tables(self, tables: np.ndarray) -> np.ndarray:
        """The decode step's page tables: the scheduler's (global ids) as they are, or with
        shards each row's ids local to its chip's pool (its TRASH local page 0)."""
        if not self._shards:
            return tables.copy()
        sched = self._sched
        per_rows, per_pages = sched.slots // sched.shards, sched.pool_pages // sched.shards
        base = (np.arange(tables.shape[0]) // per_rows * per_pages)[:, None]
        return np.where(tables == TRASH, TRASH, tables - base).astype(np.int32)

    def _columns(self, tables: np.ndarray, rows: slice, positions: int) -> np.ndarray:
        """The page-table columns of `rows` a program over positions 0..positions-1 reads
        (a copy)."""
        return tables[rows, : self._pages(positions)].copy()

    def _pages(self, positions: int) -> int:
        """Page-table columns a program over positions 0..positions-1 reads."""
        return min(-(-positions // self.page_size), self._sched.max_pages)

    # ------------------------------------------------------------------ client API
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        callback: Callable[[TokenEvent], None] | None = None,
        *,
        row: int = 0,
        constraint: TokenConstraint | None = None,
    ) -> int:
        """Queues a request; returns its id. Events go to `callback` on the engine thread.

        `row` is the row index folded into the key of a seeded request (`generate(rng=seed)`
        gives prompt i row i), e.g. choice i of an `n` > 1 request; unseeded requests use the
        engine seed with row = request id. `constraint`: the request's tokens are drawn from
        its allowed sets (see the module docstring; one constraint object per request).

        Raises:
          ValueError: empty prompt, token ids out of range, bad params, prompt length +
            max_tokens beyond max_len, or more cache pages than the whole pool.
          QueueFull: max_queue requests are already waiting.
          RuntimeError: the engine is not running.
        """
        prompt = [int(t) for t in prompt]
        params.validate(self.cfg.vocab_size)
        if params.speculative and not self._can_speculate:
            raise ValueError("speculative=True: this checkpoint has no MTP module to draft with")
        n_stops = len(set(params.stop_token_ids) | {self.eos_id} - {None})
        if n_stops > self._stop_width:
            raise ValueError(
                f"stop_token_ids: {n_stops} stop ids (eos included) exceed max_stop_ids="
                f"{self._stop_width}"
            )
        if not isinstance(row, int) or row < 0:
            raise ValueError(f"row={row!r}: must be an integer >= 0")
        if not prompt:
            raise ValueError("prompt is empty: generation needs at least one token")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise ValueError(f"prompt has token ids outside [0, vocab_size={self.cfg.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt length {len(prompt)} + max_tokens {params.max_tokens} = "
                f"{len(prompt) + params.max_tokens} exceeds the context length {self.max_len}"
            )
        self._sched.check_fits(len(prompt), params.max_tokens)
        with self._cv:
            rid = self._next_id
            self._next_id += 1
        req = _Request(
            id=rid,
            prompt=prompt,
            max_tokens=params.max_tokens,
            params=params,
            callback=callback or (lambda ev: None),
            row=row if params.seed is not None else rid,
            constraint=constraint,
        )
        with self._cv:
            if self._thread is None or self._stopping:
                raise RuntimeError("the engine is not running; call start()")
            if len(self._sched.queue) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._sched.queue)} requests are waiting (max_queue={self.max_queue})"
                )
            self._requests[rid] = req
            self._sched.queue.append(req)
            self._counters["submitted"] += 1
            self._cv.notify_all()
        return rid

    def cancel(self, request_id: int) -> None:
        """Cancels a queued or running request (its slot is freed before the next step)."""
        with self._cv:
            req = self._requests.get(request_id)
            if req is None or req.finished:
                return
            req.cancelled = True
            queued = req.slot is None and req in self._sched.queue
            self._cv.notify_all()
        if queued:
            self._finish(req, "cancelled")

    def stats(self) -> dict[str, Any]:
        """Slots, free slots, active and queued requests, cache pages, running totals and
        speculation.

        Totals: submitted, prefills (prompts in the cache, first token sampled), prefill_chunks
        (chunks of incrementally prefilled prompts run), steps, step_us, tokens
        (= generated_tokens), forwards (row decode forwards), draft_tokens, accepted_tokens,
        finished_<reason>, prompt_tokens (admitted), prefix_cache_hit_tokens (of them found in
        the prefix cache), cache_pages_evicted; derived: acceptance_rate (accepted / drafted) and
        tokens_per_forward (decoded tokens per row forward). `active` counts slots holding a
        request, `prefilling` those of them whose prompt is still being prefilled chunk by
        chunk. Pool: page_size, cache_pages (in the pool), cache_pages_used (referenced by a
        request), cache_pages_cached (unreferenced, kept for the prefix cache),
        cache_pages_free, cache_usage (used / pages), cache_bytes_per_token (paged cache bytes
        of one position, all layers and MTP; DeepSeek-V4: its compressed entries and indexer
        keys, the per-slot windows and buffers being fixed); preemptions (requests sent back
        to the queue to free pages, since start).
        """
        with self._cv:
            sched = self._sched
            active = self.slots - sched.free_slots()
            c = self._counters
            decoded = c["generated_tokens"] - c["prefills"]
            pages = sched.page_stats()
            return {
                **dict.fromkeys(_TOTALS, 0),  # present (0) before the first request
                "acceptance_rate": c["accepted_tokens"] / c["draft_tokens"]
                if c["draft_tokens"]
                else 0.0,
                "tokens_per_forward": decoded / c["forwards"] if c["forwards"] else 0.0,
                "slots": self.slots,
                "active": active,
                "prefilling": len(sched.prefilling),
                "free_slots": self.slots - active,
                "queued": len(sched.queue),
                "max_queue": self.max_queue,
                "max_len": self.max_len,
                **pages,
                "cache_usage": pages["cache_pages_used"] / pages["cache_pages"],
                "cache_bytes_per_token": self._bytes_per_token,
                **{k: int(v) for k, v in self._counters.items()},
            }

    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        timeout: float | None = None,
    ) -> tuple[list[int], str]:
        """Blocking: returns (generated tokens, finish_reason)."""
        done = threading.Event()
        tokens: list[int] = []
        result: dict[str, TokenEvent] = {}

        def on_event(ev: TokenEvent) -> None:
            tokens.extend(ev.tokens)
            if ev.finish_reason is not None:
                result["last"] = ev
                done.set()

        rid = self.submit(prompt, params, on_event)
        if not done.wait(timeout):
            self.cancel(rid)
            raise TimeoutError(f"request {rid} did not finish in {timeout} s")
        last = result["last"]
        if last.finish_reason == "error":
            raise RuntimeError(f"request {rid} failed: {last.error}")
        assert last.finish_reason is not None
        return tokens, last.finish_reason

    async def stream(
        self, prompt: Sequence[int], params: SamplingParams = SamplingParams()
    ) -> AsyncIterator[TokenEvent]:
        """Async iterator over a request's events; cancels it if the consumer stops early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def push(ev: TokenEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        rid = self.submit(prompt, params, push)
        finished = False
        try:
            while not finished:
                ev = await queue.get()
                finished = ev.finish_reason is not None
                yield ev
        finally:
            if not finished:
                self.cancel(rid)

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, req: _Request, ev: TokenEvent) -> None:
        try:
            req.callback(ev)
        except Exception as err:  # a broken consumer must not stop the engine
            log.exception("callback of request %d failed; ending it with an error", req.id)
            req.failed = req.failed or f"callback failed: {type(err).__name__}: {err}"

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        """Frees the request's slot and pages and sends its last event (once)."""
        with self._cv:
            if req.finished:
                return
            req.finished = True
            self._requests.pop(req.id, None)
            self._sched.finish(req)
            self._counters[f"finished_{reason}"] += 1
        self._deliver(req, TokenEvent(req.id, (), reason, error))

    def _fail_all(self, err: Exception) -> None:
        self._state = self._new_state()
        for req in [r for r in self._sched.slot_seq if r is not None]:
            assert isinstance(req, _Request)
            self._finish(req, "error", f"{type(err).__name__}: {err}")
        with self._cv:
            for pool in self._sched.pools:
                pool.drop_cached()  # the new state's pages hold nothing

    def _run(self) -> None:
        with self._context():
            while not self._stopping:
                try:
                    self._iteration()
                except Exception as err:  # never let the engine thread die
                    log.exception("engine iteration failed; failing the active requests")
                    self._fail_all(err)

    def _slot_requests(self) -> list[_Request]:
        return [r for r in self._sched.slot_seq if isinstance(r, _Request)]

    def _iteration(self) -> None:
        """Ends cancelled / failed requests, admits queued requests, runs one prefill chunk of
        the oldest incrementally prefilled prompt and one decode step."""
        with self._cv:
            while not (self._stopping or self._sched.queue or self._slot_requests()):
                self._cv.wait()
            if self._stopping:
                return
            ending = [r for r in self._slot_requests() if r.cancelled or r.failed]
        for req in ending:
            self._end_early(req)
        while True:
            with self._cv:
                if self._stopping:
                    break
                admitted = self._sched.admit_next()
            if admitted is None:
                break
            assert isinstance(admitted, _Request)
            if admitted.chunk is None:
                self._admit(admitted)
        if self._sched.prefilling:
            head = self._sched.prefilling[0]
            assert isinstance(head, _Request)
            self._prefill_chunk(head)
        if self._sched.decoding():
            self._step()

    def _end_early(self, req: _Request) -> None:
        if req.failed:
            self._finish(req, "error", req.failed)
        else:
            self._finish(req, "cancelled")

    def _row_request(self, req: _Request) -> decode.RowRequest:
        rr = decode.row_requests(
            [req.params],
            [req.row],
            self.eos_id,
            self._stop_width,
            default_seed=self.seed,
            speculative_default=self._spec_default,
        )
        rr.start_B[0] = req.generated  # resumed after a preemption: continue its output
        return rr

    def _table(self, slot: int, positions: int) -> np.ndarray:
        """Row `slot`'s page table over positions 0..positions-1, as a [1, K] batch."""
        return self._columns(self._sched.tables, slice(slot, slot + 1), positions)

    def _admit(self, req: _Request) -> None:
        """Prefills `req` into its slot and pages and emits its first token."""
        assert req.slot is not None
        try:
            context = req.context
            n = len(context)
            P = min(decode.bucket_length(n), self.max_len)
            tokens = np.zeros((1, P), np.int32)
            tokens[0, :n] = context
            self._state, first = programs.admit(
                self.cfg,
                self._variables,
                self._state,
                tokens,
                np.array([n], np.int32),
                self._row_request(req),
                np.int32(req.slot),
                self._table(req.slot, P),
                _rows(req.allowed()),
                speculative=self._can_speculate,
                top_n=None if req.params.logprobs is None else MAX_LOGPROBS,
            )
            first = jax.device_get(first)
        except Exception as err:
            log.exception("prefill of request %d failed", req.id)
            self._finish(req, "error", f"{type(err).__name__}: {err}")
            if any(x.is_deleted() for x in jax.tree.leaves(self._state)):  # donated, then failed
                raise
            return
        with self._cv:
            self._sched.prompt_done(req)
        self._counters["prefills"] += 1
        self._emit(req, first, 0)

    def _chunk_plan(self, n: int, start: int = 0) -> list[tuple[int, int, int]]:
        """(start, length, window) of each prefill chunk (`Scheduler.chunk_plan`)."""
        return self._sched.chunk_plan(n, start)

    def _run_chunk(self, state, prompt, slot, start, T, window, tables=None, end=None):
        """Runs `programs.prompt_chunk` for prompt[start:end] (zero-padded to T tokens; `end`:
        where the next chunk starts, default the prompt's end) into row `slot` (page tables:
        the scheduler's, or `tables`); returns (state, logits_1V, hidden_1D) at the prompt's
        last token (or the chunk's last entry). The padding is no token of the prompt (the
        next chunk's tokens are its own): DeepSeek-V4's window ring must not hold positions
        the next chunk rewrites."""
        n = len(prompt)
        end = n if end is None else min(end, n)
        tokens = np.zeros((2, T), np.int32)  # the chunk's tokens and their MTP next tokens
        nxt = decode.prompt_next_tokens(np.asarray([prompt], np.int32))[0]
        seg = slice(start, min(start + T, end))
        tokens[0, : seg.stop - start], tokens[1, : seg.stop - start] = prompt[seg], nxt[seg]
        table = self._columns(
            self._sched.tables if tables is None else tables, slice(slot, slot + 1), window
        )
        return programs.prompt_chunk(
            self.cfg,
            self._variables,
            state,
            tokens[:1],
            tokens[1:],
            np.int32(start),
            np.array([end], np.int32),
            np.int32(min(n - 1 - start, T - 1)),
            np.int32(slot),
            table,
            speculative=self._can_speculate,
            first=start == 0,
            # One row over global page ids: the gather path (GSPMD) on a mesh.
            impl=self.paged_attention if self._mesh is None else "xla",
        )

    def _run_start_decoding(self, state, prompt, req, slot, logits, hidden, top_n, allowed=None):
        return programs.start_decoding(
            state,
            logits,
            hidden,
            np.array(prompt[-1:], np.int32),
            np.array([len(prompt)], np.int32),
            req,
            np.int32(slot),
            _rows(allowed),
            speculative=self._can_speculate,
            top_n=top_n,
        )

    def _prefill_chunk(self, req: _Request) -> None:
        """Runs the next prefill chunk of `req`; after the last, samples and emits its first
        token (the slot then decodes from the next step on)."""
        assert req.chunk is not None
        start, T, window = req.plan[req.chunk]
        last = req.chunk == len(req.plan) - 1
        context = req.context
        end = len(context) if last else req.plan[req.chunk + 1][0]
        try:
            self._state, logits, hidden = self._run_chunk(
                self._state, context, req.slot, start, T, window, end=end
            )
            if last:
                top_n = None if req.params.logprobs is None else MAX_LOGPROBS
                self._state, first = self._run_start_decoding(
                    self._state, context, self._row_request(req), req.slot, logits, hidden,
                    top_n, req.allowed(),
                )  # fmt: skip
                first = jax.device_get(first)
        except Exception as err:
            log.exception("prefill chunk %d of request %d failed", req.chunk, req.id)
            self._finish(req, "error", f"{type(err).__name__}: {err}")
            if any(x.is_deleted() for x in jax.tree.leaves(self._state)):  # donated, then failed
                raise
            return
        self._counters["prefill_chunks"] += 1
        if not last:
            req.chunk += 1
            return
        with self._cv:
            self._sched.prompt_done(req)
        self._counters["prefills"] += 1
        self._emit(req, first, 0)

    def _emit(self, req: _Request, out, i: int) -> None:
        """Delivers row i of a StepOutput (host arrays) to `req`; finishes it if it ended."""
        n = int(out.n_B[i])
        if n == 0:
            return
        tokens = tuple(int(t) for t in out.tokens_B2[i, :n])
        req.output.extend(tokens)
        self._counters["generated_tokens"] += n
        self._counters["tokens"] += n
        if req.cancelled or req.failed:
            self._end_early(req)
            return
        logprobs = top = None
        k = req.params.logprobs
        if k is not None:
            logprobs = tuple(float(x) for x in out.logprobs_B2[i, :n])
            top = tuple(
                tuple(
                    (int(t), float(x))
                    for t, x in zip(
                        out.top_ids_B2N[i, j, :k], out.top_logprobs_B2N[i, j, :k], strict=True
                    )
                )
                for j in range(n)
            )
        self._deliver(req, TokenEvent(req.id, tokens, None, None, logprobs, top))
        finished = False
        if req.constraint is not None and not req.failed:
            try:
                req.constraint.advance(tokens)
                finished = req.constraint.finished
            except Exception as err:  # a constraint that fails ends only its request
                log.exception("the constraint of request %d failed", req.id)
                req.failed = f"constraint failed: {type(err).__name__}: {err}"
        if req.failed:
            self._end_early(req)
        elif out.stopped_B[i] or finished:  # a stop at exactly max_tokens is still a stop
            self._finish(req, "stop")
        elif out.done_B[i]:
            self._finish(req, "length")

    def _step(self) -> None:
        """One decode step for all decoding slots (slots being prefilled are held done)."""
        decoding = self._sched.decoding()
        speculative = any(
            self._spec_default if r.params.speculative is None else r.params.speculative
            for _, r in decoding
            if isinstance(r, _Request)
        )
        with self._cv:
            plan = self._sched.step_plan(speculative)
        assert plan is not None
        if plan.preempted:
            log.info("preempted %d requests: the cache pool is full", len(plan.preempted))
        if not plan.active:
            return
        active = [(i, r) for i, r in plan.active if isinstance(r, _Request)]
        rows = plan.rows
        live = np.zeros(rows, bool)
        live[[i for i, _ in active]] = True
        allowed = self._step_masks(active, rows, live)
        want = any(r.params.logprobs is not None for _, r in active)
        table = self._local_tables(self._sched.tables[:rows, : self._pages(plan.window)])
        t0 = time.perf_counter()
        try:
            self._state, out = programs.step(
                self.cfg,
                self._variables,
                self._state,
                table,
                live,
                allowed,
                speculative=speculative,
                top_n=MAX_LOGPROBS if want else None,
                rows=rows,
                impl=self.paged_attention,
                shards=self._shards,
            )
            out = jax.device_get(out)
        except Exception as err:
            log.exception("decode step failed; failing %d active requests", len(active))
            self._fail_all(err)
            return
        self._counters["steps"] += 1
        self._counters["step_us"] += int(1e6 * (time.perf_counter() - t0))
        self._counters["forwards"] += len(active)
        if out.drafted_B is not None:
            self._counters["draft_tokens"] += int(out.drafted_B.sum())
            self._counters["accepted_tokens"] += int(out.accepted_B.sum())
        for i, req in active:
            if live[i]:
                self._emit(req, out, i)

    def _step_masks(self, active, rows: int, live: np.ndarray) -> np.ndarray | None:
        """Packed allowed-token masks of the step's `rows` rows (all-ones where unconstrained),
        or None when no active request is constrained. A request whose constraint fails is
        marked failed and held out of the step (`live` False)."""
        if not any(r.constraint is not None for _, r in active):
            return None
        masks = np.full((rows, -(-self.cfg.vocab_size // 32)), 0xFFFFFFFF, np.uint32)
        for i, req in active:
            try:
                mask = req.allowed()
            except Exception as err:
                log.exception("the constraint of request %d failed", req.id)
                req.failed = f"constraint failed: {type(err).__name__}: {err}"
                live[i] = False
                continue
            if mask is not None:
                masks[i] = mask
        return masks
