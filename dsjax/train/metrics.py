"""Training metrics: model FLOPs, peak device FLOP/s and MFU, JSONL/TensorBoard logs, progress.

Model FLOPs (what MFU divides by the hardware peak) are counted analytically, per token, from the
config alone: 2 FLOPs per multiply-add of every matmul a token does with the ACTIVATED parameters,
plus the causal attention core. Recomputation (remat) is not counted: MFU measures useful work.

    flops = train_flops_per_token(cfg, seq_len)            # 3 x forward (forward + 2 x backward)
    peak, source = peak_flops_per_device(jax.devices()[0], cfg.dtype)
    utilisation = mfu(tokens_per_second, flops, peak, jax.device_count())

    writer = MetricWriter(workdir, is_chief=jax.process_index() == 0, resume_step=start_step)
    progress = Progress(total_steps, start_step)
    writer.write(step, {"loss": loss, "tokens_per_sec": tps, "mfu": utilisation})
    progress.update(step, {"loss": loss, "tokens_per_sec": tps, "mfu": utilisation})
    plot_loss(workdir / "metrics.jsonl", workdir / "loss.png")
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from dsjax.model.config import ModelConfig

# ---------------------------------------------------------------------------------- model FLOPs


def _attention_proj_params(cfg: ModelConfig) -> int:
    """Weights of one MLA layer's projections: q_a/q_b (or q), kv_a, kv_b, o."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, dv, C = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    else:
        q = D * H * qk
    kv = D * (C + cfg.qk_rope_head_dim) + C * H * (cfg.qk_nope_head_dim + dv)
    return q + kv + H * dv * D


def _attention_core_flops(cfg: ModelConfig, context: float) -> float:
    """QK^T (head dim d_n + d_r) and PV (head dim d_v) of one query over `context` keys."""
    H = cfg.num_attention_heads
    return 2.0 * H * (cfg.qk_head_dim + cfg.v_head_dim) * context


def _dense_mlp_params(cfg: ModelConfig) -> int:
    """A dense SwiGLU: gate, up and down projections."""
    return 3 * cfg.hidden_size * cfg.intermediate_size


def _moe_activated_params(cfg: ModelConfig) -> int:
    """Router + shared experts + the k routed experts one token is sent to."""
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    experts = cfg.n_shared_experts + cfg.num_experts_per_tok
    return D * cfg.n_routed_experts + 3 * D * F * experts


def _causal_context(seq_len: int) -> float:
    """Average number of keys a query attends to under a causal mask: (T + 1) / 2."""
    return (seq_len + 1) / 2.0


def flops_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of a length-`seq_len` training sequence, by component.

    Keys: `attention_proj` (MLA projections, all layers), `attention_core` (QK^T and PV over the
    causal average context (T+1)/2, all layers), `dense_mlp` (the dense SwiGLU layers), `moe`
    (router, shared experts and the k routed experts, all MoE layers), `head` (the output
    projection; the embedding lookup does no matmul) and `mtp` (each MTP depth k: eh_proj, its
    block with its own causal attention over T-k positions, and its pass through the shared head;
    it runs on T-k of the T positions, so it is weighted by (T-k)/T). Norms, softmax, routing
    top-k and other elementwise work are not counted. The values sum to
    `forward_flops_per_token(cfg, seq_len)`.
    """
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r}: must be a positive integer")
    if cfg.is_v4:  # DeepSeek-V4's attention, mHC and MoE-everywhere (adds an `mhc` key)
        from dsjax.train.flops_v4 import v4_flops_breakdown  # noqa: PLC0415

        return v4_flops_breakdown(cfg, seq_len)
    D, V = cfg.hidden_size, cfg.vocab_size
    L = cfg.num_hidden_layers
    proj = 2.0 * _attention_proj_params(cfg)
    dense = 2.0 * _dense_mlp_params(cfg)
    moe = 2.0 * _moe_activated_params(cfg)
    head = 2.0 * D * V
    mtp = 0.0
    for k in range(1, cfg.num_mtp_layers + 1):
        n = seq_len - k
        if n <= 0:
            break
        ffn = moe if cfg.mtp_is_moe else dense
        per_token = 2.0 * (2 * D) * D + proj + _attention_core_flops(cfg, _causal_context(n))
        mtp += (per_token + ffn + head) * n / seq_len
    return {
        "attention_proj": L * proj,
        "attention_core": L * _attention_core_flops(cfg, _causal_context(seq_len)),
        "dense_mlp": cfg.num_dense_layers * dense,
        "moe": cfg.num_moe_layers * moe,
        "head": head,
        "mtp": mtp,
    }


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one forward pass, per token (see `flops_breakdown`)."""
    return float(sum(flops_breakdown(cfg, seq_len).values()))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training step, per token: forward + backward (2 x forward) = 3 x forward.

    Activation recomputation (remat) is deliberately not included: MFU counts useful work only.
    """
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def mfu(
    tokens_per_second: float,
    flops_per_token: float,
    peak_flops_per_device: float | None,
    num_devices: int = 1,
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s / (peak per device x device count).

    Returns a fraction (0.35 = 35 %), or None when the peak is unknown.
    """
    if not peak_flops_per_device or num_devices <= 0:
        return None
    return tokens_per_second * flops_per_token / (peak_flops_per_device * num_devices)


# ---------------------------------------------------------------------------------- peak FLOP/s

# (device_kind substring, lower case; dense bf16 FLOP/s; dense float32 FLOP/s under JAX's default
# matmul precision). Dense means without 2:4 sparsity (vendor sheets often quote sparse numbers,
# twice these). First match wins, so specific names come before their prefixes.
#
# float32 choice: JAX's DEFAULT precision runs float32 matmuls on TF32 tensor cores on NVIDIA
# Ampere and later (A100, H100, H200, L4, L40), so their float32 entry is the dense TF32 peak (half
# the bf16 peak), not the much lower CUDA-core FP32 rate; on TPU it is a single bf16 pass on the
# MXU, so the float32 entry equals the bf16 one. float16 uses the bf16 numbers everywhere. Numbers
# are per JAX device: one chip for H100/A100/L4 and for TPU v4, v5e, v5p, v6e (megacore or
# single-core chips).
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756e12, 378e12),
    ("h100 nvl", 835e12, 417.5e12),
    ("h100", 989e12, 494.7e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h800", 989e12, 494.7e12),
    ("h200", 989e12, 494.7e12),  # also GH200
    ("a100", 312e12, 156e12),
    ("l40s", 362e12, 183e12),
    ("l40", 181e12, 90.5e12),
    ("l4", 121e12, 60e12),
    ("tpu v6 lite", 918e12, 918e12),
    ("tpu v6e", 918e12, 918e12),
    ("tpu v5 lite", 197e12, 197e12),
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),  # v5p reports device_kind "TPU v5"
    ("tpu v4", 275e12, 275e12),
)


def _dtype_name(dtype: Any) -> str:
    """'bfloat16' / 'float32' / 'float16' from a string, numpy or JAX dtype."""
    import jax.numpy as jnp

    name = jnp.dtype(dtype).name
    if name not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected bfloat16, float16 or float32")
    return name


@functools.cache
def _measure_cpu_peak_flops(dtype: str, size: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), dtype), cpu)
    b = jax.device_put(jnp.full((size, size), 0.5, dtype), cpu)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile + warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / max(best, 1e-9)


def measure_cpu_peak_flops(dtype: Any = "float32", size: int = 1024, repeats: int = 3) -> float:
    """Best FLOP/s of a jitted `size` x `size` matmul on the CPU backend, after one warm-up run.

    Measured once per (dtype, size, repeats) per process and cached.
    """
    return _measure_cpu_peak_flops(_dtype_name(dtype), int(size), int(repeats))


def peak_flops_per_device(device: Any = None, dtype: Any = "bfloat16") -> tuple[float | None, str]:
    """(peak dense FLOP/s of one device for `dtype` matmuls, where the number comes from).

    Accelerators are looked up in `PEAK_FLOPS` by `device.device_kind`; CPUs are measured
    (`measure_cpu_peak_flops`); an unknown accelerator gives (None, reason). `device` defaults to
    `jax.devices()[0]`.
    """
    if device is None:
        import jax

        device = jax.devices()[0]
    name = _dtype_name(dtype)
    kind = str(getattr(device, "device_kind", ""))
    platform = str(getattr(device, "platform", "")).lower()
    if platform == "cpu":
        value = measure_cpu_peak_flops(name)
        return value, f"measured: jitted 1024x1024 {name} matmul on the CPU backend ({kind})"
    lowered = kind.lower()
    for key, bf16, fp32 in PEAK_FLOPS:
        if key in lowered:
            if name == "float32":
                precision = "TF32 tensor cores" if not key.startswith("tpu") else "1-pass bf16 MXU"
                detail = f"float32 at JAX default precision ({precision}), dense"
                return fp32, f"table: {kind!r} matched {key!r}, {detail}"
            return bf16, f"table: {kind!r} matched {key!r}, {name} dense (bf16 peak)"
    return None, f"unknown device kind {kind!r} (platform {platform!r}): no peak FLOP/s, no MFU"


# (device_kind substring, lower case; HBM bytes/s per device; dense FP8 FLOP/s per device, None
# where the chip has no FP8 matmul). Vendor data sheets (dense = without 2:4 sparsity; sheets
# quote sparse FP8, twice these); TPU bandwidths as in dsjax/plan/tpu_specs.py. First match wins.
DEVICE_MEMORY: tuple[tuple[str, float, float | None], ...] = (
    ("h100 pcie", 2.0e12, 1513e12),
    ("h100 nvl", 3.9e12, 1671e12),
    ("h100", 3.35e12, 1979e12),  # SXM5 80 GB HBM3
    ("h800", 3.35e12, 1979e12),
    ("gh200", 4.0e12, 1979e12),  # the 96 GB HBM3 part (the 144 GB HBM3e one has 4.9 TB/s)
    ("h200", 4.8e12, 1979e12),
    ("a100-sxm4-80gb", 2.039e12, None),
    ("a100 80gb pcie", 1.935e12, None),
    ("a100", 1.555e12, None),  # 40 GB parts
    ("l40s", 864e9, 733e12),
    ("l40", 864e9, 362e12),
    ("l4", 300e9, 242.5e12),
    ("tpu v6 lite", 1640e9, None),
    ("tpu v6e", 1640e9, None),
    ("tpu v5 lite", 819e9, None),
    ("tpu v5e", 819e9, None),
    ("tpu v5p", 2765e9, None),
    ("tpu v5", 2765e9, None),
    ("tpu v4", 1200e9, None),
)


def _device_memory_row(device: Any) -> tuple[str, str, tuple[str, float, float | None] | None]:
    kind = str(getattr(device, "device_kind", ""))
    platform = str(getattr(device, "platform", "")).lower()
    row = next((r for r in DEVICE_MEMORY if r[0] in kind.lower()), None)
    return kind, platform, row


@functools.cache
def _measure_cpu_memory_bandwidth(mib: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((mib * 2**18,), jnp.float32), jax.devices("cpu")[0])
    scale = jax.jit(lambda a: a * 1.5)
    scale(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        scale(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * x.nbytes / max(best, 1e-9)  # one read + one write of the array


def memory_bandwidth_per_device(device: Any = None, mib: int = 256) -> tuple[float | None, str]:
    """(HBM bytes/s of one device, where the number comes from): accelerators from
    `DEVICE_MEMORY` by `device.device_kind`; CPUs measured (best of 3 jitted elementwise passes
    over a `mib`-MiB float32 array, read + write bytes); unknown accelerators (None, reason)."""
    if device is None:
        import jax

        device = jax.devices()[0]
    kind, platform, row = _device_memory_row(device)
    if platform == "cpu":
        value = _measure_cpu_memory_bandwidth(int(mib), 3)
        return value, f"measured: jitted elementwise pass over {mib} MiB float32 ({kind})"
    if row is None:
        return None, f"unknown device kind {kind!r} (platform {platform!r}): no HBM bandwidth"
    return row[1], f"table: {kind!r} matched {row[0]!r}"


def peak_fp8_flops_per_device(device: Any = None) -> tuple[float | None, str]:
    """(dense FP8 FLOP/s of one device, where the number comes from); None for CPUs, chips
    without FP8 matmuls (A100, TPU v4/v5) and unknown kinds."""
    if device is None:
        import jax

        device = jax.devices()[0]
    kind, platform, row = _device_memory_row(device)
    if platform == "cpu" or row is None or row[2] is None:
        return None, f"no FP8 matmul peak for {kind!r} (platform {platform!r})"
    return row[2], f"table: {kind!r} matched {row[0]!r}, FP8 dense"


# ---------------------------------------------------------------------------------- metric logs


def _to_float(value: Any) -> float | None:
    """A JSON-safe float: None, NaN and infinities become None (strict JSON has no such
    numbers)."""
    if value is None:
        return None
    x = float(value)
    return x if math.isfinite(x) else None


class MetricWriter:
    """Appends metrics to `workdir/metrics.jsonl` (one JSON object per line, flushed) and to
    TensorBoard event files under `workdir/tensorboard`. Non-chief processes write nothing.
    Values are stored as floats; NaN and infinities as `null` (strict JSON), and skipped in
    TensorBoard.

    `resume_step=N` (resuming from a checkpoint at step N) first drops the lines whose step is
    greater than N (and any unreadable line, e.g. one cut short by a kill), and tells TensorBoard to
    purge its events after N, so the resumed run's logs hold each step once.
    """

    FILENAME = "metrics.jsonl"

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        use_tensorboard: bool = True,
        is_chief: bool = True,
        resume_step: int | None = None,
    ):
        self.path = Path(workdir) / self.FILENAME
        self.is_chief = is_chief
        self._file: TextIO | None = None
        self._tb = None
        if not is_chief:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if use_tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)

    def _truncate(self, resume_step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    step = int(record["step"])
                except (ValueError, KeyError, TypeError):
                    continue
                if step <= resume_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs `metrics` (name -> scalar: Python/NumPy/JAX numbers) at `step`."""
        if not self.is_chief:
            return
        if self._file is None:
            raise RuntimeError("MetricWriter.write after close()")
        values = {name: _to_float(value) for name, value in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if value is not None:
                    self._tb.add_scalar(name, value, int(step))
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(metrics_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, skipping unreadable lines."""
    records = []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


# ---------------------------------------------------------------------------------- progress


def format_duration(seconds: float | None) -> str:
    """Compact duration: '42s', '4m12s', '1h05m', '2d03h' ('?' for unknown/negative)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_count(x: float) -> str:
    """'950', '8.1k', '12.3M', '1.5G'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class Progress:
    """Console progress, e.g.
    `step 120/600 [####----------------] loss 3.214 | 8.1k tok/s | MFU 12.3% | ETA 4m12s`.

    On a TTY the line is redrawn in place (carriage return); otherwise (CI, a pipe, a file) each
    `update` prints one plain line. Recognised metrics: `loss`, `eval_loss`, `tokens_per_sec`,
    `mfu` (a fraction); others are ignored. The ETA uses an exponential moving average of the
    seconds per step measured between updates.
    """

    BAR_WIDTH = 20

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        stream: TextIO | None = None,
        *,
        smoothing: float = 0.3,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps = int(total_steps)
        self.stream = sys.stderr if stream is None else stream
        self.smoothing = smoothing
        self._clock = clock
        self._last_step = int(start_step)
        self._last_time = clock()
        self._sec_per_step: float | None = None
        self._live_width = 0
        isatty = getattr(self.stream, "isatty", None)
        self.is_tty = bool(isatty and isatty())

    def _bar(self, step: int) -> str:
        frac = min(max(step / self.total_steps, 0.0), 1.0) if self.total_steps > 0 else 1.0
        filled = int(round(frac * self.BAR_WIDTH))
        return "[" + "#" * filled + "-" * (self.BAR_WIDTH - filled) + "]"

    def format(self, step: int, metrics: Mapping[str, Any]) -> str:
        """The status line for `step` (uses the current step-time estimate for the ETA)."""
        parts = [f"step {step}/{self.total_steps} {self._bar(step)}"]
        fields = []
        if metrics.get("loss") is not None:
            loss = f"loss {float(metrics['loss']):.3f}"
            if metrics.get("main_ce") is not None:  # comparable with `eval` (loss adds MTP CE)
                loss += f" (main CE {float(metrics['main_ce']):.3f})"
            fields.append(loss)
        if metrics.get("eval_loss") is not None:
            fields.append(f"eval {float(metrics['eval_loss']):.3f}")
        if metrics.get("tokens_per_sec") is not None:
            fields.append(f"{format_count(float(metrics['tokens_per_sec']))} tok/s")
        if metrics.get("mfu") is not None:
            fields.append(f"MFU {100 * float(metrics['mfu']):.1f}%")
        eta = None
        if self._sec_per_step is not None:
            eta = self._sec_per_step * max(self.total_steps - step, 0)
        fields.append(f"ETA {format_duration(eta)}")
        return " ".join(parts) + " " + " | ".join(fields)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        """Records that `step` is done and prints the status line; returns it."""
        now = self._clock()
        done = step - self._last_step
        if done > 0:
            rate = (now - self._last_time) / done
            if self._sec_per_step is None:
                self._sec_per_step = rate
            else:
                a = self.smoothing
                self._sec_per_step = a * rate + (1 - a) * self._sec_per_step
            self._last_step, self._last_time = step, now
        line = self.format(step, metrics or {})
        if self.is_tty:
            pad = " " * max(self._live_width - len(line), 0)
            self.stream.write("\r" + line + pad)
            self._live_width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def write(self, message: str) -> None:
        """Prints a message on its own line without garbling the live status line."""
        self.close()
        self.stream.write(message.rstrip("\n") + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the live line (TTY), so later output starts on a fresh line."""
        if self.is_tty and self._live_width:
            self.stream.write("\n")
            self.stream.flush()
        self._live_width = 0


# ---------------------------------------------------------------------------------- plots


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): `weight` 0 = raw values."""
    out, avg = [], 0.0
    for n, v in enumerate(values, start=1):
        avg = weight * avg + (1.0 - weight) * v
        out.append(avg / (1.0 - weight**n) if weight else v)
    return out


def _smoothing(n_points: int) -> float:
    """EMA weight for a curve of `n_points` logged points: none below 10, at most 0.75 (a few
    points of lag, so the smoothed curve still follows a fast early drop)."""
    return 0.0 if n_points < 10 else min(0.75, 1.0 - 5.0 / n_points)


def loss_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) series `plot_loss` draws, all cross-entropies in nats per token.

    "train": the training MAIN cross-entropy (`main_ce`: next-token CE only, what `eval_loss`
    measures on held-out data; the optimised `loss` adds λ·MTP CE and the balance loss, so it is
    not comparable) — or `loss` for logs written before `main_ce` existed ("train_total");
    "train_smoothed": that series smoothed (`smooth`); "eval": held-out main CE (`eval_loss`);
    "mtp": the MTP modules' CE (`mtp_ce`; logs without MTP have none).
    """

    def series(key: str) -> list[tuple[int, float]]:
        out = []
        for r in records:
            v = None if r.get(key) is None else _to_float(r[key])
            if v is not None and "step" in r:
                out.append((int(r["step"]), v))
        return out

    curves: dict[str, list[tuple[int, float]]] = {}
    train = series("main_ce")
    curves["train" if train else "train_total"] = train or series("loss")
    raw = train or curves["train_total"]
    curves["train_smoothed"] = list(
        zip([s for s, _ in raw], smooth([v for _, v in raw], _smoothing(len(raw))), strict=True)
    )
    curves["eval"] = series("eval_loss")
    mtp = [(s, v) for s, v in series("mtp_ce") if v > 0]  # 0.0 is logged when there is no MTP
    if mtp:
        curves["mtp"] = mtp
    return curves


def plot_loss(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plots the `loss_curves` of a metrics.jsonl file into a PNG (Agg renderer; no pyplot global
    state): training main cross-entropy (faint raw, bold smoothed) beside held-out main
    cross-entropy, and the MTP cross-entropy as its own line. Works with any number of points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    curves = loss_curves(records)
    bpb = [r["eval_bpb"] for r in records if r.get("eval_bpb") is not None]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    raw_key = "train" if "train" in curves else "train_total"
    raw, label = (
        curves[raw_key],
        {
            "train": "train main CE",
            "train_total": "train loss (incl. MTP, balance)",
        }[raw_key],
    )
    if raw:
        steps, values = zip(*raw, strict=True)
        if len(raw) >= 10:
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=1)
            steps, values = zip(*curves["train_smoothed"], strict=True)
            label += " (smoothed)"
        ax.plot(steps, values, color="tab:blue", marker="." if len(raw) < 50 else None, label=label)
    if curves.get("mtp"):
        steps, values = zip(*curves["mtp"], strict=True)
        mtp = smooth(values, _smoothing(len(values)))
        ax.plot(steps, mtp, color="tab:green", alpha=0.8, label="train MTP CE (smoothed)")
    if curves["eval"]:
        steps, values = zip(*curves["eval"], strict=True)
        ax.plot(steps, values, "o-", color="tab:red", label="held-out main CE")
    if not (raw or curves["eval"]):
        ax.text(0.5, 0.5, "no loss recorded yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend()
    if curves["eval"]:
        title = f"held-out main CE {curves['eval'][0][1]:.3f} -> {curves['eval'][-1][1]:.3f}"
        if bpb:
            title += f" nats/token ({bpb[0]:.3f} -> {bpb[-1]:.3f} bits/byte)"
        ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# ------------------------------------------------------------- tokenizer-independent eval units


def token_byte_lengths(tokenizer: Any, size: int | None = None) -> list[int]:
    """[V] list: how many UTF-8 bytes of decoded text each token id stands for.

    `tokenizer` is a `dsjax.text.tokenizer.Tokenizer`. Special tokens count 0 (decoding skips them).
    With a byte-level decoder (GPT-2 / DeepSeek style BPE) a vocabulary piece is a string of
    byte-alphabet characters, one per byte, so its length is read from the piece itself; decoding
    a piece alone would not do, since a piece that holds part of a multi-byte character decodes to
    U+FFFD (3 bytes). Other decoders (and added non-special tokens) count
    `len(decode([id]).encode())`. The list is zero-padded to `size` (the model's vocab) if given.
    """
    from tokenizers import decoders, pre_tokenizers  # noqa: PLC0415  (only eval needs them)

    backend = tokenizer.backend
    vocab = tokenizer.vocab_size
    added = backend.get_added_tokens_decoder()
    byte_level = isinstance(backend.decoder, decoders.ByteLevel)
    byte_chars = set(pre_tokenizers.ByteLevel.alphabet())  # one character per byte value
    out = []
    for i in range(vocab):
        if i in added:
            token = added[i]
            out.append(0 if token.special else len(token.content.encode("utf-8")))
            continue
        piece = backend.id_to_token(i)
        if byte_level and piece is not None and all(c in byte_chars for c in piece):
            out.append(len(piece))
        else:
            out.append(len(tokenizer.decode([i]).encode("utf-8")))
    if size is not None:
        if size < vocab:
            raise ValueError(f"size {size} is smaller than the tokenizer's vocab_size {vocab}")
        out += [0] * (size - vocab)
    return out


def bits_per_byte(total_nats: float, total_bytes: float) -> float | None:
    """Σ cross-entropy (nats) over target tokens / ln 2 / Σ UTF-8 bytes those tokens decode to:
    a loss that does not change with the tokenizer. None when there are no bytes."""
    if total_bytes <= 0:
        return None
    return float(total_nats) / math.log(2.0) / float(total_bytes)


def _parses_alone(line: str) -> bool:
    """Whether one dedented source line is valid Python on its own: a block header (`...:`) gets
    an indented `pass`; `elif`/`else`/`except`/`finally` headers are tried after the `if`/`try`
    block they continue, and a decorator before a `def`."""
    import ast  # noqa: PLC0415

    text = line.strip()
    if text.endswith(":"):
        text += "\n    pass"
    first = text.split(None, 1)[0].rstrip(":")
    if first in ("elif", "else"):
        text = "if _:\n    pass\n" + text
    elif first in ("except", "finally"):
        text = "try:\n    pass\n" + text
    elif text.startswith("@"):
        text += "\ndef _():\n    pass"
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the text
        return False
    return True


def python_line_check(text: str) -> tuple[int, int]:
    """(lines that parse as Python on their own, lines) of `text`, blank and comment-only lines
    left out (a `#` line always parses): how code-like a model's sample is, line by line (see
    `_parses_alone`)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return sum(_parses_alone(ln) for ln in lines), len(lines)
