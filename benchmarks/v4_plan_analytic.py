"""DeepSeek-V4-Flash / V4-Pro train steps on v5p and v6e slices, analytically (no compile).

    python benchmarks/v4_plan_analytic.py

Per chip: the training state exactly from the shardings of the real state (parameters float32,
gradients, bf16 AdamW moments), plus the planner's analytic activations and working set
(`planner.train_analytic`, remat "full", ce_chunk 512), against HBM; and the roofline compute
time of one step at the chip's peak (model FLOPs x 4/3 for the recompute). The whole unrolled V4
program does not compile on the 2-core / 24 GiB planning machine (see benchmarks/RESULTS.md),
so these are the planner's analytic figures, not XLA's buffer assignment.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax.model import sharding  # noqa: E402
from dsjax.model.transformer import Transformer  # noqa: E402
from dsjax.plan import planner  # noqa: E402
from dsjax.train import metrics  # noqa: E402
from dsjax.train import step as ts  # noqa: E402

GIB = 1024**3
# (model, seq_len, topology, mesh): 4K with experts over 64 chips and FSDP over the rest; 1M with
# 8-way expert parallelism and the rest context parallelism (one sequence split over the chips).
CASES = [
    ("deepseek_v4_flash", 4096, "v5p:4x4x2", dict(expert=32)),
    ("deepseek_v4_flash", 4096, "v5p:4x4x4", dict(expert=64)),
    ("deepseek_v4_flash", 4096, "v6e:8x16", dict(expert=64, fsdp=2)),
    ("deepseek_v4_flash", 4096, "v6e:16x16", dict(expert=64, fsdp=4)),
    ("deepseek_v4_flash", 1 << 20, "v5p:4x4x4", dict(expert=8, context=8)),
    ("deepseek_v4_flash", 1 << 20, "v5p:4x8x8", dict(expert=8, context=32)),
    ("deepseek_v4_flash", 1 << 20, "v6e:16x16", dict(expert=8, context=32)),
    ("deepseek_v4_pro", 4096, "v5p:4x8x8", dict(expert=64, fsdp=4)),
    ("deepseek_v4_pro", 4096, "v5p:8x8x8", dict(expert=64, fsdp=8)),
    ("deepseek_v4_pro", 4096, "v6e:16x16", dict(expert=64, fsdp=4)),
    ("deepseek_v4_pro", 1 << 20, "v5p:8x8x8", dict(expert=8, context=64)),
]


def plan(name: str, T: int, topology: str, mesh_kw: dict) -> dict:
    config = importlib.import_module(f"configs.{name}").get_config()
    config.data.seq_len = T
    config.optim.moment_dtype = "bfloat16"
    config.train.ce_chunk = 512
    config.mesh.update({"data": 1, "fsdp": 1, **mesh_kw})
    target = planner.make_target(topology)
    mesh = sharding.make_mesh(**config.mesh, devices=list(target.devices))
    config.train.batch_size = sharding.batch_shards(mesh)  # one sequence per batch shard
    cfg = ts.model_config(config)
    tx, _ = ts.make_optimizer(config)
    abstract, _ = ts.state_shardings(Transformer(cfg), tx, mesh, 8)
    params, opt = planner.shard_bytes(abstract.params), planner.shard_bytes(abstract.opt_state)
    mem = planner.train_analytic(cfg, config, params, opt, mesh)
    n = len(target.devices)
    flops = metrics.train_flops_per_token(cfg, T) * config.train.batch_size * T / n
    step = flops * 4 / 3 / target.peak_flops
    return {"model": name, "seq": T, "target": target.label, "mesh": mesh_kw,
            "batch": config.train.batch_size, "state_gib": (2 * params + opt) / GIB,
            "total_gib": mem["total"] / GIB, "hbm_gib": target.hbm_bytes / GIB,
            "fits": mem["total"] <= 0.9 * target.hbm_bytes, "step_s": step}  # fmt: skip


def main() -> None:
    print("| model | seq | topology | mesh | batch | state / chip | total / chip (analytic) "
          "| fits (90% of HBM) | roofline compute step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        r = plan(*case)
        print(f"| {r['model']} | {r['seq']} | {r['target']} | {r['mesh']} | {r['batch']} | "
              f"{r['state_gib']:.1f} GiB | {r['total_gib']:.1f} of {r['hbm_gib']:.2f} GiB | "
              f"{'yes' if r['fits'] else 'no'} | {r['step_s']:.2f} s |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
