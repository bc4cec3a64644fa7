"""Passkey retrieval (needle in a haystack) over context lengths, for a trained checkpoint.

    python benchmarks/passkey_eval.py --model=runs/small [--lengths=4096,8192,...,131072]
        [--depths=0,0.5,1] [--trials=5] [--seed=0] [--new-tokens=8] [--batch=8]
        [--prefill-chunk=512] [--dtype=bfloat16] [--force] [--json=FILE]

`--model` is a train.py work directory or a Hugging Face directory (`dsjax.inference.loading.load_model`);
the checkpoint's own tokenizer builds the prompts. Each prompt is

    <intro> <filler ...> The pass key is NNNNN. Remember it. <filler ...>
    What is the pass key? The pass key is

with neutral filler sentences repeated to fill `length - new_tokens` tokens (the context length
counts the answer's tokens too), the needle after a fraction `depth` of the filler (0 = at the
start, 1 = just before the question), and a 5-digit key drawn per (seed, length, depth, trial).
Greedy `dsjax.generate` (chunked prefill) writes `--new-tokens` tokens; a trial is correct when
the first run of digits in the decoded answer equals the key. Accuracy per length and depth is
printed as a markdown table and written with `--json`.

Lengths whose context exceeds the model's max_position_embeddings are reported as such and not
run (`--force` runs them anyway, raising max_position_embeddings: RoPE/YaRN are computed for any
position, but a model never trained there is extrapolating). Lengths beyond YaRN's range
(rope_original_max_position x rope_factor) but within max_position_embeddings are run and noted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsjax.inference import decode  # noqa: E402

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it afterwards.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class Trial:
    length: int
    depth: float
    index: int
    key: str
    tokens: list[int]


def make_key(seed: int, length: int, depth_index: int, trial: int) -> str:
    """A 5-digit pass key, fixed by (seed, length, depth index, trial)."""
    rng = np.random.default_rng([seed, length, depth_index, trial])
    return str(int(rng.integers(10000, 100000)))


def build_prompt(tokenizer, add_bos: bool, budget: int, depth: float, key: str) -> list[int]:
    """Token ids of the passkey prompt with as many filler sentences as fit in `budget` tokens.

    The text is encoded as a whole (what the model saw in training); the number of filler units
    starts from a per-unit estimate and shrinks until the prompt fits.
    """
    unit = len(tokenizer.encode(FILLER))
    fixed = len(tokenizer.encode(INTRO + NEEDLE.format(key=key) + QUESTION, add_bos=add_bos))
    n = max((budget - fixed) // max(unit, 1), 0)
    while True:
        before = int(round(depth * n))
        text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n - before) + QUESTION
        ids = tokenizer.encode(text, add_bos=add_bos)
        if len(ids) <= budget or n == 0:
            return ids
        n -= max(1, (len(ids) - budget) // max(unit, 1))


def answer_digits(text: str) -> str:
    """The first run of digits in the model's answer ('' if none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def length_status(cfg, length: int, force: bool) -> tuple[bool, str]:
    """(run it?, note) for a context of `length` tokens."""
    limit = cfg.max_position_embeddings
    yarn = ""
    if cfg.use_yarn:
        span = cfg.rope_original_max_position * cfg.rope_factor
        yarn = (
            f"YaRN range {cfg.rope_original_max_position}x{cfg.rope_factor:g}={span:g}"
            if span != limit
            else ""
        )
        if length > span and length <= limit:
            return True, f"beyond {yarn}"
    if length <= limit:
        return True, ""
    why = f"exceeds max_position_embeddings={limit}" + (f" ({yarn})" if yarn else "")
    return (True, f"forced: {why}") if force else (False, why)


def run_length(cfg, variables, tokenizer, add_bos, length, depths, args) -> dict:
    """All trials at one context length: accuracy per depth, answers, seconds."""
    from dsjax.inference.generate import generate

    budget = length - args.new_tokens
    trials = [
        Trial(length, d, t, key, build_prompt(tokenizer, add_bos, budget, d, key))
        for i, d in enumerate(depths)
        for t in range(args.trials)
        for key in [make_key(args.seed, length, i, t)]
    ]
    t0 = time.perf_counter()
    answers: list[str] = []
    for s in range(0, len(trials), args.batch):
        batch = trials[s : s + args.batch]
        out = generate(
            cfg,
            variables,
            [tr.tokens for tr in batch],
            args.new_tokens,
            eos_id=tokenizer.eos_id,
            prefill_chunk=args.prefill_chunk,
        )
        answers += [tokenizer.decode(toks) for toks in out.tokens]
    seconds = time.perf_counter() - t0
    per_depth = {}
    for d in depths:
        rows = [(tr, a) for tr, a in zip(trials, answers, strict=True) if tr.depth == d]
        correct = [answer_digits(a) == tr.key for tr, a in rows]
        per_depth[str(d)] = {
            "accuracy": float(np.mean(correct)),
            "correct": int(sum(correct)),
            "trials": len(rows),
            "answers": [
                {"key": tr.key, "answer": a, "correct": c}
                for (tr, a), c in zip(rows, correct, strict=True)
            ],
        }
    lengths = [len(tr.tokens) for tr in trials]
    return {
        "length": length,
        "prompt_tokens": [min(lengths), max(lengths)],
        "seconds": seconds,
        "accuracy": float(np.mean([v["accuracy"] for v in per_depth.values()])),
        "depths": per_depth,
    }


def table(rows: list[dict], depths: list[float]) -> str:
    head = (
        "| length | "
        + " | ".join(f"depth {d:g}" for d in depths)
        + " | mean | prompt tokens | s | note |"
    )
    lines = [head, "|" + "---|" * (len(depths) + 5)]
    for r in rows:
        if "skipped" in r:
            cells = " | ".join("—" for _ in depths)
            lines.append(f"| {r['length']} | {cells} | — | — | — | {r['skipped']} |")
            continue
        cells = " | ".join(
            f"{r['depths'][str(d)]['accuracy']:.2f} ({r['depths'][str(d)]['correct']}/"
            f"{r['depths'][str(d)]['trials']})"
            for d in depths
        )
        lo, hi = r["prompt_tokens"]
        lines.append(
            f"| {r['length']} | {cells} | {r['accuracy']:.2f} | {lo}-{hi} | {r['seconds']:.0f} | "
            f"{r.get('note', '')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="train.py work directory or HF directory")
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--depths", default="0,0.5,1", help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=5, help="keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    p.add_argument("--prefill-chunk", type=int, default=decode.PREFILL_CHUNK)
    p.add_argument("--dtype", default=None, help="override the checkpoint dtype")
    p.add_argument("--force", action="store_true", help="run lengths beyond the model's range")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    depths = [float(d) for d in args.depths.split(",") if d]
    if any(not 0.0 <= d <= 1.0 for d in depths):
        p.error(f"--depths {args.depths}: each depth must be in [0, 1]")
    lengths = [int(s) for s in args.lengths.split(",") if s]

    from dsjax.inference.loading import load_model

    cfg, variables, tokenizer, add_bos = load_model(args.model, dtype=args.dtype)
    print(
        f"model {args.model}: max_position_embeddings={cfg.max_position_embeddings}, "
        f"YaRN factor {cfg.rope_factor} x original {cfg.rope_original_max_position}; "
        f"{args.trials} trials x depths {depths}; greedy, {args.new_tokens} new tokens, "
        f"prefill chunk {args.prefill_chunk}",
        flush=True,
    )
    rows = []
    for length in lengths:
        run, note = length_status(cfg, length, args.force)
        if not run:
            rows.append({"length": length, "skipped": note})
            print(f"  {length}: {note} (not run; --force to run it)", flush=True)
            continue
        run_cfg = cfg
        if length > cfg.max_position_embeddings:
            run_cfg = dataclasses.replace(cfg, max_position_embeddings=length)
        row = run_length(run_cfg, variables, tokenizer, add_bos, length, depths, args)
        row["note"] = note
        rows.append(row)
        print(f"  {length}: accuracy {row['accuracy']:.2f} ({row['seconds']:.0f} s)", flush=True)
    print()
    print(table(rows, depths))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": str(args.model), "args": vars(args), "rows": rows}, indent=1)
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
