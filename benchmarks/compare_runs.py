"""Two or more train.py runs in one plot: training main cross-entropy (smoothed) and held-out
cross-entropy per step, and the relative difference of the final held-out loss to the first run.

    python benchmarks/compare_runs.py --out=compare.png LABEL=WORKDIR [LABEL=WORKDIR ...]

e.g. the FP8 recipe against float32 on the same seed and data:
    python train.py --config=configs/small.py --workdir=runs/f32 --config.train.steps=200
    python train.py --config=configs/small.py --workdir=runs/fp8 --config.train.steps=200 \
        --config.model.fp8=True
    python benchmarks/compare_runs.py --out=fp8_vs_f32.png f32=runs/f32 fp8=runs/fp8
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax.train.metrics import smooth  # noqa: E402


def read(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="LABEL=WORKDIR")
    p.add_argument("--out", default="compare_runs.png")
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    finals = []
    for i, spec in enumerate(a.runs):
        label, _, workdir = spec.partition("=")
        recs = read(workdir)
        train = [(r["step"], r["main_ce"]) for r in recs if "main_ce" in r]
        evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
        color = f"C{i}"
        if train:
            steps, values = zip(*train, strict=True)
            ax.plot(steps, smooth(list(values), 0.6), color=color, alpha=0.6,
                    label=f"{label} train main CE (smoothed)")  # fmt: skip
        steps, values = zip(*evals, strict=True)
        ax.plot(steps, values, "o-", color=color, label=f"{label} held-out CE")
        finals.append((label, values[-1]))
    base = finals[0][1]
    for label, value in finals:
        print(
            f"{label:12s} final held-out CE {value:.4f}  ({(value - base) / base:+.3%} vs {finals[0][0]})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"plot: {a.out}")


if __name__ == "__main__":
    main()
