"""The planner: will this config train (or decode) on that slice, and how fast at best?

    python -m dsjax.plan --config=configs/deepseek_v3.py --topology=v5p:4x8x8 \
        [--mode=train|decode] [--config.mesh.fsdp=32 --config.mesh.expert=8 ...] \
        [--batch_per_chip=1] [--batch=64 --cache_len=32768 --layout=fsdp|decode]
        [--json=PATH] [--search] [--num_slices=K]

It compiles the REAL program (`dsjax.train.step.train_step` with `state_shardings`, or the
model's absorbed-latent decode forward of one token per row over a cache) for abstract TPU chips
(`jax.experimental.topologies`; libtpu from requirements-tpu.txt) or the local GPUs
(`--topology=gpu`), and reports per device: parameters, optimizer state, temporaries, total
against HBM, compile time, FLOPs (analytic and XLA's), the collectives of the optimized HLO with
bytes per step, and a roofline step time from published chip figures (dsjax/plan/tpu_specs.py) ->
an upper-bound MFU. Beside the compiler's figures an analytic breakdown shows where memory goes.
Decode plans take a layout (`--layout`, `dsjax.model.sharding.logical_rules`) and report the HBM
bound (weights + latent cache read once per step, evenly over the chips) beside the roofline.
`--num_slices=K` plans K such slices joined by the data-center network (multi-slice; the mesh's
outer axes, `stage` then `data`, span the slices): the report adds the bytes each chip sends
between slices per step and their time at the published DCN rate, and for `mesh.stage > 1` an
estimated step time with the pipeline's bubble.
Exit status: 0 fits, 1 does not fit (numbers printed), 2 cannot plan (libtpu / GPU missing).
"""

from __future__ import annotations

import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server on a CPU machine
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # others may hold libtpu's lock file
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import linen as nn  # noqa: E402

from dsjax import run_config  # noqa: E402
from dsjax.model import sharding  # noqa: E402
from dsjax.model.transformer import Transformer, cache_batch_axis  # noqa: E402
from dsjax.model.v4_blocks import cache_shapes  # noqa: E402
from dsjax.plan import (
    hlo_stats,  # noqa: E402
    tpu_specs,  # noqa: E402
)
from dsjax.run_config import RunConfig  # noqa: E402
from dsjax.train import metrics  # noqa: E402
from dsjax.train import step as ts  # noqa: E402
from dsjax.train.pipeline_schedule import pipeline_figures  # noqa: E402
from dsjax.train.stack_layout import stack_layout  # noqa: E402

GIB = 1024**3
SAVED_PER_LAYER = {"full": 1, "offload": 0, "save_attn": 2, "save_attn_ffn": 3,
                   "dots_no_batch": 6, "dots": 8}  # fmt: skip
HOST = "pinned_host"


class PlanError(Exception):
    """A plan cannot be made (missing libtpu/GPU, bad arguments); `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: the devices and, for TPUs, the chip figures."""

    label: str
    devices: tuple
    peak_flops: float | None  # per device
    hbm_bytes: float | None
    hbm_bytes_per_s: float | None
    ici_bytes_per_s: float | None
    host_bytes: float | None = None  # host memory per device
    slices: int = 1  # slices joined by the data-center network (multi-slice)
    dcn_bytes_per_s: float | None = None  # per device, between slices


# ----------------------------------------------------------------------------- target
def make_target(topology: str, num_slices: int = 1) -> Target:
    """TPU topology name (v5p:4x8x8, v5e:2x2, v6e:4x4, v4:2x2x1) or 'gpu' (the local GPUs);
    `num_slices` TPU slices of that topology joined by DCN (devices in slice order)."""
    if num_slices < 1:
        raise PlanError(f"--num_slices={num_slices}: must be >= 1")
    if topology.strip().lower() == "gpu":
        if num_slices > 1:
            raise PlanError("--num_slices applies to TPU topologies, not --topology=gpu")
        try:
            devices = jax.devices("gpu")
        except RuntimeError:
            devices = []
        if not devices:
            raise PlanError(
                "GPU plans need the device: run the planner on the GPU machine itself "
                "(no GPU is visible here; for TPUs pass e.g. --topology=v5p:4x8x8)"
            )
        peak, _ = metrics.peak_flops_per_device(devices[0], "bfloat16")
        return Target(f"{len(devices)} x {devices[0].device_kind}", tuple(devices), peak,
                      _gpu_memory(devices[0]), None, None)  # fmt: skip
    spec, dims = tpu_specs.parse_topology(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(
            "TPU plans need libtpu (the XLA:TPU compiler): pip install -r requirements-tpu.txt"
        )
    from jax.experimental import topologies

    name = tpu_specs.libtpu_topology_name(spec, dims)
    extra: dict = {"num_slices": num_slices} if num_slices > 1 else {}
    if tpu_specs.num_chips(dims) < 4:  # less than one host: libtpu needs the host's bounds
        extra["chips_per_host_bounds"] = [*dims, 1, 1][:3]
    devices = topologies.get_topology_desc(platform="tpu", topology_name=name, **extra).devices
    chips = tpu_specs.num_chips(dims) * num_slices
    per_chip = len(devices) / chips  # v4: one device per TensorCore
    label = f"{name} ({chips} chips, {len(devices)} devices)"
    if num_slices > 1:
        label = f"{num_slices} x {name} over DCN ({chips} chips, {len(devices)} devices)"
    return Target(
        label,
        tuple(devices),
        spec.peak_bf16_flops / per_chip,
        spec.hbm_bytes / per_chip,
        spec.hbm_bytes_per_s / per_chip,
        spec.ici_bytes_per_s / per_chip,
        spec.host_bytes / per_chip if spec.host_bytes else None,
        num_slices,
        spec.dcn_bytes_per_s / per_chip if spec.dcn_bytes_per_s else None,
    )


def _gpu_memory(device) -> float | None:
    try:
        return float(device.memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001 - a backend without memory stats
        return None


# ----------------------------------------------------------------------------- helpers
def shard_bytes(tree, memory_kind: str | None = None) -> float:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (only the leaves in
    `memory_kind`, e.g. "pinned_host", if given)."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        if memory_kind is not None and getattr(leaf.sharding, "memory_kind", None) != memory_kind:
            continue
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _size(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([KMGT]?)i?B?", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


@dataclasses.dataclass
class CompilerDump:
    """What the compiler wrote of the optimized program (XLA's own dump, read back as text):
    `hlo_text` the optimized module; `allocations[color][kind]` bytes of its buffer assignment
    per memory space (color 0 = HBM, `HOST_COLOR` = host memory) and kind ("param" / "temp")."""

    hlo_text: str | None = None
    allocations: dict = dataclasses.field(default_factory=dict)

    def bytes(self, color: int, kind: str) -> float:
        return float(self.allocations.get(color, {}).get(kind, 0))


HOST_COLOR = 5  # xla::Layout::kHostMemorySpace: the memory space of pinned_host buffers
_ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*)$")


def _read_dump(directory: str) -> CompilerDump:
    """The optimized HLO text and the buffer assignment's bytes per (memory space, kind)."""
    dump = CompilerDump()
    names = os.listdir(directory)
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(".after_optimizations.txt"):
            with open(path) as f:
                dump.hlo_text = f.read()
        elif name.endswith(".after_optimizations-buffer-assignment.txt"):
            with open(path) as f:
                for line in f:
                    m = _ALLOCATION.match(line)
                    if not m:
                        continue
                    color = re.search(r"\bcolor (\d+)", m.group(2))
                    kind = "param" if "parameter" in m.group(2) else "temp"
                    per = dump.allocations.setdefault(int(color.group(1)) if color else 0, {})
                    per[kind] = per.get(kind, 0) + int(m.group(1))
    return dump


def compile_or_oom(lowered):
    """(compiled, None, dump) or (None, {"required_bytes", "hbm_bytes", "message"}, None) when XLA
    says OOM. The compiler dumps the optimized program into a temporary directory: its buffer
    assignment gives the HBM heap and the host buffers apart (XLA:TPU's `memory_analysis`
    temp_size disagrees with that heap, and counts host buffers with it), and its text stands
    in for `compiled.as_text()` where jaxlib cannot parse a newer libtpu's program."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dsjax-plan-") as directory:
        options = {"xla_dump_to": directory, "xla_dump_hlo_as_text": True}
        try:
            compiled = lowered.compile(compiler_options=options)
        except Exception as e:  # noqa: BLE001
            return (None, *_oom_or_raise(e))
        return compiled, None, _read_dump(directory)


# Compiler failures with a known cause, and what to do about them.
KNOWN_COMPILER_BUGS = {
    "Assigned barrier is not acceptable for opcode: ragged-all-to-all": (
        "a bug of the libtpu that jax 0.10.2 pins (0.0.42), met on 512-chip slices; libtpu "
        "0.0.52 compiles the program: pip install libtpu==0.0.52 in the planning environment"
    ),
}


def _oom_or_raise(e: Exception) -> tuple[dict, None]:
    """XLA's out-of-memory error as ({"message", "required_bytes"/"used_bytes", "hbm_bytes"},
    None), both byte counts the whole per-device requirement;
    any other compiler failure is a PlanError with its first line (and the known remedy)."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
        first = text.strip().splitlines()[0][:400] if text.strip() else type(e).__name__
        hint = "".join(f" ({fix})" for bug, fix in KNOWN_COMPILER_BUGS.items() if bug in text)
        raise PlanError(f"the XLA compiler failed on this plan: {first}{hint}", code=1) from e
    oom: dict[str, str | float] = {"message": text.splitlines()[0][:400]}
    num = r"\(([0-9.]+[KMGT]?)\)"
    m = re.search(rf"HLO temporaries {num} exceeds available HBM {num}", text)
    if m:
        # Despite its wording this figure is the whole requirement, arguments included: V3
        # decode, batch 128, 32K cache, expert 8 x tensor 8 says 33.39G on v6e-64, and on
        # v5p-64, where it fits, the same program's arguments 28.99 + temporaries 4.40 GiB =
        # 33.39 GiB.
        oom["required_bytes"], oom["hbm_bytes"] = _size(m.group(1)), _size(m.group(2))
    m = re.search(r"Used ([0-9.]+[KMGT]?) of ([0-9.]+[KMGT]?) hbm", text)
    if m:
        oom["used_bytes"], oom["hbm_bytes"] = _size(m.group(1)), _size(m.group(2))
    return oom, None


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _memory_from_compiled(compiled, args_bytes: float, dump: CompilerDump | None) -> dict:
    """Per-device bytes: arguments, outputs, aliasing and code from `memory_analysis`;
    temporaries in HBM from the buffer assignment (its HBM temporary heap) where the dump has
    it, and host memory (offloaded state, activations) apart from them."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {"args_bytes": args_bytes}
    out = {
        "args_bytes": float(ma.argument_size_in_bytes),
        "output_bytes": float(ma.output_size_in_bytes),
        "alias_bytes": float(ma.alias_size_in_bytes),
        "temp_bytes": float(ma.temp_size_in_bytes),
        "code_bytes": float(ma.generated_code_size_in_bytes),
    }
    host = {k: float(getattr(ma, f"host_{k}_size_in_bytes", 0) or 0)
            for k in ("argument", "output", "alias", "temp")}  # fmt: skip
    out["host_bytes"] = host["argument"] + host["output"] - host["alias"] + host["temp"]
    out["compiler_temp_bytes"] = out["temp_bytes"]  # memory_analysis, as XLA reports it
    hbm_temp = None
    if dump is not None and dump.allocations:
        hbm_temp = dump.bytes(0, "temp")
        # XLA:TPU's temp_size disagrees with its own HBM heap (V3 on v6e-512: 26.85 G reported,
        # an 18.96 GiB heap, which the compiler accepted on a 31.25 G chip; its peak_memory
        # agrees with the heap) and, when a program offloads, counts host buffers with it
        # (27.73 G: an 18.92 GiB heap plus 8.32 GiB of host buffers). The heap must fit.
        out["temp_bytes"] = hbm_temp
        out["host_bytes"] = dump.bytes(HOST_COLOR, "param") + dump.bytes(HOST_COLOR, "temp")
    out["total_bytes"] = (
        out["args_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
        + out["code_bytes"]
    )  # fmt: skip
    peak = float(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    if peak:
        out["peak_bytes"] = peak
        if hbm_temp is None and peak > out["total_bytes"]:
            # Without the dump: XLA:TPU reports temp_size 0 for some straight-line programs
            # whose buffer assignment still has an HBM heap (small, scan_unroll=4, v5e:2x2: 0
            # reported, 9.7 MiB assigned) while its peak stays right: the peak is then a floor.
            out["temp_bytes"] += peak - out["total_bytes"]
            out["total_bytes"] = peak
    return out


def _collectives(compiled, dump: CompilerDump | None, n: int, slices: int = 1) -> dict | None:
    """The collectives of the optimized program: from the compiler's dump, else from
    `compiled.as_text()` (which jaxlib cannot parse for a newer libtpu's programs). With
    `slices` > 1 each op also has its bytes sent between slices ("dcn_bytes")."""
    per_slice = n // slices if slices > 1 else None
    if dump is not None and dump.hlo_text:
        return hlo_stats.collectives(dump.hlo_text, n, per_slice)
    try:
        return hlo_stats.collectives(compiled.as_text(), n, per_slice)
    except Exception:  # noqa: BLE001 - e.g. "async-update instruction should have 1 operands"
        return None


def _fill_fit(report: dict, target: Target, memory: dict, oom: dict | None) -> None:
    hbm = (oom or {}).get("hbm_bytes") or target.hbm_bytes
    if oom:
        total = oom.get("used_bytes") or oom.get("required_bytes", float("nan"))
        memory["total_bytes"] = total
        memory["temp_bytes"] = max(total - memory["args_bytes"], 0.0)
        memory["compiler_message"] = oom["message"]
    report["memory"] = memory
    report["hbm_bytes"] = hbm
    host = memory.get("host_bytes") or 0.0
    report["host_memory_bytes"] = target.host_bytes
    report["host_fits"] = target.host_bytes is None or host <= target.host_bytes
    report["fits"] = bool(
        oom is None and (hbm is None or memory["total_bytes"] <= hbm) and report["host_fits"]
    )
    report["headroom_bytes"] = (hbm - memory["total_bytes"]) if hbm else None


def _roofline(report: dict, target: Target, flops_dev: float, hw_flops_dev: float,
              hbm_bytes_dev: float) -> None:  # fmt: skip
    """compute / HBM / ICI times at the published peaks; the step cannot be faster than the
    largest (perfect overlap), so analytic FLOPs over it is an upper bound on MFU."""
    est = {}
    if target.peak_flops:
        est["compute_s"] = hw_flops_dev / target.peak_flops
    if target.hbm_bytes_per_s:
        est["hbm_s"] = hbm_bytes_dev / target.hbm_bytes_per_s
    ops = (report.get("collectives") or {}).get("ops", {})
    dcn = sum(v.get("dcn_bytes", 0.0) for v in ops.values())
    if target.ici_bytes_per_s and ops:
        moved = sum(v["moved_bytes"] for v in ops.values())
        est["ici_s"] = max(moved - dcn, 0.0) / target.ici_bytes_per_s
    if target.slices > 1 and ops:
        report["dcn_bytes"] = dcn
        if target.dcn_bytes_per_s:
            est["dcn_s"] = dcn / target.dcn_bytes_per_s
    if est:
        est["step_s"] = max(est.values())
        if target.peak_flops:
            est["mfu_upper_bound"] = flops_dev / (est["step_s"] * target.peak_flops)
    pp = report.get("pipeline")
    if pp and "compute_s" in est:
        # Pipelined: every rank idles for the bubble; compute stretches by 1 / (1 - bubble),
        # the transfers overlap it at best.
        stretched = est["compute_s"] / (1 - pp["bubble_fraction"])
        est["pipelined_step_s"] = max(
            [stretched] + [v for k, v in est.items() if k in ("hbm_s", "ici_s", "dcn_s")]
        )
    report["estimate"] = est


# ----------------------------------------------------------------------------- train
def moe_tokens_per_shard(run: RunConfig, mesh) -> int:
    """Tokens one MoE layer call sees per batch shard: a (grad_accum) batch's share, split further
    into micro-batches when pipelined over `stage` (each chunk runs one micro-batch)."""
    stages = dict(mesh.shape).get("stage", 1)
    micro = run_config.pipeline_settings(run.train, stages)[1] if stages > 1 else 1
    context = dict(mesh.shape).get("context", 1)
    B = run.train.batch_size / sharding.batch_shards(mesh) / run.train.grad_accum / micro
    return int(B * run.data.seq_len / context)


def moe_exchange_figures(cfg, run: RunConfig, mesh) -> dict | None:
    """The routed experts' token exchange the model will pick (`moe.exchange_group` "auto") at the
    step's tokens per shard, and the bytes of expert weights a chip all-gathers per MoE layer run
    (each of E/G experts' gate, up, down whole in the compute dtype, less what the chip holds).
    Without an exchange that is all E experts every layer run — at V3 widths 21 GiB — which
    dominates the step's ICI time (issue 22)."""
    if not cfg.n_routed_experts or cfg.num_moe_layers + cfg.num_mtp_layers == 0:
        return None
    from dsjax.model.layers import moe as moe_lib

    shape = dict(mesh.shape)
    n = moe_tokens_per_shard(run, mesh)
    group = moe_lib.exchange_group(cfg, mesh, n)
    G = math.prod(shape[a] for a in group) if group else 1
    F_l = cfg.moe_intermediate_size / shape.get("tensor", 1)
    layer = 3 * cfg.n_routed_experts / G * cfg.hidden_size * F_l * jnp.dtype(cfg.dtype).itemsize
    held = math.prod(shape.get(a, 1) for a in ("expert", "fsdp", "context") if a not in group)
    return {
        "group": list(group),
        "tokens_per_shard": n,
        "block": moe_lib.exchange_block(cfg, n) if group else n,
        "gather_bytes_per_layer": layer * (1 - 1 / held) if held > 1 else 0.0,
    }


def train_analytic(cfg, run: RunConfig, params_bytes: float, optimizer_bytes: float, mesh) -> dict:
    """Per-device bytes by cause: the state exactly (from shardings), the rest estimated from the
    buffers the XLA:TPU compiler was seen to hold for V3 on v5p-256 (buffer assignment of the
    real train step, 2026-11-23; benchmarks/RESULTS.md):

    params, grads (param dtype: the stacked layers' gradients exist whole before the update),
    optimizer; param_cast: the stacked parameters in the compute dtype (XLA casts the whole
    stack once, outside the layer loop); saved_activations: what the remat policy keeps per
    layer ([B,T,D] each); moe_exchange: one MoE layer's backward inside the loop — R-row buffers
    of the expert all-to-all (R = `moe.exchange_rows`, the dropless worst case unless a capacity
    is set, for one round of `moe.exchange_block` tokens: the rounds are rematerialised one at a
    time): 3 x [R, D] (received rows, their cotangent, the outputs') and 3 x [R, F/tensor]
    (gate, up, their product); mtp_block: the MTP block is not rematerialised, so its MoE
    keeps 2 x [R, D] + 3 x [R, F] through the backward; expert_weights: the layer's expert
    weights gathered over fsdp in the compute dtype, two layers (the next one is prefetched);
    head: the output projection gathered in the compute dtype plus its float32 gradient;
    logits: a cross-entropy chunk's float32 logits; layer_working_set: attention projections
    and a dense FFN's intermediates of one layer."""
    from dsjax.model.layers import moe as moe_lib

    T, D, V = run.data.seq_len, cfg.hidden_size, cfg.vocab_size
    B = run.train.batch_size / sharding.batch_shards(mesh) / run.train.grad_accum
    shape = dict(mesh.shape)
    tensor, context = shape.get("tensor", 1), shape.get("context", 1)
    tokens = B * T / context  # per device
    act = jnp.dtype(cfg.dtype).itemsize
    pb = jnp.dtype(cfg.param_dtype).itemsize
    per_layer = SAVED_PER_LAYER.get(cfg.remat, 24)  # "none": every intermediate (rough)
    chunk = run.train.ce_chunk
    logit_T = min(chunk, T) if chunk else T * (1 + cfg.num_mtp_layers)
    heads = cfg.num_attention_heads / tensor
    if cfg.is_v4:
        attn = _v4_attention_working_set(cfg, tokens, T, heads, act)
    else:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        attn = tokens * heads * (2 * qk + 2 * cfg.v_head_dim) * act * 3
    streams = cfg.hc_mult if cfg.is_v4 else 1  # V4's residual is n mHC streams
    dense = tokens * 3 * cfg.intermediate_size / tensor * act
    moe_exchange = mtp_block = expert_weights = 0.0
    if cfg.n_routed_experts and cfg.num_moe_layers + cfg.num_mtp_layers > 0:
        n = moe_tokens_per_shard(run, mesh)
        group = moe_lib.exchange_group(cfg, mesh, n)
        G = math.prod(shape[a] for a in group) if group else 1
        c = moe_lib.exchange_block(cfg, n)
        R = moe_lib.exchange_rows(cfg, G, c) if G > 1 else n * cfg.num_experts_per_tok
        F_l = cfg.moe_intermediate_size / tensor
        moe_exchange = R * (3 * D + 3 * F_l) * act if cfg.num_moe_layers else 0.0
        mtp_block = cfg.num_mtp_layers * R * (2 * D + 3 * F_l) * act
        E_l = cfg.n_routed_experts / G
        expert_weights = 2 * 3 * E_l * D * F_l * act
    offload = run.optim.host_offload
    out = {
        "params": params_bytes,
        "grads": params_bytes,
        "optimizer": 0.0 if offload else optimizer_bytes,
        "param_cast": params_bytes * act / pb if pb > act else 0.0,
        "saved_activations": cfg.num_hidden_layers * per_layer * tokens * streams * D * act,
        "moe_exchange": moe_exchange,
        "mtp_block": mtp_block,
        "expert_weights": expert_weights,
        "head": D * V / tensor * (act + 4),
        "logits": 3 * B * logit_T * V / tensor * 4 / context,
        "layer_working_set": attn + dense,
    }
    out["total"] = sum(out.values())  # in HBM; what follows waits in host memory
    out["host_optimizer"] = optimizer_bytes if offload else 0.0
    out["host_activations"] = (
        cfg.num_hidden_layers * tokens * streams * D * act if cfg.remat == "offload" else 0.0
    )
    return out


def _v4_attention_working_set(cfg, tokens: float, T: int, heads: float, act: int) -> float:
    """DeepSeek-V4 (docs/spec.md §12, `v4_core`): one CSA layer's attention intermediates on a
    device's `tokens` queries: queries and outputs [tokens, heads, d] (x3 for the backward), the
    indexer's choice [tokens, K] (ids + mask), the gathered entries and indexer keys of the whole
    sequence, and one query chunk's float32 logits and probabilities (x2 for the backward) over
    Q + W window keys and max(K, T/m') entries, its gathered entries [Q, K, d] and its indexer
    scores [Q, T/m] (float32, twice)."""
    n_csa = T // cfg.compress_rate_csa if "compressed_sparse_attention" in cfg.layer_types else 0
    K = min(cfg.index_topk, n_csa)
    Q = min(cfg.attention_chunk, tokens)
    keys = Q + cfg.sliding_window + max(K, T // cfg.compress_rate_hca)
    q = tokens * heads * cfg.head_dim * act * 3
    choice = tokens * K * 5
    entries = n_csa * (cfg.head_dim + cfg.index_head_dim) * act
    chunk = Q * heads * keys * 4 * 4 + Q * K * cfg.head_dim * act * 2 + Q * n_csa * 4 * 2
    return q + choice + entries + chunk


def host_transfer_bytes(analytic: dict) -> float:
    """Bytes per device crossing between HBM and host memory each step: the offloaded optimizer
    state in and out once, each offloaded layer input out in the forward and back in the
    backward. (No published host-link bandwidth per chip is used: no time is estimated.)"""
    return 2 * (analytic["host_optimizer"] + analytic["host_activations"])


def _batch_abstract(mesh, batch: int, seq_len: int) -> dict:
    bs = sharding.batch_sharding(mesh)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
              "segment_ids": jnp.int32, "weights": jnp.float32}  # fmt: skip
    return {k: jax.ShapeDtypeStruct((batch, seq_len), d, sharding=bs) for k, d in dtypes.items()}


def plan_train(config: ml_collections.ConfigDict | RunConfig, target: Target) -> dict:
    """Compiles the real train step for `target`; returns the report dict."""
    run = run_config.parse(config)
    mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh), devices=list(target.devices))
    cfg = run.model
    model, (tx, schedule) = Transformer(cfg), ts.make_optimizer(run)
    T, batch = run.data.seq_len, run.train.batch_size
    if batch % (sharding.batch_shards(mesh) * run.train.grad_accum):
        raise PlanError(
            f"config.train.batch_size={batch} must divide by grad_accum x the "
            f"{sharding.batch_shards(mesh)} batch shards of mesh {dict(mesh.shape)}",
            1,
        )
    offload = run.optim.host_offload
    # The step runs on the stored MoE stack (the schedule's row order, padded per rank).
    layout = stack_layout(cfg, run.train, mesh.shape["stage"])
    # Outside the mesh; shardings fitted to the stored rows.
    abstract, shardings = ts.state_shardings(model, tx, mesh, T, offload, layout)
    abstract = layout.abstract(abstract)
    n = len(target.devices)
    report = _header(run, target, mesh, "train")
    report.update(batch=batch, seq_len=T, tokens_per_step=batch * T)
    stages = mesh.shape["stage"]
    if stages > 1:  # docs/spec.md §13: bubble, activation memory, stage-to-stage bytes
        name, micro = run_config.pipeline_settings(run.train, stages)
        if batch % (sharding.batch_shards(mesh) * run.train.grad_accum * micro):
            raise PlanError(
                f"config.train.batch_size={batch} must divide by grad_accum x microbatches="
                f"{micro} x the {sharding.batch_shards(mesh)} batch shards (raise --batch_per_chip)",
                1,
            )
        rows = batch // run.train.grad_accum // micro / sharding.batch_shards(mesh)
        act = rows * T * cfg.hidden_size * jnp.dtype(cfg.dtype).itemsize
        report["pipeline"] = pipeline_figures(name, stages, micro, act)
        report["pipeline"]["stage_transfer_bytes"] *= run.train.grad_accum
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        step = ts.jit_train_step(model, tx, schedule, run, shardings=shardings, mesh=mesh)
        lowered = step.lower(abstract, _batch_abstract(mesh, batch, T))
        compiled, oom, dump = compile_or_oom(lowered)
    report["compile_s"] = time.perf_counter() - t0
    host_state = shard_bytes(abstract, HOST)
    state_bytes = shard_bytes(abstract) - host_state  # in HBM
    memory = {
        "params_bytes": shard_bytes(abstract.params),
        "optimizer_bytes": shard_bytes(abstract.opt_state),
        "args_bytes": state_bytes,
        "host_bytes": host_state,
    }
    if compiled is not None:
        memory.update(_memory_from_compiled(compiled, state_bytes, dump))
    _fill_fit(report, target, memory, oom)
    report["analytic_bytes"] = train_analytic(
        cfg, run, memory["params_bytes"], memory["optimizer_bytes"], mesh
    )
    report["host_transfer_bytes"] = host_transfer_bytes(report["analytic_bytes"])
    report["moe_exchange"] = moe_exchange_figures(cfg, run, mesh)
    flops_dev = metrics.train_flops_per_token(cfg, T) * batch * T / n
    recompute = 1.0 if cfg.remat == "save_attn_ffn" else (1.0 if cfg.remat == "none" else 4 / 3)
    report["flops"] = {
        "analytic_per_device": flops_dev,
        "with_recompute_per_device": flops_dev * recompute,
    }
    hbm_traffic = 0.0
    if compiled is not None:
        cost = _cost(compiled)
        report["flops"]["xla_per_device"] = cost.get("flops")
        report["collectives"] = _collectives(compiled, dump, n, target.slices)
        hbm_traffic = float(cost.get("bytes accessed", 0.0))
    # At least: weights read in forward, recompute and backward, state read+written once.
    hbm_traffic = max(hbm_traffic, 3 * memory["params_bytes"] + 2 * (state_bytes + host_state))
    _roofline(report, target, flops_dev, flops_dev * recompute, hbm_traffic)
    return report


def _header(run: RunConfig, target: Target, mesh, mode: str) -> dict:
    counts_b = None
    try:
        from dsjax.model.transformer import count_params

        counts_b = {k: v / 1e9 for k, v in count_params(run.model).items()}
    except Exception:  # noqa: BLE001 - counting is informative only
        pass
    return {
        "config": run.name,
        "mode": mode,
        "target": target.label,
        "devices": len(target.devices),
        "mesh": dict(mesh.shape),
        "remat": run.model.remat,
        "dtype": run.model.dtype,
        "param_dtype": run.model.param_dtype,
        "moment_dtype": run.optim.moment_dtype,
        "host_offload": run.optim.host_offload,
        "ce_chunk": run.train.ce_chunk,
        "params_billion": counts_b,
        "hbm_per_device_bytes": target.hbm_bytes,
        "peak_flops_per_device": target.peak_flops,
    }


# ----------------------------------------------------------------------------- decode
def kept_fp8(cfg, variables):
    """Abstract `variables` as a `keep_fp8` load of the FP8 release holds them: every FP8 leaf
    of the release format (`hf_fp8.kept_fp8_slots` over `hf_tensor_table(cfg)`, all its
    tensors FP8) float8_e4m3fn with its float32 `_scale_inv` sibling [..., ceil(in/128),
    ceil(out/128)]; the rest as given. DeepSeek-V3 layouts only."""
    from dsjax.checkpoints import hf_fp8
    from dsjax.checkpoints.hf_table import hf_tensor_table

    table = hf_tensor_table(cfg)
    slots = hf_fp8.kept_fp8_slots(table, {e.key for e in table}, hf_fp8.DEFAULT_BLOCK, "")

    def walk(node, prefix):
        out = {}
        for k, v in node.items():
            path = (*prefix, str(k))
            if not isinstance(v, jax.ShapeDtypeStruct):
                out[k] = walk(v, path)
            elif (path[0], path[1:]) in slots:
                out[k] = jax.ShapeDtypeStruct(v.shape, jnp.float8_e4m3fn)
                scale = hf_fp8.kernel_scale_shape(tuple(v.shape))
                out[k + hf_fp8.SCALE_SUFFIX] = jax.ShapeDtypeStruct(scale, jnp.float32)
            else:
                out[k] = v
        return out

    return walk(variables, ())


def lower_decode(cfg, mesh, layout: str, batch: int, cache_len: int, page_size: int = 64,
                 attention: str = "xla", keep_fp8: bool = False):  # fmt: skip
    """The decode step the planner compiles, lowered for `mesh` under `layout`'s rules
    (`sharding.logical_rules`): `batch` rows, one token each, over a `cache_len` latent cache
    held as the engine holds it, in page pools (`dsjax.model.layers.paged`, pages of
    `page_size`) written in place: the pools are donated and carried through the scanned
    stacks, so a step holds one copy of the cache. When the rows split evenly over
    `cache_batch`'s mesh axes, the pools' pages split with them and each chip reads and writes
    only its own rows' pages (shard-local tables, `paged.shard_tables`, in shard_map).
    `attention`: how attention reads the pages (`paged.IMPLS`: "xla", the gather path; "pallas",
    the paged MLA kernel). `keep_fp8`: the weights as a keep_fp8 load of the FP8 release holds
    them (`kept_fp8`), the block scales placed by `sharding.variable_shardings`.

    Returns (lowered, abstract variables, abstract cache pools) with their shardings."""
    from dsjax.model.layers import paged

    if cfg.is_v4:
        if keep_fp8:
            raise PlanError("--keep_fp8: DeepSeek-V3 layouts only (V4's FP4 experts not yet)")
        return _lower_decode_v4(cfg, mesh, layout, batch, cache_len)
    model = Transformer(cfg)
    rules = sharding.logical_rules(layout)
    tokens = jax.ShapeDtypeStruct((1, page_size), jnp.int32)
    boxed = jax.eval_shape(
        lambda t: model.init(jax.random.key(0), t, mode="prefill", run_mtp=False), tokens
    )
    specs = nn.get_partition_spec({k: v for k, v in boxed.items() if k != "cache"})
    unboxed = nn.unbox(boxed)
    cache_axes = sharding.dim_axes(("cache_batch",), rules)[0]
    n_shards = math.prod(mesh.shape[a] for a in cache_axes)
    shards = cache_axes if batch % n_shards == 0 else ()
    tables, n_pages = paged.shard_tables(
        batch, -(-cache_len // page_size), n_shards if shards else 1
    )
    P = jax.sharding.PartitionSpec
    row_axes = shards or None

    def pool(path, leaf):  # [.., 1, page, X] -> [.., n_pages, page, X], pages with the rows
        b = cache_batch_axis(getattr(path[0], "key", ""))
        spec = [None] * leaf.ndim
        spec[b] = row_axes
        sh = jax.sharding.NamedSharding(mesh, P(*spec))
        return jax.ShapeDtypeStruct(leaf.shape[:b] + (n_pages,) + leaf.shape[b + 1 :], leaf.dtype,
                                    sharding=sh)  # fmt: skip

    abs_cache = jax.tree_util.tree_map_with_path(pool, unboxed["cache"])
    cache_sh = jax.tree.map(lambda a: a.sharding, abs_cache)
    variables = {k: v for k, v in unboxed.items() if k != "cache"}
    if keep_fp8:
        variables = kept_fp8(cfg, variables)
    var_sh = sharding.variable_shardings(specs, variables, mesh, rules)
    abs_vars = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            variables, var_sh)  # fmt: skip
    row_sh = jax.sharding.NamedSharding(mesh, P(row_axes, None))
    tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=row_sh)
    table = jax.ShapeDtypeStruct(tables.shape, jnp.int32, sharding=row_sh)

    def decode_step(variables, cache, tokens_B1, positions_B1, table_BP):
        pages = paged.Pages(table_BP, impl=attention, shards=shards)
        out, new = model.apply({**variables, "cache": cache}, tokens_B1, positions_B1,
                               mode="decode", run_mtp=False, mutable=["cache"],
                               pages=pages)  # fmt: skip
        return out.logits[:, -1], new["cache"]

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(decode_step, in_shardings=(var_sh, cache_sh, row_sh, row_sh, row_sh),
                       out_shardings=(None, cache_sh), donate_argnums=1)  # fmt: skip
        return step.lower(abs_vars, abs_cache, tok, tok, table), abs_vars, abs_cache


def _lower_decode_v4(cfg, mesh, layout: str, batch: int, cache_len: int):
    """`lower_decode` for DeepSeek-V4: its contiguous per-row caches (window rings, compressor
    buffers, compressed entries, indexer keys; `dsjax.model.v4_cache`) built from their shapes
    (`v4_blocks.cache_shapes`: no prefill trace over cache_len tokens), rows over
    `cache_batch`'s mesh axes when they divide the batch; the scanned groups carry the cache
    as scan inputs/outputs (V4 has no paged layout yet)."""
    model = Transformer(cfg)
    rules = sharding.logical_rules(layout)
    tokens = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    boxed = jax.eval_shape(
        lambda t: model.init(jax.random.key(0), t, mode="prefill", run_mtp=False), tokens
    )
    specs = nn.get_partition_spec({k: v for k, v in boxed.items() if k != "cache"})
    variables = {k: v for k, v in nn.unbox(boxed).items() if k != "cache"}
    var_sh = sharding.variable_shardings(specs, variables, mesh, rules)
    cache_axes = sharding.dim_axes(("cache_batch",), rules)[0]
    rows = cache_axes if batch % math.prod(mesh.shape[a] for a in cache_axes) == 0 else None
    P = jax.sharding.PartitionSpec

    def place(path, leaf):
        spec = [None] * len(leaf.shape)
        spec[cache_batch_axis(getattr(path[0], "key", ""))] = rows
        sh = jax.sharding.NamedSharding(mesh, P(*spec))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh)

    abs_cache = jax.tree_util.tree_map_with_path(
        place, cache_shapes(cfg, batch, cache_len, mtp=False)
    )
    cache_sh = jax.tree.map(lambda a: a.sharding, abs_cache)
    abs_vars = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            variables, var_sh)  # fmt: skip
    row_sh = jax.sharding.NamedSharding(mesh, P(rows, None))
    tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=row_sh)

    def decode_step(variables, cache, tokens_B1, positions_B1):
        out, new = model.apply({**variables, "cache": cache}, tokens_B1, positions_B1,
                               mode="decode", run_mtp=False, mutable=["cache"])  # fmt: skip
        return out.logits[:, -1], new["cache"]

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(decode_step, in_shardings=(var_sh, cache_sh, row_sh, row_sh),
                       out_shardings=(None, cache_sh), donate_argnums=1)  # fmt: skip
        return step.lower(abs_vars, abs_cache, tok, tok), abs_vars, abs_cache


def _global_bytes(tree) -> float:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def plan_decode(config: ml_collections.ConfigDict | RunConfig, target: Target, batch: int,
                cache_len: int, layout: str = "fsdp", page_size: int = 64,
                attention: str = "xla", keep_fp8: bool = False) -> dict:  # fmt: skip
    """Compiles one decode step (`lower_decode`: page pools updated in place) for `target` under
    `layout`, weights in the compute dtype (bf16 for V3), or with `keep_fp8` as a keep_fp8 load
    of the FP8 release holds them (FP8 + 128x128 block scales, `kept_fp8`). Beside the roofline it reports the HBM
    bound: every weight and the whole latent cache (`batch` x `cache_len` positions, the pools'
    TRASH pages left out) read once per step, spread evenly over the chips (no replication),
    and the roofline step time over it."""
    run = run_config.parse(config)
    cfg = run.model.replace(param_dtype=run.model.dtype)  # inference weights
    run = run.replace(model=cfg)
    mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh), devices=list(target.devices))
    report = _header(run, target, mesh, "decode")
    report.update(batch=batch, cache_len=cache_len, layout=layout, page_size=page_size,
                  attention=attention, keep_fp8=keep_fp8)  # fmt: skip
    t0 = time.perf_counter()
    lowered, abs_vars, abs_cache = lower_decode(cfg, mesh, layout, batch, cache_len, page_size,
                                                attention, keep_fp8)  # fmt: skip
    compiled, oom, dump = compile_or_oom(lowered)
    report["compile_s"] = time.perf_counter() - t0
    params_b, cache_b = shard_bytes(abs_vars), shard_bytes(abs_cache)
    memory = {"params_bytes": params_b, "cache_bytes": cache_b, "args_bytes": params_b + cache_b}
    if compiled is not None:
        memory.update(_memory_from_compiled(compiled, params_b + cache_b, dump))
    _fill_fit(report, target, memory, oom)
    report["analytic_bytes"] = {"params": params_b, "cache": cache_b, "total": params_b + cache_b}
    br = metrics.flops_breakdown(cfg, 2 * cache_len - 1)  # causal context (T+1)/2 = cache_len
    n = len(target.devices)
    flops_dev = (sum(br.values()) - br["mtp"]) * batch / n
    report["flops"] = {"analytic_per_device": flops_dev}
    if compiled is not None:
        report["flops"]["xla_per_device"] = _cost(compiled).get("flops")
        report["collectives"] = _collectives(compiled, dump, n)
    _roofline(report, target, flops_dev, flops_dev, params_b + cache_b)  # weights + cache once
    est = report["estimate"]
    if est.get("step_s"):
        est["tokens_per_s"] = batch / est["step_s"]
    if target.hbm_bytes_per_s:
        rows_pages = batch * -(-cache_len // page_size)  # the rows' pages, TRASH left out
        cache_global = sum(
            _global_bytes(leaf) * rows_pages / leaf.shape[cache_batch_axis(key)]
            for key, tree in abs_cache.items()
            for leaf in jax.tree.leaves(tree)
        )
        if cfg.is_v4:  # contiguous rows, not pages
            cache_global = _global_bytes(abs_cache)
        ideal = (_global_bytes(abs_vars) + cache_global) / n
        report["hbm_bound"] = {"bytes_per_device": ideal, "s": ideal / target.hbm_bytes_per_s}
        if est.get("step_s"):
            report["hbm_bound"]["step_over_bound"] = est["step_s"] / report["hbm_bound"]["s"]
    return report


# ----------------------------------------------------------------------------- search
def mesh_candidates(n: int, cfg) -> list[dict]:
    """(data, fsdp, expert, tensor) with product n: data and tensor up to 8, tensor dividing the
    heads, expert the routed experts."""
    out = []
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    for tensor, expert, data in itertools.product(divisors, divisors, divisors):
        if n % (tensor * expert * data) or tensor > 8 or data > 8:
            continue
        if cfg.num_attention_heads % tensor:
            continue
        if expert > 1 and (not cfg.n_routed_experts or cfg.n_routed_experts % expert):
            continue
        out.append({"data": data, "fsdp": n // (tensor * expert * data), "expert": expert,
                    "tensor": tensor})  # fmt: skip
    return out


def search(config: ml_collections.ConfigDict | RunConfig, target: Target, top: int,
           log=print) -> list[dict]:  # fmt: skip
    """Ranks mesh x batch-per-chip x remat candidates analytically (state bytes exact from the
    shardings, activations and step time estimated), compiles the `top` best that the estimate
    says fit, and returns their reports: fitting first, then by estimated time per token."""
    n = len(target.devices)
    run = run_config.parse(config)
    cfg = run.model
    shapes, logical = _param_shapes_and_specs(cfg)
    scored = []
    for mesh_kw in mesh_candidates(n, cfg):
        mesh = sharding.make_mesh(**mesh_kw, devices=list(target.devices))
        p_elems = _shard_elems(shapes, logical, mesh)
        for bpc, remat in itertools.product(
            (1, 2, 4), ("full", "offload", "save_attn", "save_attn_ffn")
        ):
            batch = bpc * sharding.batch_shards(mesh) * run.train.grad_accum
            c = run.replace(
                model=cfg.replace(remat=remat),  # the model's remat comes from config.train
                train=dataclasses.replace(run.train, remat=remat, batch_size=batch),
                mesh=dataclasses.replace(run.mesh, **mesh_kw),
            )
            scored.append((_analytic_score(c, target, mesh, p_elems), c))
    scored.sort(key=lambda x: x[0]["s_per_token"])
    fitting = [s for s in scored if s[0]["fits"]] or scored
    log(f"search: {len(scored)} candidates, {sum(s[0]['fits'] for s in scored)} fit analytically; "
        f"compiling the best {min(top, len(fitting))}")  # fmt: skip
    reports = []
    for score, c in fitting[:top]:
        log(f"  compiling mesh {dataclasses.asdict(c.mesh)} batch {c.train.batch_size} remat {c.train.remat} "
            f"(analytic {score['bytes'] / GIB:.1f} GiB, {score['step_s'] * 1e3:.0f} ms)")  # fmt: skip
        try:
            r = plan_train(c, target)
        except PlanError as e:  # a compiler failure on one candidate: report it, go on
            log(f"    skipped: {e}")
            continue
        r["analytic_score"] = score
        reports.append(r)
    per_token = lambda r: r["estimate"].get("step_s", math.inf) / r["tokens_per_step"]  # noqa: E731
    reports.sort(key=lambda r: (not r["fits"], per_token(r)))
    return reports


def _param_shapes_and_specs(cfg):
    boxed = jax.eval_shape(
        lambda t: Transformer(cfg).init(jax.random.key(0), t),
        jax.ShapeDtypeStruct((1, 8), jnp.int32),
    )
    return nn.unbox(boxed)["params"], nn.get_partition_spec(boxed)["params"]


def _shard_elems(shapes, logical, mesh) -> float:
    """Elements of the parameters one device holds under `mesh` (specs cut to what each
    dimension divides, `sharding.fit_spec`)."""
    shardings = sharding.logical_to_sharding(logical, mesh, shapes=shapes)
    total = 0.0
    for leaf, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sh.shard_shape(leaf.shape))
    return total


def _analytic_score(c: RunConfig, target: Target, mesh, p_elems: float) -> dict:
    """Analytic memory and step time of a candidate (no compile)."""
    cfg = c.model
    pb = jnp.dtype(cfg.param_dtype).itemsize
    mb = jnp.dtype(c.optim.moment_dtype).itemsize
    mem = train_analytic(cfg, c, p_elems * pb, 2 * p_elems * mb, mesh)
    T, n = c.data.seq_len, len(target.devices)
    kw = dict(mesh.shape)
    flops = metrics.train_flops_per_token(cfg, T) * c.train.batch_size * T / n
    recompute = 1.0 if cfg.remat == "save_attn_ffn" else 4 / 3
    compute = flops * recompute / (target.peak_flops or 1.0)
    # Communication per device: FSDP weight gathers (forward, recompute, backward; compute
    # dtype) + gradient reduce-scatter (param dtype); MoE token exchange over the expert axis
    # (dispatch + combine, forward + backward); tensor-parallel all-reduces (4 per layer-pass).
    act = jnp.dtype(cfg.dtype).itemsize
    gathered = p_elems * kw["fsdp"]
    B = c.train.batch_size / sharding.batch_shards(mesh)
    comm = 0.0
    if kw["fsdp"] > 1:
        comm += (3 * act + pb) * gathered * (1 - 1 / kw["fsdp"])
    if kw["expert"] > 1:
        comm += 4 * B * T * cfg.num_experts_per_tok * cfg.hidden_size * act * cfg.num_moe_layers
    if kw["tensor"] > 1:
        comm += 8 * B * T * cfg.hidden_size * act * cfg.num_hidden_layers
    ici = comm / (target.ici_bytes_per_s or math.inf)
    step = max(compute, ici)
    fits = target.hbm_bytes is None or mem["total"] <= 0.9 * target.hbm_bytes
    return {"fits": fits, "bytes": mem["total"], "step_s": step,
            "s_per_token": step / (c.train.batch_size * T)}  # fmt: skip


# ----------------------------------------------------------------------------- output
def _g(x) -> str:
    """Bytes in GiB / MiB / KiB (1024-based, as XLA prints 'G')."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _block_note(ex: dict) -> str:
    """The words " in blocks of c" when the exchange runs in rounds of c < the shard's tokens."""
    block = ex.get("block", ex["tokens_per_shard"])
    return f" in blocks of {block}" if block < ex["tokens_per_shard"] else ""


def format_report(r: dict) -> str:
    """Human-readable lines of one report."""
    m, lines = r["memory"], []
    lines.append(f"== {r['config']} {r['mode']} on {r['target']}; mesh {r['mesh']}")
    extra = (f"batch {r['batch']} x seq {r['seq_len']}" if r["mode"] == "train"
             else f"batch {r['batch']} rows, cache {r['cache_len']} positions in pages of "
                  f"{r.get('page_size')} ({r.get('attention')} attention), layout "
                  f"{r['layout']}{', weights kept FP8' if r.get('keep_fp8') else ''}")  # fmt: skip
    lines.append(f"   {extra}; remat {r['remat']}; dtype {r['dtype']}/{r['param_dtype']}; "
                 f"moments {r['moment_dtype']}{' (host)' if r.get('host_offload') else ''}; "
                 f"ce_chunk {r['ce_chunk']}")  # fmt: skip
    if r.get("params_billion"):
        p = r["params_billion"]
        lines.append(f"   parameters: {p['total']:.2f}B total, {p['activated']:.2f}B activated, "
                     f"{p['mtp']:.2f}B MTP")  # fmt: skip
    pp = r.get("pipeline")
    if pp:
        lines.append(f"   pipeline: {pp['schedule']} over {pp['stages']} stages, "
                     f"{pp['microbatches']} micro-batches, {pp['chunks']} chunks, {pp['ticks']} "
                     f"ticks; bubble {pp['bubble_fraction'] * 100:.1f}% (B = 3F); activations "
                     f"{pp['peak_activations']} chunk inputs = {_g(pp['activation_bytes'])} per "
                     f"chip; stage-to-stage {_g(pp['stage_transfer_bytes'])} per chip per step")  # fmt: skip
    ex = r.get("moe_exchange")
    if ex:
        lines.append(f"   MoE exchange: {'x'.join(ex['group']) or 'none'} at "
                     f"{ex['tokens_per_shard']} tokens per shard"
                     f"{_block_note(ex)}; expert weights all-gathered per "
                     f"MoE layer run {_g(ex['gather_bytes_per_layer'])} per chip")  # fmt: skip
    lines.append(f"   compile: {r['compile_s']:.1f} s")
    lines.append("   per device (compiler):")
    state = (f"latent cache {_g(m['cache_bytes'])}" if "cache_bytes" in m
             else f"optimizer state {_g(m.get('optimizer_bytes'))}")  # fmt: skip
    lines.append(f"     parameters {_g(m.get('params_bytes'))}, {state}, "
                 f"arguments {_g(m.get('args_bytes'))}")  # fmt: skip
    lines.append(f"     temporaries {_g(m.get('temp_bytes'))}, total {_g(m.get('total_bytes'))} "
                 f"of {_g(r['hbm_bytes'])} HBM -> fits: {'YES' if r['fits'] else 'NO'}, headroom "
                 f"{_g(r['headroom_bytes'])}")  # fmt: skip
    if "compiler_message" in m:
        lines.append(f"     compiler: {m['compiler_message']}")
    if m.get("host_bytes") or r.get("host_transfer_bytes"):
        of = f" of {_g(r['host_memory_bytes'])}" if r.get("host_memory_bytes") else ""
        lines.append(f"     host memory (offloaded) {_g(m.get('host_bytes'))}{of} per device"
                     f"{'' if r.get('host_fits', True) else ' -> DOES NOT FIT'}; host <-> HBM "
                     f"{_g(r.get('host_transfer_bytes'))} per step (analytic)")  # fmt: skip
    a = r["analytic_bytes"]
    lines.append("   per device (analytic): " + ", ".join(f"{k} {_g(v)}" for k, v in a.items()))
    f = r["flops"]
    xla = f.get("xla_per_device")
    lines.append(f"   FLOPs/step/device: analytic {f['analytic_per_device']:.3e}"
                 + (f", with recompute {f['with_recompute_per_device']:.3e}"
                    if "with_recompute_per_device" in f else "")
                 + (f", XLA cost analysis {xla:.3e}" if xla else ""))  # fmt: skip
    col = r.get("collectives")
    if col:
        parts = [f"{op} x{v['count']} {_g(v['result_bytes'])} (sends {_g(v['moved_bytes'])})"
                 for op, v in col["ops"].items() if v["count"]]  # fmt: skip
        lines.append("   collectives/step/device: " + ("; ".join(parts) or "none"))
        if "dcn_bytes" in r:
            dcn = [f"{op} {_g(v['dcn_bytes'])}" for op, v in col["ops"].items()
                   if v.get("dcn_bytes")]  # fmt: skip
            lines.append(f"   between slices (DCN) per step per chip: {_g(r['dcn_bytes'])}"
                         + (f" ({'; '.join(dcn)})" if dcn else ""))  # fmt: skip
        if col["unknown_trip_counts"]:
            unknown = col["unknown_trip_counts"]
            lines.append(f"     ({unknown} loops of unknown trip count counted once)")
    e = r.get("estimate", {})
    if e:
        parts = [f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in e.items()
                 if k.endswith("_s") and k not in ("tokens_per_s", "pipelined_step_s")]  # fmt: skip
        tail = f"; MFU <= {e['mfu_upper_bound'] * 100:.1f}%" if "mfu_upper_bound" in e else ""
        tps = f"; {e['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in e else ""
        lines.append("   roofline: " + ", ".join(parts) + tail + tps)
        if "pipelined_step_s" in e:
            lines.append(f"   pipelined step (compute / (1 - bubble), transfers overlapped): "
                         f"{e['pipelined_step_s'] * 1e3:.1f} ms")  # fmt: skip
    bound = r.get("hbm_bound")
    if bound:
        over = bound.get("step_over_bound")
        lines.append(f"   HBM bound (weights + cache read once, evenly over the chips): "
                     f"{_g(bound['bytes_per_device'])} per device, {bound['s'] * 1e3:.1f} ms"
                     + (f"; roofline step = {over:.2f}x the bound" if over else ""))  # fmt: skip
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


# ----------------------------------------------------------------------------- CLI
def main(argv) -> int:
    from absl import flags

    del argv
    f = flags.FLAGS
    config = f.config
    if config is None:
        raise PlanError("--config=configs/NAME.py is required")
    if not f.topology:
        raise PlanError("--topology is required (e.g. v5p:4x8x8, v5e:2x2, v6e:4x4, v4:2x2x1, gpu)")
    target = make_target(f.topology, f.num_slices)
    if f.layers:
        truncate_layers(config, f.layers)
    run = run_config.parse(config)  # unknown keys, types and ranges: one line before a compile
    if f.mode == "decode":
        reports = [plan_decode(run, target, f.batch, f.cache_len, f.layout, f.page_size,
                               f.paged_attention, f.keep_fp8)]  # fmt: skip
    else:
        if f.batch_per_chip:
            mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh), devices=list(target.devices))
            batch = f.batch_per_chip * sharding.batch_shards(mesh)
            run = run.replace(train=dataclasses.replace(run.train, batch_size=batch))
        if f.search:
            reports = search(run, target, f.top)
        else:
            reports = [plan_train(run, target)]
    for r in reports:
        print(format_report(r))
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(_jsonable(reports if f.search else reports[0]), fh, indent=2)
    return 0 if reports and reports[0]["fits"] else 1


def truncate_layers(config, layers: int) -> None:
    """Keeps the first `layers` decoder layers (and their layer types): for models whose whole
    unrolled program (DeepSeek-V4) is too big to compile on the planning machine. Per-chip
    memory is then extrapolated from two depths (it is linear in the layer count: state and
    saved activations per layer, one layer's working set)."""
    m = config.model
    if layers < 1 or layers > m.num_hidden_layers:
        raise PlanError(f"--layers={layers}: must be between 1 and {m.num_hidden_layers}")
    m.num_hidden_layers = layers
    if m.get("layer_types"):
        m.layer_types = list(m.layer_types)[:layers]
    if m.get("num_hash_layers"):
        m.num_hash_layers = min(m.num_hash_layers, layers)
    if m.get("first_k_dense_replace"):
        m.first_k_dense_replace = min(m.first_k_dense_replace, layers)
    config.name = f"{config.get('name', '?')} (first {layers} layers)"


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/deepseek_v3.py")
    flags.DEFINE_string(
        "topology", None, "TPU topology (v5p:4x8x8, v5e:2x2, v6e:4x4, v4:2x2x1) or gpu"
    )
    flags.DEFINE_enum("mode", "train", ["train", "decode"], "program to compile")
    flags.DEFINE_integer("batch_per_chip", 1,
                         "train: sequences per batch shard (data x fsdp x expert); 0 = "
                         "config.train.batch_size")  # fmt: skip
    flags.DEFINE_integer("batch", 64, "decode: rows (sequences) decoded together")
    flags.DEFINE_integer("cache_len", 32768, "decode: latent cache positions per row")
    flags.DEFINE_enum("layout", "fsdp", list(sharding.LAYOUTS),
                      "decode: the rule set of dsjax.model.sharding placing weights and cache "
                      "(fsdp: weights gathered per step; decode: expert x tensor weights, "
                      "data-parallel attention)")  # fmt: skip
    flags.DEFINE_integer("page_size", 64, "decode: positions per latent-cache page")
    flags.DEFINE_enum(
        "paged_attention",
        "xla",
        ["xla", "pallas"],
        "decode: attention over the pages by the XLA gather path or the Pallas paged MLA kernel",
    )
    flags.DEFINE_bool("keep_fp8", False,
                      "decode: weights as a keep_fp8 load of the FP8 release holds them "
                      "(float8 + 128x128 block scales) instead of bf16")  # fmt: skip
    flags.DEFINE_integer("layers", 0, "compile only the first N decoder layers (0 = all)")
    flags.DEFINE_string("json", None, "write the report(s) as JSON here")
    flags.DEFINE_bool("search", False, "search meshes x batch per chip x remat (train)")
    flags.DEFINE_integer("num_slices", 1, "TPU slices of --topology joined by DCN (multi-slice)")
    flags.DEFINE_integer("top", 4, "--search: how many of the analytically best to compile")


def run() -> None:
    from absl import app

    _define_flags()

    def entry(argv):
        try:
            sys.exit(main(argv))
        except PlanError as e:
            print(f"plan: {e}", file=sys.stderr)
            sys.exit(e.code)
        except ValueError as e:  # a config or mesh the user gave that cannot work
            print(f"plan: {e}", file=sys.stderr)
            sys.exit(2)

    def parse(argv):
        from absl import flags

        try:
            return flags.FLAGS(argv)
        except (flags.Error, KeyError, AttributeError) as e:
            # ml_collections names only the missing key ('foo'); the config seam says more.
            print(f"plan: {run_config.override_error(argv) or e}", file=sys.stderr)
            sys.exit(2)

    app.run(entry, flags_parser=parse)
