"""Continuous-batching generation engine (used by serve.py).

A fixed number of slots share one static-shape latent cache (batch = slots, S = `max_len`
positions). A background thread loops:

1. frees the slots of finished or cancelled requests;
2. admits queued requests into free slots: each prompt is prefilled alone into a fresh
   [1, P] cache (P = its bucketed length), its first token is sampled, and the row is copied
   into the slot's row of every cache leaf (scanned stacks are [L, B, S, ...], so the batch axis
   is found per leaf, not assumed);
3. runs one decode step that advances every active slot by one token, each slot with its own
   position, sampling parameters and PRNG key (token i of a request is drawn with
   fold_in(request_key, i), so its samples do not depend on its neighbours). The step runs
   over the first R slots and the first W positions only (R, W bucketed powers of two that
   cover every active slot and position), so light load and short requests do not pay for
   many slots and a long max_len. New requests take the lowest free slot.

Rows never interact (attention is per row, MoE is dropless and per token), so a request's
greedy output is the same whatever else is in the batch. Stale cache contents of a previous
occupant are harmless: slot s is visible to a query at position p only if s <= p, and every
slot up to p has been rewritten by the current request by then.

Results are delivered per token through a callback (called on the engine thread; keep it cheap,
e.g. `loop.call_soon_threadsafe(queue.put_nowait, event)`); `stream()` wraps that as an async
iterator and `generate()` as a blocking call. `submit` raises `QueueFull` when `max_queue`
requests are waiting. No exception escapes the engine thread: a failing request gets an event
with finish_reason "error".
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.generate import RowSampling, bucket_length, decode_step, prefill, zeros_cache

__all__ = ["Engine", "QueueFull", "SamplingParams", "TokenEvent"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's request queue is at `max_queue`; retry later."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters.

    Attributes:
      max_tokens: tokens to generate at most (>= 1).
      temperature: 0 = greedy.
      top_k: keep the k most likely tokens (0 = all).
      top_p: nucleus mass (1 = off).
      seed: PRNG seed of this request (None: derived from the engine seed and request id).
      stop_token_ids: tokens that end the request (in addition to the engine's eos_id).
      ignore_eos: do not stop on the engine's eos_id.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raises ValueError naming the bad field."""
        if (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or (self.max_tokens < 1)
        ):
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be a positive integer")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0")


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request; `finish_reason` is set on the request's last event.

    finish_reason: None (more to come), "stop" (eos / stop token), "length" (max_tokens),
    "cancelled" or "error" (then `error` holds the message).
    """

    request_id: int
    tokens: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass
class _Request:
    """A request and its progress (always truthy: slots hold a _Request or None)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    callback: Callable[[TokenEvent], None]
    key_data: np.ndarray
    generated: int = 0
    cancelled: bool = False
    finished: bool = False
    slot: int | None = None


# ====================================================================== jitted pieces
@functools.partial(
    jax.jit, static_argnames=("cfg", "axes", "rows", "window"), donate_argnames=("cache",)
)
def _decode_all(
    cfg: ModelConfig,
    variables,
    cache,
    tokens_B,
    positions_B,
    counts_B,
    temperature_B,
    top_k_B,
    top_p_B,
    key_data_B,
    *,
    axes,
    rows: int,
    window: int,
):
    """One token for slots 0..rows-1: writes tokens_B at positions_B, samples token counts_B.

    Only the first `rows` slots (every active one is among them) and the first `window` cache
    positions (every position is below it) take part, so a step costs O(rows * window), not
    O(slots * max_len). `axes` are the cache leaves' batch axes (the position axis follows).
    """
    sampling = RowSampling(temperature_B, top_k_B, top_p_B, jax.random.wrap_key_data(key_data_B))
    flat, tree = jax.tree.flatten(cache)

    def view(x, a):
        return jax.lax.slice_in_dim(jax.lax.slice_in_dim(x, 0, rows, axis=a), 0, window, axis=a + 1)

    sub = jax.tree.unflatten(tree, [view(x, a) for x, a in zip(flat, axes, strict=True)])
    logits, _, sub = decode_step(cfg, variables, sub, tokens_B[:, None], positions_B[:, None])
    zeros = lambda x: [jnp.int32(0)] * x.ndim
    flat = [
        jax.lax.dynamic_update_slice(x, v, zeros(x))
        for x, v in zip(flat, jax.tree.leaves(sub), strict=True)
    ]
    return sampling.sample(logits[:, 0], counts_B), jax.tree.unflatten(tree, flat)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill_one(
    cfg: ModelConfig, variables, tokens_1P, length_1, temperature_1, top_k_1, top_p_1, key_data_1
):
    """Prefills one prompt into a fresh [1, P] cache and samples its first token."""
    sampling = RowSampling(temperature_1, top_k_1, top_p_1, jax.random.wrap_key_data(key_data_1))
    logits, _, cache = prefill(cfg, variables, tokens_1P, length_1, tokens_1P.shape[1])
    return sampling.sample(logits, jnp.zeros((1,), jnp.int32)), cache


def _insert_row(cache, row_cache, slot, *, axes):
    """Copies a [.., 1, P, ..] row cache into row `slot` (slots 0..P-1) of every leaf."""

    def put(leaf, row, axis):
        start = [jnp.int32(0)] * leaf.ndim
        start[axis] = slot
        return jax.lax.dynamic_update_slice(leaf, row.astype(leaf.dtype), start)

    return jax.tree.map(put, cache, row_cache, axes)


def cache_batch_axes(cfg: ModelConfig):
    """Pytree (like the main cache) of each leaf's batch axis, found from shapes alone.

    The slot (sequence) axis is the next one: leaves are [L, B, S, ...] or [B, S, ...].
    """
    one = jax.eval_shape(lambda: zeros_cache(cfg, 1, 8, mtp=False))
    two = jax.eval_shape(lambda: zeros_cache(cfg, 2, 8, mtp=False))
    longer = jax.eval_shape(lambda: zeros_cache(cfg, 1, 16, mtp=False))

    def differ(a, b):
        return [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]

    def axis(a, b, c):
        batch, seq = differ(a, b), differ(a, c)
        if len(batch) != 1 or seq != [batch[0] + 1]:
            raise ValueError(f"cache leaf shape {a.shape}: expected [..., B, S, ...]")
        return batch[0]

    return jax.tree.map(axis, one, two, longer)


# ====================================================================== engine
class Engine:
    """Continuous batching over `slots` rows of one latent cache; see the module docstring.

    Args:
      cfg: model config.
      variables: {"params", "moe_bias"}.
      slots: rows decoded together.
      max_len: positions per slot (prompt + generated); default min(max_position_embeddings,
        4096).
      max_queue: waiting requests at most (submit raises QueueFull beyond).
      eos_id: token that ends a request (unless SamplingParams.ignore_eos).
      seed: engine PRNG seed for requests without their own seed.
      min_batch, min_window: a step runs over the first R slots and attends over the first W
        positions, R (W) the smallest of min_batch (min_window) * 2^k or slots (max_len) that
        covers every active slot (position): light load and short requests do not pay for
        `slots` and `max_len`. One compilation per (R, W) used.
    """

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
    ):
        if slots < 1:
            raise ValueError(f"slots={slots}: must be >= 1")
        if min_window < 1 or min_batch < 1:
            raise ValueError(f"min_window={min_window}, min_batch={min_batch}: must be >= 1")
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue}: must be >= 1")
        max_len = max_len or min(cfg.max_position_embeddings, 4096)
        if not 2 <= max_len <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={max_len}: must be in [2, max_position_embeddings="
                f"{cfg.max_position_embeddings}]"
            )
        self.cfg, self.slots, self.max_len, self.max_queue = cfg, slots, max_len, max_queue
        self.eos_id = eos_id
        self._variables = variables
        self._key = jax.random.key(seed)
        self._axes = cache_batch_axes(cfg)
        self._flat_axes = tuple(jax.tree.leaves(self._axes))
        # Step shapes: rows (slots) and attention windows (positions), powers of two from
        # min_batch / min_window, then the full size.
        self._row_buckets = [*(b for b in (min_batch << i for i in range(32)) if b < slots), slots]
        self._windows = [*(w for w in (min_window << i for i in range(32)) if w < max_len), max_len]
        self._insert = jax.jit(functools.partial(_insert_row, axes=self._axes), donate_argnums=0)
        self._cache = self._new_cache()
        # Host-side per-slot state (what the next decode step feeds in).
        self._tokens = np.zeros(slots, np.int32)
        self._positions = np.zeros(slots, np.int32)
        self._counts = np.zeros(slots, np.int32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._key_data = np.zeros((slots, *jax.random.key_data(self._key).shape), np.uint32)
        self._slot_req: list[_Request | None] = [None] * slots

        self._cv = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counters = collections.Counter()

    # ------------------------------------------------------------------ lifecycle
    def _new_cache(self):
        return zeros_cache(self.cfg, self.slots, self.max_len, mtp=False)

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
        self._queue.clear()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def warmup(self, prompt_lengths: Sequence[int] = (1,)) -> None:
        """Compiles the decode step and the prefill for the buckets of `prompt_lengths`."""
        for n in prompt_lengths:
            self.generate([0] * n, SamplingParams(max_tokens=2, ignore_eos=True))

    # ------------------------------------------------------------------ client API
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        callback: Callable[[TokenEvent], None] | None = None,
    ) -> int:
        """Queues a request; returns its id. Events go to `callback` on the engine thread.

        Raises:
          ValueError: empty prompt, token ids out of range, bad params, or prompt length +
            max_tokens beyond max_len.
          QueueFull: max_queue requests are already waiting.
          RuntimeError: the engine is not running.
        """
        prompt = [int(t) for t in prompt]
        params.validate()
        if not prompt:
            raise ValueError("prompt is empty: generation needs at least one token")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise ValueError(f"prompt has token ids outside [0, vocab_size={self.cfg.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt length {len(prompt)} + max_tokens {params.max_tokens} = "
                f"{len(prompt) + params.max_tokens} exceeds the context length {self.max_len}"
            )
        with self._cv:
            rid = self._next_id
            self._next_id += 1
        key = (
            jax.random.key(params.seed)
            if params.seed is not None
            else jax.random.fold_in(self._key, rid)
        )
        req = _Request(
            rid, prompt, params, callback or (lambda ev: None), np.asarray(jax.random.key_data(key))
        )
        with self._cv:
            if self._thread is None or self._stopping:
                raise RuntimeError("the engine is not running; call start()")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._queue)} requests are waiting (max_queue={self.max_queue})"
                )
            self._requests[rid] = req
            self._queue.append(req)
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
            if req.slot is None and req in self._queue:
                self._queue.remove(req)
                queued = True
            else:
                queued = False
            self._cv.notify_all()
        if queued:
            self._finish(req, "cancelled")

    def stats(self) -> dict[str, Any]:
        """Slots, free slots, active and queued requests, and running totals."""
        with self._cv:
            active = sum(r is not None for r in self._slot_req)
            return {
                "slots": self.slots,
                "active": active,
                "free_slots": self.slots - active,
                "queued": len(self._queue),
                "max_queue": self.max_queue,
                "max_len": self.max_len,
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
        return tokens, last.finish_reason

    async def stream(
        self, prompt: Sequence[int], params: SamplingParams = SamplingParams()
    ) -> AsyncIterator[TokenEvent]:
        """Async iterator over a request's events; cancels it if the consumer stops early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        rid = self.submit(
            prompt, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        )
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
    def _deliver(
        self, req: _Request, tokens: tuple[int, ...], finish: str | None, error: str | None = None
    ) -> None:
        try:
            req.callback(TokenEvent(req.id, tokens, finish, error))
        except Exception:  # a broken consumer must not stop the engine
            log.exception("callback of request %d failed; cancelling it", req.id)
            req.cancelled = True

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        """Frees the request's slot and sends its last event (once)."""
        with self._cv:
            if req.finished:
                return
            req.finished = True
            self._requests.pop(req.id, None)
            if req.slot is not None:
                self._slot_req[req.slot] = None
                self._reset_slot(req.slot)
            self._counters[f"finished_{reason}"] += 1
        self._deliver(req, (), reason, error)

    def _reset_slot(self, slot: int) -> None:
        self._tokens[slot] = self._positions[slot] = self._counts[slot] = 0
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = 0.0, 0, 1.0

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._iteration()
            except Exception as err:  # never let the engine thread die
                log.exception("engine iteration failed; failing the active requests")
                self._cache = self._new_cache()
                for req in [r for r in self._slot_req if r is not None]:
                    self._finish(req, "error", f"{type(err).__name__}: {err}")

    def _iteration(self) -> None:
        """Frees cancelled slots, admits queued requests, runs one decode step."""
        with self._cv:
            while not (self._stopping or self._queue or any(self._slot_req)):
                self._cv.wait()
            if self._stopping:
                return
            cancelled = [r for r in self._slot_req if r is not None and r.cancelled]
        for req in cancelled:
            self._finish(req, "cancelled")
        while True:
            with self._cv:
                free = [i for i, r in enumerate(self._slot_req) if r is None]
                if not free or not self._queue or self._stopping:
                    break
                req = self._queue.popleft()
                req.slot = free[0]
                self._slot_req[free[0]] = req
            self._admit(req)
        if any(self._slot_req):
            self._step()

    def _admit(self, req: _Request) -> None:
        """Prefills `req` into its slot and emits its first token."""
        slot = req.slot
        try:
            n = len(req.prompt)
            P = min(bucket_length(n), self.max_len)
            tokens = np.zeros((1, P), np.int32)
            tokens[0, :n] = req.prompt
            p = req.params
            first, row_cache = _prefill_one(
                self.cfg,
                self._variables,
                tokens,
                np.array([n], np.int32),
                np.array([p.temperature], np.float32),
                np.array([p.top_k], np.int32),
                np.array([p.top_p], np.float32),
                req.key_data[None],
            )
            self._cache = self._insert(self._cache, row_cache, jnp.int32(slot))
            first = int(np.asarray(first)[0])
        except Exception as err:
            log.exception("prefill of request %d failed", req.id)
            self._finish(req, "error", f"{type(err).__name__}: {err}")
            if any(x.is_deleted() for x in jax.tree.leaves(self._cache)):  # donated, then failed
                raise
            return
        self._tokens[slot], self._positions[slot], self._counts[slot] = first, n, 1
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = (
            p.temperature,
            p.top_k,
            p.top_p,
        )
        self._key_data[slot] = req.key_data
        self._counters["prefills"] += 1
        self._emit(req, first)

    def _emit(self, req: _Request, token: int) -> None:
        """Delivers one new token; finishes the request if it stops here."""
        req.generated += 1
        self._counters["tokens"] += 1
        p = req.params
        stop = token in p.stop_token_ids or (not p.ignore_eos and token == self.eos_id)
        if req.cancelled:
            self._finish(req, "cancelled")
        elif stop or req.generated >= p.max_tokens:
            self._deliver(req, (token,), None)
            self._finish(req, "stop" if stop else "length")
        else:
            self._deliver(req, (token,), None)

    def _step(self) -> None:
        """One decode step for all slots."""
        active = [(i, r) for i, r in enumerate(self._slot_req) if r is not None]
        top = max(int(self._positions[i]) for i, _ in active)
        window = next(w for w in self._windows if w > top)
        rows = next(b for b in self._row_buckets if b > active[-1][0])
        t0 = time.perf_counter()
        try:
            nxt, self._cache = _decode_all(
                self.cfg,
                self._variables,
                self._cache,
                self._tokens[:rows],
                self._positions[:rows],
                self._counts[:rows],
                self._temperature[:rows],
                self._top_k[:rows],
                self._top_p[:rows],
                self._key_data[:rows],
                axes=self._flat_axes,
                rows=rows,
                window=window,
            )
            nxt = np.asarray(nxt)
        except Exception as err:
            log.exception("decode step failed; failing %d active requests", len(active))
            self._cache = self._new_cache()
            for _, req in active:
                self._finish(req, "error", f"{type(err).__name__}: {err}")
            return
        self._counters["steps"] += 1
        self._counters["step_us"] += int(1e6 * (time.perf_counter() - t0))
        for i, req in active:
            self._tokens[i] = nxt[i]
            self._positions[i] += 1
            self._counts[i] += 1
            self._emit(req, int(nxt[i]))
