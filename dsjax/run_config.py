"""The typed config seam: a run's ml_collections ConfigDict, validated once, as frozen dataclasses.

    configs/*.py + --config.x.y overrides -> ConfigDict -> parse(config) -> RunConfig
        .model       ModelConfig (architecture and the numerics the modules read)
        .train       TrainOptions      .optim  OptimOptions     .data  DataOptions
        .mesh        MeshOptions       .checkpoint  CheckpointOptions
        .task .sft .grpo               GRPO runs only (None elsewhere)

Everything that runs (train.py, GRPO, `python -m dsjax.plan`, serve.py's run loading) goes
through `parse`; jitted code receives these frozen, hashable options, never the ConfigDict.

**Adding an option is one line** in the section's dataclass below:
`name: type = opt(default, RULE)`. `configs/base.py` builds its defaults from these classes, the
type and the rule are checked by `parse`, and unknown keys are refused with the nearest valid ones.
A model field is a field of `ModelConfig` (dsjax/model/config.py) and needs nothing here.

One source of truth: `remat` and `dsa_stage` are ModelConfig fields (the modules read them)
whose value comes from `config.train`; a different value under `config.model` is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from dsjax.model.config import REMAT_POLICIES, ModelConfig
from dsjax.model.layers.indexer import DSA_STAGES
from dsjax.train.pipeline_schedule import SCHEDULES

__all__ = [
    "CheckpointOptions",
    "DataOptions",
    "GRPOOptions",
    "MeshOptions",
    "OptimOptions",
    "RunConfig",
    "SFTOptions",
    "TaskOptions",
    "TrainOptions",
    "default_config",
    "model_from_dict",
    "options",
    "override_error",
    "parse",
    "unknown_key_message",
]


class Rule(NamedTuple):
    text: str  # what a valid value is, e.g. "must be >= 1"
    ok: Callable[[Any], bool]


AT_LEAST_1 = Rule("must be >= 1", lambda v: v >= 1)
AT_LEAST_0 = Rule("must be >= 0", lambda v: v >= 0)
AT_LEAST_2 = Rule("must be >= 2", lambda v: v >= 2)
POSITIVE = Rule("must be > 0", lambda v: v > 0)
FRACTION = Rule("must be in [0, 1)", lambda v: 0 <= v < 1)
OPEN_UNIT = Rule("must be in (0, 1)", lambda v: 0 < v < 1)
UNIT = Rule("must be in [0, 1]", lambda v: 0 <= v <= 1)
MESH_SIZE = Rule("must be a positive size or -1 (the rest)", lambda v: v >= 1 or v == -1)


def one_of(*choices: str) -> Rule:
    return Rule(f"must be one of {choices}", lambda v: v in choices)


def opt(default: Any, rule: Rule | None = None) -> Any:
    """A config field: its default and the rule its value must satisfy (types come from the
    annotation: int, float, bool, str, or one of them | None)."""
    return dataclasses.field(default=default, metadata={"rule": rule})


REMAT = one_of(*REMAT_POLICIES)


# ----------------------------------------------------------------------------- sections
@dataclasses.dataclass(frozen=True)
class TrainOptions:
    steps: int = opt(1000, AT_LEAST_1)
    batch_size: int = opt(16, AT_LEAST_1)  # global, in sequences
    grad_accum: int = opt(1, AT_LEAST_1)  # micro-batches per optimizer step
    log_every: int = opt(10, AT_LEAST_1)
    eval_every: int = opt(200, AT_LEAST_1)
    eval_batches: int = opt(8, AT_LEAST_1)
    mtp_weight: float = opt(0.3, AT_LEAST_0)  # λ (docs/spec.md §6)
    balance_loss_weight: float = opt(1e-4, AT_LEAST_0)  # α (docs/spec.md §5)
    bias_update_rate: float = opt(1e-3, AT_LEAST_0)  # γ (docs/spec.md §5)
    # DeepSeek Sparse Attention (model.index_topk > 0): how the lightning indexer trains (V3.2).
    # "off": not at all; "warmup": dense attention, only the indexers train, on their KL to the
    # dense attention distribution (V3.2: lr 1e-3, 1000 steps); "sparse": top-k attention, the
    # indexers on the KL over their selected keys, the rest on the LM loss (V3.2: lr 7.3e-6).
    dsa_stage: str = opt("off", one_of(*DSA_STAGES))
    indexer_loss_weight: float = opt(1.0, AT_LEAST_0)  # weight of the indexer KL in the loss
    # none | full | offload | dots | dots_no_batch | save_attn | save_attn_ffn ("offload": as
    # "full", each layer's input kept in host memory until the backward pass; model/transformer.py)
    remat: str = opt("full", REMAT)
    # Cross-entropy chunk: positions of each sequence per chunk (a chunk's logits are
    # [batch, ce_chunk, vocab] float32); 0 = the whole sequence at once ([B,T,V] logits).
    ce_chunk: int = opt(0, AT_LEAST_0)
    sample_prompt: str = opt("def ")
    sample_tokens: int = opt(64, AT_LEAST_0)
    sample_temperature: float = opt(0.7, AT_LEAST_0)  # top-k 40; 0 = greedy
    # Pipeline parallelism (mesh.stage > 1; dsjax/train/pipeline.py, docs/spec.md §13): the
    # schedule, "gpipe" | "1f1b" | "dualpipe" (DeepSeek's DualPipeV: 2 x stage chunks, rank i
    # holds chunks i and 2 x stage-1-i, F&B pairs), and the micro-batches each accumulation step
    # is cut into (0 = 2 x stage; dualpipe needs >= 2 x stage). The MoE layers must split evenly
    # into chunks.
    pipeline_schedule: str = opt("1f1b", one_of(*SCHEDULES))
    microbatches: int = opt(0, AT_LEAST_0)
    # On TPU with mesh.stage > 1: compile the step with XLA:TPU's asynchronous ragged all-to-all
    # (start/done pairs), so one chunk's expert exchange overlaps the other chunk's matmuls in a
    # DualPipe F&B tick (train/step.py `compiler_options`; benchmarks/RESULTS.md).
    async_exchange: bool = opt(True)


@dataclasses.dataclass(frozen=True)
class OptimOptions:
    lr: float = opt(3e-3, AT_LEAST_0)
    min_lr_ratio: float = opt(0.1, UNIT)  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = opt(50, AT_LEAST_0)
    weight_decay: float = opt(0.1, AT_LEAST_0)
    clip_norm: float = opt(1.0, POSITIVE)
    b1: float = opt(0.9, FRACTION)
    b2: float = opt(0.95, FRACTION)
    moment_dtype: str = opt("float32", one_of("float32", "bfloat16"))  # AdamW m, v (V3: bf16)
    host_offload: bool = opt(False)  # optimizer state in host memory between steps (pinned_host)


@dataclasses.dataclass(frozen=True)
class DataOptions:
    source: str = opt("stdlib")  # "stdlib", a glob of .txt/.jsonl/.parquet, or "arrayrecord:<glob>"
    seq_len: int = opt(256, AT_LEAST_1)
    eval_fraction: float = opt(0.02, FRACTION)
    tokenizer: str = opt("")  # path to a tokenizer.json (or dir); "" trains a BPE in the workdir
    tokenizer_train_bytes: int = opt(8_000_000, AT_LEAST_1)
    max_documents: int = opt(0, AT_LEAST_0)  # 0 = all
    shuffle_rows: int = opt(0, AT_LEAST_0)  # train rows shuffled in windows of this many (0/1: off)


@dataclasses.dataclass(frozen=True)
class MeshOptions:
    stage: int = opt(1, MESH_SIZE)  # pipeline stages (outermost axis: across slices / nodes)
    data: int = opt(-1, MESH_SIZE)
    fsdp: int = opt(1, MESH_SIZE)
    expert: int = opt(1, MESH_SIZE)
    context: int = opt(1, MESH_SIZE)  # context parallelism: the sequence split over this many chips
    tensor: int = opt(1, MESH_SIZE)


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    every: int = opt(200, AT_LEAST_1)
    keep: int = opt(3, AT_LEAST_1)


@dataclasses.dataclass(frozen=True)
class TaskOptions:  # GRPO: the arithmetic task (configs/grpo_arith.py)
    max_operand: int = opt(99, AT_LEAST_1)
    ops: str = opt("+")
    heldout_every: int = opt(10, AT_LEAST_2)  # every n-th problem is never trained on


@dataclasses.dataclass(frozen=True)
class SFTOptions:  # GRPO: the cold start
    steps: int = opt(300, AT_LEAST_0)
    lr: float = opt(3e-3, AT_LEAST_0)
    warmup_steps: int = opt(20, AT_LEAST_0)
    p_correct: float = opt(0.5, UNIT)  # the noisy teacher's answers are right this often
    p_bad_format: float = opt(0.1, UNIT)
    init_from: str = opt("")  # a train.py work directory or a HF directory: no cold start


@dataclasses.dataclass(frozen=True)
class GRPOOptions:
    steps: int = opt(100, AT_LEAST_1)
    prompts: int = opt(16, AT_LEAST_1)  # per step
    group_size: int = opt(8, AT_LEAST_2)  # G completions per prompt
    inner_steps: int = opt(2, AT_LEAST_1)  # μ optimisation passes per rollout batch
    max_new_tokens: int = opt(28, AT_LEAST_1)
    temperature: float = opt(1.0, POSITIVE)
    speculative: bool = opt(False)  # MTP-speculative rollouts (same distribution)
    epsilon: float = opt(0.2, OPEN_UNIT)
    beta: float = opt(0.04, AT_LEAST_0)
    lr: float = opt(1e-4, AT_LEAST_0)
    warmup_steps: int = opt(3, AT_LEAST_0)
    bias_update_rate: float | None = opt(None, AT_LEAST_0)  # None: config.train.bias_update_rate
    format_weight: float = opt(0.5, AT_LEAST_0)  # reward = accuracy + format_weight * format
    eval_every: int = opt(10, AT_LEAST_1)
    eval_prompts: int = opt(128, AT_LEAST_1)


# section name -> its options class; GRPO-only sections are None in RunConfig unless present.
SECTIONS: dict[str, type] = {
    "train": TrainOptions,
    "optim": OptimOptions,
    "data": DataOptions,
    "mesh": MeshOptions,
    "checkpoint": CheckpointOptions,
}
GRPO_SECTIONS: dict[str, type] = {"task": TaskOptions, "sft": SFTOptions, "grpo": GRPOOptions}
TOP_LEVEL = {"name": str, "seed": int, "trainer": str}
TRAINERS = ("pretrain", "grpo")
# ModelConfig fields whose value comes from config.train (one source of truth).
FROM_TRAIN = ("remat", "dsa_stage")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated run: the model, and the run options apart from it."""

    model: ModelConfig
    train: TrainOptions = TrainOptions()
    optim: OptimOptions = OptimOptions()
    data: DataOptions = DataOptions()
    mesh: MeshOptions = MeshOptions()
    checkpoint: CheckpointOptions = CheckpointOptions()
    task: TaskOptions | None = None
    sft: SFTOptions | None = None
    grpo: GRPOOptions | None = None
    name: str = "run"
    seed: int = 0
    trainer: str = "pretrain"

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- checking
def _nearest(key: str, valid: typing.Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"valid keys: {', '.join(valid)}"


def _valid_keys(section: str) -> list[str] | None:
    if section == "model":
        return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in FROM_TRAIN]
    cls = SECTIONS.get(section) or GRPO_SECTIONS.get(section)
    return None if cls is None else [f.name for f in dataclasses.fields(cls)]


def unknown_key_message(path: str) -> str | None:
    """One line for a `config.<path>` that names no option (None when it does): the section,
    the key and the nearest valid keys. `path` is dotted, without the `config.` prefix."""
    parts = path.split(".")
    head = parts[0]
    if len(parts) == 1:
        if head in TOP_LEVEL or head in SECTIONS or head in GRPO_SECTIONS or head == "model":
            return None
        names = [*TOP_LEVEL, "model", *SECTIONS, *GRPO_SECTIONS]
        return f"config.{head}: no such key at the top level ({_nearest(head, names)})"
    valid = _valid_keys(head)
    if valid is None:
        return unknown_key_message(head)
    key = parts[1]
    if head == "model" and key in FROM_TRAIN:
        return (
            f"config.model.{key}: set config.train.{key} instead (the run's one source of "
            f"truth for {key}; it is passed on to the model)"
        )
    if key in valid:
        return None
    return f"config.{head}.{key}: no such key in config.{head} ({_nearest(key, valid)})"


def override_error(argv: typing.Sequence[str]) -> str | None:
    """The one line for a `--config.x.y=v` override in `argv` that names no option (None when
    every override does): ml_collections itself reports only the missing key (`'foo'`)."""
    for arg in argv:
        if arg.startswith("--config."):
            message = unknown_key_message(arg[len("--config.") :].split("=", 1)[0])
            if message:
                return message
    return None


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _check_value(where: str, value: Any, tp: Any, rule: Rule | None) -> Any:
    """`value` as type `tp` (an int is a valid float), checked against `rule`; else ValueError."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:  # tuple[X, ...] (e.g. ModelConfig.layer_types)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r} must be a list")
        return tuple(_check_value(f"{where}[{i}]", v, args[0], None) for i, v in enumerate(value))
    if args:  # X | None
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = is_int
    elif tp is float:
        ok = is_int or isinstance(value, float)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{where}={value!r} must be finite")
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ValueError(f"{where}={value!r} must be {_type_name(tp)}")
    if rule is not None and not rule.ok(value):
        raise ValueError(f"{where}={value!r} {rule.text}")
    return value


def _section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ValueError(unknown_key_message(f"{name}.{key}"))
    kw = {
        key: _check_value(f"config.{name}.{key}", values[key], hints[key], f.metadata.get("rule"))
        for key, f in fields.items()
        if key in values
    }
    return cls(**kw)


def _as_dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "to_dict"):
        return dict(value.to_dict())
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"{where} must be a group of keys (a ConfigDict), got {value!r}")


def options(config: Any, name: str) -> Any:
    """One section (`"data"`, `"train"`, ...) of a RunConfig, ConfigDict or dict as its typed
    options, validated alone (for code that needs only that section)."""
    if isinstance(config, RunConfig):
        return getattr(config, name)
    cls = SECTIONS.get(name) or GRPO_SECTIONS[name]
    return _section(name, cls, _as_dict(_as_dict(config, "config").get(name), f"config.{name}"))


def model_from_dict(model: Mapping[str, Any], **from_train: Any) -> ModelConfig:
    """The ModelConfig of a `config.model` group (a ConfigDict or a saved run's JSON dict):
    unknown keys and wrong types refused here, the architecture's rules by ModelConfig.

    `from_train`: the FROM_TRAIN fields (remat, dsa_stage) as config.train sets them."""
    hints = typing.get_type_hints(ModelConfig)
    kw = {}
    for key, value in dict(model).items():
        if key not in hints:
            raise ValueError(unknown_key_message(f"model.{key}"))
        if key in from_train:  # the same value in both places is no conflict
            if value != from_train[key]:
                raise ValueError(
                    f"config.model.{key}={value!r} conflicts with config.train.{key}="
                    f"{from_train[key]!r}: set it under config.train only (the one source of "
                    "truth; it is passed on to the model)"
                )
            continue
        kw[key] = _check_value(f"config.model.{key}", value, hints[key], None)
    try:
        return ModelConfig(**kw, **from_train)
    except ValueError as e:  # "ModelConfig.x=..: rule" -> "config.model.x=..: rule"
        text = str(e)
        for key in FROM_TRAIN if from_train else ():
            text = text.replace(f"ModelConfig.{key}=", f"config.train.{key}=")
        raise ValueError(text.replace("ModelConfig.", "config.model.", 1)) from None


def parse(config: Any) -> RunConfig:
    """The RunConfig of a ConfigDict (or a plain nested dict), validated: unknown keys, types,
    ranges and the rules between fields, each failure one ValueError line naming the field.
    A RunConfig is returned as it is. Keys a config leaves out take the defaults above."""
    if isinstance(config, RunConfig):
        return config
    top = _as_dict(config, "config")
    for key in top:
        message = unknown_key_message(key)
        if message:
            raise ValueError(message)
    head = {
        key: _check_value(f"config.{key}", top[key], tp, None)
        for key, tp in TOP_LEVEL.items()
        if key in top
    }
    if head.get("trainer", "pretrain") not in TRAINERS:
        raise ValueError(f"config.trainer={head['trainer']!r} must be one of {TRAINERS}")
    sections = {
        name: _section(name, cls, _as_dict(top.get(name), f"config.{name}"))
        for name, cls in SECTIONS.items()
    }
    grpo = head.get("trainer") == "grpo"
    for name, cls in GRPO_SECTIONS.items():
        if name in top or grpo:
            sections[name] = _section(name, cls, _as_dict(top.get(name), f"config.{name}"))
    train: TrainOptions = sections["train"]
    model = model_from_dict(
        _as_dict(top.get("model"), "config.model"),
        **{key: getattr(train, key) for key in FROM_TRAIN},
    )
    run = RunConfig(model=model, **sections, **head)
    _check_between(run)
    return run


def _check_between(run: RunConfig) -> None:
    """The rules that involve more than one field (no devices needed)."""
    from dsjax.model.layers.context import check_context_parallel  # noqa: PLC0415

    m, d = run.model, run.data
    if d.seq_len > m.max_position_embeddings:
        raise ValueError(
            f"config.data.seq_len={d.seq_len} exceeds "
            f"config.model.max_position_embeddings={m.max_position_embeddings}"
        )
    if run.mesh.context > 1:
        check_context_parallel(m, d.seq_len, run.mesh.context)
    elif run.mesh.context == -1:
        raise ValueError("config.mesh.context=-1: give the context axis an explicit size")
    _check_pipeline(run)
    if run.trainer == "grpo" or run.grpo is not None:
        g = run.grpo or GRPOOptions()
        if g.prompts * g.group_size % run.train.grad_accum:
            raise ValueError(
                f"config.grpo.prompts x group_size = {g.prompts * g.group_size} must divide by "
                f"config.train.grad_accum={run.train.grad_accum}"
            )


def pipeline_settings(train: TrainOptions, stages: int) -> tuple[str, int]:
    """(schedule, micro-batches) of `config.train`; microbatches 0 means 2 x stages."""
    return train.pipeline_schedule, train.microbatches or 2 * stages


def _check_pipeline(run: RunConfig) -> None:
    """The pipeline's rules (mesh.stage > 1): at least one MoE layer per stage, no context
    parallelism (its permuted layout is not pipelined)."""
    stages = run.mesh.stage
    if stages == 1:
        return
    if stages == -1:
        raise ValueError("config.mesh.stage=-1: give the stage axis an explicit size")
    if run.mesh.context != 1:
        raise ValueError(
            f"config.mesh.context={run.mesh.context} with config.mesh.stage={stages}: context "
            "parallelism is not pipelined (its permuted token layout); use one of them"
        )
    layers = run.model.num_moe_layers
    if stages > max(layers, 1):  # before building a schedule table of that size
        raise ValueError(
            f"config.mesh.stage={stages} exceeds the model's {layers} MoE layers (one per stage "
            "at least)"
        )
    schedule, micro = pipeline_settings(run.train, stages)
    if micro > run.train.batch_size:
        raise ValueError(
            f"config.train.microbatches={micro} exceeds config.train.batch_size="
            f"{run.train.batch_size} (a micro-batch holds at least one sequence)"
        )
    from dsjax.train.pipeline import check_pipeline  # noqa: PLC0415

    check_pipeline(run.model, stages, schedule, micro)


def check_mesh(run: RunConfig, mesh: Any) -> None:
    """The rules that involve the device layout (`mesh`: a jax Mesh or AbstractMesh)."""
    import jax  # noqa: PLC0415

    from dsjax.model import sharding  # noqa: PLC0415

    t = run.train
    if run.optim.host_offload or t.remat == "offload":
        field = "config.optim.host_offload" if run.optim.host_offload else "config.train.remat"
        _check_host_memory(mesh, field)
    shards = sharding.batch_shards(mesh)
    if t.batch_size % (t.grad_accum * shards):
        raise ValueError(
            f"config.train.batch_size={t.batch_size} must divide into grad_accum={t.grad_accum} "
            f"micro-batches across {shards} data shards (mesh data x fsdp x expert)"
        )
    stages = mesh.shape.get("stage", 1)
    if stages > 1:
        micro = pipeline_settings(t, stages)[1]
        if t.batch_size % (t.grad_accum * micro * shards):
            raise ValueError(
                f"config.train.batch_size={t.batch_size} must divide into grad_accum="
                f"{t.grad_accum} x microbatches={micro} pipeline micro-batches across {shards} "
                "data shards (mesh data x fsdp x expert)"
            )
    if t.batch_size % jax.process_count():
        raise ValueError(
            f"config.train.batch_size={t.batch_size} must divide by the "
            f"{jax.process_count()} processes"
        )
    cfg = run.model
    if cfg.n_routed_experts and cfg.n_routed_experts % mesh.shape["expert"]:
        raise ValueError(
            f"config.model.n_routed_experts={cfg.n_routed_experts} must divide by "
            f"config.mesh.expert={mesh.shape['expert']}"
        )


def make_mesh(run: RunConfig, devices: Any = None) -> Any:
    """The run's mesh over `devices` (default: all), checked against the run; a mesh that does
    not fit the devices is one line naming config.mesh."""
    from dsjax.model import sharding  # noqa: PLC0415

    try:
        mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh), devices=devices)
    except ValueError as e:
        text = str(e)
        raise ValueError(
            f"config.{text}" if text.startswith("mesh") else f"config.mesh: {text}"
        ) from None
    check_mesh(run, mesh)
    return mesh


def _check_host_memory(mesh: Any, field: str) -> None:
    device = mesh.devices.flat[0]
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # noqa: BLE001 - abstract (AOT) devices: the compiler decides
        return
    if "pinned_host" not in kinds:
        raise ValueError(
            f"{field}: {device.platform} devices have no pinned host memory to offload to "
            f"(memories: {sorted(kinds)})"
        )


# ----------------------------------------------------------------------------- defaults
def default_config() -> Any:
    """The ConfigDict of every run option at its default (configs/base.py starts from it);
    `config.model` holds only the run-choice model fields base.py names."""
    import ml_collections  # noqa: PLC0415

    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    for name, cls in SECTIONS.items():
        c[name] = ml_collections.ConfigDict(dataclasses.asdict(cls()))
    return c
