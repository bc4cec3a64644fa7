"""dsjax vs HF transformers on the CPU, side by side in one run, unpinned, per model shape (issue 26).

    python benchmarks/cpu_vs_hf_bench.py [--shapes=issue26,small,wide] [--steps=3]
        [--repeats=3] [--new-tokens=32] [--batches=1,8] [--skip-train] [--skip-decode]

Both frameworks run as installed: no `taskset`, torch with its default intra-op threads, XLA:CPU
with its default pool (every core this process may use). For each shape:

- train: dsjax's jitted, donated `train_step` (as train.py runs it; MTP off because HF does not
  train it) against an eager HF `DeepseekV3ForCausalLM` step (cross-entropy, backward, clip 1.0,
  `torch.optim.AdamW`), fp32, batch 8 x 256, the same random checkpoint and batch (the step-0
  losses are printed to show they train the same model). `benchmarks/train_vs_hf_bench.py`'s
  steppers.
- decode: greedy generation (prompt 16, `--new-tokens`) at each batch, prefill time subtracted,
  greedy tokens compared; `benchmarks/decode_bench.py`'s runners.

The two take turns inside every repeat, so drifting machine load hits both alike; medians are
reported, and the load average before and after. Shapes: "issue26" = issue 8/26's checkpoint
(hidden 256, 4 layers, 16 experts top-4, vocab 8192), "small" = configs/small.py's model, "wide" =
issue26 with hidden 1024 (8 heads, q LoRA 512, kv LoRA 256, expert FFN 512, dense FFN 2816).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_bench as db  # noqa: E402
import train_vs_hf_bench as tb  # noqa: E402

from dsjax.model.config import ModelConfig  # noqa: E402
from dsjax.testing import random_variables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDE = dict(
    db.ISSUE8_CONFIG,
    hidden_size=1024,
    intermediate_size=2816,
    moe_intermediate_size=512,
    num_attention_heads=8,
    q_lora_rank=512,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
)


def shape_config(name: str) -> ModelConfig:
    """The float32 ModelConfig of a named shape."""
    if name == "issue26":
        return db.load_model_config("issue8")
    if name == "small":
        return db.load_model_config(str(ROOT / "configs/small.py"))
    if name == "wide":
        fields = {k: v for k, v in WIDE.items() if k in ModelConfig.__dataclass_fields__}
        return ModelConfig(**dict(fields, dtype="float32", param_dtype="float32", remat="none"))
    raise ValueError(f"--shapes: unknown shape {name!r} (expected issue26, small, wide)")


def hf_model(cfg: ModelConfig, variables, train: bool):
    """HF DeepseekV3ForCausalLM reading dsjax's checkpoint of `variables` (fp32)."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    from dsjax.checkpoints.hf import save_hf_checkpoint

    tmp = tempfile.mkdtemp()
    save_hf_checkpoint(tmp, cfg, variables)
    model = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return model.train() if train else model.eval()


def bench_train(cfg: ModelConfig, steps: int, batch: int = 8, seq: int = 256) -> dict:
    """Median s/step of both sides, alternating."""
    cfg = cfg.replace(num_mtp_layers=0, scan_unroll=cfg.num_hidden_layers)
    c = tb.run_config(cfg, batch, seq)
    variables = random_variables(cfg, std=0.02)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
    tokens = tokens.astype(np.int32)
    runs = {"dsjax": tb.dsjax_stepper(c, variables, tokens)}
    runs["HF"] = tb.hf_stepper(hf_model(cfg, variables, train=True), tokens, c)
    first = {k: step() for k, step in runs.items()}
    print("  step-0 CE: " + ", ".join(f"{k} {v:.6f}" for k, v in first.items()), flush=True)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(steps):
        for name, step in runs.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    for k, v in times.items():
        print(f"  train {k}: " + " ".join(f"{t * 1e3:.0f}" for t in v) + " ms", flush=True)
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_decode(cfg: ModelConfig, batches, new_tokens: int, repeats: int) -> dict:
    """{batch: (dsjax decode tok/s, HF decode tok/s, share of identical greedy rows)}."""
    variables = random_variables(cfg)
    model = hf_model(cfg, variables, train=False)
    rng = np.random.default_rng(0)
    out = {}
    for B in batches:
        prompts = rng.integers(3, cfg.vocab_size, (B, 16)).tolist()
        runs = {"dsjax": db.dsjax_runner(cfg, variables, prompts, new_tokens)}
        hf = db.hf_runner(model, prompts)
        runs["HF"] = lambda n, r=hf: r(n)[0]
        med = db.alternate(runs, new_tokens, repeats, B)
        rate = {k: B * (new_tokens - 1) / (med[k, new_tokens] - med[k, 1]) for k in runs}
        same = np.mean(
            [a == b for a, b in zip(runs["dsjax"](new_tokens), runs["HF"](new_tokens), strict=True)]
        )
        out[B] = (rate["dsjax"], rate["HF"], float(same))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="issue26,small,wide")
    p.add_argument("--steps", type=int, default=3, help="timed train steps per side")
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per side")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args(argv)
    print(db.versions(), flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.shapes.split(","):
        cfg = shape_config(name)
        print(
            f"{name}: d={cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
            f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}",
            flush=True,
        )
        row = [name]
        if not args.skip_train:
            t = bench_train(cfg, args.steps)
            row += [f"{t['dsjax']:.3f} / {t['HF']:.3f}", f"**{t['HF'] / t['dsjax']:.2f}×**"]
        if not args.skip_decode:
            decode = bench_decode(cfg, batches, args.new_tokens, args.repeats)
            for ours, theirs, same in decode.values():
                row += [
                    f"{ours:,.0f} / {theirs:,.0f} ({same:.0%} same)",
                    f"**{ours / theirs:.2f}×**",
                ]
        rows.append(row)
    print(f"load average after: {db.load_average()}\n")
    header = ["shape"]
    if not args.skip_train:
        header += ["train s/step dsjax / HF", "train dsjax/HF"]
    if not args.skip_decode:
        for B in batches:
            header += [f"decode B={B} tok/s dsjax / HF", f"B={B} dsjax/HF"]
    print(db.table(rows, header))


if __name__ == "__main__":
    main()
