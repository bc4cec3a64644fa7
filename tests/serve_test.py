"""Tests for dsjax.inference.engine (continuous batching) and serve.py / dsjax.serve.app (HTTP API).

One tiny random Hugging Face checkpoint (with a BPE tokenizer trained in-test and a chat
template) serves every test. Engine results are checked against `dsjax.generate`; the HTTP
server runs as ONE subprocess on a free local port (the official `openai` client talks to it);
log-probabilities are checked against the Hugging Face model in torch. Request parsing is
tested without a server in api_requests_test.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from dsjax import testing
from dsjax.checkpoints.hf import load_hf_checkpoint
from dsjax.inference.engine import Engine, QueueFull, SamplingParams
from dsjax.inference.generate import generate
from dsjax.serve.responses import TokenText
from dsjax.text.tokenizer import BOS_TOKEN, Tokenizer
from tests import hf_fixtures as fx

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
MAX_LEN = 128
# 16 requests: prompt lengths 1..16 (prefill buckets 8 and 16), different max_tokens.
PROMPT_IDS = [[(7 * i + 3 * j) % 250 + 3 for j in range(1 + i)] for i in range(16)]
MAX_TOKENS = [4 + (5 * i) % 13 for i in range(16)]


# ====================================================================== fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random HF DeepSeek-V3 directory with tokenizer.json + tokenizer_config.json."""
    path = tmp_path_factory.mktemp("ckpt")
    tok = testing.chat_tokenizer()
    tok.save(path)
    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    model = fx.separated_hf_model(
        0,
        vocab_size=tok.vocab_size,
        max_position_embeddings=256,
        rope_parameters=default_rope,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server_process(checkpoint, tmp_path_factory):
    """serve.py in a subprocess (started early: it compiles while in-process tests run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "serve.py"),
                f"--checkpoint={checkpoint}",
                f"--port={port}",
                "--slots=4",
                "--min-batch=4",
                f"--max-len={MAX_LEN}",
                "--max-queue=32",
                f"--api-key={API_KEY}",
                "--model-name=tiny",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield proc, f"http://127.0.0.1:{port}", log
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(server_process):
    """Base URL of the running server (waits until /health answers)."""
    proc, url, log = server_process
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def model(checkpoint, server_process):
    cfg, variables = load_hf_checkpoint(checkpoint)
    return cfg, variables, Tokenizer.load(checkpoint)


@pytest.fixture(scope="module")
def reference(model):
    """Single-request greedy results from `generate` (eos = the tokenizer's)."""
    cfg, variables, tok = model
    result = generate(cfg, variables, PROMPT_IDS, max(MAX_TOKENS), eos_id=tok.eos_id)
    out = []
    for tokens, n in zip(result.tokens, MAX_TOKENS, strict=True):
        tokens = tokens[:n]
        stopped = tok.eos_id in tokens
        out.append(
            (
                tokens[: tokens.index(tok.eos_id) + 1] if stopped else tokens,
                "stop" if stopped else "length",
            )
        )
    return out


def _headers():
    return {"Authorization": f"Bearer {API_KEY}"}


# ====================================================================== engine
def test_engine_batched_results_equal_single_generate(model, reference):
    cfg, variables, tok = model
    # min_window=16: requests cross from a 16- to a 32-position attention window mid-way.
    with Engine(
        cfg, variables, slots=4, max_len=MAX_LEN, eos_id=tok.eos_id, min_batch=4, min_window=16
    ) as engine:
        results: dict[int, list] = {}
        done = threading.Event()

        def collect(ev):
            entry = results.setdefault(ev.request_id, [[], None])
            entry[0].extend(ev.tokens)
            if ev.finish_reason is not None:
                entry[1] = ev.finish_reason
                if len(results) == 16 and all(r[1] is not None for r in results.values()):
                    done.set()

        # All 16 at once: 4 slots, so requests join and leave a running batch.
        ids = [
            engine.submit(p, SamplingParams(max_tokens=n), collect)
            for p, n in zip(PROMPT_IDS, MAX_TOKENS, strict=True)
        ]
        assert done.wait(120)
        for rid, (tokens, reason) in zip(ids, reference, strict=True):
            assert results[rid] == [tokens, reason]
        stats = engine.stats()
        assert stats["prefills"] == 16 and stats["tokens"] == sum(len(r[0]) for r in reference)


def test_engine_sampling_queue_full_and_cancel(model):
    cfg, variables, tok = model
    with Engine(cfg, variables, slots=4, max_len=MAX_LEN, max_queue=1) as engine:
        # Seeded sampling does not depend on the neighbours (alone: a 1-slot step; then 4).
        params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
        alone = engine.generate(PROMPT_IDS[5], params)
        busy = [
            engine.submit(p, SamplingParams(max_tokens=60, ignore_eos=True)) for p in PROMPT_IDS[:1]
        ]
        while engine.stats()["queued"]:
            time.sleep(0.001)
        assert engine.generate(PROMPT_IDS[5], params) == alone
        engine.cancel(busy[0])

        long = SamplingParams(max_tokens=120, ignore_eos=True)
        events: dict[int, list] = {}
        running = []
        for p in PROMPT_IDS[:4]:
            running.append(
                engine.submit(p, long, lambda ev: events.setdefault(ev.request_id, []).append(ev))
            )
            while engine.stats()["queued"]:  # admitted before the next one is queued
                time.sleep(0.001)
        waiting = engine.submit(PROMPT_IDS[4], long)
        with pytest.raises(QueueFull):
            engine.submit(PROMPT_IDS[5], long)
        with pytest.raises(ValueError, match="exceeds the context length"):
            engine.submit([1] * 100, SamplingParams(max_tokens=29))
        for rid in [*running, waiting]:
            engine.cancel(rid)
        deadline = time.time() + 30
        while engine.stats()["free_slots"] < 4 or engine.stats()["queued"]:
            assert time.time() < deadline
            time.sleep(0.01)
        assert all(events[r][-1].finish_reason in ("cancelled", "length") for r in running)
        assert engine.stats()["finished_cancelled"] >= 2  # the queued one at least


def test_queue_full_is_503_in_app(model):
    from fastapi.testclient import TestClient

    from dsjax.serve.app import create_app

    cfg, variables, tok = model
    with Engine(cfg, variables, slots=4, max_len=MAX_LEN, max_queue=1) as engine:
        client = TestClient(create_app(engine, tok, "tiny"))
        long = SamplingParams(max_tokens=120, ignore_eos=True)
        busy = []
        for p in PROMPT_IDS[:4]:
            busy.append(engine.submit(p, long))
            while engine.stats()["queued"]:
                time.sleep(0.001)
        busy.append(engine.submit(PROMPT_IDS[4], long))
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        for rid in busy:
            engine.cancel(rid)
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200, r.text

        # A request the engine cancels (here: shutdown) is an error, never finish_reason "stop".
        result = {}
        body = {"prompt": "hello", "max_tokens": 120, "ignore_eos": True}
        sender = threading.Thread(
            target=lambda: result.update(r=client.post("/v1/completions", json=body))
        )
        sender.start()
        while not engine.stats()["active"]:
            time.sleep(0.001)
        engine.stop()
        sender.join(30)
        assert result["r"].status_code == 503, result["r"].text
        assert result["r"].json()["error"]["code"] == "request_cancelled"
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]


# ====================================================================== HTTP server
def _post(url, path, body, **kw):
    return httpx.post(f"{url}{path}", json=body, headers=_headers(), timeout=60, **kw)


def _stream(url, path, body) -> tuple[str, list[dict]]:
    """Concatenated text deltas and the parsed chunks of a streamed request."""
    chunks, lines = [], []
    with httpx.stream(
        "POST", f"{url}{path}", json={**body, "stream": True}, headers=_headers(), timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunks.append(json.loads(line[len("data: ") :]))
    text = ""
    for c in chunks:
        for choice in c["choices"]:
            text += choice.get("text") or choice.get("delta", {}).get("content") or ""
    return text, chunks


def test_completion_chat_and_streaming(server, model):
    _, _, tok = model
    assert httpx.get(f"{server}/v1/models", headers=_headers()).json()["data"][0]["id"] == "tiny"
    body = {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 12, "temperature": 0}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    n_prompt = len(tok.encode("the quick brown fox"))
    assert out["object"] == "text_completion" and out["usage"]["prompt_tokens"] == n_prompt
    assert out["usage"]["total_tokens"] == n_prompt + out["usage"]["completion_tokens"]
    text, chunks = _stream(server, "/v1/completions", body)
    assert text == out["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]

    chat = {
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": 10,
        "temperature": 0,
    }
    r = _post(server, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["role"] == "assistant"
    expected_prompt = tok.encode(f"{BOS_TOKEN}<user>hello world\n<assistant>", parse_special=True)
    assert r.json()["usage"]["prompt_tokens"] == len(expected_prompt)
    text, chunks = _stream(
        server, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}}
    )
    assert text == message["content"]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[-1]["usage"] == r.json()["usage"]

    # A stop string cuts the text (streamed and not) before its first occurrence.
    full = _post(server, "/v1/completions", {**body, "max_tokens": 20}).json()
    full_text = full["choices"][0]["text"]
    letters = [c for c in full_text[1:] if c.isascii() and c.isalnum()]
    if letters:
        stop = letters[0]
        cut = full_text[: full_text.index(stop)]
        r = _post(server, "/v1/completions", {**body, "max_tokens": 20, "stop": [stop]})
        assert r.json()["choices"][0] == {
            **r.json()["choices"][0],
            "text": cut,
            "finish_reason": "stop",
        }
        assert (
            _stream(server, "/v1/completions", {**body, "max_tokens": 20, "stop": stop})[0] == cut
        )


def test_concurrent_requests_equal_single_request_results(server, model, reference):
    _, _, tok = model

    async def run_all():
        async with httpx.AsyncClient(timeout=120, headers=_headers()) as client:

            async def one(prompt, n):
                r = await client.post(
                    f"{server}/v1/completions",
                    json={"prompt": prompt, "max_tokens": n, "temperature": 0},
                )
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]

            return await asyncio.gather(
                *(one(p, n) for p, n in zip(PROMPT_IDS, MAX_TOKENS, strict=True))
            )

    results = asyncio.run(run_all())
    for choice, (tokens, reason) in zip(results, reference, strict=True):
        assert choice["text"] == tok.decode(tokens)
        assert choice["finish_reason"] == reason


def test_bad_requests_get_openai_errors_and_server_keeps_serving(server):
    def error(r, status):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err

    url = f"{server}/v1/completions"
    error(httpx.post(url, content=b"{not json", headers=_headers()), 400)
    assert (
        error(_post(server, "/v1/completions", {"prompt": "x", "max_tokens": -3}), 400)["param"]
        == "max_tokens"
    )
    err = error(_post(server, "/v1/completions", {"prompt": [5] * 120, "max_tokens": 20}), 400)
    assert err["code"] == "context_length_exceeded" and "140" in err["message"]
    error(_post(server, "/v1/completions", {"prompt": "x", "n": 0}), 400)
    error(_post(server, "/v1/completions", {"prompt": "x", "temperature": "hot"}), 400)
    error(_post(server, "/v1/completions", {"prompt": [[]]}), 400)
    error(_post(server, "/v1/chat/completions", {"messages": "hi"}), 400)
    assert (
        error(_post(server, "/v1/completions", {"prompt": "x", "model": "gpt-9"}), 404)["code"]
        == "model_not_found"
    )
    error(httpx.post(url, json={"prompt": "x"}), 401)
    error(httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401)
    error(httpx.get(f"{server}/v1/nothing", headers=_headers()), 404)
    r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_dropped_stream_frees_its_slot(server):
    before = httpx.get(f"{server}/health").json()
    body = {
        "prompt": "the",
        "max_tokens": 120,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body, headers=_headers(), timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # close the connection after the first chunk
    deadline = time.time() + 30
    while True:
        health = httpx.get(f"{server}/health").json()
        if health["free_slots"] == health["slots"] and health.get(
            "finished_cancelled", 0
        ) > before.get("finished_cancelled", 0):
            break
        assert time.time() < deadline, health
        time.sleep(0.05)
    assert health["tokens"] - before["tokens"] < 120  # stopped early, not run to the end


def test_serve_prompt_samples_like_http_for_the_same_seed(server, checkpoint, capsys):
    """`serve.py --prompt` (generate, no FastAPI) and an HTTP request with the same seed."""
    sys.path.insert(0, str(REPO))
    import serve

    args = ["--prompt=the quick", "--max-tokens=10", "--temperature=1", "--seed=77"]
    assert serve.main([f"--checkpoint={checkpoint}", *args]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    body = {"prompt": "the quick", "max_tokens": 10, "temperature": 1, "seed": 77}
    r = _post(server, "/v1/completions", body)
    assert printed == "the quick" + r.json()["choices"][0]["text"]


def test_load_model_from_workdir_and_hf_dir(tmp_path, checkpoint, model):
    """serve.py's loader: a train.py workdir (Orbax model + config, tokenizer/) and an HF dir."""
    import dataclasses

    import jax
    import orbax.checkpoint as ocp

    from dsjax.inference.loading import load_model

    cfg, variables, tok = model
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", options=options)
    manager.save(
        3,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(variables),
            config=ocp.args.JsonSave({"model": dataclasses.asdict(cfg)}),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    tok.save(tmp_path / "tokenizer")

    for path in (tmp_path, checkpoint):
        got_cfg, got_vars, got_tok, add_bos = load_model(path)
        assert got_cfg == cfg and got_tok.eos_id == tok.eos_id and add_bos is False
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), got_vars, variables))
    # a workdir whose run stopped before its first checkpoint: said so, not "no safetensors"
    early = tmp_path / "early"
    tok.save(early / "tokenizer")
    (early / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="train.py workdir with no checkpoints/"):
        load_model(early)


def test_hub_ids_resolve_from_the_local_cache_offline(
    tmp_path, checkpoint, model, monkeypatch, capsys
):
    """`org/name` ids through huggingface_hub, from a cache laid out as the Hub client does."""
    import jax

    sys.path.insert(0, str(REPO))
    import serve
    from dsjax.inference.loading import load_model

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--dsjax--tiny"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, variables, tok = model
    for spec in ("dsjax/tiny", f"dsjax/tiny@{commit}"):
        got_cfg, got_vars, got_tok, _ = load_model(spec)
        assert got_cfg == cfg and got_tok.vocab_size == tok.vocab_size
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), got_vars, variables))
    assert serve.main(["--checkpoint=dsjax/tiny", "--prompt=the", "--max-tokens=2"]) == 0
    for missing in ("dsjax/absent", "dsjax/tiny@v9"):
        assert serve.main([f"--checkpoint={missing}", "--prompt=x"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"'{missing}'" in err and "HF_HUB_OFFLINE" in err, err


# ====================================================================== OpenAI client
def test_openai_client_completions_chat_stream_n_and_logprobs(server, checkpoint, model):
    """The official client: models list, completions and chat (streamed and not), n=2 with a
    seed, logprobs checked against the Hugging Face model's log-softmax."""
    import openai

    _, _, tok = model
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    prompt = PROMPT_IDS[6]
    greedy = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    greedy["extra_body"] = {"ignore_eos": True}
    out = client.completions.create(prompt=prompt, logprobs=3, **greedy)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 6
    assert len(lp.tokens) == len(lp.token_logprobs) == 6
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(token_lp, abs=1e-6)  # greedy
    # The token strings name the generated ids (whole characters, or "bytes:\xNN" pieces).
    token_text = TokenText(tok)
    id_of = {token_text(i)[0]: i for i in range(tok.vocab_size)}
    ids = prompt + [id_of[t] for t in lp.tokens]
    assert tok.decode(ids[len(prompt) :]) == choice.text
    # Independent reference: HF transformers' log-softmax at each generated position.
    hf = DeepseekV3ForCausalLM.from_pretrained(checkpoint).float().eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids[len(prompt) :])]
    assert lp.token_logprobs == pytest.approx(want, abs=2e-4)

    streamed = list(client.completions.create(prompt=prompt, stream=True, logprobs=3, **greedy))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [x for p in pieces for x in p.token_logprobs] == lp.token_logprobs
    assert [x for p in pieces for x in p.text_offset] == lp.text_offset

    # n=2 with a seed: two distinct choices; choice 0 is the n=1 result for that seed.
    body = {"prompt": "the quick", "max_tokens": 8, "temperature": 1.0, "seed": 123}
    body["extra_body"] = {"ignore_eos": True}
    two = client.completions.create(model="tiny", n=2, **body)
    one = client.completions.create(model="tiny", **body)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 16
    assert two.choices[0].text == one.choices[0].text != two.choices[1].text

    messages = [{"role": "user", "content": "hello world"}]
    short = {"model": "tiny", "messages": messages, "max_completion_tokens": 5, "temperature": 0}
    chat = client.chat.completions.create(logprobs=True, top_logprobs=2, **short)
    content = chat.choices[0].logprobs.content
    assert chat.choices[0].message.role == "assistant" and 1 <= len(content) <= 5
    assert tok.decode([id_of[c.token] for c in content]) == chat.choices[0].message.content
    assert all(bytes(c.bytes) == token_text(id_of[c.token])[1] for c in content)
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    stream = client.chat.completions.create(stream=True, **short)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", n=2, best_of=1)
    assert info.value.body["param"] == "best_of"

    # best_of=3: the candidate (of the 3 that n=3 gives for the seed) with the best mean logprob.
    candidates = client.completions.create(model="tiny", n=3, logprobs=0, **body).choices
    best = client.completions.create(model="tiny", best_of=3, **body)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates]
    assert best.choices[0].text == candidates[means.index(max(means))].text
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == 24


# ====================================================================== hardening
def _error_json(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_hostile_bodies_and_fields_get_4xx(server):
    url = f"{server}/v1/completions"
    raw = lambda b: httpx.post(url, content=b, headers=_headers(), timeout=30)  # noqa: E731
    assert "nests" in _error_json(raw(b"[" * 100_000 + b"]" * 100_000), 400)["message"]
    big_int = b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}"
    assert "digits" in _error_json(raw(big_int), 400)["message"]
    assert _error_json(raw(b'{"prompt": "a\\ud800b"}'), 400)["param"] == "prompt"

    def param(path, body):
        return _error_json(_post(server, path, body), 400)["param"]

    for field, value in [("top_k", 2**31), ("seed", 10**30), ("seed", 2**64), ("logprobs", 99)]:
        assert param("/v1/completions", {"prompt": "x", field: value}) == field
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    bad = {**chat, "max_completion_tokens": "x"}
    assert param("/v1/chat/completions", bad) == "max_completion_tokens"
    # Never silently ignored: each is implemented or a 400 naming it.
    echo = {"prompt": "the", "max_tokens": 2, "temperature": 0, "echo": True}
    assert _post(server, "/v1/completions", echo).json()["choices"][0]["text"].startswith("the")
    for field, value in [("best_of", 0), ("frequency_penalty", 1), ("suffix", "!"), ("nope", 1)]:
        assert param("/v1/completions", {"prompt": "x", field: value}) == field
    # Requests that can never fit: 400 saying the limit (4 slots + 32 queued), not 503.
    err = _error_json(_post(server, "/v1/completions", {"prompt": [[5]] * 100}), 400)
    assert err["code"] == "too_many_sequences" and "at most 36" in err["message"]


def test_big_body_is_refused_before_parsing_and_health_answers(server):
    body = b'{"prompt": "' + b"a" * 50_000_000 + b'"}'
    result = {}

    def send():
        t0 = time.perf_counter()
        result["r"] = httpx.post(
            f"{server}/v1/completions", content=body, headers=_headers(), timeout=60
        )
        result["s"] = time.perf_counter() - t0

    sender = threading.Thread(target=send)
    sender.start()
    health = httpx.get(f"{server}/health", timeout=10)
    sender.join(60)
    assert health.status_code == 200
    err = _error_json(result["r"], 413)
    assert err["code"] == "request_too_large" and "4194304" in err["message"]
    assert result["s"] < 20


def test_non_streaming_disconnect_cancels_and_metrics(server):
    before = httpx.get(f"{server}/health").json()
    # 16 choices x 120 tokens on 4 slots: the client hangs up once the first ones run.
    body = json.dumps(
        {"prompt": "the", "n": 16, "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    ).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        while not httpx.get(f"{server}/health").json()["active"]:
            time.sleep(0.002)
    deadline = time.time() + 30
    while True:
        health = httpx.get(f"{server}/health").json()
        cancelled = health.get("finished_cancelled", 0) - before.get("finished_cancelled", 0)
        if health["free_slots"] == health["slots"] and not health["queued"] and cancelled >= 4:
            break
        assert time.time() < deadline, health
        time.sleep(0.02)
    assert health["generated_tokens"] - before["generated_tokens"] < 16 * 120
    metrics = httpx.get(f"{server}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    values = dict(
        line.rsplit(" ", 1) for line in metrics.text.splitlines() if not line.startswith("#")
    )
    assert float(values["dsjax_generated_tokens_total"]) >= health["generated_tokens"]
    assert values["dsjax_active_slots"] == "0" and values["dsjax_queue_depth"] == "0"
    assert float(values['dsjax_requests_finished_total{reason="cancelled"}']) >= 4
    assert "dsjax_speculative_acceptance_ratio" in values


def test_any_json_value_in_any_field_is_200_or_4xx(server, server_process):
    """Property: one running server, random JSON in one field of a valid request."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dsjax.serve.requests import CHAT_FIELDS, COMPLETION_FIELDS

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=6,
    )

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(COMPLETION_FIELDS | CHAT_FIELDS)), values, st.booleans())
    def check(field, value, chat):
        base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "the"}
        body = {**base, "max_tokens": 2, field: value}
        r = httpx.post(
            f"{server}/v1/{'chat/' if chat else ''}completions",
            content=json.dumps(body),
            headers={**_headers(), "content-type": "application/json"},
            timeout=60,
        )
        if r.status_code != 200:
            assert 400 <= r.status_code < 500, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert "unhandled error" not in server_process[2].read_text()


def test_serve_prompt_on_a_decode_mesh_prints_the_same_completion(checkpoint, capsys):
    """`serve.py --prompt --mesh=expert=2,tensor=4` (the decode layout on the 8 test devices)
    completes greedily exactly as on one device; a bad --mesh is a one-line error."""
    sys.path.insert(0, str(REPO))
    import serve

    args = [f"--checkpoint={checkpoint}", "--prompt=the quick", "--max-tokens=8"]
    assert serve.main(args) == 0
    single = capsys.readouterr().out
    assert serve.main([*args, "--mesh=expert=2,tensor=4"]) == 0
    assert capsys.readouterr().out == single
    assert serve.main([*args, "--mesh=experts=2"]) == 2
    assert "AXIS=SIZE" in capsys.readouterr().err
