"""The engine's scheduling policy: queue, slots, prefill chunk plans and cache pages (no JAX).

`Scheduler` decides; `dsjax.inference.engine.Engine` executes its decisions on the device from
its thread. Nothing here touches the device, so the policy is unit-tested without JAX
(tests/scheduler_test.py).

- Admission (`admit_next`): FIFO. The queue head takes the lowest free slot when the page pool
  has the pages of its prompt and of its first decode step (less the cached prefix pages it
  shares, `page_pool.PagePool`); otherwise it waits (and so does everything behind it). On
  admission its prompt pages are allocated and written into its row of the page tables
  (`tables` [slots, max_pages] int32, page ids; unused entries point at `page_pool.TRASH`).
- Pages as tokens arrive: a decoding request takes a page when its next write needs one
  (`step_plan`). When the pool has none, the youngest running request (the last admitted) is
  preempted (vLLM's recompute preemption): it releases its slot and pages and goes back to the
  head of the queue with its generated tokens kept (`Seq.output`). Readmitted, it prefills its
  prompt followed by those tokens (`Seq.context`; its full pages may still be in the prefix
  cache) and continues from the token after them, so its output is what it would have been.
  The oldest request can always grow (everything younger gives way) and a request fits the
  pool alone (`check_fits`), so every request finishes.
- Prefill: a prompt longer than `prefill_chunk`, or one with a cached prefix, is prefilled chunk
  by chunk (`chunk_plan`) between decode steps; otherwise in one program at admission.
- Decode (`step_plan`): the rows that decode, the row bucket R and attention window W the step
  runs over, after giving each row the pages its next write needs (preempting if need be).
- `prompt_done` registers a prefilled prompt's full pages in the prefix cache; `finish` frees a
  request's slot and pages.
- Shards (`shards=n`, a decode mesh whose chips each hold their own rows and pages): slots
  split into n equal blocks, the pool into n pools of pages offset by the block (`pools[i]`
  holds ids i * (per + 1) + 1 .., i * (per + 1) its chip's TRASH); a request takes the pages of
  its slot's block only, admission takes the lowest free slot whose block has its pages, a dry
  block preempts its own youngest request, and the prefix cache is per block. Every step runs
  all slots (the rows' split over chips must not move).
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

    `output`: the tokens generated so far (appended by the engine as they are emitted).
    `chunk`: while the context is prefilled chunk by chunk, the index of its next chunk in
    `plan` (None otherwise: queued, or decoding). `pages`: the cache pages of its positions, in
    order (the first `cached_tokens // page_size` shared with the prefix cache). `order`: when
    it was last admitted (younger requests are preempted first)."""

    prompt: list[int]
    max_tokens: int
    output: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    chunk: int | None = None
    plan: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)
    cached_tokens: int = 0
    order: int = 0
    preemptions: int = 0

    @property
    def generated(self) -> int:
        """Tokens generated so far."""
        return len(self.output)

    @property
    def context(self) -> list[int]:
        """What an admission prefills: the prompt, then (after a preemption) the tokens
        generated before it; the next token drawn is token `generated` of the output."""
        return self.prompt + self.output

    @property
    def last_position(self) -> int:
        """Position of the last token (sampled, not yet in the cache)."""
        return len(self.prompt) + self.generated - 1


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One decode step: `active` (slot, seq) pairs decoding (none: no step runs), over slots
    0..rows-1 and cache positions 0..window-1; `preempted`: the requests sent back to the
    queue to free pages for it."""

    active: list[tuple[int, Seq]]
    rows: int
    window: int
    preempted: list[Seq] = dataclasses.field(default_factory=list)


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
        shards: int = 1,
    ):
        if page_size < 1:
            raise ValueError(f"page_size={page_size}: must be >= 1")
        if cache_tokens < page_size:
            raise ValueError(
                f"cache_tokens={cache_tokens}: must hold at least one page ({page_size} tokens)"
            )
        if shards < 1 or slots % shards or cache_tokens // page_size < shards:
            raise ValueError(
                f"shards={shards}: must divide slots={slots} and the pool's "
                f"{cache_tokens // page_size} pages"
            )
        self.slots, self.max_len, self.prefill_chunk = slots, max_len, prefill_chunk
        self.page_size, self.shards = page_size, shards
        self.row_buckets = [*(b for b in (min_batch << i for i in range(32)) if b < slots), slots]
        if shards > 1:
            self.row_buckets = [slots]
        self.windows = [*(w for w in (min_window << i for i in range(32)) if w < max_len), max_len]
        self.max_pages = -(-max_len // page_size)
        per = cache_tokens // page_size // shards
        self.pools = [PagePool(per, page_size, prefix_cache, i * (per + 1)) for i in range(shards)]
        self.pool_pages = shards * (per + 1)  # the device pool's pages, TRASH pages included
        self.tables = np.full((slots, self.max_pages), TRASH, np.int32)
        self.slot_seq: list[Seq | None] = [None] * slots
        self.queue: collections.deque[Seq] = collections.deque()
        self.prefilling: list[Seq] = []  # prefilled chunk by chunk, in admission order
        self.hit_tokens = 0  # prompt tokens found in the prefix cache, since start
        self.prompt_tokens = 0  # prompt tokens admitted, since start
        self.preemptions = 0  # requests preempted, since start
        self._admissions = 0

    # ------------------------------------------------------------------ sizes
    def pages_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Pages a request may ever write: positions 0 .. prompt + max_tokens - 1."""
        return self.pools[0].pages_for(prompt_len + max_tokens)

    def _first_pages(self, seq: Seq) -> int:
        """Pages of `seq`'s context and its first decode step's writes (two positions with
        speculation), within prompt + max_tokens."""
        end = len(seq.prompt) + seq.max_tokens
        return self.pools[0].pages_for(min(len(seq.context) + 2, end))

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raises ValueError when such a request could never get its pages."""
        need = self.pages_needed(prompt_len, max_tokens)
        have = self.pools[0].num_pages
        if need > have:
            per = " per mesh shard" if self.shards > 1 else ""
            raise ValueError(
                f"prompt length {prompt_len} + max_tokens {max_tokens} needs {need} cache pages "
                f"of {self.page_size} tokens; the cache holds {have}{per} "
                f"({have * self.page_size} tokens)"
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
        """Admits the queue head into the lowest free slot if the pool has the pages of its
        context and first decode step (see the module docstring); returns it, or None (nothing
        queued, no free slot, or the head waits for pages)."""
        if not self.queue or None not in self.slot_seq:
            return None
        seq = self.queue[0]
        context = seq.context
        n = len(context)
        # Full pages before the last context token (whose MTP entry decode rewrites) can be
        # shared.
        keys = page_keys(context, self.page_size, n - 1)
        for slot in self._free_slot_per_shard():
            pool = self.pool_of(slot)
            hits = pool.lookup(keys)
            if self._first_pages(seq) - len(hits) <= pool.available:
                break
            pool.release(hits)
        else:
            return None
        self.queue.popleft()
        self.slot_seq[slot] = seq
        self._admissions += 1
        seq.slot, seq.keys, seq.order = slot, keys, self._admissions
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

    def pool_of(self, slot: int) -> PagePool:
        """The pool the request in `slot` takes its pages from."""
        return self.pools[slot // (self.slots // self.shards)]

    @property
    def pool(self) -> PagePool:
        """The one pool (shards=1)."""
        assert self.shards == 1, "a sharded scheduler has one pool per shard: pool_of(slot)"
        return self.pools[0]

    def _free_slot_per_shard(self) -> list[int]:
        """The lowest free slot of each shard that has one, lowest first."""
        out: dict[int, int] = {}
        for slot, s in enumerate(self.slot_seq):
            if s is None:
                out.setdefault(slot // (self.slots // self.shards), slot)
        return list(out.values())

    def _append_page(self, seq: Seq, page: int) -> None:
        assert seq.slot is not None
        self.tables[seq.slot, len(seq.pages)] = page
        seq.pages.append(page)

    def grow(self, seq: Seq, tokens: int) -> None:
        """Gives `seq` pages for positions 0..tokens-1 (the pool must have them)."""
        while len(seq.pages) * self.page_size < tokens:
            assert seq.slot is not None
            self._append_page(seq, self.pool_of(seq.slot).allocate())

    def preempt(self, seq: Seq) -> None:
        """Sends running `seq` back to the head of the queue, releasing its slot and pages; it
        keeps its output and is prefilled again on readmission (see the module docstring)."""
        self._release(seq)
        seq.plan, seq.cached_tokens = [], 0
        seq.preemptions += 1
        self.preemptions += 1
        self.queue.appendleft(seq)

    def _release(self, seq: Seq) -> None:
        assert seq.slot is not None
        self.pool_of(seq.slot).release(seq.pages)
        seq.pages = []
        self.tables[seq.slot] = TRASH
        self.slot_seq[seq.slot] = None
        seq.slot = None
        if seq.chunk is not None:
            self.prefilling.remove(seq)
            seq.chunk = None

    def prompt_done(self, seq: Seq) -> None:
        """After the prompt is in the cache: registers its full pages in the prefix cache and
        ends its chunked prefill."""
        assert seq.slot is not None
        for page, key in zip(seq.pages, seq.keys, strict=False):
            self.pool_of(seq.slot).register(page, key)
        if seq.chunk is not None:
            self.prefilling.remove(seq)
            seq.chunk = None

    def finish(self, seq: Seq) -> None:
        """Frees `seq`'s slot and pages (or takes it off the queue)."""
        if seq.slot is None:
            if seq in self.queue:
                self.queue.remove(seq)
            return
        self._release(seq)

    # ------------------------------------------------------------------ decode
    def decoding(self) -> list[tuple[int, Seq]]:
        return [(i, s) for i, s in enumerate(self.slot_seq) if s is not None and s.chunk is None]

    def step_plan(self, speculative: bool) -> StepPlan | None:
        """The next decode step (None: nothing decodes). Gives every decoding row, oldest
        first, the pages of the positions the step writes (its last token's, and the next with
        `speculative`, within prompt + max_tokens), preempting the youngest running requests
        while the pool has none (see the module docstring); their rows leave the step."""
        active = self.decoding()
        if not active:
            return None
        preempted: list[Seq] = []
        for _, seq in sorted(active, key=lambda a: a[1].order):
            end = min(seq.last_position + 1 + speculative, len(seq.prompt) + seq.max_tokens)
            while seq.slot is not None and len(seq.pages) * self.page_size < end:
                pool = self.pool_of(seq.slot)
                if pool.available:
                    self._append_page(seq, pool.allocate())
                    continue
                shard = [
                    x for i, x in enumerate(self.slot_seq)
                    if x is not None and self.pool_of(i) is pool
                ]  # fmt: skip
                victim = max(shard, key=lambda x: x.order)
                self.preempt(victim)
                preempted.append(victim)
        active = [(i, seq) for i, seq in active if seq.slot is not None]
        if not active:
            return StepPlan([], 0, 0, preempted)
        top = max(seq.last_position for _, seq in active) + speculative
        rows = next(b for b in self.row_buckets if b > active[-1][0])
        return StepPlan(active, rows, self.window_for(top), preempted)

    def page_stats(self) -> dict[str, int]:
        """Pool occupancy and prefix-cache counters for `Engine.stats` (summed over shards)."""
        total = lambda name: sum(getattr(p, name) for p in self.pools)  # noqa: E731
        return {
            "page_size": self.page_size,
            "cache_pages": total("num_pages"),
            "cache_pages_used": total("used"),
            "cache_pages_cached": total("cached"),
            "cache_pages_free": total("free"),
            "cache_pages_evicted": total("evicted"),
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prompt_tokens": self.prompt_tokens,
            "preemptions": self.preemptions,
        }
