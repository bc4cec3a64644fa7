"""Chunked prefill (first chunk expanded, later chunks absorbed over the cache) against the
one-shot prefill: caches (main and MTP), last-token logits and hidden states, greedy tokens."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from dsjax.inference import decode
from dsjax.inference.generate import generate
from dsjax.inference.sampling import SamplingParams
from dsjax.testing import random_variables, rel_err, tiny_config

CFG = tiny_config(num_hidden_layers=2)  # one dense and one MoE layer, one MTP module


@pytest.fixture(scope="module")
def variables():
    return random_variables(CFG, seed=7)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _prefill(variables, tokens, lengths, req, chunk):
    return decode.prefill(
        CFG,
        variables,
        tokens,
        lengths,
        req,
        cache_len=48,
        speculative=True,
        top_n=4,
        prefill_chunk=chunk,
    )


def test_chunked_prefill_equals_oneshot_cache_logits_and_mtp(variables):
    rng = np.random.RandomState(0)
    P, lengths = 40, np.array([40, 23], np.int32)  # chunk 16: 8 expanded tokens, 2 chunks of 16
    tokens = rng.randint(0, CFG.vocab_size, (2, P)).astype(np.int32)
    req = decode.row_requests([SamplingParams(max_tokens=4)] * 2, [0, 1], None, stop_width=1)
    one, one_out = _prefill(variables, tokens, lengths, req, None)
    chk, chk_out = _prefill(variables, tokens, lengths, req, 16)
    for name, a, b in [
        ("cache", chk.cache, one.cache),
        ("mtp_cache", chk.mtp_cache, one.mtp_cache),
        ("hidden", chk.hidden_B2D, one.hidden_B2D),
    ]:
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert rel_err(x, y) < 1e-4, name
    assert rel_err(np.exp(chk_out.top_logprobs_B2N), np.exp(one_out.top_logprobs_B2N)) < 1e-4
    np.testing.assert_array_equal(chk_out.top_ids_B2N, one_out.top_ids_B2N)
    np.testing.assert_array_equal(chk.tokens_B, one.tokens_B)


def test_chunked_generate_greedy_tokens_equal_oneshot(variables):
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, CFG.vocab_size, 37).tolist(), [3, 1, 4, 1, 5]]
    one = generate(CFG, variables, prompts, 6, prefill_chunk=None)
    chk = generate(CFG, variables, prompts, 6, prefill_chunk=16)
    assert chk.tokens == one.tokens
    assert len(set(one.tokens[0])) > 1  # not a degenerate constant continuation
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate(CFG, variables, prompts, 6, prefill_chunk=0)
