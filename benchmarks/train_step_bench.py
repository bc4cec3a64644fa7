"""Times one jitted, donated train step of a config on synthetic batches (no data pipeline).

    python benchmarks/train_step_bench.py --config=configs/small.py [--steps=5]

Prints compile time, seconds per step, tokens/s, analytic model FLOP/s and MFU against the
device peak (a measured matmul on CPU).
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax.model.transformer import Transformer  # noqa: E402
from dsjax.train import metrics  # noqa: E402
from dsjax.train import step as ts  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/small.py", "config file")
flags.DEFINE_integer("steps", 5, "timed steps after the first (compiling) one")
FLAGS = flags.FLAGS


def main(_):
    c = FLAGS.config
    B, T = c.train.batch_size, c.data.seq_len
    cfg = ts.model_config(c)
    model = Transformer(cfg)
    tx, schedule = ts.make_optimizer(c)
    init = functools.partial(ts.init_state, model=model, tx=tx, seq_len=T)
    state = jax.jit(init)(jax.random.key(0))
    rng = np.random.RandomState(0)
    batch = {
        "inputs": rng.randint(0, cfg.vocab_size, (B, T)),
        "targets": rng.randint(0, cfg.vocab_size, (B, T)),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.tile(np.arange(T), (B, 1)),
        "weights": np.ones((B, T), np.float32),
    }
    batch = jax.tree.map(jnp.asarray, batch)
    step = ts.jit_train_step(model, tx, schedule, c)
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / FLAGS.steps
    flops = metrics.train_flops_per_token(cfg, T)
    peak, source = metrics.peak_flops_per_device(jax.devices()[0], cfg.dtype)
    tok_s = B * T / dt
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; peak: {source}")
    print(
        f"compile {compile_s:.1f}s | {dt:.3f} s/step | {tok_s:.0f} tokens/s | "
        f"{flops / 1e6:.2f} MFLOP/token | {tok_s * flops / 1e9:.1f} GFLOP/s"
        + (f" | MFU {tok_s * flops / peak:.1%}" if peak else "")
    )


if __name__ == "__main__":
    app.run(main)
