"""Decode benchmark: dsjax generate vs Hugging Face transformers, latent cache size, MTP speed-up.

    python benchmarks/decode_bench.py [--config=issue8|configs/small.py] [--prompt-len=16]
        [--new-tokens=64] [--batches=1,8] [--repeats=5] [--train-steps=300] [--skip-hf]
        [--skip-moe] [--threads=N]

For a fair ratio on a shared machine pin both sides to the same cores, e.g.
`taskset -c 1 python benchmarks/decode_bench.py` (XLA:CPU sizes its pool by the affinity mask,
torch gets `--threads`, default the same mask); the load average is printed before and after.

The default model (`--config=issue8`) is issue 8's checkpoint shape: hidden 256, 4 layers,
16 experts top-4, 1 shared, vocab 8192, q LoRA 128, kv LoRA 64, float32.

1. Throughput: greedy decoding of the same random checkpoint (the config's model, float32,
   written with `save_hf_checkpoint` and read by `DeepseekV3ForCausalLM.from_pretrained`) at
   each batch size; prefill time is measured separately (max_new_tokens=1) and subtracted, so
   "decode tok/s" is generated tokens after the first per second of decode loop. Also reports
   whether both produced the same tokens. dsjax and HF take turns inside every repeat, so
   drifting load from other processes hits both alike.
2. Cache bytes per token per sequence: dsjax's absorbed latent cache (formula
   L * (kv_lora_rank + qk_rope_head_dim) * itemsize, and the actual arrays) against the
   expanded per-head keys and values (formula L * H * (d_n + d_r + d_v) * itemsize, and the
   actual tensors in HF's DynamicCache after generate), plus the DeepSeek-V3 formulas.
3. MTP speculative decoding: acceptance rate, tokens per main forward and speed-up over plain
   greedy, for the random model and after training main model + MTP module for
   `--train-steps` steps (optax AdamW) on a repetitive pattern (each sequence follows a fixed
   random permutation of the vocabulary, from a random start token).

4. The routed-MoE layer alone at decode token counts (the sorted tiled dispatch the model runs
   on CPU vs gathering the selected experts' weights vs a dense one-hot over all experts).

Timings are the medians of `--repeats` runs after a compile/warm-up run (each call's time is
printed too, to spot outliers). Print-only: the lead
copies the tables into benchmarks/RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsjax.inference.generate import generate, main_cache  # noqa: E402
from dsjax.model.config import ModelConfig  # noqa: E402
from dsjax.model.transformer import Transformer, init_cache  # noqa: E402
from dsjax.testing import random_variables  # noqa: E402

DEFAULT_CONFIG = dict(
    vocab_size=4096,
    hidden_size=192,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    rope_factor=4.0,
    rope_original_max_position=64,
    max_position_embeddings=1024,
    num_mtp_layers=1,
)


ISSUE8_CONFIG = dict(
    DEFAULT_CONFIG,
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_experts_per_tok=4,
    q_lora_rank=128,
    kv_lora_rank=64,
)


# ====================================================================== shared helpers
def load_model_config(path: str | None) -> ModelConfig:
    """ModelConfig from a configs/*.py file (`get_config().model`), float32, no remat."""
    fields = dict(ISSUE8_CONFIG if path == "issue8" else DEFAULT_CONFIG)
    if path and Path(path).exists():
        spec = importlib.util.spec_from_file_location("bench_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fields = module.get_config().model.to_dict()
    known = {f for f in ModelConfig.__dataclass_fields__}
    fields = {k: v for k, v in fields.items() if k in known}
    fields.update(dtype="float32", param_dtype="float32", remat="none")
    return ModelConfig(**fields)


def best_time(fn, repeats: int, label: str = "") -> float:
    """Median wall time of `repeats` calls (after the caller's warm-up); prints every call."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if label:
        print(f"  {label}: " + " ".join(f"{t * 1e3:.0f}" for t in times) + " ms", flush=True)
    return float(np.median(times))


def table(rows: list[list], header: list[str]) -> str:
    """A GitHub-markdown table."""
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    return "\n".join(
        [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [fmt(r) for r in cells[1:]]
    )


# ====================================================================== 1. throughput
def dsjax_runner(cfg, variables, prompts, new_tokens, **kw):
    """run(n) -> token lists of greedy `generate` with n new tokens (both buckets compiled)."""
    run = lambda n: generate(cfg, variables, prompts, n, **kw).tokens  # noqa: E731
    run(1)
    run(new_tokens)
    return run


def hf_runner(model, prompts):
    """run(n) -> (token lists, DynamicCache) of HF greedy `generate` with n new tokens."""
    import torch

    ids = torch.tensor(prompts)
    kw = dict(
        do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids)
    )

    def run(n):
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True, **kw
            )
        return out.sequences[:, ids.shape[1] :].tolist(), out.past_key_values

    run(2)
    return run


def hf_cache_bytes_per_token(cache, batch: int, new_tokens: int, prompt_len: int) -> float:
    """Bytes of HF's DynamicCache per token per sequence (the last token is never cached)."""
    nbytes = 0
    for layer in cache.layers:
        nbytes += layer.keys.numel() * layer.keys.element_size()
        nbytes += layer.values.numel() * layer.values.element_size()
    return nbytes / (batch * (prompt_len + new_tokens - 1))


def alternate(runs: dict, new_tokens: int, repeats: int, batch: int) -> dict:
    """Median seconds of each runner's full call and its 1-token (prefill) call, the runners
    taking turns within every repeat so that drifting machine load hits all of them alike."""
    times = {(name, n): [] for name in runs for n in (new_tokens, 1)}
    for _ in range(repeats):
        for name, run in runs.items():
            for n in (new_tokens, 1):
                t0 = time.perf_counter()
                run(n)
                times[name, n].append(time.perf_counter() - t0)
    for (name, n), ts in times.items():
        what = "total" if n == new_tokens else "prefill"
        print(f"  {name} B={batch} {what}: " + " ".join(f"{t * 1e3:.0f}" for t in ts) + " ms")
    return {k: float(np.median(v)) for k, v in times.items()}


def versions() -> str:
    """Both frameworks as installed (torch's thread count is its default), and the load."""
    import jax
    import torch

    return (
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, default); load average {load_average()}"
    )


def load_average() -> str:
    """The 1/5/15-minute load averages (other processes compete for the same cores)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ====================================================================== 3. speculative
def train_pattern(cfg: ModelConfig, steps: int, seed: int = 0):
    """Trains main model + MTP (AdamW, from a std-0.02 init) on sequences t_{i+1} = perm(t_i);
    returns (variables, perm)."""
    import optax

    rng = np.random.default_rng(seed)
    perm = rng.permutation(cfg.vocab_size)
    batch, length = 16, 64

    def sample_batch():
        x = np.empty((batch, length), np.int32)
        x[:, 0] = rng.integers(0, cfg.vocab_size, batch)
        for t in range(1, length):
            x[:, t] = perm[x[:, t - 1]]
        return jnp.asarray(x)

    def loss_fn(params, moe_bias, tokens):
        out = Transformer(cfg).apply({"params": params, "moe_bias": moe_bias}, tokens, run_mtp=True)
        main = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], tokens[:, 1:])
        mtp = optax.softmax_cross_entropy_with_integer_labels(
            out.mtp_logits[0][:, :-1], tokens[:, 2:]
        )
        return main.mean() + mtp.mean(), (main.mean(), mtp.mean())

    warmup = min(20, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, max(steps, warmup + 1))
    opt = optax.adamw(schedule, weight_decay=0.0)

    @jax.jit
    def step(params, state, moe_bias, tokens):
        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, moe_bias, tokens)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, losses

    variables = random_variables(cfg, seed, std=0.02)
    params, moe_bias = variables["params"], variables["moe_bias"]
    state = opt.init(params)
    t0 = time.perf_counter()
    for i in range(steps):
        params, state, loss = step(params, state, moe_bias, sample_batch())
        if i % 50 == 0 or i == steps - 1:
            print(
                f"  train step {i}: main loss {float(loss[0]):.3f}, MTP loss {float(loss[1]):.3f}"
                f" ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return {"params": params, "moe_bias": moe_bias}, perm


def bench_speculative(cfg, variables, prompts, new_tokens, repeats):
    """[acceptance, tokens/forward, plain tok/s, speculative tok/s, speed-up] (greedy).

    Plain and speculative runs alternate (best of 2 * repeats each), so drifting machine load
    affects both alike.
    """

    def run(spec):
        return generate(cfg, variables, prompts, new_tokens, speculative=spec)

    plain, spec = run(False), run(True)  # compile
    assert spec.tokens == plain.tokens, "speculative greedy differs from plain greedy"
    plain_t = spec_t = float("inf")
    for _ in range(2 * repeats):
        plain_t = min(plain_t, best_time(lambda: run(False), 1))
        spec_t = min(spec_t, best_time(lambda: run(True), 1))
    B = len(prompts)
    return [
        spec.acceptance_rate,
        spec.tokens_per_forward,
        B * new_tokens / plain_t,
        B * new_tokens / spec_t,
        plain_t / spec_t,
    ]


# ====================================================================== 4. MoE at decode sizes
def dense_moe(x_ND, idx_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Every routed expert on every token, combined with one-hot routing weights (no sort, no
    gather of weights): N * E rows of work instead of the dispatch's padded tiles."""
    combine_NE = (jax.nn.one_hot(idx_NK, w_gate_EDF.shape[0]) * weights_NK[..., None]).sum(1)
    gate = jnp.einsum("nd,edf->enf", x_ND, w_gate_EDF)
    up = jnp.einsum("nd,edf->enf", x_ND, w_up_EDF)
    y_END = jnp.einsum("enf,efd->end", jax.nn.silu(gate) * up, w_down_EFD)
    return jnp.einsum("end,ne->nd", y_END, combine_NE)


def gathered_moe(x_ND, idx_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Each (token, slot) with its own expert's weights gathered: N * K weight copies."""
    gate = jnp.einsum("nd,nkdf->nkf", x_ND, w_gate_EDF[idx_NK])
    up = jnp.einsum("nd,nkdf->nkf", x_ND, w_up_EDF[idx_NK])
    y_NKD = jnp.einsum("nkf,nkfd->nkd", jax.nn.silu(gate) * up, w_down_EFD[idx_NK])
    return jnp.einsum("nkd,nk->nd", y_NKD, weights_NK)


def bench_moe_decode(cfg: ModelConfig, batches, repeats: int = 300) -> list[list]:
    """ms per routed-MoE layer at decode token counts: the sorted, tiled dispatch the model runs
    on CPU (`moe.dispatch_combine` + `grouped_swiglu`, "tiled") against `gathered_moe` and
    `dense_moe` (same weights, routing and result to 1e-4)."""
    from dsjax.model.layers import moe

    E, D, F, K = (
        cfg.n_routed_experts,
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.num_experts_per_tok,
    )
    rng = np.random.default_rng(0)
    w = [
        jnp.asarray(rng.standard_normal(s) / math.sqrt(s[1]), jnp.float32)
        for s in ((E, D, F), (E, D, F), (E, F, D))
    ]
    # The weights are arguments (as in the model), not constants XLA could lay out at will.
    fns = [
        jax.jit(
            lambda x, i, c, w: moe.dispatch_combine(
                x, i, c, E, lambda xs, g: moe.grouped_swiglu(xs, g, *w, "tiled", cfg.moe_tile)
            )
        ),
        jax.jit(lambda x, i, c, w: gathered_moe(x, i, c, *w)),
        jax.jit(lambda x, i, c, w: dense_moe(x, i, c, *w)),
    ]
    out = []
    for B in batches:
        x = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
        idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(B)]))
        c = jnp.asarray(rng.dirichlet(np.ones(K), B), jnp.float32)
        args = (x, idx, c, w)
        ref = fns[0](*args)
        row = [B]
        for fn in fns:
            np.testing.assert_allclose(fn(*args), ref, rtol=1e-4, atol=1e-4)
            row.append(best_time(lambda a=args, f=fn: jax.block_until_ready(f(*a)), repeats) * 1e3)
        out.append(row)
    return out


# ====================================================================== main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="issue8")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-moe", action="store_true", help="skip the MoE-at-decode-sizes table")
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads (default: the cores this process may use, which is also "
        "what XLA:CPU sizes its pool by)",
    )
    args = p.parse_args(argv)

    cfg = load_model_config(args.config)
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); model: "
        f"{cfg.num_hidden_layers} layers, d={cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{cfg.n_routed_experts} experts; prompt {args.prompt_len}, new {args.new_tokens}",
        flush=True,
    )
    variables = random_variables(cfg)
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    hf_model = None
    if not args.skip_hf:
        import torch
        from transformers import DeepseekV3ForCausalLM

        from dsjax.checkpoints.hf import save_hf_checkpoint

        tmp = tempfile.mkdtemp()
        save_hf_checkpoint(tmp, cfg, variables)
        hf_model = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        torch.set_num_threads(args.threads)
        print(
            f"torch {torch.__version__}: {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; XLA:CPU: "
            f"{len(os.sched_getaffinity(0))} schedulable cores",
            flush=True,
        )

    # 1. Throughput (dsjax and HF alternate within every repeat).
    print(f"load average before: {load_average()}", flush=True)
    rows, hf_cache = [], None
    for B in batches:
        prompts = rng.integers(3, cfg.vocab_size, (B, args.prompt_len)).tolist()
        runs = {"dsjax": dsjax_runner(cfg, variables, prompts, args.new_tokens)}
        if hf_model is not None:
            hf_run = hf_runner(hf_model, prompts)
            runs["HF"] = lambda n, r=hf_run: r(n)[0]
        med = alternate(runs, args.new_tokens, args.repeats, B)
        ours = runs["dsjax"](args.new_tokens)
        note = ""
        for name in runs:
            total, first = med[name, args.new_tokens], med[name, 1]
            decode = B * (args.new_tokens - 1) / (total - first)
            if name == "HF":
                h_tokens, cache = hf_runner(hf_model, prompts)(args.new_tokens)
                hf_cache = hf_cache_bytes_per_token(cache, B, args.new_tokens, args.prompt_len)
                same = np.mean([a == b for a, b in zip(h_tokens, ours, strict=True)])
                dsjax_decode = rows[-1][3]
                note = f"{same:.0%} rows identical; dsjax/HF decode {dsjax_decode / decode:.2f}x"
            label = "dsjax" if name == "dsjax" else "HF transformers"
            rows.append([label, B, B * args.new_tokens / total, decode, first * 1e3, note])
        print(
            table(
                rows[-len(runs) :],
                ["impl", "batch", "tok/s (total)", "decode tok/s", "prefill ms", "note"],
            ),
            flush=True,
        )
    print(f"load average after: {load_average()}", flush=True)
    print("\n## Greedy decode throughput\n")
    print(table(rows, ["impl", "batch", "tok/s (total)", "decode tok/s", "prefill ms", "note"]))

    # 4 (printed here, next to the throughput it explains). MoE at decode token counts.
    if not args.skip_moe:
        print("\n## Routed MoE layer at decode sizes (ms per layer, same weights and routing)\n")
        print(
            table(
                bench_moe_decode(cfg, batches),
                ["tokens", "sorted tiled dispatch (now)", "gathered experts", "dense one-hot"],
            ),
            flush=True,
        )

    # 2. Cache bytes per token.
    itemsize = jnp.dtype(cfg.dtype).itemsize
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    absorbed = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
    expanded = L * H * (cfg.qk_head_dim + cfg.v_head_dim) * itemsize
    cache = main_cache(jax.eval_shape(lambda: init_cache(cfg, 2, 256)))
    actual = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)) / (2 * 256)
    v3 = ModelConfig()
    v3_abs = v3.num_hidden_layers * (v3.kv_lora_rank + v3.qk_rope_head_dim) * 2
    v3_exp = v3.num_hidden_layers * v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim) * 2
    print("\n## KV cache bytes per token (one sequence, all layers)\n")
    print(
        table(
            [
                [
                    f"this model ({cfg.dtype})",
                    absorbed,
                    int(actual),
                    expanded,
                    f"{hf_cache:.0f}" if hf_cache else "-",
                    expanded / absorbed,
                ],
                ["DeepSeek-V3 (bf16, 61 layers)", v3_abs, "-", v3_exp, "-", v3_exp / v3_abs],
            ],
            [
                "model",
                "absorbed (formula)",
                "absorbed (dsjax arrays)",
                "expanded (formula)",
                "HF DynamicCache (arrays)",
                "expanded / absorbed",
            ],
        )
    )
    print(
        "\n(transformers 5 caches MLA's compressed latent + rotary key as well, and re-expands "
        "the keys and values from it at every step.)"
    )

    # 3. Speculative decoding.
    spec_rows = []
    for name, vs in [("random weights", variables)] + (
        [("trained on pattern", None)] if args.train_steps else []
    ):
        if vs is None:
            print(f"\ntraining main + MTP for {args.train_steps} steps ...", flush=True)
            vs, perm = train_pattern(cfg, args.train_steps)
        for B in batches:
            starts = rng.integers(0, cfg.vocab_size, B)
            if name == "random weights":
                prompts = rng.integers(3, cfg.vocab_size, (B, args.prompt_len)).tolist()
            else:  # prompts that follow the pattern
                prompts = [[int(s)] for s in starts]
                for row in prompts:
                    while len(row) < args.prompt_len:
                        row.append(int(perm[row[-1]]))
            spec_rows.append(
                [name, B, *bench_speculative(cfg, vs, prompts, args.new_tokens, args.repeats)]
            )
            print(
                table(
                    spec_rows[-1:],
                    [
                        "weights",
                        "batch",
                        "acceptance",
                        "tokens/forward",
                        "plain tok/s",
                        "speculative tok/s",
                        "speed-up",
                    ],
                ),
                flush=True,
            )
    print("\n## MTP speculative decoding (greedy; output identical to plain greedy)\n")
    print(
        table(
            spec_rows,
            [
                "weights",
                "batch",
                "acceptance",
                "tokens/forward",
                "plain tok/s",
                "speculative tok/s",
                "speed-up",
            ],
        )
    )


if __name__ == "__main__":
    main()
