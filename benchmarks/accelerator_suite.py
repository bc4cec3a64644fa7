"""Accelerator suite: one call on a lent GPU/TPU (under 8 minutes), one JSON, one RESULTS section.

    python benchmarks/accelerator_suite.py [--out=PATH.json] [--budget-s=420] [--toy]

What it measures on `jax.devices()[0]` (the same code at `--toy` sizes runs on CPU in seconds,
which is what CI does, so the script never rots):

1. `train`: seconds per jitted, donated `train_step` (the one train.py runs) of
   configs/moe_1b.py (batch 8 x 2048, full remat, bf16 AdamW moments, MTP on) in BF16 and with the
   DeepSeek-V3 FP8 recipe (`model.fp8=True`), tokens/s and MFU = analytic model FLOP/s
   (`dsjax.train.metrics.train_flops_per_token`, remat not counted) / the device's dense BF16
   peak; both recipes are divided by the BF16 peak, as the published V3-class figures it is
   compared with are: ~34 % (Megatron-Core, H100) and 38.9 % (DeepSeek, H800).
2. `decode`: greedy `dsjax.inference.generate` at batch 1 / 8 / 64 (prompt 128, 32 new tokens;
   bf16 weights), decode tokens/s = B * (new - 1) / (t(new) - t(1)), against the HBM roofline
   B / (bytes one decode step must read / HBM bytes/s): every main-model weight once (routed
   experts: the expected share of distinct experts B rows x top-k touch per layer,
   1 - (1 - k/E)^B), the embedding rows, and each row's latent cache over the mean context.
3. `kernels.attention`: causal attention (V3's expanded MLA head dims 192/128) forward and
   forward+backward per impl ("reference", "chunked" with causal chunk skipping, and on NVIDIA
   "cudnn"); `kernels.grouped_gemm`: the routed experts' grouped SwiGLU
   (`moe.grouped_swiglu`) forward+backward at moe_1b's shape per impl (ragged_dot, tiled:128,
   tiled:512). Useful TFLOP/s of each.

Device figures come from `dsjax.train.metrics` tables by `device_kind` (H100 SXM/PCIe/NVL, H800,
H200, A100 40/80 GB, L4/L40/L40S, TPU v4/v5e/v5p/v6e); on CPU the peak FLOP/s and the memory
bandwidth are measured. A section that fails records its error and the rest still run; a section
that would start after `--budget-s` is recorded as skipped. The JSON is rewritten after every
section, so a killed run leaves what it finished.

JSON (`SCHEMA` below is the JSON Schema CI validates against): an object with
  "suite": "dsjax accelerator suite", "version": 1, "toy": bool, "date": ISO-8601 UTC,
  "elapsed_s": float, "jax_version": str,
  "device": {"platform", "device_kind", "device_count", "peak_bf16_flops", "peak_fp8_flops",
             "hbm_bytes_per_s", "peak_source", "hbm_source"} (numbers per device, null if unknown),
  "published_mfu": {"megatron_h100": 0.34, "deepseek_h800": 0.389},
  "train": [{"recipe": "bf16" | "fp8", "config", "batch", "seq_len", "compile_s", "step_s",
             "tokens_per_s", "model_flops_per_token", "mfu", "error"}],
  "decode": [{"batch", "prompt_len", "new_tokens", "decode_tokens_per_s", "bytes_per_step",
              "roofline_tokens_per_s", "roofline_fraction", "error"}],
  "kernels": {"attention": [{"impl", "seq_len", "heads", "pass": "fwd" | "fwd_bwd", "ms",
                             "tflops", "error"}],
              "grouped_gemm": [{"impl", "rows", "experts", "hidden", "ffn", "ms", "tflops",
                                "error"}]}
Every figure is a number or null; "error" is null or a one-line reason (including
"skipped: time budget"). Seconds are medians over the timed repeats after a warm-up call.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsjax.inference.generate import generate, main_cache  # noqa: E402
from dsjax.model.config import ModelConfig  # noqa: E402
from dsjax.model.layers.attention import (  # noqa: E402
    chunked_attention,
    cudnn_attention,
    reference_attention,
)
from dsjax.model.layers.moe import grouped_swiglu  # noqa: E402
from dsjax.model.transformer import Transformer, abstract_variables, init_cache  # noqa: E402
from dsjax.train import metrics  # noqa: E402
from dsjax.train import step as ts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_MFU = {"megatron_h100": 0.34, "deepseek_h800": 0.389}

_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}
_ERR = {"type": ["string", "null"]}


def _rows(props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {
            "type": "object",
            "required": sorted(props),
            "properties": props,
            "additionalProperties": False,
        },
    }


SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "suite",
        "version",
        "toy",
        "date",
        "elapsed_s",
        "jax_version",
        "device",
        "published_mfu",
        "train",
        "decode",
        "kernels",
    ],
    "additionalProperties": False,
    "properties": {
        "suite": {"const": "dsjax accelerator suite"},
        "version": {"const": 1},
        "toy": {"type": "boolean"},
        "date": {"type": "string"},
        "elapsed_s": {"type": "number"},
        "jax_version": {"type": "string"},
        "device": {
            "type": "object",
            "required": [
                "platform",
                "device_kind",
                "device_count",
                "peak_bf16_flops",
                "peak_fp8_flops",
                "hbm_bytes_per_s",
                "peak_source",
                "hbm_source",
            ],
            "additionalProperties": False,
            "properties": {
                "platform": {"type": "string"},
                "device_kind": {"type": "string"},
                "device_count": _INT,
                "peak_bf16_flops": _NUM,
                "peak_fp8_flops": _NUM,
                "hbm_bytes_per_s": _NUM,
                "peak_source": {"type": "string"},
                "hbm_source": {"type": "string"},
            },
        },
        "published_mfu": {
            "type": "object",
            "required": sorted(PUBLISHED_MFU),
            "properties": {k: {"type": "number"} for k in PUBLISHED_MFU},
        },
        "train": _rows(
            {
                "recipe": {"enum": ["bf16", "fp8"]},
                "config": {"type": "string"},
                "batch": _INT,
                "seq_len": _INT,
                "compile_s": _NUM,
                "step_s": _NUM,
                "tokens_per_s": _NUM,
                "model_flops_per_token": _NUM,
                "mfu": _NUM,
                "error": _ERR,
            }
        ),
        "decode": _rows(
            {
                "batch": _INT,
                "prompt_len": _INT,
                "new_tokens": _INT,
                "decode_tokens_per_s": _NUM,
                "bytes_per_step": _NUM,
                "roofline_tokens_per_s": _NUM,
                "roofline_fraction": _NUM,
                "error": _ERR,
            }
        ),
        "kernels": {
            "type": "object",
            "required": ["attention", "grouped_gemm"],
            "additionalProperties": False,
            "properties": {
                "attention": _rows(
                    {
                        "impl": {"type": "string"},
                        "seq_len": _INT,
                        "heads": _INT,
                        "pass": {"enum": ["fwd", "fwd_bwd"]},
                        "ms": _NUM,
                        "tflops": _NUM,
                        "error": _ERR,
                    }
                ),
                "grouped_gemm": _rows(
                    {
                        "impl": {"type": "string"},
                        "rows": _INT,
                        "experts": _INT,
                        "hidden": _INT,
                        "ffn": _INT,
                        "ms": _NUM,
                        "tflops": _NUM,
                        "error": _ERR,
                    }
                ),
            },
        },
    },
}


# ====================================================================== sizes
def sizes(toy: bool) -> dict[str, Any]:
    """What each section runs: the real sizes, or toy ones for a CPU in seconds."""
    if toy:
        return dict(
            config="configs/tiny.py",
            layers=2,  # one dense + one MoE layer
            batch=2,
            seq_len=32,
            steps=2,
            decode_batches=(1, 2),
            prompt_len=8,
            new_tokens=4,
            attn_lengths=(64,),
            attn_heads=2,
            attn_dims=(16, 8),
            gemm=dict(tokens=64, experts=8, topk=2, hidden=32, ffn=16),
            gemm_impls=("ragged_dot", "tiled:16"),
            repeats=2,
        )
    return dict(
        config="configs/moe_1b.py",
        batch=8,
        seq_len=2048,
        steps=5,
        decode_batches=(1, 8, 64),
        prompt_len=128,
        new_tokens=32,
        attn_lengths=(2048, 8192),
        attn_heads=16,
        attn_dims=(192, 128),
        gemm=dict(tokens=16384, experts=24, topk=4, hidden=2048, ffn=1408),
        gemm_impls=("ragged_dot", "tiled:128", "tiled:512"),
        repeats=5,
    )


def load_config(path: str, batch: int, seq_len: int, layers: int = 0):
    """The ml_collections config of `path` with the suite's batch and sequence length (and
    `layers` layers, 0: the config's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("suite_config", ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.train.batch_size, c.data.seq_len = batch, seq_len
    c.optim.warmup_steps = 0
    if layers:
        c.model.num_hidden_layers = layers
    return c


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn` (which blocks), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


# ====================================================================== device
def device_info() -> dict[str, Any]:
    d = jax.devices()[0]
    peak, peak_source = metrics.peak_flops_per_device(d, "bfloat16")
    fp8, _ = metrics.peak_fp8_flops_per_device(d)
    hbm, hbm_source = metrics.memory_bandwidth_per_device(d, mib=64 if d.platform == "cpu" else 256)
    return dict(
        platform=d.platform,
        device_kind=str(d.device_kind),
        device_count=jax.device_count(),
        peak_bf16_flops=peak,
        peak_fp8_flops=fp8,
        hbm_bytes_per_s=hbm,
        peak_source=peak_source,
        hbm_source=hbm_source,
    )


# ====================================================================== 1. train
def train_row(recipe: str, s: dict, device: dict, keep: dict) -> dict[str, Any]:
    """One recipe's train-step row; leaves bf16 copies of the trained variables in `keep`."""
    c = load_config(s["config"], s["batch"], s["seq_len"], s["layers"])
    c.model.fp8 = recipe == "fp8"
    c.model.dtype = "bfloat16"  # both recipes compute in BF16 (FP8: the recipe's GEMMs in FP8)
    B, T = s["batch"], s["seq_len"]
    row: dict[str, Any] = dict(recipe=recipe, config=s["config"], batch=B, seq_len=T)
    cfg = ts.model_config(c)
    model = Transformer(cfg)
    tx, schedule = ts.make_optimizer(c)
    state = jax.jit(functools.partial(ts.init_state, model=model, tx=tx, seq_len=T))(
        jax.random.key(0)
    )
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32),
        "targets": rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "weights": np.ones((B, T), np.float32),
    }
    batch = jax.tree.map(jnp.asarray, batch)
    step = ts.jit_train_step(model, tx, schedule, c)
    holder = {"state": state}
    del state

    def run():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m)

    t0 = time.perf_counter()
    run()
    row["compile_s"] = time.perf_counter() - t0
    row["step_s"] = median_time(run, s["steps"])
    row["tokens_per_s"] = B * T / row["step_s"]
    row["model_flops_per_token"] = metrics.train_flops_per_token(cfg, T)
    row["mfu"] = metrics.mfu(
        row["tokens_per_s"], row["model_flops_per_token"], device["peak_bf16_flops"]
    )
    if "variables" not in keep:
        cast = lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x  # noqa: E731
        params = jax.tree.map(cast, holder["state"].params)
        keep["variables"] = {"params": params, "moe_bias": holder["state"].moe_bias}
        keep["config"] = c
    return row


# ====================================================================== 2. decode
def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: float) -> float:
    """HBM bytes one decode step of `batch` rows must read (see the module docstring)."""
    shapes = nn.unbox(abstract_variables(cfg))["params"]
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = 1.0 - (1.0 - K / E) ** batch if E else 1.0
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        name = jax.tree_util.keystr(path)
        nbytes = math.prod(leaf.shape) * jnp.dtype(cfg.param_dtype).itemsize
        if "mtp_" in name:
            continue  # plain decoding does not run the MTP module
        if "['embed']" in name:
            nbytes *= batch / leaf.shape[0]  # one embedding row per sequence
        elif "['experts']" in name:
            nbytes *= touched
        total += nbytes
    cache = main_cache(jax.eval_shape(lambda: init_cache(cfg, 1, 64)))
    per_token = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 64
    return total + batch * context * per_token


def decode_row(cfg: ModelConfig, variables, B: int, s: dict, device: dict) -> dict[str, Any]:
    """Greedy decode tokens/s at batch `B` against the HBM roofline."""
    P, N = s["prompt_len"], s["new_tokens"]
    row: dict[str, Any] = dict(batch=B, prompt_len=P, new_tokens=N)
    prompts = np.random.default_rng(B).integers(3, cfg.vocab_size, (B, P)).tolist()

    def run(n: int):
        return generate(cfg, variables, prompts, n).tokens

    t_full = median_time(lambda: run(N), s["repeats"])
    t_first = median_time(lambda: run(1), s["repeats"])
    row["decode_tokens_per_s"] = B * (N - 1) / max(t_full - t_first, 1e-9)
    row["bytes_per_step"] = decode_bytes_per_step(cfg, B, P + N / 2)
    if device["hbm_bytes_per_s"]:
        roof = B / (row["bytes_per_step"] / device["hbm_bytes_per_s"])
        row["roofline_tokens_per_s"] = roof
        row["roofline_fraction"] = row["decode_tokens_per_s"] / roof
    return row


def decode_rows(s: dict, device: dict, keep: dict) -> list[dict[str, Any]]:
    cfg = ts.model_config(keep["config"]).replace(
        dtype="bfloat16", param_dtype="bfloat16", remat="none", fp8=False
    )
    rows = []
    for B in s["decode_batches"]:
        try:
            rows.append(decode_row(cfg, keep["variables"], B, s, device))
        except Exception as e:  # noqa: BLE001 - one batch size failing must not lose the others
            rows.append(
                dict(
                    batch=B,
                    prompt_len=s["prompt_len"],
                    new_tokens=s["new_tokens"],
                    error=one_line(e),
                )
            )
    return rows


# ====================================================================== 3. kernels
def attention_at(T: int, s: dict, impls: list[str], dtype) -> list[dict[str, Any]]:
    """Rows of each attention impl at length T, forward and forward+backward."""
    H = s["attn_heads"]
    dk, dv = s["attn_dims"]
    k = jax.random.split(jax.random.key(T), 3)
    args = (
        jax.random.normal(k[0], (1, T, H, 1, dk), dtype),
        jax.random.normal(k[1], (1, T, H, dk), dtype),
        jax.random.normal(k[2], (1, T, H, dv), dtype),
    )
    idx = jnp.arange(T, dtype=jnp.int32)[None]
    pos = dict(q_idx_BT=idx, k_idx_BS=idx, scale=dk**-0.5)
    fns = {
        "reference": lambda q, k, v: reference_attention(q, k, v, **pos),
        "chunked": lambda q, k, v: chunked_attention(q, k, v, chunk=min(512, T), **pos),
        "cudnn": lambda q, k, v: cudnn_attention(q, k, v, scale=dk**-0.5),
    }
    fwd_flops = 2.0 * H * (T * (T + 1) / 2) * (dk + dv)
    rows = []
    for impl in impls:
        f = fns[impl]

        def loss(q, k, v, f=f):
            return jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)

        for kind, fn, flops in (
            ("fwd", jax.jit(f), fwd_flops),
            ("fwd_bwd", jax.jit(jax.grad(loss, argnums=(0, 1, 2))), 3.5 * fwd_flops),
        ):
            row: dict[str, Any] = dict(impl=impl, seq_len=T, heads=H, **{"pass": kind})
            try:
                t = median_time(lambda fn=fn: jax.block_until_ready(fn(*args)), s["repeats"])
                row.update(ms=t * 1e3, tflops=flops / t / 1e12)
            except Exception as e:  # noqa: BLE001 - e.g. cuDNN refusing a shape
                row["error"] = one_line(e)
            rows.append(row)
    return rows


def attention_rows(s: dict, platform: str) -> list[dict[str, Any]]:
    impls = ["reference", "chunked"] + (["cudnn"] if platform == "gpu" else [])
    dtype = jnp.bfloat16 if platform != "cpu" else jnp.float32
    return [row for T in s["attn_lengths"] for row in attention_at(T, s, impls, dtype)]


def grouped_gemm_rows(s: dict, platform: str) -> list[dict[str, Any]]:
    g = s["gemm"]
    E, D, F, K = g["experts"], g["hidden"], g["ffn"], g["topk"]
    M = g["tokens"] * K
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(g["tokens"])]).ravel()
    group_sizes = jnp.asarray(np.bincount(ids, minlength=E), jnp.int32)
    dtype = jnp.bfloat16 if platform != "cpu" else jnp.float32
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (M, D), dtype)
    ws = [
        jax.random.normal(k[1], (E, D, F), dtype) * 0.02,
        jax.random.normal(k[2], (E, D, F), dtype) * 0.02,
        jax.random.normal(k[3], (E, F, D), dtype) * 0.02,
    ]
    flops = 3 * 2.0 * M * D * F * 3  # three GEMMs, forward + two gradients each
    rows = []
    for spec in s["gemm_impls"]:
        impl, _, tile = spec.partition(":")

        def loss(x, wg, wu, wd, impl=impl, tile=int(tile or 128)):
            y = grouped_swiglu(x, group_sizes, wg, wu, wd, impl=impl, tile=tile)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        row: dict[str, Any] = dict(impl=spec, rows=M, experts=E, hidden=D, ffn=F)
        try:
            t = median_time(lambda fn=fn: jax.block_until_ready(fn(x, *ws)), s["repeats"])
            row.update(ms=t * 1e3, tflops=flops / t / 1e12)
        except Exception as e:  # noqa: BLE001
            row["error"] = one_line(e)
        rows.append(row)
    return rows


# ====================================================================== output
def _complete(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows with every schema key present (missing figures null)."""
    return [{k: r.get(k) for k in keys} for r in rows]


def finish(result: dict[str, Any], t_start: float, out: Path) -> None:
    props = SCHEMA["properties"]
    result["elapsed_s"] = time.perf_counter() - t_start
    for key in ("train", "decode"):
        result[key] = _complete(result[key], props[key]["items"]["required"])
    for key in ("attention", "grouped_gemm"):
        spec = props["kernels"]["properties"][key]["items"]["required"]
        result["kernels"][key] = _complete(result["kernels"][key], spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown(r: dict[str, Any], command: str) -> str:
    d = r["device"]
    lines = [
        f"## Accelerator suite — {d['device_kind']} ({d['platform']}, {d['device_count']} "
        f"device(s)){' — toy sizes' if r['toy'] else ''}",
        "",
        f"- Date: {r['date']}. Command: `{command}`. jax {r['jax_version']}; "
        f"{r['elapsed_s']:.0f} s in all.",
        f"- Peak BF16: {_fmt(d['peak_bf16_flops'], '.3e')} FLOP/s ({d['peak_source']}); FP8: "
        f"{_fmt(d['peak_fp8_flops'], '.3e')}; HBM {_fmt(d['hbm_bytes_per_s'], '.3e')} B/s "
        f"({d['hbm_source']}).",
        "",
        "| train recipe | config | batch x seq | compile s | s/step | tokens/s | MFU (vs BF16 "
        "peak) | vs Megatron 34 % / DeepSeek 38.9 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pub = r["published_mfu"]
    for t in r["train"]:
        mfu = t["mfu"]
        vs = (
            f"{mfu / pub['megatron_h100']:.2f}x / {mfu / pub['deepseek_h800']:.2f}x"
            if mfu is not None
            else (t["error"] or "-")
        )
        lines.append(
            f"| {t['recipe']} | {t['config']} | {t['batch']} x {t['seq_len']} | "
            f"{_fmt(t['compile_s'], '.0f')} | {_fmt(t['step_s'], '.3f')} | "
            f"{_fmt(t['tokens_per_s'], ',.0f')} | {_fmt(mfu and 100 * mfu, '.1f')} % | {vs} |"
        )
    lines += [
        "",
        "| decode batch | prompt / new | decode tok/s | HBM roofline tok/s | of roofline |",
        "|---|---|---|---|---|",
    ]
    for x in r["decode"]:
        frac = x["roofline_fraction"]
        lines.append(
            f"| {x['batch']} | {x['prompt_len']} / {x['new_tokens']} | "
            f"{_fmt(x['decode_tokens_per_s'], ',.0f')} | {_fmt(x['roofline_tokens_per_s'], ',.0f')}"
            f" | {_fmt(frac and 100 * frac, '.1f')} %{' ' + x['error'] if x['error'] else ''} |"
        )
    lines += ["", "| kernel | impl | shape | pass | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for a in r["kernels"]["attention"]:
        lines.append(
            f"| attention | {a['impl']} | T={a['seq_len']}, {a['heads']} heads | {a['pass']} | "
            f"{_fmt(a['ms'])} | {_fmt(a['tflops'])}{' ' + a['error'] if a['error'] else ''} |"
        )
    for g in r["kernels"]["grouped_gemm"]:
        shape = f"{g['rows']} rows, E={g['experts']}, {g['hidden']}x{g['ffn']}"
        lines.append(
            f"| grouped SwiGLU | {g['impl']} | {shape} | fwd_bwd | {_fmt(g['ms'])} | "
            f"{_fmt(g['tflops'])}{' ' + g['error'] if g['error'] else ''} |"
        )
    return "\n".join(lines)


# ====================================================================== main
def run_suite(toy: bool, out: Path, budget_s: float) -> dict[str, Any]:
    t_start = time.perf_counter()
    s = sizes(toy)
    device = device_info()
    result: dict[str, Any] = dict(
        suite="dsjax accelerator suite",
        version=1,
        toy=toy,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        elapsed_s=0.0,
        jax_version=jax.__version__,
        device=device,
        published_mfu=dict(PUBLISHED_MFU),
        train=[],
        decode=[],
        kernels={"attention": [], "grouped_gemm": []},
    )
    keep: dict[str, Any] = {}

    def section(rows: list, make: Callable[[], Any], skipped: list[dict]) -> None:
        over = time.perf_counter() - t_start > budget_s
        if over:
            rows.extend(dict(r, error="skipped: time budget") for r in skipped)
        else:
            try:
                made = make()
                rows.extend(made if isinstance(made, list) else [made])
            except Exception as e:  # noqa: BLE001 - record and go on to the next section
                rows.extend(dict(r, error=one_line(e)) for r in skipped)
        finish(result, t_start, out)
        print(f"[{time.perf_counter() - t_start:.0f} s] {len(rows)} row(s)", flush=True)

    base = dict(config=s["config"], batch=s["batch"], seq_len=s["seq_len"])
    for recipe in ("bf16", "fp8"):
        section(
            result["train"],
            lambda recipe=recipe: train_row(recipe, s, device, keep),
            [dict(base, recipe=recipe)],
        )
    dec = [
        dict(batch=b, prompt_len=s["prompt_len"], new_tokens=s["new_tokens"])
        for b in s["decode_batches"]
    ]
    if "variables" in keep:
        section(result["decode"], lambda: decode_rows(s, device, keep), dec)
    else:
        result["decode"] = [dict(r, error="no trained variables (train bf16 failed)") for r in dec]
    keep.clear()
    section(
        result["kernels"]["attention"],
        lambda: attention_rows(s, device["platform"]),
        [dict(impl="all", heads=s["attn_heads"])],
    )
    section(
        result["kernels"]["grouped_gemm"],
        lambda: grouped_gemm_rows(s, device["platform"]),
        [dict(impl="all", experts=s["gemm"]["experts"])],
    )
    finish(result, t_start, out)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", action="store_true", help="toy sizes: seconds on a CPU (CI)")
    default_out = Path(os.environ.get("OUT", ".")) / "accelerator_suite.json"
    p.add_argument("--out", type=Path, default=default_out)
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="sections that would start later than this many seconds in are skipped",
    )
    args = p.parse_args(argv)
    r = run_suite(args.toy, args.out, args.budget_s)
    command = "python benchmarks/accelerator_suite.py" + (" --toy" if args.toy else "")
    print(f"\nwrote {args.out}\n")
    print(markdown(r, command))


if __name__ == "__main__":
    main()
