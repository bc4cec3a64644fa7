"""The latent-cache page pool and its prefix cache: host-side bookkeeping, no JAX.

The device holds one pool of `num_pages + 1` fixed-size pages per cache leaf (page 0 is the
TRASH page: unused page-table entries point at it, writes there are dropped garbage, reads of it
are masked). This module decides which page holds what:

- reference counts: a page is in use while a request's page table holds it; several requests
  share a prefix page (each holds a reference);
- allocation as tokens arrive: a request takes a page (`allocate`) when its next position
  needs one; when none is `available` the scheduler preempts a request to free some
  (`dsjax.inference.scheduler`);
- prefix cache (vLLM's chained block hashes, `kv_cache_utils.hash_block_tokens`): a full prompt
  page is keyed by a hash chain over its tokens (`page_keys`); a later request whose prompt starts
  with the same pages reuses them (`lookup`). Pages nobody references but whose key is known stay
  cached, in least-recently-released order, until a fresh page is needed and none is free
  (`allocate` evicts the oldest).

Invariant (`check`): every page 1..num_pages is exactly one of free, cached-unreferenced (LRU),
or referenced.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["TRASH", "PagePool", "page_keys"]

TRASH = 0  # the page unused page-table entries point at


def page_keys(tokens: Sequence[int], page_size: int, limit: int) -> list[bytes]:
    """Hash-chain keys of the full pages of `tokens` that end at or before `limit` (exclusive
    end <= limit). Key k covers tokens [0, (k + 1) * page_size] (the whole prefix, through its
    parent's key) plus the token right after the page: a page's last MTP cache entry reads it."""
    keys: list[bytes] = []
    parent = b""
    arr = np.asarray(tokens, np.int64)
    for k in range(limit // page_size):
        end = (k + 1) * page_size
        if end >= len(arr):  # the look-ahead token must exist
            break
        parent = hashlib.sha256(parent + arr[k * page_size : end + 1].tobytes()).digest()
        keys.append(parent)
    return keys


class PagePool:
    """Pages offset+1..offset+num_pages of `page_size` tokens; see the module docstring.
    `offset`: where this pool's ids start (a decode mesh's chip holds pages offset..offset +
    num_pages, offset its own TRASH page; `scheduler.Scheduler(shards=)`)."""

    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True,
                 offset: int = 0):  # fmt: skip
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages}, page_size={page_size}: must be >= 1")
        self.num_pages, self.page_size, self.prefix_cache = num_pages, page_size, prefix_cache
        self.offset = offset
        ids = range(offset + 1, offset + num_pages + 1)
        self._free: collections.deque[int] = collections.deque(ids)
        self._refs = [0] * (num_pages + 1)  # by page - offset
        self._key_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.evicted = 0  # cached pages evicted since start

    # ------------------------------------------------------------------ counts
    @property
    def free(self) -> int:
        """Pages holding nothing."""
        return len(self._free)

    @property
    def cached(self) -> int:
        """Pages nobody references that keep a cached prefix (evictable)."""
        return len(self._lru)

    @property
    def used(self) -> int:
        """Pages some request references."""
        return self.num_pages - self.free - self.cached

    @property
    def available(self) -> int:
        """Pages `allocate` can take: free + evictable."""
        return self.free + self.cached

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # ------------------------------------------------------------------ requests
    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached prefix of `keys`, each now referenced once more."""
        pages: list[int] = []
        if self.prefix_cache:
            for key in keys:
                page = self._page_of.get(key)
                if page is None:
                    break
                pages.append(page)
            for page in pages:
                self._ref(page)
        return pages

    def allocate(self) -> int:
        """A page, referenced once: a free one, else the least recently released cached one
        (evicted from the prefix cache)."""
        if self.available < 1:
            raise RuntimeError("allocate: no page available (free or cached)")
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._lru.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            self.evicted += 1
        self._refs[page - self.offset] = 1
        return page

    def register(self, page: int, key: bytes) -> None:
        """Makes a referenced, fully written page findable under `key` (no-op when the key is
        already cached or the page already has a key)."""
        if not self.prefix_cache or key in self._page_of or page in self._key_of:
            return
        if self._refs[page - self.offset] < 1:
            raise ValueError(f"register: page {page} is not referenced")
        self._key_of[page] = key
        self._page_of[key] = page

    def release(self, pages: Iterable[int]) -> None:
        """Drops one reference of each page; unreferenced pages are freed, or kept cached
        (most recently released last) when they hold a cached prefix."""
        for page in pages:
            if page == TRASH:
                continue
            if self._refs[page - self.offset] < 1:
                raise ValueError(f"release: page {page} is not referenced")
            self._refs[page - self.offset] -= 1
            if self._refs[page - self.offset] == 0:
                if page in self._key_of:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    def drop_cached(self) -> None:
        """Forgets every cached prefix (their pages' contents are gone); unreferenced cached
        pages become free, referenced ones lose their key."""
        for page in self._lru:
            self._free.append(page)
        self._lru.clear()
        self._key_of.clear()
        self._page_of.clear()

    def _ref(self, page: int) -> None:
        if self._refs[page - self.offset] == 0:
            del self._lru[page]
        self._refs[page - self.offset] += 1

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Raises AssertionError unless the pool's invariant holds (see the module docstring)."""
        free, lru = set(self._free), set(self._lru)
        ids = set(range(self.offset + 1, self.offset + self.num_pages + 1))
        refd = {p for p in ids if self._refs[p - self.offset] > 0}
        assert len(free) == len(self._free), "a page is free twice"
        assert not (free & lru) and not (free & refd) and not (lru & refd), "a page in two states"
        assert free | lru | refd == ids, "a page was leaked"
        assert all(p in self._key_of for p in lru), "an uncached page in the LRU"
