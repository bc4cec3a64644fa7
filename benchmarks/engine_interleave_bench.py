"""A decoding stream's longest gap between tokens while a long prompt is prefilled, with the
engine's whole-prompt admit vs its chunked prefill interleaved with the decode steps.

    python benchmarks/engine_interleave_bench.py [--config=configs/small.py]
        [--prompt-tokens=2048] [--chunks=off,512,256] [--repeats=3]

A random checkpoint of the config's model (float32, `max_position_embeddings` raised to hold the
prompt). One `dsjax.inference.engine.Engine` per setting (2 slots, plain greedy decoding, everything
compiled by `Engine.warmup` and one untimed pass first). Stream A (a 16-token prompt) decodes;
once it has produced 32 tokens a `--prompt-tokens` prompt B arrives (max_tokens 8). Per setting,
the median over `--repeats` passes of: A's median gap between tokens before B arrived, A's
longest gap from B's arrival to B's last token, B's time to first token, and prefill chunks
run. `off`: prefill_chunk above the prompt length, i.e. the whole prompt in one admit program (as
before interleaving: chunked by decode.PREFILL_CHUNK inside that one program). Print-only; copy
figures into benchmarks/RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from benchmarks.decode_bench import load_model_config  # noqa: E402
from dsjax.inference.engine import Engine, SamplingParams  # noqa: E402
from dsjax.model.transformer import init_variables  # noqa: E402

SHORT_TOKENS, WARM_TOKENS, LONG_NEW = 16, 32, 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/small.py", help="a configs/*.py file")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="the long prompt's length")
    p.add_argument("--chunks", default="off,512,256", help="prefill_chunk settings ('off')")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting")
    return p.parse_args(argv)


def one_pass(engine: Engine, short: list[int], long: list[int], max_short: int) -> dict:
    """A decodes; B arrives after A's WARM_TOKENS-th token; returns the pass's figures."""
    times: list[float] = []  # A's token arrival times (one per token)
    marks: dict[str, float] = {}
    done = threading.Event()
    rid: dict[str, int] = {}

    def on_long(ev):
        now = time.perf_counter()
        marks.setdefault("first", now)
        if ev.finish_reason is not None:
            marks["last"] = now
            engine.cancel(rid["short"])

    def on_short(ev):
        now = time.perf_counter()
        times.extend([now] * len(ev.tokens))
        if len(times) >= WARM_TOKENS and "arrive" not in marks:
            marks["arrive"] = time.perf_counter()
            engine.submit(long, SamplingParams(max_tokens=LONG_NEW, ignore_eos=True), on_long)
        if ev.finish_reason is not None:
            done.set()

    chunks0 = engine.stats()["prefill_chunks"]
    rid["short"] = engine.submit(
        short, SamplingParams(max_tokens=max_short, ignore_eos=True), on_short
    )
    assert done.wait(600)
    if "last" not in marks:
        raise RuntimeError("stream A ended before the long prompt finished: raise max_len")
    before = [b - a for a, b in zip(times, times[1:], strict=False) if b <= marks["arrive"]]
    during = [t for t in times if marks["arrive"] <= t <= marks["last"]]
    edges = [marks["arrive"], *during, marks["last"]]
    return {
        "gap_before_ms": 1e3 * statistics.median(before),
        "max_gap_ms": 1e3 * max(b - a for a, b in zip(edges, edges[1:], strict=False)),
        "ttft_s": marks["first"] - marks["arrive"],
        "a_tokens_during": len(during),
        "chunks": engine.stats()["prefill_chunks"] - chunks0,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    P = args.prompt_tokens
    max_len = 1 << (P + LONG_NEW + 1).bit_length()
    cfg = load_model_config(args.config)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, max_len))
    variables = init_variables(cfg, jax.random.key(0))
    rng = jax.random.split(jax.random.key(1))
    short = jax.random.randint(rng[0], (SHORT_TOKENS,), 0, cfg.vocab_size).tolist()
    long = jax.random.randint(rng[1], (P,), 0, cfg.vocab_size).tolist()
    print(f"backend {jax.default_backend()}, config {args.config}, prompt {P}, max_len {max_len}")
    print("setting | A gap before (ms) | A max gap (ms) | B TTFT (s) | A tokens during | chunks")
    for setting in args.chunks.split(","):
        chunk = 2 * max_len if setting == "off" else int(setting)
        eng = Engine(
            cfg,
            variables,
            slots=2,
            max_len=max_len,
            min_batch=2,
            min_window=256,
            speculative=False,
            prefill_chunk=chunk,
        )
        eng.warmup(prompt_lengths=[SHORT_TOKENS, P], all_windows=True)
        runs = []
        with eng:
            for i in range(args.repeats + 1):
                out = one_pass(eng, short, long, max_len - SHORT_TOKENS - 1)
                if i:  # the first pass is untimed
                    runs.append(out)
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{setting:>7} | {med['gap_before_ms']:17.1f} | {med['max_gap_ms']:14.1f} | "
            f"{med['ttft_s']:10.2f} | {med['a_tokens_during']:15.0f} | {med['chunks']:6.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
