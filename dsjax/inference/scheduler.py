"""The engine's scheduling policy: queue, slots, prefill chunk plans and cache pages (no JAX).

`Scheduler` decides; `dsjax.inference.engine.Engine` executes its decisions on the device from
its thread. Nothing here touches the device, so the policy is unit-tested without JAX
(tests/scheduler_test.py).

- Admission (`admit_next`): FIFO. The queue head takes the lowest free slot when the page pool
  can reserve the pages it may ever need (prompt + max_tokens, less the cached prefix pages it
  shares, `page_pool.PagePool`); otherwise it waits (and so does everything behind it). On
  admission its prompt pages are allocated and written into its row of the page tables
  (`tables` [slots, max_pages] int32, page ids; unused entries point at `page_pool.TRASH`).
- Prefill: a prompt longer than `prefill_chunk`, or one with a cached prefix, is prefilled chunk
  by chunk (`chunk_plan`) between decode steps; otherwise in one program at admission.
- Decode (`step_plan`): the rows that decode, the row bucket R and attention window W the step
  runs over, after giving each row the page its next write needs (`grow`).
- `prompt_done` registers a prefilled prompt's full pages in the prefix cache; `finish` frees a
  request's slot, pages and unused reservation.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from dsjax.inference.page_pool import TRASH, PagePool, page_keys

__all__ = ["Seq", "StepPlan", "Scheduler", "bucket_length"]


def bucket_length(n: int, minimum: int = 8) -> int:
    """`n` rounded up to a power of two (at least `minimum`) up to 64, then to a multiple of 64
    (the prompt-length buckets programs compile for)."""
    n = max(int(n), minimum)
    if n <= 64:
        return 1 << (n - 1).bit_length()
    return -(-n // 64) * 64


@dataclasses.dataclass(eq=False, kw_only=True)
class Seq:
    """What the scheduler tracks of one request.

    `chunk`: while the prompt is prefilled chunk by chunk, the index of its next chunk in `plan`
    (None otherwise: queued, or decoding). `pages`: the cache pages of its positions, in order
    (the first `cached_tokens // page_size` shared with the prefix cache). `reserved`: pages
    still reserved for it."""

    prompt: list[int]
    max_tokens: int
    generated: int = 0
    slot: int | None = None
    chunk: int | None = None
    plan: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)
    reserved: int = 0
    cached_tokens: int = 0

    @property
    def last_position(self) -> int:
        """Position of the last token (sampled, not yet in the cache)."""
        return len(self.prompt) + self.generated - 1


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One decode step: `active` (slot, seq) pairs decoding, over slots 0..rows-1 and cache
    positions 0..window-1."""

    active: list[tuple[int, Seq]]
    rows: int
    window: int


class Scheduler:
    """See the module docstring. `cache_tokens`: the page pool's size in tokens (rounded down to
    pages); `page_size`: tokens per page; `min_batch`, `min_window`: the smallest row bucket and
    attention window (each doubles up to `slots`, `max_len`)."""

    def __init__(
        self,
        *,
        slots: int,
        max_len: int,
        prefill_chunk: int,
        min_batch: int,
        min_window: int,
        page_size: int,
        cache_tokens: int,
        prefix_cache: bool = True,
    ):
        if page_size < 1:
            raise ValueError(f"page_size={page_size}: must be >= 1")
        if cache_tokens < page_size:
            raise ValueError(
                f"cache_tokens={cache_tokens}: must hold at least one page ({page_size} tokens)"
            )
        self.slots, self.max_len, self.prefill_chunk = slots, max_len, prefill_chunk
        self.page_size = page_size
        self.row_buckets = [*(b for b in (min_batch << i for i in range(32)) if b < slots), slots]
        self.windows = [*(w for w in (min_window << i for i in range(32)) if w < max_len), max_len]
        self.max_pages = -(-max_len // page_size)
        self.pool = PagePool(cache_tokens // page_size, page_size, prefix_cache)
        self.tables = np.full((slots, self.max_pages), TRASH, np.int32)
        self.slot_seq: list[Seq | None] = [None] * slots
        self.queue: collections.deque[Seq] = collections.deque()
        self.prefilling: list[Seq] = []  # prefilled chunk by chunk, in admission order
        self.hit_tokens = 0  # prompt tokens found in the prefix cache, since start
        self.prompt_tokens = 0  # prompt tokens admitted, since start

    # ------------------------------------------------------------------ sizes
    def pages_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Pages a request may ever write: positions 0 .. prompt + max_tokens - 1."""
        return self.pool.pages_for(prompt_len + max_tokens)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raises ValueError when such a request could never get its pages."""
        need = self.pages_needed(prompt_len, max_tokens)
        if need > self.pool.num_pages:
            raise ValueError(
                f"prompt length {prompt_len} + max_tokens {max_tokens} needs {need} cache pages "
                f"of {self.page_size} tokens; the cache holds {self.pool.num_pages} "
                f"({self.pool.num_pages * self.page_size} tokens)"
            )

    def chunk_plan(self, n: int, start: int = 0) -> list[tuple[int, int, int]]:
        """(start, length, window) of each prefill chunk of prompt positions start..n-1: first
        the remainder ((n - start) mod prefill_chunk, or a whole chunk) padded to its bucket (at
        most a chunk, and within max_len), then whole chunks ending exactly at n, each over the
        smallest step window covering it. A chunk starting at 0 runs in prefill mode; later ones
        (and all of them after a cached prefix) with the absorbed forward over the cache."""
        c = self.prefill_chunk
        k = -(-(n - start) // c)
        r = (n - start) - (k - 1) * c
        first = min(bucket_length(r), c, self.max_len - start)
        spans = [(start, first)] + [(start + r + i * c, c) for i in range(k - 1)]
        return [(s, T, next(w for w in self.windows if w >= s + T)) for s, T in spans]

    def window_for(self, top: int) -> int:
        """The smallest window holding position `top`."""
        return next(w for w in self.windows if w > top)

    # ------------------------------------------------------------------ queue and slots
    def free_slots(self) -> int:
        return sum(s is None for s in self.slot_seq)

    def admit_next(self) -> Seq | None:
        """Admits the queue head into the lowest free slot if its pages can be reserved (see
        the module docstring); returns it, or None (nothing queued, no free slot, or the head
        waits for pages)."""
        if not self.queue or None not in self.slot_seq:
            return None
        seq = self.queue[0]
        n = len(seq.prompt)
        # Full pages before the last prompt token (whose MTP entry decode rewrites) can be shared.
        keys = page_keys(seq.prompt, self.page_size, n - 1)
        hits = self.pool.lookup(keys)
        need = self.pages_needed(n, seq.max_tokens) - len(hits)
        if not self.pool.reserve(need):
            self.pool.release(hits)
            return None
        self.queue.popleft()
        slot = self.slot_seq.index(None)
        self.slot_seq[slot] = seq
        seq.slot, seq.keys, seq.reserved = slot, keys, need
        seq.pages = []
        for page in hits:
            self._append_page(seq, page)
        seq.cached_tokens = len(hits) * self.page_size
        self.hit_tokens += seq.cached_tokens
        self.prompt_tokens += n
        self.grow(seq, n)
        if n > self.prefill_chunk or seq.cached_tokens:
            seq.chunk = 0
            seq.plan = self.chunk_plan(n, seq.cached_tokens)
            self.prefilling.append(seq)
        return seq

    def _append_page(self, seq: Seq, page: int) -> None:
        assert seq.slot is not None
        self.tables[seq.slot, len(seq.pages)] = page
        seq.pages.append(page)

    def grow(self, seq: Seq, tokens: int) -> None:
        """Gives `seq` pages for positions 0..tokens-1 (from its reservation)."""
        while len(seq.pages) * self.page_size < tokens:
            seq.reserved -= 1
            self._append_page(seq, self.pool.allocate())

    def prompt_done(self, seq: Seq) -> None:
        """After the prompt is in the cache: registers its full pages in the prefix cache and
        ends its chunked prefill."""
        for page, key in zip(seq.pages, seq.keys, strict=False):
            self.pool.register(page, key)
        if seq.chunk is not None:
            self.prefilling.remove(seq)
            seq.chunk = None

    def finish(self, seq: Seq) -> None:
        """Frees `seq`'s slot, pages and unused reservation (or takes it off the queue)."""
        if seq.slot is None:
            if seq in self.queue:
                self.queue.remove(seq)
            return
        self.pool.release(seq.pages)
        self.pool.unreserve(seq.reserved)
        seq.pages, seq.reserved = [], 0
        self.tables[seq.slot] = TRASH
        self.slot_seq[seq.slot] = None
        if seq.chunk is not None:
            self.prefilling.remove(seq)
            seq.chunk = None

    # ------------------------------------------------------------------ decode
    def decoding(self) -> list[tuple[int, Seq]]:
        return [(i, s) for i, s in enumerate(self.slot_seq) if s is not None and s.chunk is None]

    def step_plan(self, speculative: bool) -> StepPlan | None:
        """The next decode step (None: nothing decodes). Gives every decoding row the pages of
        the positions the step writes (its last token's, and the next with `speculative`,
        within prompt + max_tokens)."""
        active = self.decoding()
        if not active:
            return None
        for _, seq in active:
            self.grow(
                seq, min(seq.last_position + 1 + speculative, len(seq.prompt) + seq.max_tokens)
            )
        top = max(seq.last_position for _, seq in active) + speculative
        rows = next(b for b in self.row_buckets if b > active[-1][0])
        return StepPlan(active, rows, self.window_for(top))

    def page_stats(self) -> dict[str, int]:
        """Pool occupancy and prefix-cache counters for `Engine.stats`."""
        pool = self.pool
        return {
            "page_size": self.page_size,
            "cache_pages": pool.num_pages,
            "cache_pages_used": pool.used,
            "cache_pages_cached": pool.cached,
            "cache_pages_free": pool.free,
            "cache_pages_reserved": pool.reserved,
            "cache_pages_evicted": pool.evicted,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prompt_tokens": self.prompt_tokens,
        }
