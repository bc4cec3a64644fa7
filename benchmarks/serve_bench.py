"""Server throughput benchmark: serve.py under 1 / 4 / 16 concurrent streaming clients.

    python benchmarks/serve_bench.py [--checkpoint=DIR] [--config=configs/small.py]
        [--clients=1,4,16] [--requests=4] [--prompt-len=32] [--max-tokens=64] [--slots=16]
        [--cache-requests=K]

Without --checkpoint a random checkpoint of the config's model (float32) is written to a
temporary Hugging Face directory together with a byte-level BPE tokenizer trained on a small
built-in corpus. serve.py runs in a subprocess on a free local port; each client sends
`--requests` streamed completions one after another (token-id prompts of `--prompt-len`,
`max_tokens` tokens each with ignore_eos, greedy), after a warm-up of two requests per client
per level (which compiles the step shapes it needs). Reported per concurrency level: generated
tokens per second over the whole run, requests per second, mean time to first token and mean
request latency; then the mean decode step, the speculative (MTP) acceptance rate and the tokens
per row forward over the measured runs (engine counters from /health).

`--cache-requests=K` compares, at one latent cache size (K max-length requests: K x max-len
tokens), the contiguous per-slot cache (before paging: one max-len region per slot, so K slots;
reproduced as `--slots=K --cache-tokens=K*max-len`, each slot's region then always available)
with the paged cache (`--slots` slots sharing the same pool, pages taken as tokens arrive).
Each gets the same clients; reported beside throughput: the peak number of requests running
at once and the cache memory per running request (contiguous: max-len positions; paged: the
pages held, sampled from /health during the measured runs, mean over samples). Print-only:
results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_bench import load_model_config, table  # noqa: E402

from dsjax.testing import save_random_hf_checkpoint  # noqa: E402


def make_checkpoint(config: str) -> tuple[Path, int]:
    """A random HF checkpoint + BPE tokenizer in a temporary directory; returns (dir, vocab)."""
    from dsjax.text.tokenizer import train_bpe

    cfg = load_model_config(config)
    path = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    save_random_hf_checkpoint(path, cfg)
    corpus = [Path(__file__).read_text()] * 4 + [
        p.read_text() for p in (REPO / "dsjax").glob("*.py")
    ]
    tok = train_bpe(corpus, min(cfg.vocab_size, 2048))
    tok.save(path)
    return path, min(cfg.vocab_size, tok.vocab_size)


async def client_loop(client, url, prompts, max_tokens, stats):
    """Sends the prompts one after another (streamed); appends (ttft, latency, tokens)."""
    for prompt in prompts:
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        stats.append((ttft, time.perf_counter() - t0, tokens))


async def run_level(url, clients, requests, prompt_len, max_tokens, vocab, seed):
    rng = np.random.default_rng(seed)
    stats: list[tuple[float, float, int]] = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                client_loop(
                    client,
                    url,
                    rng.integers(3, vocab, (requests, prompt_len)).tolist(),
                    max_tokens,
                    stats,
                )
                for _ in range(clients)
            )
        )
        wall = time.perf_counter() - t0
    tokens = sum(s[2] for s in stats)
    return [
        clients,
        len(stats),
        tokens / wall,
        len(stats) / wall,
        1e3 * float(np.mean([s[0] for s in stats])),
        1e3 * float(np.mean([s[1] for s in stats])),
    ]


class Sampler:
    """Polls /health while running: peak running requests and cache bytes held per running
    request (mean over samples with any running)."""

    def __init__(self, url: str, period: float = 0.05):
        self.url, self.period = url, period
        self.peak, self.per_request = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                s = client.get(f"{self.url}/health").json()
                active = s["active"] - s.get("prefilling", 0)
                if active > 0:
                    self.peak = max(self.peak, s["active"])
                    held = s["cache_pages_used"] * s["page_size"] * s["cache_bytes_per_token"]
                    self.per_request.append(held / s["active"])
                time.sleep(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_server(path: Path, args, slots: int, cache_tokens: int | None):
    """serve.py in a subprocess on a free port; returns (process, url) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        str(REPO / "serve.py"),
        f"--checkpoint={path}",
        f"--port={port}",
        f"--slots={slots}",
        f"--max-len={args.max_len}",
        "--max-queue=256",
        "--no-prefix-cache",  # random prompts: no hits; keeps the memory figure the pages held
    ]
    if cache_tokens is not None:
        cmd.append(f"--cache-tokens={cache_tokens}")
    server = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 600
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            server.terminate()
            raise SystemExit("server did not start")
        time.sleep(0.5)


def run_levels(url: str, args, vocab: int):
    """Warm-up, then the measured levels; returns (rows, /health before, /health after,
    Sampler)."""
    levels = [int(c) for c in args.clients.split(",")]
    # Warm up: compile the prompt bucket and the step shapes of every level. Two requests
    # per client, so the staggered tails (fewer active rows: smaller row buckets) compile
    # here too; one round left them to the measured run (4 clients: 14 tok/s, not 900).
    for level in levels:
        asyncio.run(run_level(url, level, 2, args.prompt_len, args.max_tokens, vocab, seed=0))
    before = httpx.get(f"{url}/health").json()
    rows = []
    with Sampler(url) as sampler:
        for level in levels:
            rows.append(
                asyncio.run(
                    run_level(
                        url, level, args.requests, args.prompt_len, args.max_tokens, vocab,
                        seed=level,
                    )
                )
            )  # fmt: skip
            print(table(rows[-1:], HEADER), flush=True)
    return rows, before, httpx.get(f"{url}/health").json(), sampler


def compare_caches(path: Path, args, vocab: int) -> None:
    """Contiguous per-slot cache vs paged cache at one cache size (see the module docstring)."""
    budget = args.cache_requests * args.max_len
    out = []
    for name, slots in (("contiguous per slot", args.cache_requests), ("paged", args.slots)):
        server, url = start_server(path, args, slots, budget)
        try:
            rows, _, stats, sampler = run_levels(url, args, vocab)
        finally:
            server.terminate()
            server.wait(timeout=30)
        if name == "paged":
            per_request = float(np.mean(sampler.per_request))
        else:  # the slot's region: max_len positions, whatever the request uses
            per_request = args.max_len * stats["cache_bytes_per_token"]
        for row in rows:
            out.append([name, slots, *row[:3], sampler.peak, f"{per_request / 2**10:.0f} KiB"])
    print(
        f"\n## Contiguous per-slot vs paged latent cache ({budget} cache tokens = "
        f"{args.cache_requests} x context {args.max_len}; prompt {args.prompt_len} tokens, "
        f"{args.max_tokens} generated per request)\n"
    )
    print(table(out, ["cache", "slots", "clients", "requests", "tok/s", "peak running",
                      "cache per running request"]))  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="sequential requests per client")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument(
        "--cache-requests",
        type=int,
        default=None,
        help="compare the contiguous per-slot cache with the paged one at a cache of this many "
        "max-len requests",
    )
    args = p.parse_args(argv)

    if args.checkpoint:
        path = Path(args.checkpoint)
        config = path / "config.json"
        vocab = json.loads(config.read_text())["vocab_size"] if config.exists() else 256
    else:
        path, vocab = make_checkpoint(args.config)
    if args.cache_requests:
        compare_caches(path, args, vocab)
        return
    server, url = start_server(path, args, args.slots, None)
    try:
        rows, before, stats, _ = run_levels(url, args, vocab)
        delta = {k: stats.get(k, 0) - before.get(k, 0) for k in SPEC_KEYS}
        step_ms = delta["step_us"] / max(delta["steps"], 1) / 1e3
        accepted = delta["accepted_tokens"] / delta["draft_tokens"] if delta["draft_tokens"] else 0
        per_forward = (delta["generated_tokens"] - delta["prefills"]) / max(delta["forwards"], 1)
        print(
            f"\n## Server throughput ({args.slots} slots, context {args.max_len}, prompt "
            f"{args.prompt_len} tokens, {args.max_tokens} generated per request, "
            f"mean decode step {step_ms:.2f} ms, speculative acceptance {accepted:.2f}, "
            f"{per_forward:.2f} tokens per row forward)\n"
        )
        print(table(rows, HEADER))
    finally:
        server.terminate()
        server.wait(timeout=30)


SPEC_KEYS = (
    "steps",
    "step_us",
    "generated_tokens",
    "prefills",
    "forwards",
    "draft_tokens",
    "accepted_tokens",
)
HEADER = ["clients", "requests", "tok/s", "req/s", "mean TTFT ms", "mean latency ms"]

if __name__ == "__main__":
    main()
