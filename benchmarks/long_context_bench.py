"""Long context on CPU with a tiny config: memory of a train step vs length, and a 128K prefill.

    nice -n 10 python benchmarks/long_context_bench.py [--config=configs/tiny.py|tests]
        [--lengths=4096,8192,16384,32768,65536] [--run-max=8192] [--baseline-len=256]
        [--remat=<config's>] [--attention-impl=auto] [--attention-chunk=512]
        [--prefill-len=131072[,...]] [--prefill-chunk=512] [--new-tokens=16]
        [--skip-train] [--skip-block] [--skip-prefill] [--json=FILE]

`--config=tests` is dsjax.testing.tiny_config (train settings from configs/tiny.py).

(a) Train step memory: one jitted forward + backward of the real training loss
    (`dsjax.train.step.loss_fn`: main + MTP cross-entropy + balance loss; batch 1, T tokens, one
    document) per length, each in a FRESH subprocess. Reported per T: the compiler's
    `memory_analysis()` temp bytes, the process's peak RSS over the step alone (Linux VmHWM after
    resetting it via /proc/self/clear_refs once the program is compiled and the inputs are live),
    `getrusage` ru_maxrss (whole process: import + compile + step), both minus the same figure of a
    baseline child at `--baseline-len`, the ratios (bytes per token) and the step time. Linear
    memory shows as a constant ratio. Lengths above `--run-max` are compiled only (temp bytes).
    The remat policy is the config's (`config.train.remat`) unless `--remat` is given.
(a') Diagnosis: temp bytes (compile only) of one decoder block's forward + backward called
    directly vs as the one-layer `nn.scan` stack the Transformer uses.
(b) Long prefill: a random-weight model of the config with max_position_embeddings
    = prefill_len + new_tokens (YaRN rope_factor stretched to cover it when the config uses YaRN)
    prefills a `--prefill-len`-token prompt chunk by chunk (`--prefill-chunk`, default
    `decode.PREFILL_CHUNK`) and greedily decodes `--new-tokens` tokens with `dsjax.generate`.
    generate's program is compiled ahead of time (timed apart), so the generate call is run time
    only. Decode tokens/s: `decode.step` at position T over a cache of the same length (filled by
    a short prompt; a step's cost does not depend on the cache contents); prefill time (est.) =
    generate time - (new_tokens - 1) decode steps. Peak RSS (ru_maxrss after generate) of the
    child, minus that of a baseline child with a `--baseline-len`-token prompt.

Print-only markdown tables (and --json). Times on a shared machine are upper bounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ====================================================================== process memory
def _status_kib(field: str) -> int | None:
    """A `VmHWM` / `VmRSS` line of /proc/self/status in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def maxrss_bytes() -> int:
    """getrusage ru_maxrss of this process in bytes (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform == "darwin" else 1024)


# ====================================================================== config
def load_run_config(path: str):
    """The ml_collections ConfigDict of a configs/*.py file."""
    spec = importlib.util.spec_from_file_location("bench_config", REPO / path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def model_cfg(args, max_len: int, stretch_yarn: bool = False):
    """The config's ModelConfig (train.py's: remat from config.train) with max_position_embeddings
    >= `max_len`; `stretch_yarn`: YaRN's rope_factor raised so original x factor covers it."""
    from dsjax.train.step import model_config

    if args.config == "tests":  # dsjax.testing.tiny_config; train settings of configs/tiny.py
        from dsjax.testing import tiny_config

        config = load_run_config("configs/tiny.py")
        cfg = tiny_config(**({"remat": args.remat} if args.remat else {}))
    else:
        config = load_run_config(args.config)
        if args.remat:
            config.train.remat = args.remat
        cfg = model_config(config)
    changes: dict = dict(
        attention_impl=args.attention_impl,
        attention_chunk=args.attention_chunk,
        max_position_embeddings=max(cfg.max_position_embeddings, max_len),
    )
    if stretch_yarn and cfg.use_yarn and cfg.rope_original_max_position * cfg.rope_factor < max_len:
        changes["rope_factor"] = max_len / cfg.rope_original_max_position
    return dataclasses.replace(cfg, **changes), config


# ====================================================================== children
def child_train(args) -> dict:
    """One forward + backward of the training loss at T = args.T; returns the figures."""
    import jax
    import jax.numpy as jnp

    from dsjax.model.transformer import Transformer, init_variables
    from dsjax.train.step import loss_fn, train_options

    T = args.T
    cfg, config = model_cfg(args, T)
    variables = init_variables(cfg, jax.random.key(0))
    rng = jax.random.key(1)
    tokens = jax.random.randint(rng, (1, T + 1), 0, cfg.vocab_size, jnp.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.arange(T, dtype=jnp.int32)[None],
        "segment_ids": jnp.ones((1, T), jnp.int32),
        "weights": jnp.ones((1, T), jnp.float32),
    }
    model = Transformer(cfg)

    @jax.jit
    def fwd_bwd(params, moe_bias, batch):
        def loss(p):
            return loss_fn(p, moe_bias, batch, model=model, train_cfg=train_options(config))[0]

        return jax.value_and_grad(loss)(params)

    params, moe_bias = variables["params"], variables.get("moe_bias", {})
    t0 = time.perf_counter()
    compiled = fwd_bwd.lower(params, moe_bias, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    rss_before = (_status_kib("VmRSS") or 0) * 1024
    hwm_reset = reset_peak_rss()
    times = []
    loss = float("nan")
    for _ in range(0 if args.compile_only else args.repeats):
        t0 = time.perf_counter()
        loss, grads = compiled(params, moe_bias, batch)
        jax.block_until_ready((loss, grads))
        times.append(time.perf_counter() - t0)
    return {
        "T": T,
        "remat": cfg.remat,
        "attention_impl": cfg.attention_impl,
        "attention_chunk": cfg.attention_chunk,
        "loss": float(loss),
        "compile_only": bool(args.compile_only),
        "compile_s": compile_s,
        "step_s": min(times) if times else None,
        "step_times_s": times,
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "output_bytes": getattr(mem, "output_size_in_bytes", None),
        "rss_before_step_bytes": rss_before,
        "step_peak_rss_bytes": (
            (_status_kib("VmHWM") or 0) * 1024 if hwm_reset and times else None
        ),
        "maxrss_bytes": maxrss_bytes() if times else None,
    }


def child_block(args) -> dict:
    """Compile only: XLA temp bytes of one decoder block's forward + backward (dense FFN, the
    config's MLA and remat) called directly vs as a one-layer `nn.scan` stack (`model._stack`,
    how the Transformer runs its layers)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from dsjax.model.transformer import Block, _stack

    T = args.T
    cfg, _ = model_cfg(args, T)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    seg = jnp.ones((1, T), jnp.int32)
    x = jax.ShapeDtypeStruct((1, T, cfg.hidden_size), jnp.dtype(cfg.dtype))
    x8 = jnp.zeros((1, 8, cfg.hidden_size), jnp.dtype(cfg.dtype))
    out = {"T": T}
    for name, module, extra in (
        ("direct", Block(cfg, False, "train"), ()),
        ("scanned", _stack(cfg, False, 1, "train", "dense_layers"), (None,)),
    ):
        shapes = jax.eval_shape(
            lambda m=module, e=extra: m.init(jax.random.key(0), x8, pos[:, :8], seg[:, :8], *e)
        )
        params = nn.unbox(shapes)

        def loss(p, x, m=module, e=extra):
            return m.apply(p, x, pos, seg, *e)[0].astype(jnp.float32).sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
        out[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
    return out


def child_prefill(args) -> dict:
    """`generate` over one prompt of args.T tokens (chunked prefill, greedy new_tokens), timed
    with its compile measured apart; then decode tokens/s at position T on a cache of the same
    size (decode cost does not depend on the cache contents, so the cache is filled by a short
    prompt and the position set to T: no second long prefill)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsjax.inference import decode
    from dsjax.inference.generate import _generate_jit, generate
    from dsjax.inference.sampling import SamplingParams
    from dsjax.model.transformer import init_variables

    T, new = args.T, args.new_tokens
    cfg, _ = model_cfg(args, T + new, stretch_yarn=True)
    variables = init_variables(cfg, jax.random.key(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, T).tolist()
    S = decode.bucket_length(T + new + 1)  # generate's cache length for this call
    P = decode.bucket_length(T)
    req = decode.row_requests([SamplingParams(max_tokens=new)], [0], None, stop_width=1)
    tokens = np.zeros((1, P), np.int32)
    tokens[0, :T] = prompt
    lengths = np.asarray([T], np.int32)

    # generate's compile alone: the same jitted program lowered ahead of time (this fills jit's
    # cache, so the generate call below runs without compiling).
    t0 = time.perf_counter()
    _generate_jit.lower(
        cfg, variables, tokens, lengths, req,
        cache_len=S, speculative=False, prefill_chunk=args.prefill_chunk,
    ).compile()  # fmt: skip
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = generate(cfg, variables, [prompt], new, prefill_chunk=args.prefill_chunk)
    generate_s = time.perf_counter() - t0
    rss_generate = maxrss_bytes()

    # Decode steps at positions T, T+1, ... over an S-slot cache.
    short = np.asarray([prompt[:64]], np.int32)
    prefill = jax.jit(
        lambda v, t, n, r: decode.prefill(
            cfg, v, t, n, r, cache_len=S, speculative=False, prefill_chunk=None
        )
    )
    state, _ = prefill(variables, short, np.asarray([64], np.int32), req)
    state = state.replace(positions_B=jnp.asarray([T], jnp.int32))
    step = jax.jit(lambda v, s: decode.step(cfg, v, s, speculative=False), donate_argnums=1)
    state, _ = step(variables, state)  # compile
    jax.block_until_ready(state)
    n_steps = max(new - 2, 1)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        state, _ = step(variables, state)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t0) / n_steps
    decode_s = (out.lengths[0] - 1) * step_s
    prefill_s = generate_s - decode_s
    return {
        "T": T,
        "new_tokens": new,
        "generated": out.lengths[0],
        "tokens": out.tokens[0],
        "prefill_chunk": args.prefill_chunk,
        "cache_len": S,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_factor": cfg.rope_factor,
        "compile_s": compile_s,
        "generate_s": generate_s,
        "prefill_s_est": prefill_s,
        "prefill_tok_s": T / prefill_s,
        "decode_step_s": step_s,
        "decode_tok_s": 1.0 / step_s,
        "maxrss_after_generate_bytes": rss_generate,
        "maxrss_bytes": maxrss_bytes(),
    }


def run_child(kind: str, T: int, args, compile_only: bool = False) -> dict:
    """Runs this file as a fresh subprocess for one measurement; returns its JSON line."""
    cmd = [sys.executable, __file__, f"--child={kind}", f"--T={T}", f"--config={args.config}"]
    if compile_only:
        cmd.append("--compile-only")
    cmd += [f"--attention-impl={args.attention_impl}", f"--attention-chunk={args.attention_chunk}"]
    cmd += [f"--prefill-chunk={args.prefill_chunk}", f"--new-tokens={args.new_tokens}"]
    cmd += [f"--repeats={args.repeats}"]
    if args.remat:
        cmd.append(f"--remat={args.remat}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(f"child {kind} T={T} failed (rc {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"T": T, "error": tail, "rc": proc.returncode}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["child_wall_s"] = wall
    print(f"  [{kind} T={T}: {wall:.0f} s]", file=sys.stderr, flush=True)
    return result


# ====================================================================== tables
def mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def train_table(rows: list[dict], base: dict) -> str:
    """Markdown: per T the memory figures above the baseline child and bytes per token."""
    head = (
        "| T | XLA temp MiB | temp B/token | step peak RSS − base MiB | B/token | "
        "ru_maxrss − base MiB | B/token | step s | compile s |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        T = r["T"]
        per = lambda x, T=T: "n/a" if x is None else f"{x / T:.0f}"  # noqa: E731
        if r.get("compile_only"):
            lines.append(
                f"| {T} | {mib(r['temp_bytes'])} | {per(r['temp_bytes'])} | not run | | | | | "
                f"{r['compile_s']:.1f} |"
            )
            continue
        hwm = r["step_peak_rss_bytes"]
        d_hwm = None if hwm is None or base.get("step_peak_rss_bytes") is None else (
            hwm - base["step_peak_rss_bytes"]
        )  # fmt: skip
        d_max = r["maxrss_bytes"] - base["maxrss_bytes"]
        lines.append(
            f"| {T} | {mib(r['temp_bytes'])} | {per(r['temp_bytes'])} | {mib(d_hwm)} | "
            f"{per(d_hwm)} | {mib(d_max)} | {per(d_max)} | {r['step_s']:.1f} | "
            f"{r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def block_table(rows: list[dict]) -> str:
    lines = [
        "| T | direct MiB | B/token | scanned MiB | B/token | scanned / direct |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        T, d, s = r["T"], r["direct_temp_bytes"], r["scanned_temp_bytes"]
        lines.append(
            f"| {T} | {mib(d)} | {d / T:.0f} | {mib(s)} | {s / T:.0f} | {s / max(d, 1):.1f} |"
        )
    return "\n".join(lines)


def prefill_table(runs: list[dict], base: dict) -> str:
    """Markdown: one row per prompt length."""
    lines = [
        "| prompt tokens | chunk | generate s (compiled) | compile s | prefill s (est.) | "
        "prefill tok/s | decode tok/s at T | generated | peak RSS MiB | − baseline MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['T']} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        d = r["maxrss_after_generate_bytes"] - base.get("maxrss_after_generate_bytes", 0)
        lines.append(
            f"| {r['T']} | {r['prefill_chunk']} | {r['generate_s']:.1f} | {r['compile_s']:.1f} | "
            f"{r['prefill_s_est']:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['generated']} | {mib(r['maxrss_after_generate_bytes'])} | {mib(d)} |"
        )
    return "\n".join(lines)


# ====================================================================== main
def parse(argv=None):
    from dsjax.inference import decode

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    p.add_argument("--baseline-len", type=int, default=256)
    p.add_argument("--remat", default="", help="override config.train.remat")
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--attention-chunk", type=int, default=512)
    p.add_argument("--prefill-len", default="131072", help="comma-separated prompt lengths")
    p.add_argument("--prefill-chunk", type=int, default=decode.PREFILL_CHUNK)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per child (min taken)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--json", default="")
    p.add_argument(
        "--run-max", type=int, default=8192,
        help="(a): lengths above this are compiled only (XLA temp bytes, no step, no RSS)",
    )  # fmt: skip
    p.add_argument("--skip-block", action="store_true", help="skip the block-vs-scan table")
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.child:
        children = {"train": child_train, "prefill": child_prefill, "block": child_block}
        result = children[args.child](args)
        print(json.dumps(result))
        return
    import jax

    platform = jax.devices()[0].platform
    report: dict = {"config": args.config, "platform": platform, "args": vars(args)}
    if not args.skip_train:
        lengths = [int(s) for s in args.lengths.split(",") if s]
        base = run_child("train", args.baseline_len, args)
        rows = [run_child("train", T, args, compile_only=T > args.run_max) for T in lengths]
        report["train"] = {"baseline": base, "rows": rows}
        r0 = next((r for r in rows if "error" not in r), base)
        print(
            f"\n(a) {args.config}: one jitted forward+backward of dsjax.train.step.loss_fn, "
            f"batch 1, remat={r0.get('remat')}, attention={r0.get('attention_impl')} "
            f"(chunk {r0.get('attention_chunk')}), {platform}; memory minus a T={args.baseline_len}"
            f" child (step peak RSS {mib(base.get('step_peak_rss_bytes'))} MiB, ru_maxrss "
            f"{mib(base.get('maxrss_bytes'))} MiB)\n"
        )
        print(train_table(rows, base))
        if not args.skip_block:
            blocks = [run_child("block", T, args) for T in lengths]
            report["block"] = blocks
            print(
                "\n(a') XLA temp bytes of ONE decoder block's forward+backward (compile only): "
                "called directly vs as a one-layer nn.scan stack (how Transformer runs layers)\n"
            )
            print(block_table(blocks))
    if not args.skip_prefill:
        base = run_child("prefill", args.baseline_len, args)
        runs = [run_child("prefill", int(T), args) for T in args.prefill_len.split(",") if T]
        r = runs[-1]
        report["prefill"] = {"baseline": base, "runs": runs}
        print(
            f"\n(b) {args.config}, random weights, max_position_embeddings="
            f"{r.get('max_position_embeddings')}, rope_factor={r.get('rope_factor')}: generate() "
            f"greedy, chunked prefill; baseline = a {args.baseline_len}-token prompt child "
            f"(ru_maxrss {mib(base.get('maxrss_bytes'))} MiB)\n"
        )
        print(prefill_table(runs, base))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
