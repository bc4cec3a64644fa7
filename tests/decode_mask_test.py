"""Allowed-token masks in the decode core (`decode.prefill` / `decode.step`, `allowed_BW`).

Rows get a fixed allowed set each (row 0: everything); decoding runs through the real prefill and
step programs, plain and MTP-speculative, greedy and sampled. Checked: every emitted token is in
its row's set (drafts, verification, residual draws and the missing bonus included), greedy
masked tokens are the argmax over the allowed set of an independent full forward's logits,
greedy speculative output equals plain output under the masks, and the unmasked row is what an
unmasked run gives.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.inference import decode
from dsjax.inference import sampling as smp
from dsjax.model.transformer import Transformer
from dsjax.testing import drafter_variables, tiny_config

CFG = tiny_config()
PROMPTS = [[5, 9, 14, 3, 7], [11, 2], [1, 2, 3, 4, 5, 6, 7, 8], [40, 41, 42]]
STEPS = 10


def test_pack_and_unpack_allowed_round_trip():
    rng = np.random.default_rng(0)
    for V in (1, 31, 32, 33, 100):
        allowed = rng.random((3, V)) < 0.4
        words = smp.pack_allowed(allowed)
        assert words.shape == (3, -(-V // 32)) and words.dtype == np.uint32
        assert np.array_equal(np.asarray(smp.unpack_allowed(jnp.asarray(words), V)), allowed)
    # Bit v % 32 of word v // 32 is token v.
    assert smp.pack_allowed(np.eye(40, dtype=bool)[33])[0].tolist() == [0, 2]


def _allowed_sets(seed: int = 0) -> np.ndarray:
    """Row 0 allows everything; the others a random quarter of the vocabulary."""
    rng = np.random.default_rng(seed)
    allowed = rng.random((len(PROMPTS), CFG.vocab_size)) < 0.25
    allowed[0] = True
    return allowed


@functools.partial(jax.jit, static_argnames=("speculative",))
def _prefill(variables, tokens, lengths, req, allowed_BW, *, speculative):
    return decode.prefill(
        CFG, variables, tokens, lengths, req, cache_len=32, speculative=speculative,
        allowed_BW=allowed_BW,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("speculative",))
def _step(variables, state, allowed_BW, *, speculative):
    return decode.step(CFG, variables, state, speculative=speculative, allowed_BW=allowed_BW)


def _run(variables, allowed, *, speculative, temperature):
    """Tokens per row (and how many each step emitted per row) under fixed masks."""
    B, P = len(PROMPTS), max(len(p) for p in PROMPTS)
    tokens = np.zeros((B, P), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    params = [smp.SamplingParams(max_tokens=STEPS, temperature=temperature, seed=7)] * B
    req = decode.row_requests(params, range(B), None, 4, speculative_default=speculative)
    words = None if allowed is None else smp.pack_allowed(allowed)
    state, out = _prefill(variables, tokens, lengths, req, words, speculative=speculative)
    rows = [[int(t)] for t in np.asarray(out.tokens_B2[:, 0])]
    per_step = []
    while not bool(np.all(np.asarray(state.done_B))):
        state, out = _step(variables, state, words, speculative=speculative)
        n = np.asarray(out.n_B)
        per_step.append(n)
        for i in range(B):
            rows[i].extend(int(t) for t in np.asarray(out.tokens_B2[i, : n[i]]))
    return rows, np.array(per_step)


@pytest.fixture(scope="module")
def variables():
    # An MTP module that drafts well: most drafts are accepted, so the "accepted, no bonus"
    # path of masked rows runs often.
    return drafter_variables(CFG, seed=3, residual=0.01)


def test_masked_greedy_is_argmax_over_the_allowed_set(variables):
    allowed = _allowed_sets()
    rows, _ = _run(variables, allowed, speculative=False, temperature=0.0)
    forward = jax.jit(lambda v, t: Transformer(CFG).apply(v, t, run_mtp=False).logits[0])
    for i, (prompt, out) in enumerate(zip(PROMPTS, rows, strict=True)):
        assert len(out) == STEPS and all(allowed[i, t] for t in out)
        seq = np.array([prompt + out], np.int32)
        logits = np.asarray(forward(variables, seq))[len(prompt) - 1 : -1]
        want = np.where(allowed[i], logits, -np.inf).argmax(-1)
        assert out == want.tolist(), i
    unmasked, _ = _run(variables, None, speculative=False, temperature=0.0)
    assert rows[0] == unmasked[0]  # the all-ones row is decoded as without masks
    assert any(rows[i] != unmasked[i] for i in range(1, len(PROMPTS)))  # the masks bite


def test_speculative_decoding_respects_masks(variables):
    allowed = _allowed_sets()
    plain, _ = _run(variables, allowed, speculative=False, temperature=0.0)
    spec, per_step = _run(variables, allowed, speculative=True, temperature=0.0)
    assert spec == plain  # greedy speculation stays exact under masks
    assert per_step[:, 1:].max() <= 1  # masked rows take no bonus token
    assert per_step[:, 0].max() == 2  # the unmasked row still does
    for temperature in (1.0, 3.0):
        for speculative in (False, True):
            rows, _ = _run(variables, allowed, speculative=speculative, temperature=temperature)
            for i, out in enumerate(rows):
                assert len(out) == STEPS and all(allowed[i, t] for t in out), (i, speculative)


# ====================================================================== engine
class EveryThird:
    """A test constraint: tokens divisible by 3 only; complete after `length` tokens."""

    def __init__(self, length: int, fail: bool = False):
        self.length, self.fail, self.seen = length, fail, []

    @property
    def finished(self) -> bool:
        return len(self.seen) >= self.length

    def allowed_words(self, remaining: int) -> np.ndarray:
        if self.fail and self.seen:
            raise RuntimeError("broken constraint")
        return smp.pack_allowed(np.arange(CFG.vocab_size) % 3 == 0)[0]

    def advance(self, tokens) -> None:
        self.seen.extend(tokens)


def test_engine_constrained_requests_beside_free_ones(variables):
    from dsjax.inference.engine import Engine

    prompts = PROMPTS[:3]
    params = smp.SamplingParams(max_tokens=STEPS, logprobs=3)
    forward = jax.jit(lambda v, t: Transformer(CFG).apply(v, t, run_mtp=False).logits[0])
    with Engine(CFG, variables, slots=4, max_len=32, min_batch=4, min_window=32) as engine:
        free_alone = engine.generate(prompts[0], params)
        results: dict[int, list] = {}
        done = threading.Event()

        def collect(ev):
            results.setdefault(ev.request_id, []).append(ev)
            if sum(e[-1].finish_reason is not None for e in results.values()) == 3:
                done.set()

        constraints = [EveryThird(6), EveryThird(6, fail=True)]
        ids = [
            engine.submit(prompts[0], params, collect),
            # Complete exactly at max_tokens: finish_reason is still "stop".
            engine.submit(
                prompts[1], dataclasses.replace(params, max_tokens=6), collect,
                constraint=constraints[0],
            ),  # fmt: skip
            engine.submit(prompts[2], params, collect, constraint=constraints[1]),
        ]
        assert done.wait(120)
    free, masked, broken = ([t for ev in results[i] for t in ev.tokens] for i in ids)
    assert (free, results[ids[0]][-1].finish_reason) == free_alone
    assert results[ids[1]][-1].finish_reason == "stop" and len(masked) == 6
    assert constraints[0].seen == masked and all(t % 3 == 0 for t in masked)
    logits = np.asarray(forward(variables, np.array([prompts[1] + masked], np.int32)))
    want = np.where(np.arange(CFG.vocab_size) % 3 == 0, logits, -np.inf).argmax(-1)
    assert masked == want[len(prompts[1]) - 1 : -1].tolist()
    # Log-probs of the masked request: of the masked distribution it was drawn from.
    masked_lp = jax.nn.log_softmax(
        np.where(np.arange(CFG.vocab_size) % 3 == 0, logits, -np.inf)[len(prompts[1]) - 1 : -1]
    )
    got_lp = [x for ev in results[ids[1]] if ev.logprobs for x in ev.logprobs]
    want_lp = np.take_along_axis(np.asarray(masked_lp), np.array(masked)[:, None], 1)[:, 0]
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-4)
    tops = [t for ev in results[ids[1]] if ev.top_logprobs for t in ev.top_logprobs]
    assert all(tok % 3 == 0 for top in tops for tok, _ in top)
    assert results[ids[2]][-1].finish_reason == "error" and len(broken) == 1
    assert "broken constraint" in results[ids[2]][-1].error
