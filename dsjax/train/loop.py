"""train_and_evaluate: the training run behind `python train.py --config=...`.

Mesh from `config.mesh` -> validated config -> tokenizer (trained on the corpus once, kept in the
workdir) -> Grain iterators -> state initialised straight into its shardings (or restored from the
latest checkpoint, possibly onto another mesh) -> jitted, donated `train_step` -> metrics
(JSONL, TensorBoard, a progress line) -> periodic held-out eval (`eval_loss` in nats per token,
`eval_bpb` in bits per UTF-8 byte, which does not change with the tokenizer) -> Orbax checkpoints
(async, every K steps, at the end, and on SIGTERM/Ctrl-C) -> `loss.png` and, at the end, a sample
from `config.train.sample_prompt` beside the greedy continuation of a held-out prompt and the real
text, with how many of the sample's lines parse as Python (`summary["sample_python_lines"]`).

A non-finite loss stops the run with `TrainingError` naming the first bad step, and a
checkpoint is only written of finite parameters, so a poisoned state is never kept as the last
good one. Resuming restores the newest checkpoint that verifies (see `checkpoint.py`), moving
damaged newer ones aside. Rerunning a finished run returns at once (`summary["complete"]`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from dsjax import run_config
from dsjax.checkpoints.orbax_io import Checkpointer, CheckpointError
from dsjax.model import sharding
from dsjax.model.transformer import Transformer, count_params
from dsjax.run_config import RunConfig
from dsjax.train import data, metrics
from dsjax.train.run import (
    StopFlag,
    check_finite,
    last_good,
    prepare_workdir,
    save_if_finite,
    write_config,
)
from dsjax.train.stack_layout import StackLayout, stack_layout
from dsjax.train.step import (
    TrainingError,
    create_sharded_state,
    eval_step,
    jit_train_step,
    make_optimizer,
)

log = logging.getLogger("dsjax.train")

__all__ = [
    "CheckpointError",
    "TrainingError",
    "heldout_prompt",
    "heldout_prompts",
    "prepare_workdir",
    "train_and_evaluate",
]


def _global_batch(local: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


@jax.jit
def _target_bytes(byte_table_V, targets_BT, weights_BT) -> jax.Array:
    """UTF-8 bytes the counted (weight > 0) target tokens decode to, summed (int32)."""
    return jnp.where(weights_BT > 0, byte_table_V[targets_BT], 0).sum()


def _evaluate(eval_fn, state, config: RunConfig, tokenizer, batch_sharding, byte_table_V):
    """(mean held-out cross-entropy in nats per token, bits per byte) over the first
    `eval_batches` batches of the eval split (the same batches every time).

    Bits per byte = Σ nats / ln 2 / Σ UTF-8 bytes of the counted target tokens
    (`byte_table_V` = `metrics.token_byte_lengths`), comparable across tokenizers; None when the
    targets hold no bytes.
    """
    it = data.make_iterator(
        config,
        tokenizer,
        "eval",
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_epochs=None,
        prefetch=0,
    )
    total = count = n_bytes = 0.0
    for local in itertools.islice(it, config.train.eval_batches):
        batch = _global_batch(local, batch_sharding)
        s, n = eval_fn(state.params, state.moe_bias, batch)
        b = _target_bytes(byte_table_V, batch["targets"], batch["weights"])
        total, count, n_bytes = total + float(s), count + float(n), n_bytes + float(b)
    return total / max(count, 1.0), metrics.bits_per_byte(total, n_bytes)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _initial_eval(metrics_path: str) -> tuple[float, float | None] | None:
    """(eval_loss, eval_bpb) logged at step 0 of a run (a resumed run reads them back)."""
    with contextlib.suppress(OSError, ValueError):
        for r in metrics.read_metrics(metrics_path):
            if r.get("step") == 0 and r.get("eval_loss") is not None:
                return r["eval_loss"], r.get("eval_bpb")
    return None


def sample_python_lines(sample: str) -> tuple[int, int]:
    """(lines that parse as Python alone, lines) of a generated sample, blank and comment lines
    left out (`metrics.python_line_check`). A last line cut off by the token budget (no newline
    after it) is left out unless it is the only line."""
    lines = sample.splitlines(keepends=True)
    if len(lines) > 1 and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    return metrics.python_line_check("".join(lines))


# Lines of the held-out prompt / continuations shown at the end of a run.
_SHOW_PROMPT_LINES, _SHOW_LINES = 6, 8


def heldout_prompts(
    config, tokenizer, max_prompt_tokens: int, n: int = 1
) -> list[tuple[str, str, str]]:
    """(document name, prompt, real continuation) from the first `n` usable held-out documents
    (fewer when the eval split has fewer; the same documents every time).

    A prompt is its document's text up to and including the first `def `/`class ` line (the
    first 8 lines if there is none), with whole leading lines dropped until it fits in
    `max_prompt_tokens`; the continuation is the text that really follows it.
    """
    docs = data.load_documents(
        data._data_field(config, "source"), int(data._data_field(config, "max_documents"))
    )
    _, held_out = data.split_documents(docs, float(data._data_field(config, "eval_fraction")))
    out: list[tuple[str, str, str]] = []
    for index in held_out:
        if len(out) >= n:
            break
        lines = docs[index].splitlines(keepends=True)
        if len(lines) < 2:
            continue
        starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(("def ", "class "))]
        end = next((i + 1 for i in starts if i + 1 < len(lines)), min(8, len(lines) - 1))
        first = max(0, end - 64)  # a prompt that fits in a training row is far shorter
        while (
            first < end - 1 and len(tokenizer.encode("".join(lines[first:end]))) > max_prompt_tokens
        ):
            first += 1
        prompt = "".join(lines[first:end])
        if prompt.strip() and len(tokenizer.encode(prompt)) <= max_prompt_tokens:
            out.append((docs.names[index], prompt, "".join(lines[end:])))
    return out


def heldout_prompt(config, tokenizer, max_prompt_tokens: int) -> tuple[str, str, str] | None:
    """The first of `heldout_prompts`; None when the eval split has no usable document."""
    found = heldout_prompts(config, tokenizer, max_prompt_tokens, 1)
    return found[0] if found else None


def _head_lines(text: str, n: int) -> str:
    return "".join(text.splitlines(keepends=True)[:n]).rstrip("\n")


def _sample(
    cfg, state, tokenizer, config: RunConfig, layout: StackLayout
) -> tuple[str | None, str | None]:
    """What the model learned, from one `generate` call of two rows (single-process runs):

    - a sampled continuation of `config.train.sample_prompt` (`config.train.sample_temperature`,
      top-k 40), returned as prompt + continuation;
    - the greedy continuation of a held-out prompt (`heldout_prompt`), returned as a text block
      that prints the prompt's last lines, the model's continuation and the real one.
    """
    if jax.process_count() > 1 or config.train.sample_tokens <= 0:
        return None, None
    from dsjax.inference.generate import generate  # noqa: PLC0415  (generation is optional here)

    n_new = config.train.sample_tokens
    add_bos = tokenizer.bos_id is not None
    prompts = [tokenizer.encode(config.train.sample_prompt, add_bos=add_bos)]
    temperatures, top_ks = [config.train.sample_temperature], [40]
    budget = max(1, min(config.data.seq_len, cfg.max_position_embeddings) - n_new - 1)
    held = heldout_prompt(config, tokenizer, budget)
    if held is not None:
        prompts.append(tokenizer.encode(held[1], add_bos=add_bos))
        temperatures.append(0.0)
        top_ks.append(0)
    variables = jax.device_get({"params": state.params, "moe_bias": state.moe_bias})
    variables["params"] = layout.model(variables["params"])  # on the host
    result = generate(
        cfg,
        variables,
        prompts,
        max_new_tokens=n_new,
        temperature=temperatures,
        top_k=top_ks,
        rng=jax.random.key(config.seed),
        eos_id=tokenizer.eos_id,
    )
    sample = config.train.sample_prompt + tokenizer.decode(result.tokens[0])
    if held is None:
        return sample, None
    name, prompt, real = held
    real = tokenizer.decode(tokenizer.encode(real)[:n_new])  # as many tokens as the model got
    prompt_tail = "".join(prompt.splitlines(keepends=True)[-_SHOW_PROMPT_LINES:])
    block = (
        f"held-out document {name} (never trained on), greedy continuation:\n"
        f"--- prompt (last lines) ---\n{prompt_tail.rstrip()}\n"
        f"--- model ---\n{_head_lines(tokenizer.decode(result.tokens[1]), _SHOW_LINES)}\n"
        f"--- real ---\n{_head_lines(real, _SHOW_LINES)}"
    )
    return sample, block


@dataclasses.dataclass
class _Rate:
    """Tokens per second over each logged interval, and over the steady state (every interval
    after the one holding step `start + 1`, which holds the compiles). Eval and checkpoint time
    is not step time: `restart` after them."""

    start: int
    mark: float = dataclasses.field(default_factory=time.perf_counter)
    tokens_run: float = 0.0
    time_run: float = 0.0

    def interval(self, done: list[tuple[int, dict]]) -> float:
        now = time.perf_counter()
        tokens = sum(m["tokens"] for _, m in done)
        if done[0][0] > self.start + 1:
            self.tokens_run, self.time_run = (
                self.tokens_run + tokens,
                self.time_run + now - self.mark,
            )
        return tokens / max(now - self.mark, 1e-9)

    def restart(self) -> None:
        self.mark = time.perf_counter()

    @property
    def steady(self) -> float | None:
        return self.tokens_run / self.time_run if self.time_run else None


@dataclasses.dataclass
class _Loop:
    """What the step loop of one run needs: the jitted step, held-out evaluation, the data,
    the checkpointer and metric sinks, and the FLOP figures for MFU. `layout`: the row order of
    the state's MoE stack (`stack_layout`); the step runs on it, the rest sees model order."""

    run: RunConfig
    config: ml_collections.ConfigDict  # saved with each checkpoint
    step_fn: Any
    evaluate: Any
    train_iter: Any
    ckpt: Checkpointer
    writer: metrics.MetricWriter
    progress: metrics.Progress | None
    flops_per_token: float
    peak_total: float | None
    batch_sharding: Any
    layout: StackLayout

    def save(self, step: int, state) -> None:
        """A checkpoint of `state` at `step` (model order), if its parameters are finite."""
        save_if_finite(
            step,
            state.params,
            lambda: self.ckpt.save(
                step,
                self.layout.model(state, to_host=True),
                self.train_iter,
                self.config,
                force=True,
            ),
        )


def _interval_metrics(loop: _Loop, done: list[tuple[int, dict]], rate: _Rate) -> dict[str, Any]:
    """The last step's metrics with the interval's throughput (and MFU when the peak is known)."""
    tok_s = rate.interval(done)
    last = dict(done[-1][1])
    last["tokens_per_sec"] = tok_s
    last["tflops_per_sec"] = tok_s * loop.flops_per_token / 1e12
    if loop.peak_total:
        last["mfu"] = tok_s * loop.flops_per_token / loop.peak_total
    return last


def _run_steps(loop: _Loop, state, start: int, stop: StopFlag):
    """Steps from `start` to `train.steps` (or until `stop`), logging, evaluating and saving at
    their intervals. Metrics are fetched only at those points (`check_finite` raises on the first
    non-finite step). Returns (state, step, last logged metrics, last eval (loss, bpb), rate)."""
    run, steps = loop.run, loop.run.train.steps
    pending: list[tuple[int, dict]] = []
    last: dict[str, Any] = {}
    evaluated: tuple[float | None, float | None] = (None, None)
    rate, step = _Rate(start), start
    while step < steps and stop.reason is None:
        state, m = loop.step_fn(state, _global_batch(next(loop.train_iter), loop.batch_sharding))
        step += 1
        pending.append((step, m))
        final = step == steps
        log_now = step % run.train.log_every == 0 or final
        save_now = step % run.checkpoint.every == 0 or final
        eval_now = step % run.train.eval_every == 0 or final
        if not (log_now or save_now or eval_now or stop.reason):
            continue
        done, pending = check_finite(pending), []
        last = _interval_metrics(loop, done, rate)
        if eval_now:
            evaluated = loop.evaluate(state)
            last["eval_loss"], last["eval_bpb"] = evaluated
        loop.writer.write(step, last)
        if loop.progress:
            loop.progress.update(step, last)
        if save_now or stop.reason:
            loop.save(step, state)
        rate.restart()
    return state, step, last, evaluated, rate


def _log_model(cfg, mesh) -> None:
    counts = count_params(cfg)
    log.info(
        "model: %.2fM parameters (%.2fM activated, %.2fM MTP); mesh %s; %d devices",
        counts["total"] / 1e6,
        counts["activated"] / 1e6,
        counts["mtp"] / 1e6,
        dict(mesh.shape),
        jax.device_count(),
    )


def _make_evaluate(run: RunConfig, model, tokenizer, mesh, layout: StackLayout):
    """state -> (held-out nats per token, bits per byte), jitted once (the parameters in
    `layout`, put in model order inside the program)."""
    vocab = max(run.model.vocab_size, tokenizer.vocab_size)
    step = functools.partial(eval_step, model=model)
    return functools.partial(
        _evaluate,
        jax.jit(lambda params, moe_bias, batch: step(layout.model(params), moe_bias, batch)),
        config=run,
        tokenizer=tokenizer,
        batch_sharding=sharding.batch_sharding(mesh),
        byte_table_V=jnp.asarray(metrics.token_byte_lengths(tokenizer, vocab), jnp.int32),
    )


def _complete(ckpt: Checkpointer, steps: int) -> int | None:
    """The newest checkpoint's step when it verifies and reaches `steps` (the run is done)."""
    latest = ckpt.latest_step()
    if latest is not None and latest >= steps and ckpt.newest_verified_step() == latest:
        return latest
    return None


def _eval_at_zero(loop: _Loop, state) -> tuple[float, float | None]:
    """The held-out loss before training: the starting point of the loss curve."""
    loss, bpb = loop.evaluate(state)
    loop.writer.write(0, {"eval_loss": loss, "eval_bpb": bpb})
    log.info("step 0: eval loss %.4f nats/token, %s bits/byte", loss, _fmt(bpb))
    return loss, bpb


def _initial_state(run: RunConfig, model, tx, mesh, ckpt: Checkpointer, it, layout):
    """(state, its shardings, first step): fresh parameters initialised into their shardings,
    replaced by the newest checkpoint that verifies (restored onto this mesh, `it` rewound),
    its MoE stack then put in `layout`'s row order."""
    state, abstract, shardings = create_sharded_state(
        jax.random.key(run.seed),
        model,
        tx,
        mesh,
        run.data.seq_len,
        run.optim.host_offload,
        layout,
    )
    start, restored = ckpt.restore_latest(abstract, it)
    if start is not None:
        del state
        state = layout.stored(restored, shardings)
        log.info("resumed from the checkpoint at step %d", start)
    return state, shardings, int(start or 0)


def _finish(summary: dict[str, Any], loop: _Loop, state, tokenizer, workdir: str) -> None:
    """The chief's end of a completed run: loss.png, the samples, summary.json."""
    summary["plot"] = os.path.join(workdir, "loss.png")
    metrics.plot_loss(os.path.join(workdir, "metrics.jsonl"), summary["plot"])
    run = loop.run
    summary["sample"], summary["heldout_sample"] = _sample(
        run.model, state, tokenizer, run, loop.layout
    )
    if summary["sample"] is not None:
        parsed, lines = sample_python_lines(summary["sample"])
        summary["sample_python_lines"] = {"parse": parsed, "lines": lines}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per `config` in `workdir` (resuming from its latest checkpoint); returns a summary."""
    workdir = prepare_workdir(workdir)
    run = run_config.parse(config)  # validated once; the rest reads `run`
    mesh = run_config.make_mesh(run)
    cfg = run.model
    chief = jax.process_index() == 0
    write_config(workdir, config)
    tokenizer = data.get_tokenizer(run, workdir)
    model = Transformer(cfg)
    tx, schedule = make_optimizer(run)
    _log_model(cfg, mesh)
    # Measured on CPU (a matmul), so before the mesh context.
    peak, peak_source = metrics.peak_flops_per_device(jax.devices()[0], cfg.dtype)
    peak_total = peak * jax.device_count() if peak else None

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        it = data.make_iterator(
            run,
            tokenizer,
            "train",
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        ckpt = Checkpointer(workdir, every=run.checkpoint.every, keep=run.checkpoint.keep)
        latest = _complete(ckpt, run.train.steps)
        if latest is not None:
            ckpt.close()
            log.info("the run is complete: its checkpoint at step %d >= train.steps", latest)
            return {"step": latest, "complete": True, "peak_flops_source": peak_source}
        layout = stack_layout(cfg, run.train, dict(mesh.shape).get("stage", 1))
        state, shardings, start = _initial_state(run, model, tx, mesh, ckpt, it, layout)
        loop = _Loop(
            run,
            config,
            jit_train_step(model, tx, schedule, run, shardings=shardings, mesh=mesh),
            _make_evaluate(run, model, tokenizer, mesh, layout),
            it,
            ckpt,
            metrics.MetricWriter(workdir, is_chief=chief, resume_step=start),
            metrics.Progress(run.train.steps, start_step=start) if chief else None,
            metrics.train_flops_per_token(cfg, run.data.seq_len),
            peak_total,
            sharding.batch_sharding(mesh),
            layout,
        )
        t_start = time.perf_counter()
        initial = _eval_at_zero(loop, state) if start == 0 else None
        stop = StopFlag()
        with stop.installed():
            try:
                state, step, last, evaluated, rate = _run_steps(loop, state, start, stop)
            except TrainingError as e:
                raise TrainingError(f"{e} ({last_good(ckpt)})") from None
            finally:
                if loop.progress:
                    loop.progress.close()
                loop.writer.close()
                ckpt.close()

        if evaluated[0] is None and initial is not None:
            evaluated = initial
        summary: dict[str, Any] = {
            "step": step,
            "loss": last.get("loss"),
            "eval_loss": evaluated[0],
            "eval_bpb": evaluated[1],
            "tokens_per_sec": rate.steady,
            "wall_seconds": time.perf_counter() - t_start,
            "peak_flops_source": peak_source,
        }
        if peak_total and rate.steady:
            summary["mfu"] = rate.steady * loop.flops_per_token / peak_total
        if chief:
            initial = initial or _initial_eval(os.path.join(workdir, "metrics.jsonl"))
            summary["eval_loss_initial"], summary["eval_bpb_initial"] = initial or (None, None)
        if stop.reason:
            summary["stopped_by"] = stop.reason
            log.warning("stopped by %s at step %d; checkpoint saved", stop.reason, step)
            return summary
        if chief:
            _finish(summary, loop, state, tokenizer, workdir)
        return summary
