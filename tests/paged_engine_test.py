"""The engine's paged latent cache and prefix cache against the contiguous decode core
(`generate`, its own contiguous cache): same tokens greedy and seeded-sampled with MTP
speculation on, by the XLA gather path and by the Pallas kernel (Pallas' interpreter); a pool
sized for 4 max-length requests runs 32 short ones at once; pool exhaustion, preemption,
eviction, cancels in the queue and mid-prefill leave no page behind (the pool's invariant is
checked and its pages counted) and change no output; a prompt sharing a 400-token prefix with
an earlier one reuses 384 cached tokens and still decodes what `generate` decodes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dsjax.inference import engine_programs as programs
from dsjax.inference.engine import Engine, SamplingParams, TokenEvent
from dsjax.inference.generate import generate
from dsjax.testing import random_variables, tiny_config, tokens_of

TINY = tiny_config()  # one MTP module: speculative steps over pages too
SAMPLED = dict(temperature=1.0, top_k=6, top_p=0.9)


@pytest.fixture(scope="module")
def variables():
    return random_variables(TINY, seed=5)


def run_all(engine, prompts, params, on_first=None) -> list[list[TokenEvent]]:
    events: dict[int, list[TokenEvent]] = {}
    done = threading.Event()
    lock = threading.Lock()

    def collect(ev):
        with lock:
            events.setdefault(ev.request_id, []).append(ev)
            if on_first is not None and len(events[ev.request_id]) == 1:
                on_first(ev)
            if len(events) == len(prompts) and all(e[-1].finish_reason for e in events.values()):
                done.set()

    ids = [engine.submit(p, params, collect) for p in prompts]
    assert done.wait(300)
    return [events[i] for i in ids]


def assert_no_page_held(engine):
    stats = engine.stats()
    engine._sched.pool.check()
    assert stats["cache_pages_used"] == 0
    assert stats["cache_pages_free"] + stats["cache_pages_cached"] == stats["cache_pages"]


def test_pool_of_four_max_length_requests_runs_32_short_ones_at_once(variables):
    """cache_tokens = 4 x max_len; 32 requests of <= 8 tokens (one page each) are all admitted
    together (32 slots active at once) and decode what `generate` decodes."""
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, TINY.vocab_size, rng.randint(3, 5)).tolist() for _ in range(32)]
    params = SamplingParams(max_tokens=4)
    seen_active: list[int] = []
    with Engine(
        TINY, variables, slots=32, max_len=64, cache_tokens=4 * 64, page_size=8,
        min_batch=32, min_window=64,
    ) as engine:  # fmt: skip
        assert engine.stats()["cache_pages"] == 32
        events = run_all(
            engine,
            prompts,
            params,
            on_first=lambda ev: seen_active.append(engine.stats()["active"]),
        )
        assert max(seen_active) == 32
        assert_no_page_held(engine)
    ref = generate(TINY, variables, prompts, 4).tokens
    assert [tokens_of(e) for e in events] == ref


@pytest.fixture(scope="module")
def small_pool(variables):
    """4 slots over 8 pages of 8 tokens: two 30-token requests fill the pool."""
    with Engine(
        TINY, variables, slots=4, max_len=64, cache_tokens=64, page_size=8, prefill_chunk=8,
        min_batch=4, min_window=64,
    ) as eng:  # fmt: skip
        yield eng


def test_exhaustion_and_eviction_queue_requests_and_leak_nothing(small_pool, variables):
    """8 requests needing 4 pages each on an 8-page pool run two at a time (the rest wait, none
    fails); finished prompts' pages are cached, then evicted for later requests; outputs equal
    `generate` (greedy and seeded sampling, speculative)."""
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, TINY.vocab_size, 20).tolist() for _ in range(8)]
    before = small_pool.stats()
    greedy = run_all(small_pool, prompts[:4], SamplingParams(max_tokens=10))
    sampled = run_all(small_pool, prompts[4:], SamplingParams(max_tokens=10, seed=7, **SAMPLED))
    stats = small_pool.stats()
    assert stats["cache_pages_evicted"] > before["cache_pages_evicted"]
    assert stats.get("finished_error", 0) == 0
    assert_no_page_held(small_pool)
    assert [tokens_of(e) for e in greedy] == generate(TINY, variables, prompts[:4], 10).tokens
    for p, ev in zip(prompts[4:], sampled, strict=True):  # seeded: row 0 each
        assert (
            tokens_of(ev)
            == generate(TINY, variables, [p], 10, rng=7, speculative=True, **SAMPLED).tokens[0]
        )


def test_a_dry_pool_preempts_and_the_outputs_stay_the_same(small_pool, variables):
    """4 requests growing to 4 pages each on the 8-page pool all start (pages come as tokens
    arrive), so the pool runs dry: the youngest are preempted, resume from their prompt and the
    tokens they had (prefilled again) and finish with `generate`'s tokens (greedy; seeded
    sampling with MTP); no page is left behind."""
    rng = np.random.RandomState(8)
    prompts = [rng.randint(0, TINY.vocab_size, 6).tolist() for _ in range(4)]
    before = small_pool.stats()["preemptions"]
    greedy = run_all(small_pool, prompts, SamplingParams(max_tokens=20))
    mid = small_pool.stats()["preemptions"]
    sampled = run_all(small_pool, prompts[:2], SamplingParams(max_tokens=20, seed=5, **SAMPLED))
    stats = small_pool.stats()
    assert mid > before and stats.get("finished_error", 0) == 0
    assert_no_page_held(small_pool)
    assert [tokens_of(e) for e in greedy] == generate(TINY, variables, prompts, 20).tokens
    for p, ev in zip(prompts[:2], sampled, strict=True):
        want = generate(TINY, variables, [p], 20, rng=5, speculative=True, **SAMPLED).tokens[0]
        assert tokens_of(ev) == want


def test_cancel_in_queue_and_mid_prefill_leaks_nothing(small_pool, variables, monkeypatch):
    real = programs.prompt_chunk
    rids: list[int] = []

    def cancelling(*args, **kw):
        out = real(*args, **kw)
        if int(args[5]) > 0 and rids:  # after its 2nd chunk: cancel the prefilling request
            small_pool.cancel(rids.pop())
        return out

    monkeypatch.setattr(programs, "prompt_chunk", cancelling)
    rng = np.random.RandomState(3)
    long = [rng.randint(0, TINY.vocab_size, 30).tolist() for _ in range(3)]
    events: list[list[TokenEvent]] = [[], [], []]
    done = [threading.Event() for _ in range(3)]

    def collect(i):
        def f(ev):
            events[i].append(ev)
            if ev.finish_reason:
                done[i].set()

        return f

    params = SamplingParams(max_tokens=30)  # 60 positions: 8 pages, the whole pool each
    rids.append(small_pool.submit(long[0], params, collect(0)))  # 4 chunks: 0, 6, 14, 22
    small_pool.submit(long[1], params, collect(1))  # admitted too: pages come as tokens do
    rid2 = small_pool.submit(long[2], params, collect(2))
    small_pool.cancel(rid2)  # cancelled in the queue
    for d in done:
        assert d.wait(300)
    assert [e.finish_reason for e in events[0]] == ["cancelled"]
    assert [e.finish_reason for e in events[2]] == ["cancelled"]
    assert tokens_of(events[1]) == generate(TINY, variables, [long[1]], 30).tokens[0]
    assert_no_page_held(small_pool)


TINY512 = tiny_config(max_position_embeddings=512)


def test_prefix_cache_reuses_384_tokens_of_a_400_token_prefix():
    """B shares a 400-token prefix with A: it finds 6 pages of 64 (384 tokens) cached and
    prefills only the rest; A again hits as much. Every output (greedy; seeded sampling)
    equals `generate` with no cache reuse."""
    variables = random_variables(TINY512, seed=9)
    rng = np.random.RandomState(4)
    prefix = rng.randint(0, TINY512.vocab_size, 400).tolist()
    a = prefix + rng.randint(0, TINY512.vocab_size, 10).tolist()
    b = prefix + rng.randint(0, TINY512.vocab_size, 12).tolist()
    greedy = SamplingParams(max_tokens=8)
    sampled = SamplingParams(max_tokens=8, seed=3, **SAMPLED)
    with Engine(
        TINY512, variables, slots=2, max_len=512, page_size=64, min_batch=2, min_window=512
    ) as engine:  # fmt: skip
        hits = [engine.stats()["prefix_cache_hit_tokens"]]
        outs = []
        for prompt, params in ((a, greedy), (b, greedy), (a, sampled), (b, sampled)):
            outs.append(engine.generate(prompt, params, timeout=300)[0])
            hits.append(engine.stats()["prefix_cache_hit_tokens"])
        assert np.diff(hits).tolist() == [0, 384, 384, 384]
        assert_no_page_held(engine)
    ref_greedy = generate(TINY512, variables, [a, b], 8, prefill_chunk=None).tokens
    assert outs[:2] == ref_greedy
    for prompt, got in zip((a, b), outs[2:], strict=True):
        ref = generate(
            TINY512, variables, [prompt], 8, prefill_chunk=None, rng=3, speculative=True, **SAMPLED
        )
        assert got == ref.tokens[0]


def test_pallas_kernel_in_interpret_mode_decodes_what_generate_decodes(variables):
    """Decode and MTP verification steps read the pages through the Pallas kernel (in Pallas'
    interpreter on CPU): greedy plain, greedy speculative and seeded sampled speculative
    outputs equal `generate`'s (its own contiguous cache)."""
    rng = np.random.RandomState(6)
    prompts = [rng.randint(0, TINY.vocab_size, n).tolist() for n in (5, 11)]
    runs = [
        (SamplingParams(max_tokens=9, speculative=False), dict(speculative=False)),
        (SamplingParams(max_tokens=9), dict(speculative=True)),
        (SamplingParams(max_tokens=9, seed=4, **SAMPLED), dict(speculative=True, **SAMPLED)),
    ]
    with Engine(
        TINY, variables, slots=2, max_len=32, page_size=8, min_batch=2, min_window=32,
        paged_attention="pallas_interpret",
    ) as engine:  # fmt: skip
        assert engine.paged_attention == "pallas_interpret"
        outs = [[tokens_of(e) for e in run_all(engine, prompts, p)] for p, _ in runs]
        assert_no_page_held(engine)
    for got, (params, kw) in zip(outs, runs, strict=True):
        if params.seed is None:
            assert got == generate(TINY, variables, prompts, 9, **kw).tokens
        else:  # seeded: row 0 each
            for p, g in zip(prompts, got, strict=True):
                assert g == generate(TINY, variables, [p], 9, rng=4, **kw).tokens[0]
