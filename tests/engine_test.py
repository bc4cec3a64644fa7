"""Tests for dsjax.inference.engine over the decode core: same tokens as `generate` for the same seeds
(sampling and MTP speculation on), speculative greedy = plain greedy, log-probs = log_softmax of
the model's logits (no-cache forward), truthful finish reasons, stop ids, parameter validation.

One engine (4 slots, one row bucket, one attention window) serves every test, and every engine
request asks for log-probs, so only a few programs are compiled.
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.inference.engine import Engine, SamplingParams, TokenEvent
from dsjax.inference.generate import generate
from dsjax.model.transformer import Transformer
from dsjax.testing import PROMPTS, drafter_variables, tiny_config, tokens_of

TINY = tiny_config()
NEW = 10
SAMPLED = dict(temperature=1.0, top_k=6, top_p=0.9)


@pytest.fixture(scope="module")
def variables():
    # A good MTP drafter: speculative steps accept most drafts (both branches exercised).
    return drafter_variables(TINY, seed=3, residual=0.01)


@pytest.fixture(scope="module")
def engine(variables):
    with Engine(TINY, variables, slots=4, max_len=32, min_batch=4, min_window=32) as eng:
        yield eng


@pytest.fixture(scope="module")
def forward(variables):
    fn = jax.jit(lambda v, t: Transformer(TINY).apply(v, t, run_mtp=False).logits[0])

    def run(seq):
        padded = np.zeros((1, 32), np.int32)
        padded[0, : len(seq)] = seq
        return np.asarray(fn(variables, jnp.asarray(padded)), np.float64)[: len(seq)]

    return run


def run_all(engine, prompts, params, rows=None) -> list[list[TokenEvent]]:
    """Submits all prompts at once; returns each request's events."""
    events: dict[int, list[TokenEvent]] = {}
    done = threading.Event()
    lock = threading.Lock()

    def collect(ev):
        with lock:
            events.setdefault(ev.request_id, []).append(ev)
            if sum(e[-1].finish_reason is not None for e in events.values()) == len(prompts):
                done.set()

    rows = rows or [0] * len(prompts)
    ids = [engine.submit(p, params, collect, row=r) for p, r in zip(prompts, rows, strict=True)]
    assert done.wait(120)
    return [events[i] for i in ids]


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_engine_equals_generate_for_same_seed(engine, variables, forward, speculative):
    ref = generate(TINY, variables, PROMPTS, NEW, rng=7, speculative=speculative, **SAMPLED)
    params = SamplingParams(max_tokens=NEW, seed=7, logprobs=3, speculative=speculative, **SAMPLED)
    results = run_all(engine, PROMPTS, params, rows=list(range(len(PROMPTS))))
    for prompt, events, want in zip(PROMPTS, results, ref.tokens, strict=True):
        got = tokens_of(events)
        assert got == want
        assert events[-1].finish_reason == "length"
        # Log-probs: log_softmax of the raw logits (no-cache forward), top-3 sorted.
        logits = forward(prompt + got)[len(prompt) - 1 : -1]
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        lp = logits - lse[:, None]
        ours = [x for ev in events for x in (ev.logprobs or ())]
        np.testing.assert_allclose(ours, lp[np.arange(NEW), got], atol=2e-4)
        tops = [x for ev in events for x in (ev.top_logprobs or ())]
        for t, top in enumerate(tops):
            ids = [i for i, _ in top]
            assert ids == np.argsort(-lp[t])[:3].tolist()
            np.testing.assert_allclose([x for _, x in top], lp[t, ids], atol=2e-4)
    if speculative:
        stats = engine.stats()
        assert stats["draft_tokens"] > 0 and 0 < stats["accepted_tokens"] <= stats["draft_tokens"]
        assert stats["tokens_per_forward"] > 1.0


def test_speculative_greedy_equals_plain_greedy_and_stop_ids(engine, variables):
    plain = generate(TINY, variables, PROMPTS, NEW)
    for spec in (True, False):
        params = SamplingParams(max_tokens=NEW, logprobs=0, speculative=spec)
        assert [tokens_of(e) for e in run_all(engine, PROMPTS, params)] == plain.tokens

    # stop_token_ids: in generate and in the engine, the stop token is included, reason "stop".
    stop = plain.tokens[0][3]
    cut = [t[: t.index(stop) + 1] if stop in t else t for t in plain.tokens]
    stopped = generate(TINY, variables, PROMPTS, NEW, stop_token_ids=[stop], speculative=True)
    assert stopped.tokens == cut
    assert stopped.finish_reasons[0] == "stop"
    params = SamplingParams(max_tokens=NEW, logprobs=0, stop_token_ids=(stop,))
    results = run_all(engine, PROMPTS, params)
    assert [tokens_of(e) for e in results] == cut
    assert [e[-1].finish_reason for e in results] == stopped.finish_reasons


def test_cancel_failing_callback_and_shutdown_report_truthfully(variables):
    eng = Engine(TINY, variables, slots=4, max_len=32, min_batch=4, min_window=32).start()
    long = SamplingParams(max_tokens=18, ignore_eos=True, logprobs=0)
    events: dict[int, list[TokenEvent]] = {}
    first = threading.Event()

    def collect(ev):
        events.setdefault(ev.request_id, []).append(ev)
        first.set()

    def broken(ev):
        raise RuntimeError("client went away")

    cancelled = eng.submit(PROMPTS[0], long, collect)
    failing = eng.submit(PROMPTS[1], long, broken)
    assert first.wait(60)
    eng.cancel(cancelled)
    running = eng.submit(PROMPTS[2], SamplingParams(max_tokens=18, logprobs=0), collect)
    eng.stop()  # the still-running request ends "cancelled"
    assert events[cancelled][-1].finish_reason == "cancelled"
    assert events[running][-1].finish_reason == "cancelled"
    stats = eng.stats()
    assert stats["finished_error"] == 1 and stats.get("finished_stop", 0) == 0
    assert failing not in events


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("max_tokens", 0, r"max_tokens=0: .*\[1, 2147483647\]"),
        ("max_tokens", 2**31, "max_tokens"),
        ("temperature", float("nan"), "temperature=nan: must be a finite"),
        ("temperature", 1e9, "temperature"),
        ("temperature", -1.0, "temperature"),
        ("top_k", -1, "top_k"),
        ("top_p", 0.0, r"top_p=0.0: .*\(0, 1\]"),
        ("top_p", 1.5, "top_p"),
        ("seed", -1, "seed"),
        ("seed", 2**64, "seed"),
        ("stop_token_ids", (64,), r"stop_token_ids=.*vocab_size=64"),
        ("logprobs", 21, r"logprobs=21: .*\[0, 20\]"),
        ("speculative", "yes", "speculative"),
    ],
)
def test_sampling_params_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value}).validate(vocab_size=64)
    SamplingParams(seed=2**64 - 1, logprobs=20, temperature=100.0).validate(vocab_size=64)


def test_warmup_compiles_every_row_bucket_so_staggered_requests_never_compile(
    variables, monkeypatch
):
    from dsjax.inference import engine_programs as programs

    step_jit, admit_jit = programs.step, programs.admit
    rows_used = []

    def recording_step(*args, **kw):
        rows_used.append(kw["rows"])
        return step_jit(*args, **kw)

    monkeypatch.setattr(programs, "step", recording_step)
    eng = Engine(TINY, variables, slots=4, max_len=32, min_batch=1, min_window=32)
    before = step_jit._cache_size()
    eng.warmup(prompt_lengths=[len(p) for p in PROMPTS], speculative=False)
    assert step_jit._cache_size() - before == 3  # row buckets 1, 2, 4; one window; plain
    rows_used.clear()
    compiled = step_jit._cache_size(), admit_jit._cache_size()
    with eng:
        # Staggered: each request is admitted while the previous ones are decoding.
        firsts = [threading.Event() for _ in PROMPTS]
        results: dict[int, list[TokenEvent]] = {}
        for i, (prompt, ev) in enumerate(zip(PROMPTS, firsts, strict=True)):

            def collect(e, i=i, ev=ev):
                results.setdefault(i, []).append(e)
                ev.set()

            params = SamplingParams(max_tokens=32 - len(prompt) - 1, speculative=False)
            eng.submit(prompt, params, collect)
            assert ev.wait(60)
        deadline = time.monotonic() + 60
        while not all(r[-1].finish_reason for r in results.values()) or len(results) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert {1, 2, 4} <= set(rows_used)
    assert (step_jit._cache_size(), admit_jit._cache_size()) == compiled
    with pytest.raises(ValueError, match="prompt_lengths: 32 must be in"):
        eng.warmup(prompt_lengths=[32])
