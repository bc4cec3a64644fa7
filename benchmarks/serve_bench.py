"""Server throughput benchmark: serve.py under 1 / 4 / 16 concurrent streaming clients.

    python benchmarks/serve_bench.py [--checkpoint=DIR] [--config=configs/small.py]
        [--clients=1,4,16] [--requests=4] [--prompt-len=32] [--max-tokens=64] [--slots=16]

Without --checkpoint a random checkpoint of the config's model (float32) is written to a
temporary Hugging Face directory together with a byte-level BPE tokenizer trained on a small
built-in corpus. serve.py runs in a subprocess on a free local port; each client sends
`--requests` streamed completions one after another (token-id prompts of `--prompt-len`,
`max_tokens` tokens each with ignore_eos, greedy), after a warm-up of two requests per client
per level (which compiles the step shapes it needs). Reported per concurrency level: generated
tokens per second over the whole run, requests per second, mean time to first token and mean
request latency; then the mean decode step, the speculative (MTP) acceptance rate and the tokens
per row forward over the measured runs (engine counters from /health). Print-only: the lead copies the table into benchmarks/RESULTS.md.
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
    args = p.parse_args(argv)

    if args.checkpoint:
        path = Path(args.checkpoint)
        config = path / "config.json"
        vocab = json.loads(config.read_text())["vocab_size"] if config.exists() else 256
    else:
        path, vocab = make_checkpoint(args.config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "serve.py"),
            f"--checkpoint={path}",
            f"--port={port}",
            f"--slots={args.slots}",
            f"--max-len={args.max_len}",
            "--max-queue=256",
        ],
        env=env,
    )
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        # Warm up: compile the prompt bucket and the step shapes of every level. Two requests
        # per client, so the staggered tails (fewer active rows: smaller row buckets) compile
        # here too; one round left them to the measured run (4 clients: 14 tok/s, not 900).
        for level in (int(c) for c in args.clients.split(",")):
            asyncio.run(run_level(url, level, 2, args.prompt_len, args.max_tokens, vocab, seed=0))
        before = httpx.get(f"{url}/health").json()
        rows = []
        for level in (int(c) for c in args.clients.split(",")):
            rows.append(
                asyncio.run(
                    run_level(
                        url,
                        level,
                        args.requests,
                        args.prompt_len,
                        args.max_tokens,
                        vocab,
                        seed=level,
                    )
                )
            )
            print(table(rows[-1:], HEADER), flush=True)
        stats = httpx.get(f"{url}/health").json()
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
