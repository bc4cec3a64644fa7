"""The run scaffold that supervised training (`train/loop.py`) and GRPO (`rl/loop.py`) share.

- `prepare_workdir`: the work directory exists and is writable, else one ValueError line.
- `write_config`: `WORKDIR/config.json`, the run's ConfigDict (chief only).
- `StopFlag`: SIGTERM or a first Ctrl-C asks the loop to save a checkpoint and return; a second
  Ctrl-C stops at once.
- `check_finite` / `all_finite`: a non-finite loss stops the run with `TrainingError` naming the
  step; a checkpoint is only written of finite parameters (`save_if_finite`), so a poisoned state
  is never kept as the last good one.
- Checkpoints are `dsjax.checkpoints.orbax_io.Checkpointer`'s: async Orbax saves with per-file
  checksums, restoring the newest step that verifies.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dsjax.checkpoints.orbax_io import Checkpointer
from dsjax.train.step import TrainingError

__all__ = [
    "StopFlag",
    "TrainingError",
    "all_finite",
    "check_finite",
    "last_good",
    "prepare_workdir",
    "save_if_finite",
    "write_config",
]


def prepare_workdir(workdir: str) -> str:
    """Creates `workdir` if needed and checks it is a writable directory (ValueError if not)."""
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"the work directory {workdir} is not writable: {e.strerror or e}"
        ) from None
    return workdir


def write_config(workdir: str, config) -> None:
    """`WORKDIR/config.json`: the run's ConfigDict as JSON (the chief process writes it)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


class StopFlag:
    """Set by SIGTERM / the first Ctrl-C; the loop saves and exits at the next step."""

    def __init__(self):
        self.reason: str | None = None

    def __call__(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.reason = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@jax.jit
def all_finite(params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))


def check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict[str, float]]]:
    """Fetches pending step metrics; raises TrainingError on the first non-finite loss."""
    fetched = jax.device_get(pending)
    out = []
    for step, m in fetched:
        m = {k: float(v) for k, v in m.items()}
        if not math.isfinite(m["loss"]):
            raise TrainingError(f"loss is {m['loss']} at step {step}; stopping")
        out.append((step, m))
    return out


def save_if_finite(step: int, params, save: Callable[[], object]) -> None:
    """Calls `save()` if every parameter is finite, else raises TrainingError naming `step`."""
    if not bool(all_finite(params)):
        raise TrainingError(
            f"the parameters after step {step} are not finite; stopping without saving them"
        )
    save()


def last_good(ckpt: Checkpointer) -> str:
    """Names the newest checkpoint that verifies, for the message of a stopped run."""
    try:
        ckpt.wait()
    except Exception:  # noqa: BLE001  a failed pending save is reported by close()
        pass
    step = ckpt.newest_verified_step()
    return "no checkpoint kept" if step is None else f"the last good checkpoint is step {step}"
