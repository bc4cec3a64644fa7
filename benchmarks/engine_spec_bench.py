"""MTP speculative decoding in the serving engine, on a checkpoint trained by train.py.

    python benchmarks/engine_spec_bench.py --workdir=runs/small [--prompts=8] [--max-tokens=64]
        [--concurrency=1,8] [--repeats=3] [--prompt-tokens=96] [--dtype=float32]

Loads the work directory's latest checkpoint the way serve.py does (`dsjax.inference.loading.load_model`),
takes `--prompts` held-out prompts (`train_lib.heldout_prompts`: the start of each held-out
document up to its first `def`/`class` line, from the run's own config.json and corpus; BOS first,
as in training) and runs them through one `dsjax.inference.engine.Engine` greedily, with MTP speculation
off and on (`SamplingParams.speculative` per request; every request of a pass the same), at each
`--concurrency` (requests in flight at once; the engine has that many slots in use).

Per concurrency it prints, for plain and speculative decoding: generated tokens per second of
wall time over the whole workload (median of `--repeats` timed passes after one untimed pass that
compiles), and for the speculative passes the acceptance rate (accepted / drafted MTP tokens) and
tokens per main forward (decoded tokens per row forward, from `Engine.stats()` differences);
then the speed-up and whether greedy outputs are identical with and without speculation (they
should be: the draft is verified by the main model). Requests run to `--max-tokens` (eos is
ignored) so both passes do the same work. Print-only; copy figures into benchmarks/RESULTS.md
with the machine named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="a train.py work directory")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--concurrency", default="1,8", help="requests in flight, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting")
    p.add_argument("--prompt-tokens", type=int, default=96, help="longest prompt in tokens")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if min(args.concurrency) < 1 or args.prompts < 1 or args.repeats < 1 or args.max_tokens < 1:
        p.error("--prompts, --max-tokens, --repeats and every --concurrency must be >= 1")
    return args


def load_prompts(workdir: str, tokenizer, n: int, max_tokens: int) -> list[tuple[str, list[int]]]:
    """(document name, token ids) of the run's first `n` usable held-out documents' prompts."""
    import ml_collections

    from dsjax.train import loop as train_lib

    with open(Path(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    held = train_lib.heldout_prompts(config, tokenizer, max_tokens - 1, n)  # BOS comes first
    if not held:
        raise ValueError(f"{workdir}: the run's held-out split has no usable document")
    bos = tokenizer.bos_id is not None  # training rows are [bos] + document + [eos]
    return [(name, tokenizer.encode(prompt, add_bos=bos)) for name, prompt, _ in held]


def run_pass(engine, prompts, params, concurrency: int) -> tuple[list[list[int]], float]:
    """Runs every prompt with at most `concurrency` in flight; (outputs, wall seconds)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    cv = threading.Condition()
    state = {"in_flight": 0, "finished": 0, "error": None}

    def on_event(i, ev):
        outputs[i].extend(ev.tokens)
        if ev.finish_reason is not None:
            with cv:
                state["in_flight"] -= 1
                state["finished"] += 1
                if ev.finish_reason not in ("length", "stop"):
                    state["error"] = f"request {i}: {ev.finish_reason} {ev.error or ''}"
                cv.notify_all()

    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        with cv:
            cv.wait_for(lambda: state["in_flight"] < concurrency)
            state["in_flight"] += 1
        engine.submit(ids, params, lambda ev, i=i: on_event(i, ev))
    with cv:
        cv.wait_for(lambda: state["finished"] == len(prompts))
    seconds = time.perf_counter() - t0
    if state["error"]:
        raise RuntimeError(state["error"])
    return outputs, seconds


def measure(engine, prompts, params, concurrency: int, repeats: int) -> dict:
    """One untimed pass, then `repeats` timed ones: tok/s median, stats over the timed passes."""
    run_pass(engine, prompts, params, concurrency)
    before = engine.stats()
    rates, outputs = [], None
    for _ in range(repeats):
        outputs, seconds = run_pass(engine, prompts, params, concurrency)
        rates.append(sum(map(len, outputs)) / seconds)
    after = engine.stats()
    d = {k: after[k] - before[k] for k in ("generated_tokens", "prefills", "forwards", "steps")}
    d.update({k: after[k] - before[k] for k in ("draft_tokens", "accepted_tokens")})
    decoded = d["generated_tokens"] - d["prefills"]
    return {
        "tok_s": statistics.median(rates),
        "tok_s_all": rates,
        "outputs": outputs,
        "acceptance": d["accepted_tokens"] / d["draft_tokens"] if d["draft_tokens"] else None,
        "tokens_per_forward": decoded / d["forwards"] if d["forwards"] else None,
        "steps_per_pass": d["steps"] / repeats,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from dsjax.inference.engine import Engine, SamplingParams
    from dsjax.inference.loading import load_model

    cfg, variables, tokenizer, _ = load_model(args.workdir, args.dtype)
    if not (cfg.num_mtp_layers > 0 and "mtp_0" in variables.get("params", {})):
        print(f"error: {args.workdir}: the checkpoint has no MTP module to speculate with")
        return 2
    prompts = load_prompts(args.workdir, tokenizer, args.prompts, args.prompt_tokens)
    ids = [p for _, p in prompts]
    lengths = [len(p) for p in ids]
    print(
        f"{args.workdir}: {jax.devices()[0].platform}, dtype {cfg.dtype}, {len(ids)} held-out "
        f"prompts of {min(lengths)}-{max(lengths)} tokens, {args.max_tokens} new tokens each, "
        "greedy, eos ignored"
    )
    slots = max(args.concurrency)
    max_len = min(cfg.max_position_embeddings, max(lengths) + args.max_tokens + 2)
    engine = Engine(cfg, variables, slots=slots, max_len=max_len, eos_id=tokenizer.eos_id).start()
    try:
        t0 = time.perf_counter()
        engine.warmup(lengths)
        print(f"warm-up (compiles): {time.perf_counter() - t0:.1f} s")
        rows = []
        for c in args.concurrency:
            res = {}
            for spec in (False, True):
                params = SamplingParams(
                    max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, speculative=spec
                )
                res[spec] = measure(engine, ids, params, c, args.repeats)
            same = sum(
                a == b for a, b in zip(res[False]["outputs"], res[True]["outputs"], strict=True)
            )
            rows.append((c, res, same))
            print(
                f"concurrency {c}: plain {res[False]['tok_s']:.0f} tok/s "
                f"({', '.join(f'{r:.0f}' for r in res[False]['tok_s_all'])}), "
                f"speculative {res[True]['tok_s']:.0f} tok/s "
                f"({', '.join(f'{r:.0f}' for r in res[True]['tok_s_all'])})"
            )
    finally:
        engine.stop()

    print()
    print("| in flight | plain tok/s | MTP spec tok/s | speed-up | acceptance | tokens/forward "
          "| greedy identical |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for c, res, same in rows:
        plain, spec = res[False], res[True]
        print(
            f"| {c} | {plain['tok_s']:.0f} | {spec['tok_s']:.0f} | "
            f"{spec['tok_s'] / plain['tok_s']:.2f}x | {spec['acceptance']:.1%} | "
            f"{spec['tokens_per_forward']:.2f} | {same}/{len(ids)} |"
        )
    differ = [
        prompts[i][0]
        for c, res, _ in rows[:1]
        for i, (a, b) in enumerate(zip(res[False]["outputs"], res[True]["outputs"], strict=True))
        if a != b
    ]
    if differ:
        print(f"greedy outputs differ (concurrency {rows[0][0]}) for: {', '.join(differ)}")
    name, _ = prompts[0]
    first = rows[-1][1][True]["outputs"][0]
    print(f"\nfirst prompt ({name}) continued, speculative:\n{tokenizer.decode(first)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
