"""Engine benchmark of the paged latent cache and the prefix cache (CPU or any backend).

    python benchmarks/paged_cache_bench.py [--config=configs/small.py] [--max-len=1024]
        [--budget-requests=4] [--requests=32] [--prompt-len=24] [--max-tokens=16]
        [--prefix-len=400] [--page-size=64]

1. Memory and throughput at one cache budget. The pool holds `--budget-requests` max-length
   requests (cache_tokens = budget x max_len). "contiguous" reproduces the pre-paging engine at
   that memory: one max_len region per slot, so budget slots (the old `Engine(slots=budget)`
   held exactly slots x max_len positions). "paged": the same pool with `--requests` slots;
   every request holds only the pages it has written. Both serve `--requests` short requests
   (prompt `--prompt-len`, `--max-tokens` greedy tokens, all submitted at once); reported:
   generated tokens per second, peak concurrent requests, and cache bytes held per running
   request at the peak (pages referenced x bytes per page, over the running ones).
2. Time to first token with and without a prefix hit: prompts sharing a `--prefix-len`-token
   prefix; the first request prefills it all, the next ones find its full pages cached. Reported:
   hit tokens and mean TTFT (over 3 requests each, after a warm-up that compiles every program).

Random weights (`decode_bench.random_variables`). Print-only: results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_bench import load_model_config, table  # noqa: E402

from dsjax.inference.engine import Engine, SamplingParams  # noqa: E402
from dsjax.testing import random_variables  # noqa: E402


def cache_bytes_per_token(engine: Engine) -> int:
    pages = engine.stats()["cache_pages"] + 1
    total = sum(x.nbytes for x in jax.tree.leaves((engine._state.cache, engine._state.mtp_cache)))
    return total // (pages * engine.page_size)


def serve_all(engine: Engine, prompts, params) -> tuple[float, int, float]:
    """Submits every prompt at once; returns (seconds, peak running, peak bytes per running)."""
    done = threading.Event()
    left = [len(prompts)]
    peak = [0, 0.0]
    per_token = cache_bytes_per_token(engine)
    lock = threading.Lock()

    def on_event(ev):
        s = engine.stats()
        if s["active"] > peak[0]:
            held = s["cache_pages_used"] * engine.page_size
            peak[0], peak[1] = s["active"], held * per_token / s["active"]
        if ev.finish_reason is not None:
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

    t0 = time.perf_counter()
    for p in prompts:
        engine.submit(p, params, on_event)
    assert done.wait(3600)
    return time.perf_counter() - t0, peak[0], peak[1]


def ttft(engine: Engine, prompt, params) -> float:
    first = threading.Event()
    t0 = time.perf_counter()
    engine.submit(prompt, params, lambda ev: first.set())
    assert first.wait(3600)
    elapsed = time.perf_counter() - t0
    while engine.stats()["active"]:
        time.sleep(0.001)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "small.py"))
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--budget-requests", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=400)
    p.add_argument("--page-size", type=int, default=64)
    args = p.parse_args()
    cfg = load_model_config(args.config)
    variables = random_variables(cfg)
    rng = np.random.RandomState(0)
    prompts = [
        rng.randint(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.requests)
    ]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    budget = args.budget_requests * args.max_len
    common = dict(max_len=args.max_len, page_size=args.page_size, cache_tokens=budget)
    common.update(min_window=args.page_size, prefix_cache=False)

    rows = []
    for name, slots in (("contiguous", args.budget_requests), ("paged", args.requests)):
        with Engine(cfg, variables, slots=slots, min_batch=slots, **common) as eng:
            eng.warmup([args.prompt_len], all_windows=False)
            serve_all(eng, prompts[: min(slots, 4)], params)  # compiles what warmup did not
            if name == "contiguous":  # one max_len region per request, as the slot held
                secs, peak, _ = serve_all(eng, prompts, params)
                per_req = args.max_len * cache_bytes_per_token(eng)
            else:
                secs, peak, per_req = serve_all(eng, prompts, params)
        tok = args.requests * args.max_tokens
        rows.append([name, slots, peak, f"{tok / secs:.1f}", f"{per_req / 2**10:.0f} KiB"])
    print(f"{cfg.num_hidden_layers} layers, cache budget {budget} tokens, page {args.page_size}")
    print(table(rows, ["engine", "slots", "peak running", "tok/s", "cache per running request"]))

    base = rng.randint(0, cfg.vocab_size, args.prefix_len).tolist()
    tails = [rng.randint(0, cfg.vocab_size, 8).tolist() for _ in range(8)]
    one = SamplingParams(max_tokens=1)
    results = []
    for cached in (False, True):
        with Engine(
            cfg, variables, slots=2, max_len=args.max_len, page_size=args.page_size,
            min_window=args.page_size, prefix_cache=cached,
        ) as eng:  # fmt: skip
            ttft(eng, base + tails[0], one)  # warm-up: compiles (and, cached, fills the cache)
            ttft(eng, base + tails[1], one)
            h0 = eng.stats()["prefix_cache_hit_tokens"]
            times = [ttft(eng, base + t, one) for t in tails[2:5]]
            hits = (eng.stats()["prefix_cache_hit_tokens"] - h0) // 3
        results.append(["on" if cached else "off", hits, f"{1e3 * np.mean(times):.1f} ms"])
    print(f"prompts: {args.prefix_len}-token shared prefix + 8 tokens")
    print(table(results, ["prefix cache", "hit tokens per request", "mean TTFT"]))


if __name__ == "__main__":
    main()
