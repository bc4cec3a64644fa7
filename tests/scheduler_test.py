"""The engine's scheduling policy without JAX: page pool (reference counts, prefix cache keys,
LRU eviction, no leaked page), admission that waits for pages, chunk plans after a cached
prefix, pages growing with the decode steps, preemption of the youngest request when the pool
runs dry (and its readmission with its output kept)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dsjax.inference.page_pool import TRASH, PagePool, page_keys
from dsjax.inference.scheduler import Scheduler, Seq


def sched(**kw) -> Scheduler:
    args = dict(
        slots=4, max_len=64, prefill_chunk=16, min_batch=1, min_window=16, page_size=8,
        cache_tokens=64,
    )  # fmt: skip
    args.update(kw)
    return Scheduler(**args)


def test_page_keys_chain_the_prefix_and_the_lookahead_token():
    a = list(range(20))
    ka = page_keys(a, 4, len(a) - 1)
    assert len(ka) == 4  # pages end at 4, 8, 12, 16 <= 19; the page ending at 20 has no token 20
    b = a[:9] + [99] + a[10:]  # differs at token 9: page 2 ([8, 12)) and after
    kb = page_keys(b, 4, len(b) - 1)
    assert ka[:2] == kb[:2] and ka[2] != kb[2] and ka[3] != kb[3]
    c = a[:8] + [99] + a[9:]  # token 8 is page 1's look-ahead (its last MTP entry reads it)
    assert page_keys(c, 4, 19)[0] == ka[0] and page_keys(c, 4, 19)[1] != ka[1]
    assert page_keys(a, 4, 11) == ka[:2]  # limit: pages ending at or before 11


def test_pool_allocate_release_and_lru_eviction():
    pool = PagePool(4, 8)
    pages = [pool.allocate() for _ in range(3)]
    assert sorted(pages) == [1, 2, 3] and pool.available == 1 and pool.used == 3
    pool.register(pages[0], b"k0")
    pool.register(pages[1], b"k1")
    pool.release(pages)
    assert pool.cached == 2 and pool.free == 2 and pool.used == 0
    assert pool.lookup([b"k0", b"k1", b"k2"]) == pages[:2] and pool.cached == 0
    pool.release(pages[:2])  # k0 released before k1: k0 is the older
    assert pool.available == 4
    got = [pool.allocate() for _ in range(4)]  # two free pages, then k0's, then k1's
    assert got[2:] == pages[:2] and pool.evicted == 2
    assert pool.lookup([b"k0"]) == []
    pool.check()
    with pytest.raises(RuntimeError, match="no page available"):
        pool.allocate()
    pool.release(got)
    assert pool.free == 4
    with pytest.raises(ValueError, match="not referenced"):
        pool.release([got[0]])
    pool.check()


def test_admission_waits_for_pages_and_finish_frees_them():
    s = sched(cache_tokens=24)  # 3 pages of 8
    a = Seq(prompt=[1] * 10, max_tokens=20)  # prompt + first step: positions 0..11, 2 pages
    b = Seq(prompt=[2] * 3, max_tokens=5)  # 1 page
    c = Seq(prompt=[3] * 3, max_tokens=5)
    s.queue.extend([a, b, c])
    assert s.admit_next() is a and a.slot == 0 and len(a.pages) == 2  # no page set aside
    assert s.admit_next() is b and s.pool.available == 0
    assert s.admit_next() is None and list(s.queue) == [c]  # c waits for a page
    assert list(s.tables[0, :2]) == a.pages and (s.tables[0, 2:] == TRASH).all()
    with pytest.raises(ValueError, match="needs 8 cache pages of 8 tokens; the cache holds 3"):
        s.check_fits(50, 14)
    s.finish(a)
    assert (s.tables[0] == TRASH).all() and s.slot_seq[0] is None
    assert s.admit_next() is c and c.slot == 0
    s.finish(b)
    s.finish(c)
    s.pool.check()
    assert s.pool.used == 0


def test_prefix_hit_shares_pages_and_prefills_only_the_rest():
    s = sched(cache_tokens=128)
    shared = list(range(1, 42))  # pages [0,8) .. [32,40) and page 4's look-ahead token 40
    a = Seq(prompt=shared + [50, 51], max_tokens=4)
    s.queue.append(a)
    assert s.admit_next() is a and a.chunk == 0 and a.plan[0][0] == 0  # 42 > chunk 16
    s.prompt_done(a)
    b = Seq(prompt=shared + [60, 61, 62], max_tokens=4)
    s.queue.append(b)
    assert s.admit_next() is b
    assert b.cached_tokens == 40 and b.pages[:5] == a.pages[:5]
    assert b.chunk == 0 and b.plan == [(40, 8, 64)]  # the rest only, absorbed from position 40
    assert s.pool.used == len(set(a.pages) | set(b.pages))
    s.finish(a)
    s.finish(b)
    assert s.pool.cached == 5 and s.pool.used == 0  # a's full prompt pages stay cached
    assert s.hit_tokens == 40 and s.prompt_tokens == 43 + 44
    s.pool.check()


def test_prefix_cache_off_never_hits():
    s = sched(cache_tokens=128, prefix_cache=False)
    for _ in range(2):
        seq = Seq(prompt=list(range(30)), max_tokens=2)
        s.queue.append(seq)
        assert s.admit_next() is seq and seq.cached_tokens == 0
        s.prompt_done(seq)
        s.finish(seq)
    assert s.pool.cached == 0 and s.hit_tokens == 0


def test_chunk_plan_from_a_cached_prefix():
    s = sched(max_len=128, min_window=32)
    assert s.chunk_plan(40) == [(0, 8, 32), (8, 16, 32), (24, 16, 64)]
    assert s.chunk_plan(40, start=16) == [(16, 8, 32), (24, 16, 64)]
    assert s.chunk_plan(123, start=120) == [(120, 8, 128)]  # padded within max_len


def test_step_plan_grows_pages_with_the_tokens():
    s = sched(cache_tokens=64)
    seq = Seq(prompt=[1] * 7, max_tokens=12)
    s.queue.append(seq)
    s.admit_next()
    s.prompt_done(seq)
    seq.output = [5]  # token 0 sampled, at position 7
    plan = s.step_plan(speculative=True)
    assert plan.active == [(0, seq)] and plan.rows == 1 and plan.window == 16
    assert len(seq.pages) == 2  # the speculative step writes positions 7 and 8
    seq.output = [5] * 11  # last position 17; writes 17, 18 = prompt + max_tokens - 1
    s.step_plan(speculative=True)
    assert len(seq.pages) == 3 and s.pool.used == 3  # pages come as the tokens do
    s.finish(seq)
    s.pool.check()


def test_a_dry_pool_preempts_the_youngest_which_resumes_with_its_output():
    s = sched(cache_tokens=32)  # 4 pages of 8
    a = Seq(prompt=[1] * 7, max_tokens=20)
    b = Seq(prompt=[2] * 7, max_tokens=20)
    s.queue.extend([a, b])
    for seq in (a, b):  # prompt + first step (positions 0..8): 2 pages each
        assert s.admit_next() is seq
        s.prompt_done(seq)
        seq.output = [9]
    plan = s.step_plan(speculative=True)
    assert [x for _, x in plan.active] == [a, b] and not plan.preempted
    assert s.pool.available == 0
    a.output, b.output = [9] * 9, [8] * 9  # next writes: positions 15, 16: a third page each
    plan = s.step_plan(speculative=True)
    assert plan.active == [(0, a)] and plan.preempted == [b]  # b gave way to a (older)
    assert list(s.queue) == [b] and b.slot is None and b.pages == [] and s.preemptions == 1
    assert len(a.pages) == 3 and (s.tables[1] == TRASH).all()
    assert b.context == [2] * 7 + [8] * 9 and b.generated == 9  # its output is kept
    assert s.admit_next() is None  # b's context + first step needs 3 pages; 1 left
    s.finish(a)
    assert s.admit_next() is b and b.slot == 0 and b.order > a.order
    assert len(b.pages) == 2 and b.chunk is None  # 16 context positions, one program
    assert b.last_position == 15
    s.finish(b)
    s.pool.check()
    assert s.pool.used == 0


def test_a_request_growing_alone_preempts_itself_when_it_is_the_youngest():
    s = sched(cache_tokens=32)  # 4 pages
    a = Seq(prompt=[1] * 7, max_tokens=20)
    b = Seq(prompt=[2] * 7, max_tokens=20)
    s.queue.extend([a, b])
    s.admit_next(), s.admit_next()
    for seq in (a, b):
        s.prompt_done(seq)
    a.output, b.output = [3], [4] * 9  # only b (the youngest) needs a third page
    plan = s.step_plan(speculative=True)
    assert plan.active == [(0, a)] and plan.preempted == [b] and list(s.queue) == [b]
    s.finish(a)
    s.finish(b)
    s.pool.check()


@pytest.mark.parametrize("shards", [1, 2])
def test_random_load_never_leaks_a_page(shards):
    """Random admissions, prefix hits, growth, preemptions, cancels mid-prefill and finishes on a
    small pool: the pool's invariant holds throughout and every page comes back. With 2 shards
    (a decode mesh: 2 slots and 10 pages each) every request's pages come from its slot's
    shard and a dry shard preempts its own requests."""
    rng = random.Random(0)
    per = 14 if shards == 1 else 10
    s = sched(slots=3 if shards == 1 else 4, cache_tokens=4 * per * shards, page_size=4,
              prefill_chunk=8, shards=shards)  # fmt: skip
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for _ in range(400):
        if rng.random() < 0.4 and len(s.queue) < 5:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 13)] + [rng.randrange(50)]
            seq = Seq(prompt=prompt, max_tokens=rng.randrange(1, 20))
            s.check_fits(len(prompt), seq.max_tokens)
            s.queue.append(seq)
        while s.admit_next() is not None:
            pass
        for seq in [x for x in s.slot_seq if x is not None]:
            r = rng.random()
            if r < 0.1:
                s.finish(seq)  # cancelled, possibly mid-prefill
            elif seq.chunk is not None:
                seq.chunk += 1
                if seq.chunk == len(seq.plan):
                    s.prompt_done(seq)
                    seq.output.append(1)
            elif not seq.output:  # prefilled in one program at admission
                s.prompt_done(seq)
                seq.output.append(1)
            elif seq.generated >= seq.max_tokens:
                s.finish(seq)
        plan = s.step_plan(speculative=rng.random() < 0.5)
        for _, seq in plan.active if plan else []:
            seq.output.append(2)
            if seq.generated >= seq.max_tokens:
                s.finish(seq)
        for pool in s.pools:
            pool.check()
        for slot, seq in enumerate(s.slot_seq):
            want = seq.pages if seq is not None else []
            assert list(s.tables[slot, : len(want)]) == want
            assert (s.tables[slot, len(want) :] == TRASH).all()
            first = s.pool_of(slot).offset
            assert all(first < p <= first + per for p in want)  # its shard's pages
    for seq in [x for x in s.slot_seq if x is not None] + list(s.queue):
        s.finish(seq)
    for pool in s.pools:
        pool.check()
        assert pool.used == 0 and pool.evicted > 0
    assert s.hit_tokens > 0 and s.preemptions > 0
    assert s.pool_pages == shards * (per + 1) and s.row_buckets[0] == (1 if shards == 1 else 4)
    assert s.tables.dtype == np.int32 and (s.tables == TRASH).all()  # every row released
