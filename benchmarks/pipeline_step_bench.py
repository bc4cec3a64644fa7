"""CPU step time of each pipeline schedule on 8 fake devices, beside no pipeline (stage=1).

    python benchmarks/pipeline_step_bench.py [--steps=3] [--layers=5] [--batch=16] [--seq=128]
        [--masked]

configs/small.py with `--layers` layers (1 dense + the rest MoE, which must split into the
schedule's chunks), fp32, on 8 fake CPU devices: stage=1 with data=4 x expert=2, then stage=2 with
data=2 x expert=2 for gpipe, 1f1b and dualpipe (4 micro-batches). Prints compile seconds and the
median of `--steps` timed steps (after one warm-up) per layout, and the FLOPs XLA's cost analysis
counts in the compiled step. On one CPU the fake devices share the cores, so this measures the
pipeline's overhead (chunk recompute, transfers, idle work), not a speed-up. `--masked`: idle
slots, prologues and epilogues computed and masked (`pipeline.SKIP_IDLE = False`), which is what
XLA:CPU runs anyway (the `lax.cond`/`lax.switch` form deadlocks its fake devices now and then).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from configs.small import get_config  # noqa: E402
from dsjax.model import sharding  # noqa: E402
from dsjax.model.transformer import Transformer  # noqa: E402
from dsjax.train import pipeline  # noqa: E402
from dsjax.train import step as ts  # noqa: E402

LAYOUTS = (
    ("stage=1", dict(stage=1, data=4, expert=2), "1f1b"),
    ("gpipe", dict(stage=2, data=2, expert=2), "gpipe"),
    ("1f1b", dict(stage=2, data=2, expert=2), "1f1b"),
    ("dualpipe", dict(stage=2, data=2, expert=2), "dualpipe"),
)


def time_layout(mesh_sizes, schedule, a) -> tuple[float, float, float]:
    c = get_config()
    c.model.num_hidden_layers = a.layers
    c.mesh.update(**mesh_sizes)
    c.train.update(pipeline_schedule=schedule, microbatches=4, batch_size=a.batch)
    c.data.seq_len = a.seq
    mesh = sharding.make_mesh(**c.mesh)
    ts.validate_config(c, mesh)
    model, (tx, lr) = Transformer(ts.model_config(c)), ts.make_optimizer(c)
    rng = np.random.default_rng(0)
    shape = (a.batch, a.seq)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, 2048, shape), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, 2048, shape), jnp.int32),
        "positions": jnp.tile(jnp.arange(a.seq, dtype=jnp.int32), (a.batch, 1)),
        "segment_ids": jnp.ones(shape, jnp.int32),
        "weights": jnp.ones(shape, jnp.float32),
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, _, shardings = ts.create_sharded_state(jax.random.key(0), model, tx, mesh, a.seq)
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        step = ts.jit_train_step(model, tx, lr, c)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times)), flops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--masked", action="store_true", help="compute idle work and mask it")
    a = p.parse_args()
    pipeline.SKIP_IDLE = False if a.masked else None
    print(f"configs/small.py, {a.layers} layers, batch {a.batch} x {a.seq}, 8 fake CPU devices"
          f"{', idle work masked' if a.masked else ''}")  # fmt: skip
    for name, mesh_sizes, schedule in LAYOUTS:
        compile_s, step_s, flops = time_layout(mesh_sizes, schedule, a)
        mesh = ",".join(f"{k}={v}" for k, v in mesh_sizes.items())
        print(f"{name:9s} {mesh:24s} compile {compile_s:6.1f}s  step {step_s * 1e3:8.1f} ms  "
              f"cost-analysis {flops / 1e9:8.2f} GFLOP")  # fmt: skip


if __name__ == "__main__":
    main()
