"""DeepSeek-V4 on the CPU: dsjax vs HF transformers' `DeepseekV4ForCausalLM`, side by side in one
run, unpinned, forward (prefill) and greedy decode (issue 23).

    python benchmarks/v4_vs_hf_bench.py [--shapes=tiny,small] [--batches=1,8]
        [--forward-len=256] [--prompt-len=64] [--new-tokens=64] [--repeats=5]

Both frameworks run as installed: no `taskset`, torch with its default intra-op threads, XLA:CPU
with its default pool. Both read the same random float32 checkpoint: dsjax's `random_variables`
(hash-routing tables with real distinct expert ids), written by `save_hf_checkpoint` and read by `DeepseekV4ForCausalLM.from_pretrained`. No MTP
module (HF's generate does not run it). For each shape and batch:

- forward: the logits of B x `--forward-len` random tokens: dsjax's jitted full forward (train
  mode: `v4_core`, CSA's top-k entries gathered) against HF `model(ids, use_cache=False)` under
  `torch.no_grad()`; the share of positions whose logits agree (1e-4 of the logit scale) is
  printed: where the indexer's top-k boundary falls among exact-zero scores (its ReLU), the two
  may pick different, equally valid entries, and the difference spreads to every later token
  through the window and the entries (the parity tests use tie-free checkpoints). Greedy rows
  differ for the same reason.
- decode: greedy generation (prompt `--prompt-len`, `--new-tokens` new): `generate` against HF
  `generate` (its V4 cache); prefill time (1 new token) subtracted, so "decode tok/s" is generated
  tokens after the first per second of decode loop. The share of identical greedy rows is shown.

After a warm-up call of each (compiles), the two take turns inside every repeat, so drifting
machine load hits both alike; medians are reported, and the load average before and after.
Shapes: "tiny" = configs/tiny_v4.py's model (d 64, window 8, CSA rate 4 top-4, HCA rate 8, vocab
512), "small" = configs/small_v4.py's (d 128, window 32, CSA top-16, HCA rate 32, vocab 2048);
both 4 layers: window, CSA, HCA, CSA.
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

from dsjax.model.config import ModelConfig  # noqa: E402
from dsjax.testing import random_variables  # noqa: E402
from dsjax.train import step as ts  # noqa: E402


def shape_config(name: str) -> ModelConfig:
    """The float32 ModelConfig of a named shape (no MTP, no remat)."""
    if name == "tiny":
        from configs.tiny_v4 import get_config
    elif name == "small":
        from configs.small_v4 import get_config
    else:
        raise ValueError(f"--shapes: unknown shape {name!r} (expected tiny, small)")
    return ts.model_config(get_config()).replace(
        dtype="float32", param_dtype="float32", num_mtp_layers=0, remat="none"
    )


def hf_model(cfg: ModelConfig, variables):
    """HF DeepseekV4ForCausalLM reading dsjax's checkpoint of `variables` (fp32, eval)."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    from dsjax.checkpoints.hf import save_hf_checkpoint

    tmp = tempfile.mkdtemp()
    save_hf_checkpoint(tmp, cfg, variables)
    return DeepseekV4ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


def forward_runners(cfg: ModelConfig, variables, model, tokens: np.ndarray):
    """{"dsjax": fn, "HF": fn}, each returning the logits of `tokens` as numpy (warmed up)."""
    import jax
    import torch

    from dsjax.model.transformer import Transformer

    fwd = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, run_mtp=False).logits)
    ids = torch.tensor(tokens)

    def hf():
        with torch.no_grad():
            return model(ids, use_cache=False).logits.numpy()

    runs = {"dsjax": lambda: np.asarray(fwd(variables, tokens)), "HF": hf}
    for run in runs.values():
        run()
    return runs


def bench_forward(cfg, variables, model, B: int, T: int, repeats: int) -> dict:
    """Median seconds per forward of each side (alternating) and their relative difference."""
    tokens = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    runs = forward_runners(cfg, variables, model, tokens)
    out = {k: run() for k, run in runs.items()}
    err = np.abs(out["dsjax"] - out["HF"]).max(-1) / np.abs(out["HF"]).max()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    for k, v in times.items():
        print(f"  forward {k} B={B} T={T}: " + " ".join(f"{t * 1e3:.0f}" for t in v) + " ms")
    print(
        f"  forward logits within 1e-4 of HF's scale at {np.mean(err <= 1e-4):.1%} of positions "
        f"(median error {np.median(err):.0e}; the rest come after a CSA indexer top-k tie among "
        "its zero scores, which either choice satisfies and which spreads to later tokens)",
        flush=True,
    )
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_decode(cfg, variables, model, B: int, prompt_len: int, new_tokens: int, repeats: int):
    """(dsjax decode tok/s, HF decode tok/s, share of identical greedy rows)."""
    rng = np.random.default_rng(100 + B)
    prompts = rng.integers(0, cfg.vocab_size, (B, prompt_len)).tolist()
    runs = {"dsjax": db.dsjax_runner(cfg, variables, prompts, new_tokens)}
    hf = db.hf_runner(model, prompts)
    runs["HF"] = lambda n, r=hf: r(n)[0]
    med = db.alternate(runs, new_tokens, repeats, B)
    rate = {k: B * (new_tokens - 1) / (med[k, new_tokens] - med[k, 1]) for k in runs}
    ours, theirs = runs["dsjax"](new_tokens), runs["HF"](new_tokens)
    same = float(np.mean([a == b for a, b in zip(ours, theirs, strict=True)]))
    return rate["dsjax"], rate["HF"], same


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="tiny,small")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--forward-len", type=int, default=256, help="tokens per row in a forward")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side")
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args(argv)
    import jax

    print(db.versions(), flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.shapes.split(","):
        cfg = shape_config(name)
        print(
            f"{name}: d={cfg.hidden_size}, {cfg.num_hidden_layers} layers {cfg.layer_types}, "
            f"window {cfg.sliding_window}, rates {cfg.compress_rate_csa}/{cfg.compress_rate_hca},"
            f" top-{cfg.index_topk}, {cfg.n_routed_experts} experts top-"
            f"{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}",
            flush=True,
        )
        variables = jax.device_get(random_variables(cfg))
        model = hf_model(cfg, variables)
        for B in batches:
            row = [name, str(B)]
            if not args.skip_forward:
                t = bench_forward(cfg, variables, model, B, args.forward_len, args.repeats)
                row += [f"{t['dsjax'] * 1e3:.1f} / {t['HF'] * 1e3:.1f}",
                        f"**{t['HF'] / t['dsjax']:.2f}×**"]  # fmt: skip
            if not args.skip_decode:
                ours, theirs, same = bench_decode(
                    cfg, variables, model, B, args.prompt_len, args.new_tokens, args.repeats
                )
                row += [f"{ours:,.0f} / {theirs:,.0f} ({same:.0%} same)",
                        f"**{ours / theirs:.2f}×**"]  # fmt: skip
            rows.append(row)
    print(f"load average after: {db.load_average()}\n")
    header = ["shape", "batch"]
    if not args.skip_forward:
        header += [f"forward ms (T={args.forward_len}) dsjax / HF", "forward dsjax/HF"]
    if not args.skip_decode:
        header += [
            f"decode tok/s (prompt {args.prompt_len}, {args.new_tokens} new) dsjax / HF",
            "decode dsjax/HF",
        ]
    print(db.table(rows, header))


if __name__ == "__main__":
    main()
