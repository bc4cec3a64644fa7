"""DeepSeek-V4 in the serving engine and the HTTP app: compressed entries and indexer keys in the
page pool, window rings, compressor buffers and MTP ring per slot (`dsjax.inference.
engine_programs`), under continuous batching, chunked prefill and MTP speculation, decode what
`generate` decodes; a pool too small for the load preempts and changes no output, and the pool
is all the entries' memory; no page or slot is left held; a V4 Hugging Face checkpoint loaded as
serve.py loads it answers a chat completion.

One tiny_v4 checkpoint (fp32, one MTP module, a BPE tokenizer with a chat template) and one
engine shape (4 slots, 64 positions) serve every test, so the engine's programs compile once.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_v4
from dsjax import testing
from dsjax.checkpoints.hf import save_hf_checkpoint
from dsjax.inference.engine import Engine, SamplingParams
from dsjax.inference.generate import generate
from dsjax.inference.loading import load_model
from dsjax.inference.page_pool import TRASH
from dsjax.model import v4_cache
from dsjax.model.transformer import init_variables
from dsjax.testing import tokens_of
from dsjax.text.tokenizer import BOS_TOKEN
from dsjax.train import step as ts

# Longer than the window (8) except the first, a multiple of neither compression rate (4, 8);
# with prefill_chunk=8 all but the first are prefilled chunk by chunk.
LENGTHS = (5, 11, 14, 19, 22)
N = 12
ENGINE = dict(slots=4, max_len=64, page_size=8, prefill_chunk=8, min_batch=4)
CHAT = "hello world"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny_v4 Hugging Face directory (dsjax's writer) with tokenizer files."""
    tok = testing.chat_tokenizer()
    cfg = ts.model_config(tiny_v4.get_config()).replace(
        dtype="float32", param_dtype="float32", num_mtp_layers=1, vocab_size=tok.vocab_size
    )
    v = init_variables(cfg, jax.random.key(3))
    # Every constant-initialised float leaf (sinks, ape, biases, norms) made live.
    keys = iter(jax.random.split(jax.random.key(4), len(jax.tree.leaves(v))))
    v = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype)
        if x.dtype == jnp.float32 else x, v,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("v4serve")
    save_hf_checkpoint(path, cfg, jax.device_get(v))
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    cfg, variables, tok, _ = load_model(checkpoint)  # as serve.py loads it
    assert cfg.is_v4 and "mtp_0" in variables["params"]
    return cfg, variables, tok


@pytest.fixture(scope="module")
def prompts(model):
    cfg, _, tok = model
    rng = np.random.RandomState(0)
    rows = [rng.randint(3, cfg.vocab_size, n).tolist() for n in LENGTHS]
    chat = tok.encode(f"{BOS_TOKEN}<user>{CHAT}\n<assistant>", parse_special=True)
    return rows + [chat]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """`generate`'s greedy and seeded-sampled tokens (one compiled program for both)."""
    cfg, variables, _ = model
    greedy = generate(cfg, variables, prompts, N).tokens
    sampled = generate(cfg, variables, prompts, N, temperature=1.0, top_k=20, rng=7).tokens
    return greedy, sampled


@pytest.fixture(scope="module")
def engine(model):
    cfg, variables, tok = model
    with Engine(cfg, variables, eos_id=tok.eos_id, **ENGINE) as eng:
        yield eng


def run_all(engine, prompts, params, rows=None):
    """Submits every prompt at once; returns each request's tokens."""
    events: dict[int, list] = {}
    done = threading.Event()
    lock = threading.Lock()

    def collect(ev):
        with lock:
            events.setdefault(ev.request_id, []).append(ev)
            if len(events) == len(prompts) and all(e[-1].finish_reason for e in events.values()):
                done.set()

    rows = rows or [0] * len(prompts)
    ids = [engine.submit(p, params, collect, row=r) for p, r in zip(prompts, rows, strict=True)]
    assert done.wait(600)
    return [tokens_of(events[i]) for i in ids]


def assert_nothing_held(engine):
    stats = engine.stats()
    engine._sched.pool.check()
    assert stats["active"] == 0 and stats["free_slots"] == engine.slots
    assert stats["cache_pages_used"] == 0 and stats["cache_pages_free"] == stats["cache_pages"]
    assert (engine._sched.tables == TRASH).all()


def test_engine_equals_generate_greedy_mtp_and_seeded(model, prompts, engine, reference):
    """6 concurrent requests on 4 slots (one queued), prompts of 5..22 tokens, chunked prefill:
    plain greedy, MTP speculative greedy and seeded sampling (row i as generate's row i) equal
    `generate`; afterwards no slot or page is held."""
    cfg, _, _ = model
    greedy, sampled = reference
    plain = SamplingParams(max_tokens=N, ignore_eos=True, speculative=False)
    assert run_all(engine, prompts, plain) == greedy
    spec = SamplingParams(max_tokens=N, ignore_eos=True, speculative=True)
    assert run_all(engine, prompts, spec) == greedy
    seeded = SamplingParams(
        max_tokens=N, ignore_eos=True, speculative=False, temperature=1.0, top_k=20, seed=7
    )
    assert run_all(engine, prompts, seeded, rows=list(range(len(prompts)))) == sampled
    stats = engine.stats()
    assert stats["prefill_chunks"] > stats["prefills"] > 0  # chunked prefills ran
    assert stats["draft_tokens"] > 0 and stats["prefix_cache_hit_tokens"] == 0
    assert_nothing_held(engine)
    # The pools' bytes per position: the entries' and indexer keys' (per_token, exact here).
    per_token = v4_cache.cache_bytes(cfg, 1, ENGINE["max_len"])["per_token"]
    assert stats["cache_bytes_per_token"] == per_token > 0


def test_preemption_under_a_small_pool_changes_no_output(model, prompts, reference):
    """A pool of 6 pages (8 tokens) for requests of up to 5 pages: running requests are
    preempted and resumed (prompt + generated tokens prefilled again into a reused slot) with
    MTP speculation on; the output is still `generate`'s and nothing is left held. The
    entries and indexer keys are the pool's 6 + 1 (TRASH) pages, 8 / rate entries each."""
    cfg, variables, tok = model
    with Engine(cfg, variables, eos_id=tok.eos_id, cache_tokens=48, **ENGINE) as eng:
        leaves = jax.tree_util.tree_leaves_with_path(eng._state.cache)
        named = lambda n: [x for path, x in leaves if getattr(path[-1], "name", "") == n]  # noqa: E731
        assert {x.shape[-3:-1] for x in named("entries")} == {(7, 8 // 4), (7, 8 // 8)}
        assert {x.shape[-3] for x in named("kv")} == {ENGINE["slots"]}  # buffers: per slot
        spec = SamplingParams(max_tokens=N, ignore_eos=True, speculative=True)
        assert run_all(eng, prompts, spec) == reference[0]
        assert eng.stats()["preemptions"] > 0
        assert_nothing_held(eng)


def test_v4_checkpoint_serves_a_chat_completion(model, prompts, engine, reference):
    """The HTTP app over the warmed-up engine: a greedy chat completion of the V4 checkpoint is
    `generate`'s continuation of the chat-templated prompt, up to eos or max_tokens."""
    from fastapi.testclient import TestClient

    from dsjax.serve.app import create_app

    _, _, tok = model
    engine.warmup((1, 20))  # as serve.py does (its programs are compiled by now: quick)
    client = TestClient(create_app(engine, tok, "tiny-v4"))
    body = {"messages": [{"role": "user", "content": CHAT}], "max_tokens": N, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    want = reference[0][-1]
    if tok.eos_id in want:
        want = want[: want.index(tok.eos_id) + 1]
    assert out["usage"] == {
        "prompt_tokens": len(prompts[-1]),
        "completion_tokens": len(want),
        "total_tokens": len(prompts[-1]) + len(want),
    }
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == tok.decode([t for t in want if t != tok.eos_id])
    assert out["choices"][0]["finish_reason"] == ("stop" if tok.eos_id in want else "length")
    assert_nothing_held(engine)


def test_engine_refuses_a_mesh_the_paged_kernel_or_a_bad_page_size_for_v4_in_one_line(model):
    cfg, _, _ = model
    with pytest.raises(ValueError, match="XLA gather path"):
        Engine(cfg, {}, paged_attention="pallas")
    with pytest.raises(ValueError, match=r"multiple of every compression rate \(4, 8\)"):
        Engine(cfg, {}, page_size=12)
    assert v4_cache.engine_page_size(cfg, None) == 64
    assert v4_cache.engine_page_size(cfg.replace(compress_rate_hca=128), None) == 128
    with pytest.raises(ValueError, match="DeepSeek-V4 in the engine runs on one device"):
        Engine(cfg, {}, mesh=object())  # type: ignore[arg-type]
