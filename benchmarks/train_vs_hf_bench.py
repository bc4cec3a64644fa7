"""CPU training step, dsjax vs Hugging Face transformers, side by side in one process (issue 8).

    python benchmarks/train_vs_hf_bench.py [--config=issue8] [--batch=8] [--seq=256]
        [--steps=5] [--threads=N] [--moe-tile=N] [--skip-hf]

Both train the same random checkpoint (issue 8's shape by default: hidden 256, 4 layers, 16
experts top-4 in 4 groups, 1 shared, vocab 8192, q LoRA 128, kv LoRA 64, float32; written with
`save_hf_checkpoint`, read by `DeepseekV3ForCausalLM.from_pretrained`) on the same batches:
forward, next-token cross-entropy, backward, gradient clipping at 1.0 and AdamW (β 0.9/0.95,
weight decay 0.1). dsjax runs its own jitted, donated `train_step` (the one train.py runs, with
its routing-bias update and α = 1e-4 balance loss; MTP off because HF does not train it). The two
take turns inside every repeat, so drifting load hits both alike; the step-0 losses are printed
to show they train the same model. For a fair ratio on a shared machine pin both to the same
cores (`taskset -c 1 ...`; torch gets `--threads`, default the cores this process may use).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_bench import load_average, load_model_config  # noqa: E402

from configs.base import get_base_config  # noqa: E402
from dsjax.model.transformer import Transformer  # noqa: E402
from dsjax.testing import random_variables  # noqa: E402
from dsjax.train import step as ts  # noqa: E402


def run_config(cfg, batch: int, seq: int):
    """The ml_collections config train.py would run for `cfg` (MTP off, no warm-up)."""
    c = get_base_config()
    c.model.update({k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "fp8"})
    c.model.num_mtp_layers = 0
    c.model.remat = "none"
    c.train.remat = "none"
    c.train.batch_size, c.data.seq_len = batch, seq
    c.optim.warmup_steps = 0
    return c


def dsjax_stepper(c, variables, tokens):
    """step() -> loss of dsjax's jitted, donated train_step, starting from `variables`."""
    cfg = ts.model_config(c)
    model = Transformer(cfg)
    tx, schedule = ts.make_optimizer(c)
    params = jax.tree.map(jnp.array, variables["params"])  # copies: the step donates them
    params.pop("mtp_0", None)
    state = ts.TrainState(
        step=jnp.int32(0),
        params=params,
        moe_bias=jax.tree.map(jnp.zeros_like, variables["moe_bias"]),
        opt_state=tx.init(params),
    )
    B, T = tokens.shape[0], tokens.shape[1] - 1
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1)),
        "weights": jnp.ones((B, T), jnp.float32),
    }
    step_fn = ts.jit_train_step(model, tx, schedule, c)
    holder = {"state": state}

    def step():
        holder["state"], m = step_fn(holder["state"], batch)
        return float(m["main_ce"])

    # The optimized HLO of the step (its instruction names are the profiler's op names).
    step.hlo_text = lambda: step_fn.lower(holder["state"], batch).compile().as_text()
    return step


def hf_stepper(model, tokens, c):
    """step() -> loss of an eager PyTorch step of the HF model (AdamW, clip 1.0)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=c.optim.lr,
        betas=(c.optim.b1, c.optim.b2),
        weight_decay=c.optim.weight_decay,
    )
    ids = torch.tensor(tokens[:, :-1])
    targets = torch.tensor(tokens[:, 1:]).long()

    def step():
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="issue8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after one warm-up)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument(
        "--scan-unroll",
        type=int,
        default=0,
        help="ModelConfig.scan_unroll for dsjax (default 0: the model's depth, straight-line "
        "layers as configs/small.py runs them; 1: a rolled loop over layers)",
    )
    p.add_argument("--moe-tile", type=int, default=0, help="ModelConfig.moe_tile (0: per platform)")
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args(argv)

    cfg = load_model_config(args.config).replace(num_mtp_layers=0, moe_tile=args.moe_tile)
    cfg = cfg.replace(scan_unroll=args.scan_unroll or cfg.num_hidden_layers)
    c = run_config(cfg, args.batch, args.seq)
    variables = random_variables(cfg, std=0.02)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    tokens_per_step = args.batch * args.seq
    print(
        f"backend {jax.default_backend()}; {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
        f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}; "
        f"batch {args.batch} x {args.seq}; dsjax scan_unroll {cfg.scan_unroll}",
        flush=True,
    )
    runs = {}
    t0 = time.perf_counter()
    runs["dsjax"] = dsjax_stepper(c, variables, tokens)
    first = {"dsjax": runs["dsjax"]()}
    print(f"dsjax compile + first step {time.perf_counter() - t0:.1f} s", flush=True)
    if not args.skip_hf:
        import torch
        from transformers import DeepseekV3ForCausalLM

        from dsjax.checkpoints.hf import save_hf_checkpoint

        torch.set_num_threads(args.threads)
        tmp = tempfile.mkdtemp()
        save_hf_checkpoint(tmp, cfg, variables)
        hf_model = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        runs["HF"] = hf_stepper(hf_model, tokens, c)
        first["HF"] = runs["HF"]()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print("step-0 cross-entropy: " + ", ".join(f"{k} {v:.6f}" for k, v in first.items()))
    print(f"load average before: {load_average()}", flush=True)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.steps):
        for name, step in runs.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    print(f"load average after: {load_average()}")
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k}: " + " ".join(f"{t * 1e3:.0f}" for t in v) + " ms")
    print("| | s/step | tokens/s |")
    print("|---|---|---|")
    for k, s in med.items():
        print(f"| {k} | {s:.3f} | {tokens_per_step / s:,.0f} |")
    if "HF" in med:
        print(f"dsjax / HF tokens/s: {med['HF'] / med['dsjax']:.2f}x")


if __name__ == "__main__":
    main()
