"""Train a DeepSeek-V3-style model: `python train.py --config=configs/small.py [--workdir=DIR]`.

Config overrides: `--config.train.steps=200 --config.mesh.expert=2 ...`. Rerunning the same command
resumes from the latest checkpoint in the work directory (default `runs/<config name>`).
Every failure a user can cause (config file or override, data, tokenizer, work directory,
checkpoints, a full disk) ends the run with one `error: ...` line on stderr and exit code 2; a
finished run's command reruns as a no-op (exit 0).
Multi-host: launch one process per host with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (or let `jax.distributed.initialize()` detect the cluster with
`--distributed`).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Work directory (default: runs/<config name>).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detected).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: coordinator HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


# Failures a user can cause (config, data, work directory, checkpoints, disk): one line, exit 2.
# OSError covers a full disk, permissions and missing files.
USER_ERRORS = (ValueError, OSError, ImportError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def fail(message: str) -> None:
    """Prints `error: message` on stderr and exits with code 2 (no traceback)."""
    sys.stderr.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class _DropOrbaxErrors(logging.Filter):
    """Orbax's background save threads log each failure with its traceback (a full disk gave
    ~110 of them) before `wait_until_finished` re-raises it, which becomes our one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
        return not (orbax and record.levelno >= logging.ERROR)


def _is_closed_loop_echo(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _drop_closed_loop_echoes() -> None:
    """After a failed async save, TensorStore's callbacks into Orbax's closed event loops print
    `RuntimeError: Event loop is closed` tracebacks (dozens); drop exactly those."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def on_exception(kind, value, tb):
        if not _is_closed_loop_echo(value):
            excepthook(kind, value, tb)

    def on_unraisable(unraisable):
        if not _is_closed_loop_echo(unraisable.exc_value):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


def _quiet_background_noise() -> None:
    """After a failure, background threads (Orbax's async save loop, grain prefetch) may log
    or print tracebacks while the process shuts down; they repeat the error already reported."""
    logging.disable(logging.CRITICAL)
    absl_logging.set_verbosity(absl_logging.FATAL)
    import threading

    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None


def _config_error(e: BaseException) -> str:
    """One line for a config file that fails to load (syntax error, exception, missing)."""
    if isinstance(e, SyntaxError):
        where = f"{e.filename}:{e.lineno}: " if e.filename else ""
        return f"cannot load --config: {where}{e.msg}"
    return f"cannot load --config: {type(e).__name__}: {_one_line(e)[:500]}"


def load_config():
    """The --config ConfigDict (config_flags loads the file lazily: any failure is one line)."""
    try:
        config = FLAGS.config
        config.keys()
        return config
    except Exception as e:  # noqa: BLE001  a config file can fail in any way a module can
        fail(_config_error(e))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    t_start = time.perf_counter()  # the wall time the last line reports
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    logging.getLogger("dsjax").setLevel(logging.INFO)
    absl_logging.get_absl_handler().addFilter(_DropOrbaxErrors())
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Event loop is closed" echoes
    _drop_closed_loop_echoes()
    config = load_config()
    import jax

    if FLAGS.coordinator_address or FLAGS.distributed:
        # Cross-process collectives for CPU devices (harmless where accelerators do the work).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    from dsjax.train import loop as train_lib

    workdir = FLAGS.workdir or os.path.join("runs", config.get("name", "run"))
    try:
        if config.get("trainer", "pretrain") == "grpo":  # R1-style RL (configs/grpo_arith.py)
            from dsjax.rl import loop as grpo_lib

            summary = grpo_lib.grpo_and_evaluate(config, workdir)
        else:
            summary = train_lib.train_and_evaluate(config, workdir)
    except (*USER_ERRORS, train_lib.TrainingError) as e:
        _quiet_background_noise()
        fail(_one_line(e))
    if summary.get("complete"):
        print(
            f"done: the run in {os.path.abspath(workdir)} is complete (step {summary['step']}, "
            f"config.train.steps={config.train.steps}); raise --config.train.steps to train on"
        )
        return
    summary.setdefault("process_seconds", time.perf_counter() - t_start)
    _report(summary, workdir, jax.process_index() == 0)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.6f}"


def _report(summary, workdir: str, chief: bool) -> None:
    # Every process reports the loss it computed (they must agree); the chief adds the rest.
    print(
        f"done: step {summary['step']}, loss {_fmt(summary.get('loss'))}, "
        f"eval loss {_fmt(summary.get('eval_loss'))}"
    )
    if chief:
        rate = summary.get("tokens_per_sec")
        print(
            f"{summary['wall_seconds']:.0f}s"
            + (f", {rate:.0f} tokens/s" if rate else "")
            + (f", MFU {summary['mfu']:.1%}" if summary.get("mfu") else "")
            + f" (peak FLOP/s: {summary['peak_flops_source']})"
        )
        if summary.get("sample"):
            print("sample:\n" + summary["sample"])
        if summary.get("heldout_sample"):
            print(summary["heldout_sample"])
        lines = summary.get("sample_python_lines")
        if lines:
            print(
                f"sample: {lines['parse']} of {lines['lines']} lines parse as Python"
                " (each line alone; comment lines and a line cut off by the token budget left"
                " out)"
            )
        plot = os.path.join(os.path.abspath(workdir), "loss.png")
        if os.path.exists(plot):
            print(f"loss plot: {plot}")
        print(f"work directory: {os.path.abspath(workdir)}")
        print(_final_line(summary, plot if os.path.exists(plot) else None))


def _final_line(summary, plot: str | None) -> str:
    """`held-out: 7.66 → 3.80 nats/token (3.10 → 1.54 bits/byte); wall 9m12s; plot: PATH`."""
    from dsjax.train.metrics import format_duration

    def pair(a, b, digits=2):
        return (
            f"{'?' if a is None else f'{a:.{digits}f}'} → {'?' if b is None else f'{b:.{digits}f}'}"
        )

    parts = [
        f"held-out: {pair(summary.get('eval_loss_initial'), summary.get('eval_loss'))} nats/token"
        f" ({pair(summary.get('eval_bpb_initial'), summary.get('eval_bpb'))} bits/byte)",
        f"wall {format_duration(summary.get('process_seconds', summary.get('wall_seconds')))}",
    ]
    if plot:
        parts.append(f"plot: {plot}")
    return "; ".join(parts)


def parse_flags(argv):
    """absl flag parsing, but a bad flag, config key or config file is one line on stderr and
    exit code 2."""
    try:
        return FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        from dsjax.run_config import override_error

        # ml_collections reports a misspelled key as a repr'd multi-line KeyError ('foo'): the
        # config seam names the section, the key and the nearest valid keys instead.
        unknown = override_error(argv)
        if unknown:
            fail(unknown)
        text = str(e)[1:-1] if isinstance(e, KeyError | AttributeError) else str(e)
        text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
        fail(text)
    except Exception as e:  # noqa: BLE001  the config file is loaded while parsing overrides
        fail(_config_error(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
