"""grpo_and_evaluate: the R1-style run behind `python train.py --config=configs/grpo_arith.py`.

1. Cold start (SFT): `config.sft.steps` of `train_step` on a noisy teacher's completions of the
   arithmetic task (format right, answers right only `config.sft.p_correct` of the time, a few
   broken formats), loss on completion tokens only. Its result is GRPO's checkpoint 0, so a rerun
   resumes after it. `config.sft.init_from` replaces the stage (`resolve_start`):
   - a train.py work directory with the same model (e.g. an earlier run of this config);
   - a Hugging Face DeepSeek-format directory (config.json + *.safetensors + tokenizer.json):
     R1-Zero style, GRPO straight from its weights. Its config.json sets the model (config.model
     keeps only dtype/param_dtype and other run choices, `_RUN_FIELDS`), its tokenizer encodes
     the task (`rewards.HFTaskTokenizer`; bos/eos from config.json or the tokenizer files; the
     R1 tags become whatever tokens it gives them) and is saved to `WORKDIR/tokenizer/`.
2. GRPO: per step `config.grpo.prompts` training prompts × `config.grpo.group_size` completions
   from dsjax's jitted `generate` (temperature 1, per-row keys from the step's seed), rule-based
   rewards (accuracy + `format_weight` × format), group advantages, π_old / π_ref log-probs, then
   `config.grpo.inner_steps` jitted, donated `grpo_update` passes over the rollout batch.
   Held-out evaluation (one sample per held-out prompt at temperature 1, and greedy) at step 0 (=
   the cold-start checkpoint) and every `config.grpo.eval_every` steps.

Checkpoints: training's `orbax_io.Checkpointer` (`WORKDIR/checkpoints/<step>/`, per-file
checksums, the newest step that verifies is restored and damaged newer ones are moved aside,
SIGTERM saves, non-finite parameters are never saved). Step 0 is the starting policy (after the
cold start, or the `init_from` weights). Items: `model` (the policy's params + moe_bias, so
`load_for_inference` and serve.py read it), `reference`, `optimizer` (step + AdamW state), `loop`
(JSON: next prompt index; the rollout seed is a function of (seed, step)), and `config` (with
the model actually run). Resuming restores all of them, so a resumed run repeats the
uninterrupted one exactly; a run started from a Hugging Face directory resumes from its
checkpoint's config and `WORKDIR/tokenizer/` without reading that directory again.
Metrics per step go to `metrics.jsonl` / TensorBoard; `rewards.png` plots reward and accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from dsjax import run_config
from dsjax.checkpoints.orbax_io import (
    Checkpointer,
    CheckpointError,
    newest_verified_step,
    step_dirs,
)
from dsjax.inference.generate import generate
from dsjax.model import sharding
from dsjax.model.transformer import Transformer, count_params
from dsjax.rl.grpo import GRPOState, group_advantages, grpo_state_shardings, jit_grpo_fns
from dsjax.rl.rewards import (
    ArithTask,
    ArithTokenizer,
    HFTaskTokenizer,
    Problem,
    TaskTokenizer,
    accuracy_reward,
    cold_start_completion,
    format_reward,
    scratchpad,
)
from dsjax.run_config import RunConfig
from dsjax.train import metrics
from dsjax.train.run import StopFlag, prepare_workdir, save_if_finite, write_config
from dsjax.train.stack_layout import stack_layout
from dsjax.train.step import (
    TrainingError,
    create_sharded_state,
    jit_train_step,
    make_optimizer,
    model_config,
    validate_config,
)

log = logging.getLogger("dsjax.rl.grpo")

__all__ = [
    "grpo_and_evaluate",
    "load_task_tokenizer",
    "make_task",
    "plot_rewards",
    "resolve_start",
    "rollout",
    "score",
    "start_kind",
]


# ----------------------------------------------------------------------------- config
def _check(config) -> None:
    """The task's rules between fields (each field's own type and range: `run_config.parse`)."""
    config = run_config.parse(config)
    g, s = _grpo(config), _sft(config)
    max_operand = run_config.options(config, "task").max_operand
    longest = len(str(max_operand)) * 2 + 3  # bos a op b =
    if longest + g.max_new_tokens > config.data.seq_len:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} must hold a prompt ({longest} tokens) + "
            f"config.grpo.max_new_tokens={g.max_new_tokens}"
        )
    teacher = longest + _longest_teacher(max_operand)
    if s.steps and not s.init_from and teacher > config.data.seq_len:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} must hold the cold start's longest "
            f"example ({teacher} tokens)"
        )


def _longest_teacher(max_operand: int) -> int:
    """Tokens of the longest cold-start completion (+ eos): the largest sum, a wrong answer
    10 too high, and trailing text."""
    p = Problem(max_operand, max_operand, "+")
    answer = str(p.answer + 10)
    text = f"<think>{scratchpad(p)}</think><answer>{answer}</answer>{answer}"
    return len(ArithTokenizer().encode(text)) + 1


def _grpo(run: RunConfig) -> run_config.GRPOOptions:
    assert run.grpo is not None  # run_config.parse fills the GRPO sections of a GRPO run
    return run.grpo


def _sft(run: RunConfig) -> run_config.SFTOptions:
    assert run.sft is not None
    return run.sft


def make_task(config) -> ArithTask:
    t = run_config.options(config, "task")
    return ArithTask(t.max_operand, t.ops, seed=config.seed, heldout_every=t.heldout_every)


# ----------------------------------------------------------------------------- batches
def _pad_rows(rows: list[list[int]], T: int, pad: int) -> np.ndarray:
    out = np.full((len(rows), T), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def sequence_batch(prompts: list[list[int]], completions: list[list[int]], T: int, pad: int):
    """Rows prompt + completion, right-padded to T: tokens, next-token targets, positions,
    segment_ids (0 on padding) and mask (1 where the target is a completion token). [B, T]."""
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    if max(len(s) for s in seqs) > T:
        raise ValueError(f"a prompt + completion exceeds config.data.seq_len={T}")
    tokens = _pad_rows(seqs, T, pad)
    targets = np.concatenate([tokens[:, 1:], np.full((len(seqs), 1), pad, np.int32)], axis=1)
    mask = np.zeros((len(seqs), T), np.float32)
    seg = np.zeros((len(seqs), T), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0  # position t predicts token t+1
        seg[i, : len(p) + len(c)] = 1
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (len(seqs), T)).copy()
    return {
        "tokens": tokens,
        "targets": targets,
        "positions": positions,
        "segment_ids": seg,
        "mask": mask,
    }


def sft_batch(
    task: ArithTask, tok: TaskTokenizer, start: int, count: int, T: int, seed: int, sft_cfg
) -> dict[str, np.ndarray]:
    """A train_step batch of teacher completions for problems start..start+count-1."""
    probs = task.problems(start, count)
    rng = np.random.default_rng([seed, 7, start])
    prompts = [tok.encode(p.prompt, add_bos=True) for p in probs]
    comps = [
        tok.encode(
            cold_start_completion(
                p, rng, p_correct=sft_cfg.p_correct, p_bad_format=sft_cfg.p_bad_format
            )
        )
        + [tok.eos_id]
        for p in probs
    ]
    b = sequence_batch(prompts, comps, T, tok.pad_id)
    return {
        "inputs": b["tokens"],
        "targets": b["targets"],
        "positions": b["positions"],
        "segment_ids": b["segment_ids"],
        "weights": b["mask"],
    }


# ----------------------------------------------------------------------------- rollouts
def score(texts: list[str], problems: list[Problem], format_weight: float):
    """(reward, accuracy, format) float32 arrays, one per completion."""
    acc = np.array(
        [accuracy_reward(t, p.answer) for t, p in zip(texts, problems, strict=True)], np.float32
    )
    fmt = np.array([format_reward(t) for t in texts], np.float32)
    return acc + format_weight * fmt, acc, fmt


def rollout(
    cfg,
    variables,
    tok,
    problems,
    *,
    group: int,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    speculative: bool = False,
):
    """G completions per problem from `generate` (rows grouped: problem i owns rows iG..iG+G-1;
    `speculative`: MTP draft + verification, same distribution). Returns (prompt ids,
    completion ids, decoded texts, repeated problems)."""
    reps = [p for p in problems for _ in range(group)]
    prompts = [tok.encode(p.prompt, add_bos=True) for p in reps]
    res = generate(
        cfg,
        variables,
        prompts,
        max_new_tokens,
        temperature=temperature,
        rng=seed,
        eos_id=tok.eos_id,
        speculative=speculative,
    )
    texts = [tok.decode(c) for c in res.tokens]
    return prompts, res.tokens, texts, reps


def _rollout_seed(seed: int, step: int) -> int:
    return int(np.random.default_rng([seed, 1, step]).integers(2**63))


def evaluate(cfg, variables, tok, task, config) -> dict[str, float]:
    """Held-out accuracy / format: one temperature-1 sample per prompt (fixed seed), and greedy."""
    probs = task.heldout(config.grpo.eval_prompts)
    out = {}
    for name, temp in (("eval", config.grpo.temperature), ("eval_greedy", 0.0)):
        _, comps, texts, reps = rollout(
            cfg,
            variables,
            tok,
            probs,
            group=1,
            seed=999_983,
            max_new_tokens=config.grpo.max_new_tokens,
            temperature=temp,
        )
        _, acc, fmt = score(texts, reps, config.grpo.format_weight)
        out[f"{name}_accuracy"], out[f"{name}_format"] = float(acc.mean()), float(fmt.mean())
    return out


# ----------------------------------------------------------------------------- cold start
def cold_start(config: RunConfig, mesh, model, tok, task):
    """(params, moe_bias) after the SFT stage (`config.sft`), trained from a fresh init."""
    sft = _sft(config)
    sft_run = config.replace(
        train=dataclasses.replace(config.train, steps=max(sft.steps, 1)),
        optim=dataclasses.replace(
            config.optim, lr=sft.lr, warmup_steps=min(sft.warmup_steps, max(sft.steps - 1, 0))
        ),
    )
    tx, schedule = make_optimizer(sft_run)
    T = config.data.seq_len
    # The train step runs on the pipeline's row order of the MoE stack (`stack_layout`).
    layout = stack_layout(model.cfg, sft_run.train, dict(mesh.shape).get("stage", 1))
    state, _, shardings = create_sharded_state(
        jax.random.key(config.seed), model, tx, mesh, T, config.optim.host_offload, layout
    )
    step_fn = jit_train_step(model, tx, schedule, sft_run, shardings=shardings, mesh=mesh)
    bsz, t0 = config.train.batch_size, time.perf_counter()
    for i in range(sft.steps):
        batch = sft_batch(task, tok, i * bsz, bsz, T, config.seed, sft)
        state, m = step_fn(state, batch)
        if (i + 1) % config.train.log_every == 0 or i + 1 == sft.steps:
            loss = float(m["main_ce"])
            if not np.isfinite(loss):
                raise TrainingError(f"cold start: loss is {loss} at SFT step {i + 1}")
            log.info(
                "cold start %d/%d: loss %.4f (%.0fs)",
                i + 1,
                sft.steps,
                loss,
                time.perf_counter() - t0,
            )
    return layout.model(state.params), state.moe_bias


def _load_start(path: str, cfg):
    """{"params", "moe_bias"} of the latest checkpoint of a train.py work directory (e.g. an
    earlier grpo_arith run), in place of the SFT stage; its model must match config.model.
    Call it outside the mesh context (it traces the model's shapes)."""
    from dsjax.checkpoints.orbax_io import load_for_inference  # noqa: PLC0415

    loaded_cfg, variables = load_for_inference(path)
    if loaded_cfg.replace(remat=cfg.remat) != cfg:
        raise ValueError(
            f"config.sft.init_from={path!r}: its model config differs from config.model"
        )
    log.info("cold start: skipped, starting from %s", path)
    return variables


# ----------------------------------------------------------------------------- starting points
# config.model fields that are run choices, not part of a checkpoint's architecture: they still
# apply when the model comes from a Hugging Face directory (remat comes from config.train).
_RUN_FIELDS = (
    "dtype",
    "param_dtype",
    "init_std",
    "attention_impl",
    "attention_chunk",
    "moe_impl",
    "moe_tile",
    "moe_capacity_factor",
    "moe_fp8_dispatch",
    "scan_unroll",
    "fp8",
)
TOKENIZER_DIR = "tokenizer"  # WORKDIR/tokenizer/: the HF start's tokenizer, kept for resume


def start_kind(path: str) -> str:
    """What `config.sft.init_from` = `path` is: "workdir" (a train.py work directory: has
    checkpoints/) or "hf" (a Hugging Face DeepSeek-format directory: config.json with a
    supported model_type, and safetensors).

    Raises:
      ValueError: `path` is neither, naming what is missing.
    """
    from dsjax.checkpoints.safetensors_io import read_json_object  # noqa: PLC0415
    from dsjax.model.config import SUPPORTED_HF_TYPES  # noqa: PLC0415

    where = f"config.sft.init_from={path!r}"
    if not os.path.isdir(path):
        raise ValueError(f"{where} is not a directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(
            f"{where} is neither a train.py work directory (checkpoints/) nor a Hugging Face "
            "directory (config.json + *.safetensors)"
        )
    model_type = read_json_object(Path(config_file), "Hugging Face config.json").get("model_type")
    if model_type not in SUPPORTED_HF_TYPES:
        raise ValueError(
            f"{where}: config.json model_type={model_type!r} is not a DeepSeek format "
            f"({', '.join(SUPPORTED_HF_TYPES)})"
        )
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise ValueError(f"{where}: a Hugging Face directory needs *.safetensors; it has none")
    return "hf"


def load_task_tokenizer(path: str, hf_config: dict[str, Any] | None = None) -> HFTaskTokenizer:
    """The task tokenizer of a Hugging Face directory (or of WORKDIR/tokenizer/).

    Its tokenizer.json (+ tokenizer_config.json) via `dsjax.text.tokenizer`. bos and eos, each: the
    token tokenizer_config.json names, else config.json's `bos_token_id` / `eos_token_id`
    (`hf_config`; the first of an eos list), else a well-known spelling in the vocabulary (see
    `dsjax.text.tokenizer`); where tokenizer_config.json and config.json disagree the former wins,
    with a warning. pad: the tokenizer's, else `pad_token_id`, else eos.

    Raises:
      FileNotFoundError: no tokenizer.json in `path` (named).
      ValueError: no eos token anywhere, or an id outside the tokenizer's vocabulary.
    """
    from dsjax.checkpoints.safetensors_io import read_json_object  # noqa: PLC0415
    from dsjax.text.tokenizer import CONFIG_FILE, TOKENIZER_FILE, Tokenizer  # noqa: PLC0415

    file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file} is missing: GRPO from a Hugging Face directory encodes the task with that "
            "checkpoint's own tokenizer"
        )
    tok = Tokenizer.load(path)
    config_file = Path(path) / CONFIG_FILE
    named = read_json_object(config_file, "tokenizer config") if config_file.is_file() else {}
    hf = hf_config or {}
    ids: dict[str, Any] = {}
    for field, own in (("bos", tok.bos_id), ("eos", tok.eos_id)):
        from_json = hf.get(f"{field}_token_id")
        from_json = from_json[0] if isinstance(from_json, list) and from_json else from_json
        if named.get(f"{field}_token") is not None:
            if from_json is not None and from_json != own:
                log.warning(
                    "%s names %s id %s but config.json says %s: using the tokenizer's",
                    config_file,
                    field,
                    own,
                    from_json,
                )
            ids[field] = own
        else:
            ids[field] = from_json if from_json is not None else own
    if ids["eos"] is None:
        raise ValueError(
            f"{path}: no eos token (config.json has no eos_token_id and the tokenizer files "
            "name none): rollouts could never end"
        )
    pad = next(p for p in (tok.pad_id, hf.get("pad_token_id"), ids["eos"]) if p is not None)
    return HFTaskTokenizer(tok, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=pad)


def _save_task_tokenizer(tok: HFTaskTokenizer, directory: str) -> None:
    """Writes `tok` (tokenizer.json + tokenizer_config.json naming its resolved bos/eos/pad and
    add_bos_token) to `directory`, where `load_task_tokenizer` and `dsjax.inference.loading` read it."""
    from dsjax.text.tokenizer import CONFIG_FILE, Tokenizer  # noqa: PLC0415

    backend = tok.tokenizer.backend
    name = lambda i: None if i is None else backend.id_to_token(i)  # noqa: E731
    Tokenizer(
        backend, bos_token=name(tok.bos_id), eos_token=name(tok.eos_id), pad_token=name(tok.pad_id)
    ).save(directory)
    config_file = os.path.join(directory, CONFIG_FILE)
    with open(config_file) as f:
        tok_config = json.load(f)
    tok_config["add_bos_token"] = tok.bos_id is not None
    with open(config_file, "w") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)


def _with_model(config, cfg) -> ml_collections.ConfigDict:
    """`config` with config.model replaced by every field of ModelConfig `cfg` but those that
    config.train sets (remat, dsa_stage: `run_config.FROM_TRAIN`)."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = ml_collections.ConfigDict(
        {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(cfg)
            if f.name not in run_config.FROM_TRAIN
        }
    )
    return out


def _latest_step(workdir: str) -> int | None:
    steps = step_dirs(os.path.join(workdir, "checkpoints"))
    return steps[-1] if steps else None


def _saved_model_config(workdir: str):
    """The ModelConfig stored with the newest GRPO checkpoint that verifies."""
    from dsjax.checkpoints.orbax_io import model_config_from_run  # noqa: PLC0415

    directory = os.path.join(workdir, "checkpoints")
    step = newest_verified_step(workdir)
    if step is None:
        raise CheckpointError(
            f"every checkpoint in {directory} is damaged; move them away to start the run again"
        )
    manager = ocp.CheckpointManager(directory)
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    manager.close()
    return model_config_from_run(saved["config"])


def resolve_start(config, workdir: str):
    """(config, tokenizer, start variables or None) of a run, before the mesh context.

    - No `config.sft.init_from`: `config`, `ArithTokenizer`, None (the cold start runs).
    - A train.py work directory: its latest checkpoint's variables (model must match
      config.model); its tokenizer/ if it has one (a pretraining run, or a run started from a
      Hugging Face directory; saved to WORKDIR/tokenizer/ too), else `ArithTokenizer`.
    - A Hugging Face DeepSeek-format directory: `config` with config.model's architecture fields
      replaced by config.json's (the `_RUN_FIELDS` and config.train.remat still apply), its
      tokenizer (`load_task_tokenizer`, saved to WORKDIR/tokenizer/), its weights (no SFT; the
      reference policy is these weights).
    Resuming (WORKDIR has a GRPO checkpoint) loads no start weights; a run with a saved
    WORKDIR/tokenizer/ takes its model config from the checkpoint and its tokenizer from there,
    so it reads nothing from the Hugging Face directory (which may be gone).
    """
    latest = _latest_step(workdir)
    init_from = run_config.options(config, "sft").init_from
    saved_tok = os.path.join(workdir, TOKENIZER_DIR)
    if latest is not None and os.path.isfile(os.path.join(saved_tok, "tokenizer.json")):
        log.info(
            "resuming a run with its own tokenizer: model config from the step-%d checkpoint, "
            "tokenizer from %s",
            latest,
            saved_tok,
        )
        cfg = _saved_model_config(workdir)
        return _with_model(config, cfg), load_task_tokenizer(saved_tok), None
    if not init_from:
        return config, ArithTokenizer(), None
    kind = start_kind(init_from)
    if kind == "workdir":
        start = None if latest is not None else _load_start(init_from, model_config(config))
        their_tok = os.path.join(init_from, TOKENIZER_DIR)
        if not os.path.isfile(os.path.join(their_tok, "tokenizer.json")):
            return config, ArithTokenizer(), start  # e.g. an earlier grpo_arith run
        tok = load_task_tokenizer(their_tok)  # a run started from HF, or a pretraining run
        log.info("config.sft.init_from=%s: the task is encoded with its tokenizer/", init_from)
        if jax.process_index() == 0:
            _save_task_tokenizer(tok, saved_tok)
        return config, tok, start
    if latest is not None:
        raise ValueError(
            f"{workdir} holds GRPO checkpoints of a run that did not start from a Hugging Face "
            f"directory, but config.sft.init_from={init_from!r} is one: use a new work directory"
        )
    return _start_from_hf(config, init_from, saved_tok)


def _start_from_hf(config, path: str, saved_tok: str):
    from dsjax.checkpoints.hf import load_hf_checkpoint  # noqa: PLC0415
    from dsjax.checkpoints.safetensors_io import read_json_object  # noqa: PLC0415

    hf = read_json_object(Path(path) / "config.json", "Hugging Face config.json")
    tok = load_task_tokenizer(path, hf)  # before the weights: a missing file fails at once
    run = {k: config.model[k] for k in _RUN_FIELDS if k in config.model}
    run["remat"] = config.train.remat
    cfg, variables = load_hf_checkpoint(
        path, dtype=run.pop("param_dtype", "float32"), config_overrides=run
    )
    log.info(
        "config.sft.init_from=%s is a Hugging Face directory: its model (%d layers, hidden %d, "
        "vocab %d) replaces config.model's shape fields; no cold start, the reference policy is "
        "its weights",
        path,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
    )
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tok.vocab_size} tokens but config.json vocab_size is "
            f"{cfg.vocab_size}"
        )
    if jax.process_index() == 0:
        _save_task_tokenizer(tok, saved_tok)
    return _with_model(config, cfg), tok, variables


# ----------------------------------------------------------------------------- checkpoints
def _save(ckpt: Checkpointer, step: int, state: GRPOState, loop: dict, config) -> None:
    items = dict(
        model=ocp.args.StandardSave({"params": state.params, "moe_bias": state.moe_bias}),
        reference=ocp.args.StandardSave(
            {"params": state.ref_params, "moe_bias": state.ref_moe_bias}
        ),
        optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
        loop=ocp.args.JsonSave(dict(loop)),  # a copy: the loop moves on while it is written
    )
    ckpt.save_items(step, items, config, force=True)


def _restore(ckpt: Checkpointer, step: int, abstract: GRPOState):
    r = ckpt.restore_items(
        step,
        model=ocp.args.StandardRestore({"params": abstract.params, "moe_bias": abstract.moe_bias}),
        reference=ocp.args.StandardRestore(
            {"params": abstract.ref_params, "moe_bias": abstract.ref_moe_bias}
        ),
        optimizer=ocp.args.StandardRestore(
            {"step": abstract.step, "opt_state": abstract.opt_state}
        ),
        loop=ocp.args.JsonRestore(),
    )
    state = GRPOState(
        step=r["optimizer"]["step"],
        params=r["model"]["params"],
        moe_bias=r["model"]["moe_bias"],
        opt_state=r["optimizer"]["opt_state"],
        ref_params=r["reference"]["params"],
        ref_moe_bias=r["reference"]["moe_bias"],
    )
    return state, dict(r["loop"])


# ----------------------------------------------------------------------------- the run
def _grpo_optimizer(config: RunConfig):
    g = _grpo(config)
    steps = g.steps * g.inner_steps
    return make_optimizer(
        config.replace(
            train=dataclasses.replace(config.train, steps=steps),
            optim=dataclasses.replace(
                config.optim,
                lr=g.lr,
                warmup_steps=min(g.warmup_steps, steps - 1),
                min_lr_ratio=1.0,  # constant after warm-up
            ),
        )
    )


def _variables(state: GRPOState):
    return {"params": state.params, "moe_bias": state.moe_bias}


def grpo_step(state, fns, cfg, tok, task, config: RunConfig, step: int, prompt_index: int):
    """One GRPO step: rollout, rewards, advantages, π_old/π_ref, μ updates. Returns
    (state, metrics dict of floats)."""
    g = _grpo(config)
    logp_fn, update_fn = fns
    probs = task.problems(prompt_index, g.prompts)
    prompts, comps, texts, reps = rollout(
        cfg,
        _variables(state),
        tok,
        probs,
        group=g.group_size,
        max_new_tokens=g.max_new_tokens,
        seed=_rollout_seed(config.seed, step),
        temperature=g.temperature,
        speculative=g.speculative,
    )
    reward, acc, fmt = score(texts, reps, g.format_weight)
    adv = np.asarray(group_advantages(reward.reshape(g.prompts, g.group_size))).reshape(-1)
    batch = sequence_batch(prompts, comps, config.data.seq_len, tok.pad_id)
    batch["advantages"] = adv.astype(np.float32)
    old, ref = logp_fn(state, batch)
    sums: dict[str, float] = {}
    for _ in range(g.inner_steps):
        state, m = update_fn(state, batch, old, ref)
        for k, v in jax.device_get(m).items():
            sums[k] = sums.get(k, 0.0) + float(v) / g.inner_steps
    out = {
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std()),
        "accuracy": float(acc.mean()),
        "format": float(fmt.mean()),
        "response_length": float(np.mean([len(c) for c in comps])),
        **sums,
    }
    if not np.isfinite(out["loss"]):
        raise TrainingError(f"GRPO loss is {out['loss']} at step {step + 1}; stopping")
    return state, out


def grpo_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Cold start then GRPO per `config` in `workdir` (resuming its newest good checkpoint)."""
    workdir = prepare_workdir(workdir)
    run = run_config.parse(config)
    _check(run)
    mesh = run_config.make_mesh(run)
    config, tok, start_vars = resolve_start(config, workdir)  # outside the mesh context
    run = validate_config(config, mesh)  # config.model may come from the start checkpoint
    task = make_task(run)
    if run.model.vocab_size < tok.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={run.model.vocab_size} is below the "
            f"task tokenizer's {tok.vocab_size} tokens"
        )
    g = _grpo(run)
    rows = g.prompts * g.group_size
    if rows % sharding.batch_shards(mesh):
        raise ValueError(
            f"config.grpo.prompts × group_size = {rows} must divide by the "
            f"{sharding.batch_shards(mesh)} data shards of the mesh"
        )
    cfg = run.model
    model = Transformer(cfg)
    chief = jax.process_index() == 0
    write_config(workdir, config)
    log.info("model: %.2fM parameters; mesh %s", count_params(cfg)["total"] / 1e6, dict(mesh.shape))
    t_start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        tx, schedule = _grpo_optimizer(run)
        abstract, shardings = grpo_state_shardings(
            model, tx, mesh, run.data.seq_len, run.optim.host_offload
        )
        ckpt = Checkpointer(workdir, every=run.checkpoint.every, keep=run.checkpoint.keep)
        writer = None
        last: dict[str, float] = {}
        stop_ctx = contextlib.ExitStack()
        try:
            resumed, restored = ckpt.restore_newest(lambda s: _restore(ckpt, s, abstract))
            if restored is not None:
                state, loop = restored
                log.info("resumed from the GRPO checkpoint at step %d", resumed)
            else:
                if start_vars is not None:  # config.sft.init_from: no cold start
                    params = jax.device_put(start_vars["params"], shardings.params)
                    moe_bias = jax.device_put(start_vars.get("moe_bias", {}), shardings.moe_bias)
                    start_vars = None
                else:
                    params, moe_bias = cold_start(run, mesh, model, tok, task)
                init = jax.jit(functools.partial(_fresh_state, tx=tx), out_shardings=shardings)
                state, loop = init(params, moe_bias), {"prompt_index": 0}
            start = int(state.step) // g.inner_steps
            fns = jit_grpo_fns(model, tx, schedule, shardings, mesh, g, run.train)
            writer = metrics.MetricWriter(workdir, is_chief=chief, resume_step=start)
            if restored is None:  # step 0: the starting policy, evaluated and kept
                first = evaluate(cfg, _variables(state), tok, task, run)
                writer.write(0, first)
                log.info("step 0 (cold start): %s", _fmt(first))
                save_if_finite(0, state.params, lambda: _save(ckpt, 0, state, loop, config))
            step, t_mark = start, time.perf_counter()
            stop = StopFlag()  # SIGTERM / Ctrl-C: save at the next step, then return
            stop_ctx.enter_context(stop.installed())
            while step < g.steps and stop.reason is None:
                state, m = grpo_step(state, fns, cfg, tok, task, run, step, loop["prompt_index"])
                step += 1
                loop["prompt_index"] += g.prompts
                m["step_seconds"] = time.perf_counter() - t_mark
                if step % g.eval_every == 0 or step == g.steps:
                    m.update(evaluate(cfg, _variables(state), tok, task, run))
                writer.write(step, m)
                if step % run.train.log_every == 0 or step == g.steps:
                    log.info("grpo %d/%d: %s", step, g.steps, _fmt(m))
                if step % run.checkpoint.every == 0 or step == g.steps or stop.reason:
                    save = functools.partial(_save, ckpt, step, state, loop, config)
                    save_if_finite(step, state.params, save)
                last = {**last, **m}
                t_mark = time.perf_counter()
        finally:
            stop_ctx.close()
            if writer is not None:
                writer.close()
            ckpt.close()
    summary: dict[str, Any] = {"step": step, "wall_seconds": time.perf_counter() - t_start, **last}
    if chief:
        plot_rewards(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "rewards.png"))
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    summary.update(
        loss=last.get("loss"), eval_loss=None, peak_flops_source="not measured (GRPO run)"
    )
    return summary


def _fresh_state(params, moe_bias, *, tx) -> GRPOState:
    from dsjax.rl.grpo import grpo_state_from  # noqa: PLC0415

    return grpo_state_from(params, moe_bias, tx)


def _fmt(m: dict) -> str:
    keys = (
        "reward_mean",
        "accuracy",
        "format",
        "kl",
        "clip_fraction",
        "entropy",
        "response_length",
        "eval_accuracy",
        "eval_format",
        "eval_greedy_accuracy",
    )
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys if k in m)


def plot_rewards(metrics_path, out_png):
    """Reward mean and accuracy per step (lines), held-out accuracy and format (points)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    records = metrics.read_metrics(metrics_path)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, style in (
        ("reward_mean", "-"),
        ("accuracy", "-"),
        ("format", "-"),
        ("eval_accuracy", "o-"),
        ("eval_format", "s--"),
    ):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=key, markersize=4)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward / rate")
    ax.grid(True, alpha=0.3)
    if records:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, format="png")
    return out_png
