"""Where dsjax's and HF transformers' CPU train steps spend their time, per part of the model.

    python benchmarks/train_step_profile.py [--shape=issue26] [--steps=3] [--skip-hf] [--skip-gemm]

Runs `cpu_vs_hf_bench.py`'s two train steps for one shape (both unpinned, default threads), then:

- dsjax: a `jax.profiler` trace of `--steps` steps; every XLA:CPU op event is named after an HLO
  instruction, whose `op_name` metadata says which part of the model it belongs to. Each instant is
  split evenly among the ops running at that instant (XLA runs independent thunks concurrently),
  so the per-part figures add up to the traced wall time; "no op" is time with no op running
  (host overhead, waits). The profiler slows the step: compare parts, not totals, with the
  untraced s/step printed first.
- HF: `torch.profiler`'s self CPU time per aten op (eager PyTorch runs one op at a time).
- `--skip-gemm` off: the routed experts' tile GEMM (80 tiles x 128 rows x 256 x 128, f32, the
  issue26 shape's tiled layout) as a batched dot in XLA:CPU and as `torch.bmm`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_vs_hf_bench as cb  # noqa: E402
import decode_bench as db  # noqa: E402
import train_vs_hf_bench as tb  # noqa: E402

# (substring of op_name, part): the first match names an op's part.
PARTS = [
    ("lm_head", "head + cross-entropy"),
    ("...v", "head + cross-entropy"),
    ("...d,dv", "head + cross-entropy"),
    ("/attn/", "attention (MLA)"),
    ("experts.routed", "routed experts"),
    ("/shared/", "shared expert"),
    ("/router", "router"),
    ("/moe/", "router"),
    ("/mlp/", "dense MLP"),
    ("norm", "norms"),
    ("embed", "embedding"),
    ("Transformer", "model, other"),
]


def part_of(op_name: str) -> str:
    side = " (bwd)" if "transpose(" in op_name else " (fwd)"
    for key, part in PARTS:
        if key in op_name:
            return part + side
    return "loss, optimizer, other"


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: op_name metadata} of an optimized HLO module's text."""
    pattern = r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\""
    return {m.group(1): m.group(2) for m in re.finditer(pattern, hlo_text, re.M)}


def wall_split(trace_dir: str, names: dict[str, str], steps: int) -> tuple[dict, float, float]:
    """({part: ms/step}, traced ms/step, ms/step with no op running) of a jax.profiler trace."""
    path = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))[-1]
    events = [
        e
        for e in json.load(gzip.open(path))["traceEvents"]
        if e.get("ph") == "X" and e.get("name") in names
    ]
    edges = sorted(
        [(e["ts"], 1, i) for i, e in enumerate(events)]
        + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events)]
    )
    parts: dict[str, float] = collections.defaultdict(float)
    active: set[int] = set()
    idle, last = 0.0, edges[0][0]
    for t, kind, i in edges:
        if t > last:
            for j in active:
                parts[part_of(names[events[j]["name"]])] += (t - last) / len(active)
            idle += 0.0 if active else t - last
        last = t
        (active.add if kind == 1 else active.discard)(i)
    ms = lambda us: us / 1e3 / steps  # noqa: E731
    return {k: ms(v) for k, v in parts.items()}, ms(edges[-1][0] - edges[0][0]), ms(idle)


def gemm_tiles() -> None:
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 128, 256), np.float32)
    w = rng.standard_normal((80, 256, 128), np.float32)
    f = jax.jit(lambda a, b: jnp.einsum("tmd,tdf->tmf", a, b))
    xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), torch.tensor(x), torch.tensor(w)
    runs = {
        "XLA:CPU": lambda: jax.block_until_ready(f(xj, wj)),
        "torch.bmm": lambda: torch.bmm(xt, wt),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for k in runs:
        runs[k]()
    for _ in range(30):
        for k, run in runs.items():
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
    flops = 2 * 80 * 128 * 256 * 128
    for k, v in times.items():
        s = float(np.median(v))
        print(
            f"tile GEMM 80x[128x256 @ 256x128] {k}: {s * 1e3:.1f} ms, {flops / s / 1e9:.0f} GFLOP/s"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="issue26")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-gemm", action="store_true")
    args = p.parse_args(argv)
    import jax

    cfg = cb.shape_config(args.shape).replace(num_mtp_layers=0)
    cfg = cfg.replace(scan_unroll=cfg.num_hidden_layers)
    c = tb.run_config(cfg, 8, 256)
    variables = db.random_variables(cfg, std=0.02)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 257)).astype(np.int32)
    runs = {"dsjax": tb.dsjax_stepper(c, variables, tokens)}
    if not args.skip_hf:
        runs["HF"] = tb.hf_stepper(cb.hf_model(cfg, variables, train=True), tokens, c)
    for step in runs.values():
        step(), step()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.steps):
        for k, step in runs.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    print(f"{args.shape}; load average {db.load_average()}")
    for k, v in times.items():
        print(f"untraced {k}: {np.median(v) * 1e3:.0f} ms/step (median of {args.steps})")

    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
        runs["dsjax"]()
    jax.profiler.stop_trace()
    parts, span, idle = wall_split(trace_dir, hlo_op_names(runs["dsjax"].hlo_text()), args.steps)
    print(f"\ndsjax, traced: {span:.0f} ms/step, of which no op running {idle:.0f} ms")
    print("| part | ms/step (wall share) |\n|---|---|")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.0f} |")

    if not args.skip_hf:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                runs["HF"]()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / args.steps
        print(f"\nHF, profiled: {total:.0f} ms/step self CPU time in aten ops; top ops:")
        print("| op | ms/step | calls/step |\n|---|---|---|")
        for e in rows:
            ms = e.self_cpu_time_total / 1e3 / args.steps
            print(f"| {e.key} | {ms:.0f} | {e.count // args.steps} |")
    if not args.skip_gemm:
        print()
        gemm_tiles()


if __name__ == "__main__":
    main()
