"""The engine prefills long prompts chunk by chunk, interleaved with the decode steps of the
running requests (`Engine(prefill_chunk=...)`).

References are independent of the engine: `generate` with a one-shot prefill (greedy and seeded
sampling) and `decode.prefill` one-shot for the slot's cache (main and MTP), hidden state and
first token. One engine (2 slots, chunk 8, one row bucket, one attention window) serves the
tests, so only a few programs are compiled: a 40-token prompt runs 5 chunks (8 expanded tokens,
then 4 absorbed chunks over the cache).
"""

from __future__ import annotations

import functools
import threading
import time

import jax
import numpy as np
import pytest

from dsjax.inference import decode
from dsjax.inference import engine_programs as programs
from dsjax.inference.engine import Engine, SamplingParams, TokenEvent
from dsjax.inference.generate import generate
from dsjax.testing import random_variables, rel_err, tiny_config, tokens_of

TINY = tiny_config()  # 3 layers (dense, MoE, MoE) and one MTP module
CHUNK, MAX_LEN = 8, 64
SHORT = [5, 9, 14, 3, 7]
LONG = np.random.RandomState(0).randint(0, TINY.vocab_size, 40).tolist()  # 5 chunks of 8
SAMPLED = dict(temperature=1.0, top_k=6, top_p=0.9)


@pytest.fixture(scope="module")
def variables():
    return random_variables(TINY, seed=11)  # attention matters: a wrong cache shows


def new_engine(variables) -> Engine:
    return Engine(
        TINY,
        variables,
        slots=2,
        max_len=MAX_LEN,
        min_batch=2,
        min_window=MAX_LEN,
        prefill_chunk=CHUNK,
    )


@pytest.fixture(scope="module")
def engine(variables):
    with new_engine(variables) as eng:
        yield eng


@pytest.fixture
def chunk_log(monkeypatch):
    """Records every prefill chunk the engine runs as ("chunk", start) in the returned list
    (shared with the tests' callbacks: the order is the engine thread's); `hooks` run after a
    chunk with its start."""
    log: list[tuple] = []
    hooks: list = []
    real = programs.prompt_chunk

    def recording(*args, **kw):
        out = real(*args, **kw)
        start = int(args[5])
        log.append(("chunk", start))
        for hook in hooks:
            hook(start)
        return out

    monkeypatch.setattr(programs, "prompt_chunk", recording)
    return log, hooks


@pytest.fixture(scope="module")
def reference(variables):
    @functools.cache
    def run(prompt: tuple[int, ...], new: int, sampled: bool) -> list[int]:
        """`generate` with a one-shot prefill (no chunks), plain decoding; seeded: row 0."""
        kw = dict(rng=7, **SAMPLED) if sampled else {}
        return generate(TINY, variables, [list(prompt)], new, prefill_chunk=None, **kw).tokens[0]

    return run


def wait_until(pred, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_long_prompt_interleaves_with_a_decoding_stream(engine, variables, chunk_log, reference):
    """The short stream emits tokens between the long prompt's chunks; both outputs equal the
    one-shot `generate`; the long prompt's slot (snapshot when its first token is emitted, after
    the interleaved steps) holds the one-shot prefill's cache, MTP cache and hidden state."""
    log, _ = chunk_log
    before = engine.stats()
    events: dict[str, list[TokenEvent]] = {"short": [], "long": []}
    snapshot: dict[str, object] = {}
    done = threading.Event()

    def on_long(ev):
        if not events["long"]:  # on the engine thread, right after the last chunk
            slot = engine._requests[ev.request_id].slot  # its row, caches gathered from pages
            table = engine._sched.tables[slot : slot + 1]
            snapshot["state"] = jax.device_get(
                programs.row_view(engine.cfg, engine._state, table, slot)
            )
        events["long"].append(ev)
        log.append(("long", len(ev.tokens)))
        if ev.finish_reason and events["short"][-1].finish_reason:
            done.set()

    def on_short(ev):
        if not events["short"]:  # the long prompt arrives while this stream is decoding
            engine.submit(LONG, SamplingParams(max_tokens=8), on_long)
        events["short"].append(ev)
        log.append(("short", len(ev.tokens)))
        if ev.finish_reason and events["long"] and events["long"][-1].finish_reason:
            done.set()

    engine.submit(SHORT, SamplingParams(max_tokens=40), on_short)
    assert done.wait(120)

    # Order: chunk 0, short tokens, chunk 1, short tokens, ..., chunk 4, long's first token.
    chunks = [i for i, e in enumerate(log) if e[0] == "chunk"]
    assert [log[i][1] for i in chunks] == [0, 8, 16, 24, 32]
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert any(e[0] == "short" and e[1] > 0 for e in log[a:b]), log
    assert log.index(("long", 1)) > chunks[-1]
    stats = engine.stats()
    assert stats["prefill_chunks"] - before["prefill_chunks"] == 5
    assert stats["prefills"] - before["prefills"] == 2
    assert stats["prefilling"] == 0 and stats["free_slots"] == 2

    assert tokens_of(events["short"]) == reference(tuple(SHORT), 40, False)
    assert tokens_of(events["long"]) == reference(tuple(LONG), 8, False)
    assert len(set(tokens_of(events["long"]))) > 1  # not a degenerate continuation

    # The slot's state after the interleaved prefill = one-shot decode.prefill's.
    req = decode.row_requests([SamplingParams(max_tokens=8)], [0], None, stop_width=16)
    prefill = jax.jit(
        lambda v, t, n, r: decode.prefill(
            TINY, v, t, n, r, cache_len=MAX_LEN, speculative=True, prefill_chunk=None
        )
    )
    one, _ = prefill(variables, np.asarray([LONG], np.int32), np.asarray([len(LONG)]), req)
    got, n = snapshot["state"], len(LONG)
    batch_axes, seq_axes = decode.state_axes(one)

    def row(x, b, q, i):  # row i, positions < n (the prompt) where x has a sequence axis
        x = np.take(np.asarray(x), i, axis=b)
        return x if q < 0 else np.take(x, np.arange(n), axis=q - (q > b))

    mine = jax.tree.map(functools.partial(row, i=0), got, batch_axes, seq_axes)
    want = jax.tree.map(functools.partial(row, i=0), one, batch_axes, seq_axes)
    for name in ("cache", "mtp_cache", "hidden_B2D"):
        for a, b in zip(
            jax.tree.leaves(getattr(mine, name)), jax.tree.leaves(getattr(want, name)), strict=True
        ):
            assert rel_err(a, b) < 1e-4, name
    for name in ("tokens_B", "positions_B", "prev_tokens_B", "counts_B", "done_B", "catch_B"):
        assert getattr(mine, name) == getattr(want, name), name


def test_interleaved_prefill_sampled_equals_oneshot(engine, chunk_log, reference):
    """A seeded sampled request with a 45-token prompt (first chunk: 5 tokens padded to 8) draws
    what `generate` with a one-shot prefill draws for the same seed and row (plain decoding in
    both: sampled speculative decoding keeps the distribution, not the draws)."""
    log, _ = chunk_log
    prompt = LONG + [1, 2, 3, 4, 5]
    params = SamplingParams(max_tokens=10, seed=7, speculative=False, **SAMPLED)
    got, reason = engine.generate(prompt, params, timeout=120)
    assert got == reference(tuple(prompt), 10, True)
    assert reason == "length"
    assert [e[1] for e in log] == [0, 5, 13, 21, 29, 37]


def test_cancel_mid_prefill_frees_the_slot(engine, chunk_log, reference):
    log, hooks = chunk_log
    before = engine.stats()
    events: list[TokenEvent] = []
    rid: list[int] = []
    hooks.append(lambda start: start == 8 and engine.cancel(rid[0]))  # after the 2nd chunk
    rid.append(engine.submit(LONG, SamplingParams(max_tokens=8), events.append))
    wait_until(lambda: events and events[-1].finish_reason)
    assert [(e.tokens, e.finish_reason) for e in events] == [((), "cancelled")]
    wait_until(lambda: engine.stats()["free_slots"] == 2)
    stats = engine.stats()
    assert stats["prefill_chunks"] - before["prefill_chunks"] == 2
    assert stats["prefilling"] == 0 and stats["prefills"] == before["prefills"]
    hooks.clear()
    # The slot is reused cleanly.
    assert engine.generate(LONG, SamplingParams(max_tokens=8), timeout=120)[0] == reference(
        tuple(LONG), 8, False
    )


def test_shutdown_mid_prefill_cancels_and_restart_serves(variables, chunk_log, reference):
    log, hooks = chunk_log
    eng = new_engine(variables).start()  # same shapes: reuses the compiled programs
    reached, release = threading.Event(), threading.Event()

    def pause(start):
        if start == 0:
            reached.set()
            assert release.wait(60)

    hooks.append(pause)
    events: list[TokenEvent] = []
    eng.submit(LONG, SamplingParams(max_tokens=8), events.append)
    assert reached.wait(120)
    stopper = threading.Thread(target=eng.stop)
    stopper.start()
    wait_until(lambda: eng._stopping)
    release.set()
    stopper.join(60)
    assert not stopper.is_alive()
    assert [(e.tokens, e.finish_reason) for e in events] == [((), "cancelled")]
    stats = eng.stats()
    assert stats["prefill_chunks"] == 1 and stats["prefilling"] == 0
    assert stats["free_slots"] == 2 and stats["finished_cancelled"] == 1
    hooks.clear()
    with eng:
        got, _ = eng.generate(LONG, SamplingParams(max_tokens=8), timeout=120)
    assert got == reference(tuple(LONG), 8, False)


def test_prefill_chunk_is_validated(variables):
    with pytest.raises(ValueError, match="prefill_chunk=0"):
        Engine(TINY, variables, slots=1, max_len=MAX_LEN, prefill_chunk=0)


def test_warmup_compiles_the_chunk_programs_once_per_shape(variables, reference):
    """Chunk programs are keyed by (first or later, chunk length, window), not by prompt length:
    with windows 16/32/64 a 40-token prompt runs first@16, later@16, @32, @32, @64; after a
    warmup for it, serving 40-, 37- and 33-token prompts (first chunks of 8, 5 and 1 tokens,
    padded to 8) compiles nothing more."""
    chunk_jit, start_jit = programs.prompt_chunk, programs.start_decoding
    eng = Engine(
        TINY, variables, slots=2, max_len=MAX_LEN, min_batch=2, min_window=16, prefill_chunk=CHUNK
    )
    assert eng._chunk_plan(40) == [(0, 8, 16), (8, 8, 16), (16, 8, 32), (24, 8, 32), (32, 8, 64)]
    assert eng._chunk_plan(33) == [(0, 8, 16), (1, 8, 16), (9, 8, 32), (17, 8, 32), (25, 8, 64)]
    eng.warmup(prompt_lengths=[40], speculative=True)
    compiled = chunk_jit._cache_size(), start_jit._cache_size()
    with eng:
        for n in (40, 37, 33):
            got, _ = eng.generate(LONG[:n], SamplingParams(max_tokens=6), timeout=120)
            assert got == reference(tuple(LONG[:n]), 6, False)
        assert eng.stats()["prefill_chunks"] == 15
    assert (chunk_jit._cache_size(), start_jit._cache_size()) == compiled
