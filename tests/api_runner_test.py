"""Tests for dsjax.serve.runner and dsjax.serve.app over a scripted fake engine (nothing compiles).

The fake engine answers each request from its seed: token i is (prompt[-1] + i + seed) % V with
log-probability -(seed % 7) / 10, finishing with "length" — or fails ("error") or is cancelled
by the server ("cancelled") for two magic seeds. That pins down what the API layer does with
each engine outcome: choice order, best_of ranking, usage, truthful finish reasons, errors.
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from dsjax.inference.engine import TokenEvent
from dsjax.serve.app import create_app
from dsjax.text.tokenizer import Tokenizer, train_bpe

FAIL_SEED, CANCEL_SEED = 666, 667


class FakeEngine:
    def __init__(self, vocab_size: int):
        self.cfg = SimpleNamespace(vocab_size=vocab_size)
        self.cancelled: list[int] = []
        self.submitted: list = []
        self._next = 0

    def stats(self):
        return {"slots": 2, "max_queue": 6, "max_len": 64, "active": 0, "queued": 0}

    def submit(self, prompt, params, callback):
        params.validate()
        rid, self._next = self._next, self._next + 1
        self.submitted.append((rid, list(prompt), params))
        threading.Thread(target=self._run, args=(rid, prompt, params, callback)).start()
        return rid

    def cancel(self, rid):
        self.cancelled.append(rid)

    def _run(self, rid, prompt, params, callback):
        if params.seed in (FAIL_SEED, CANCEL_SEED):
            reason = "error" if params.seed == FAIL_SEED else "cancelled"
            callback(TokenEvent(rid, (), reason, "boom" if reason == "error" else None))
            return
        lp = -((params.seed or 0) % 7) / 10
        for i in range(params.max_tokens):
            last = i == params.max_tokens - 1
            token = (prompt[-1] + i + (params.seed or 0)) % self.cfg.vocab_size
            extra = {}
            if params.logprobs is not None:
                top = tuple((token + j, lp - j) for j in range(params.logprobs))
                extra = {"logprobs": (lp,), "top_logprobs": (top,)}
            callback(TokenEvent(rid, (token,), "length" if last else None, **extra))


@pytest.fixture(scope="module")
def tokenizer():
    trained = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, 300)
    return Tokenizer(trained.backend, bos_token="<|bos|>", eos_token="<|eos|>")


@pytest.fixture
def app(tokenizer):
    engine = FakeEngine(tokenizer.vocab_size)
    return engine, TestClient(create_app(engine, tokenizer, "fake"))


def test_choices_seeds_usage_and_best_of(app, tokenizer):
    engine, client = app
    body = {"prompt": [[10, 11], [20]], "max_tokens": 3, "n": 2, "seed": 5, "logprobs": 1}
    out = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [p.seed for _, _, p in engine.submitted] == [5, 6, 5, 6]  # choice k: seed + k
    assert [p.logprobs for _, _, p in engine.submitted] == [1] * 4
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    assert all(c["finish_reason"] == "length" for c in out["choices"])
    assert out["choices"][1]["logprobs"]["token_logprobs"] == [-0.6] * 3  # seed 6

    # best_of=4, n=2: candidates seeds 3..6 score -0.3..-0.6; the two best are seeds 3 and 4.
    engine.submitted.clear()
    body = {"prompt": [7], "max_tokens": 2, "n": 2, "best_of": 4, "seed": 3}
    out = client.post("/v1/completions", json=body).json()
    assert [p.logprobs for _, _, p in engine.submitted] == [0] * 4  # needed for the ranking
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert [c["text"] for c in out["choices"]] == [tokenizer.decode([7 + s, 8 + s]) for s in (3, 4)]
    assert all(c["logprobs"] is None for c in out["choices"])  # not asked for
    assert out["usage"]["completion_tokens"] == 8


def test_engine_failures_are_errors_not_stop(app):
    engine, client = app
    r = client.post("/v1/completions", json={"prompt": "the", "seed": FAIL_SEED})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "seed": CANCEL_SEED},
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_cancelled"
    body = {"prompt": "the", "seed": CANCEL_SEED, "stream": True}
    lines = [x for x in client.post("/v1/completions", json=body).text.splitlines() if x]
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "request_cancelled"
    assert "data: [DONE]" not in lines


def test_stop_string_cuts_text_and_cancels(app, tokenizer):
    engine, client = app
    ids = tokenizer.encode("the quick brown fox")
    full = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6}).json()
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2 :][:2]
    assert stop
    out = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "stop": stop})
    choice = out.json()["choices"][0]
    assert choice["text"] == text[: text.index(stop)] and choice["finish_reason"] == "stop"
    assert engine.submitted[-1][0] in engine.cancelled


def _openai_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_probe_findings_routes_and_unencodable_names(app):
    """Probe findings: a trailing slash got a 307 redirect (no OpenAI body), a lone surrogate in
    a field name a 500 (the error message naming it could not be encoded), and
    `client.models.retrieve` a 404 (no GET /v1/models/{model})."""
    _, client = app
    for method, path in [("POST", "/v1/completions/"), ("POST", "/v1/chat/completions/"),
                         ("GET", "/v1/models/"), ("GET", "/health/")]:  # fmt: skip
        r = client.request(method, path, json={"prompt": "the"}, follow_redirects=False)
        assert _openai_error(r, 404)["type"] == "not_found_error", path
    raw = b'{"prompt": "the", "\\ud800x": 1}'
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    err = _openai_error(r, 400)
    assert err["param"] == "\\ud800x" and "U+D800" in err["message"]
    assert client.get("/v1/models/fake").json()["id"] == "fake"
    assert _openai_error(client.get("/v1/models/other"), 404)["code"] == "model_not_found"
