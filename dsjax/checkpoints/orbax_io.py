"""Orbax checkpoints of a run (supervised training and GRPO): model variables, optimizer state,
loop position, config.

Layout: `WORKDIR/checkpoints/<step>/<item>`. Every run has `model` (`{"params", "moe_bias"}`
alone, so inference restores it without the optimizer state), `optimizer` and `config` (the run's
ConfigDict as JSON). Training adds `data`, the Grain iterator position (one JSON file per
process); GRPO adds `reference` (the reference policy) and `loop` (JSON). `Checkpointer.save` /
`restore` are training's items; `save_items` / `restore_items` take any.
Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint. Restoring takes the target shardings, so a
checkpoint restores onto a different mesh.

Integrity: once a save has completed, the chief writes `WORKDIR/checkpoint_sums/<step>.json`,
the size and CRC-32 of every file of the step. Restoring verifies them first (a truncated or
bit-flipped array file, a deleted item, an emptied folder) and then restores; a step that fails
either is reported, moved to `WORKDIR/damaged_checkpoints/`, and the next older step is tried,
so a damaged newest checkpoint costs the steps since the previous one, never the run. (A step
saved just before the process was killed may lack its sums; it is then trusted as far as Orbax
can restore it.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from dsjax.model.config import ModelConfig

log = logging.getLogger("dsjax.checkpoints.orbax_io")

SUMS_DIR = "checkpoint_sums"
DAMAGED_DIR = "damaged_checkpoints"

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint problem a user must act on: every checkpoint damaged, an intact one that
    does not fit the run's config, a damaged one asked for by inference, or a failed save."""


def _crc32(path: str, chunk: int = 8 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _file_sums(step_dir: str) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file under `step_dir`."""
    sums = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, step_dir).replace(os.sep, "/")
            sums[rel] = [os.path.getsize(full), _crc32(full)]
    return sums


def step_dirs(directory: str) -> list[int]:
    """Completed step numbers in an Orbax directory (integer-named folders), ascending."""
    if not os.path.isdir(directory):
        return []
    names = (n for n in os.listdir(directory) if n.isdigit())
    return sorted(int(n) for n in names if os.path.isdir(os.path.join(directory, n)))


def verify_step(workdir: str, step: int) -> str | None:
    """Why checkpoint `step` of `workdir` is damaged, or None if it matches its sums (or has
    none yet)."""
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    sums_file = os.path.join(workdir, SUMS_DIR, f"{step}.json")
    if not os.path.isdir(step_dir):
        return "its folder is missing"
    present = _listing(step_dir)
    if not present:
        return "its folder is empty"
    if not os.path.isfile(sums_file):
        return None
    try:
        with open(sums_file) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its checksum file {sums_file} is unreadable ({e})"
    for rel, (size, crc) in sorted(expected.items()):
        full = os.path.join(step_dir, rel)
        if rel not in present:
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} were saved"
        if _crc32(full) != crc:
            return f"{rel} does not match its checksum (the bytes changed after saving)"
    return None


def newest_verified_step(workdir: str) -> int | None:
    """The newest step of `WORKDIR/checkpoints` whose files match their sums (None if none)."""
    for step in reversed(step_dirs(os.path.join(workdir, "checkpoints"))):
        if verify_step(workdir, step) is None:
            return step
    return None


def _listing(step_dir: str) -> set[str]:
    out = set()
    for root, _, files in os.walk(step_dir):
        for name in files:
            out.add(os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/"))
    return out


_CPU_HANDLER_SET = False


def _cpu_array_handler() -> None:
    """On the CPU backend, saves arrays without Orbax's replica-parallel slicing: it compiles a
    slicing program per array on the first save (about 20 s for a tiny model on 8 host devices,
    measured) to spread device-to-host copies that are free on a CPU. Accelerators keep it."""
    global _CPU_HANDLER_SET
    if jax.default_backend() == "cpu" and not _CPU_HANDLER_SET:
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # Orbax warns that it overrides its own default
        try:
            ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        finally:
            absl.setLevel(level)
        _CPU_HANDLER_SET = True


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` (async saves, keep the last N) that records
    checksums of each completed save and restores the newest step that verifies."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.sums_dir = os.path.join(self.workdir, SUMS_DIR)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.chief = jax.process_index() == 0
        _cpu_array_handler()
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, config, *, force: bool = False) -> bool:
        """Saves a training state if `step` is on the interval (or `force`); returns whether it
        saved."""
        items = dict(
            model=ocp.args.StandardSave({"params": state.params, "moe_bias": state.moe_bias}),
            optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            data=grain.checkpoint.CheckpointSave(data_iter),
        )
        return self.save_items(step, items, config, force=force)

    def save_items(self, step: int, items: dict[str, Any], config, *, force: bool = False) -> bool:
        """Saves Orbax `items` (name -> save args) and `config` (as the `config` item) if `step`
        is on the interval (or `force`); returns whether it saved."""
        self.wait()  # Orbax would wait for the previous save anyway; then record its sums
        args = ocp.args.Composite(**items, config=ocp.args.JsonSave(_config_json(config)))
        return self.manager.save(step, args=args, force=force)

    def seal(self) -> None:
        """Writes the checksums of completed steps that have none; drops those of deleted
        steps. Chief only; call after the saves have finished."""
        if not self.chief:
            return
        os.makedirs(self.sums_dir, exist_ok=True)
        steps = set(step_dirs(self.directory))
        for name in os.listdir(self.sums_dir):
            stem = name.removesuffix(".json")
            if stem.isdigit() and int(stem) not in steps:
                os.remove(os.path.join(self.sums_dir, name))
        for step in steps:
            target = os.path.join(self.sums_dir, f"{step}.json")
            if os.path.exists(target):
                continue
            sums = _file_sums(os.path.join(self.directory, str(step)))
            tmp = target + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"step": step, "files": sums}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)

    def newest_verified_step(self) -> int | None:
        """The newest step whose files match their sums (None if none)."""
        return newest_verified_step(self.workdir)

    def restore_latest(self, abstract_state, data_iter):
        """(step, training state) of the newest checkpoint that verifies and restores, or
        (None, None); see `restore_newest`."""
        return self.restore_newest(lambda step: self.restore(step, abstract_state, data_iter))

    def restore_newest(self, restore: Callable[[int], T]) -> tuple[int | None, T | None]:
        """(step, restore(step)) of the newest checkpoint that verifies and restores, or
        (None, None) when there is none at all. Damaged newer steps are reported and moved aside
        to `WORKDIR/damaged_checkpoints/` once a good one is found. CheckpointError (one line)
        if every checkpoint is damaged, or if one whose checksums match does not restore (the
        run's config no longer matches it: moving it aside would lose a good checkpoint)."""
        damaged: list[tuple[int, str]] = []
        steps = step_dirs(self.directory)
        for step in reversed(steps):
            reason = verify_step(self.workdir, step)
            state = None
            if reason is None:
                try:
                    state = restore(step)
                except Exception as e:  # noqa: BLE001  Orbax raises many kinds
                    if self._sealed(step):  # intact files: the run's config does not match
                        raise CheckpointError(
                            f"the checkpoint at step {step} in {self.directory} is intact but "
                            f"does not restore into this run (was the config changed?): "
                            f"{_one_line(e)}"
                        ) from e
                    reason = f"it cannot be restored: {_one_line(e)}"
            if reason is not None:
                log.warning("the checkpoint at step %d is damaged: %s", step, reason)
                damaged.append((step, reason))
                continue
            if damaged:
                self._move_aside([s for s, _ in damaged])
                log.warning(
                    "resuming from step %d, the newest good checkpoint (damaged step(s) %s "
                    "moved to %s)",
                    step,
                    [s for s, _ in damaged],
                    os.path.join(self.workdir, DAMAGED_DIR),
                )
            return step, state
        if damaged:
            listed = "; ".join(f"step {s}: {r}" for s, r in damaged)
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged ({listed}); move them away "
                "to start the run again"
            )
        return None, None

    def _sealed(self, step: int) -> bool:
        return os.path.isfile(os.path.join(self.sums_dir, f"{step}.json"))

    def _move_aside(self, steps: list[int]) -> None:
        """Moves damaged steps out of Orbax's directory (kept for inspection) and reopens it."""
        self.manager.close()
        if self.chief:
            target_root = os.path.join(self.workdir, DAMAGED_DIR)
            os.makedirs(target_root, exist_ok=True)
            for step in steps:
                target = os.path.join(target_root, str(step))
                if os.path.exists(target):
                    shutil.rmtree(target)
                shutil.move(os.path.join(self.directory, str(step)), target)
                sums = os.path.join(self.sums_dir, f"{step}.json")
                if os.path.exists(sums):
                    os.remove(sums)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("dsjax_move_damaged_checkpoints")
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def restore(self, step: int, abstract_state, data_iter):
        """Restores training's `step` into the shapes/shardings of `abstract_state`; moves
        `data_iter`."""
        target_model = {"params": abstract_state.params, "moe_bias": abstract_state.moe_bias}
        target_opt = {"step": abstract_state.step, "opt_state": abstract_state.opt_state}
        restored = self.restore_items(
            step,
            model=ocp.args.StandardRestore(target_model),
            optimizer=ocp.args.StandardRestore(target_opt),
            data=grain.checkpoint.CheckpointRestore(data_iter),
        )
        model, opt = restored["model"], restored["optimizer"]
        return abstract_state.replace(
            step=opt["step"],
            params=model["params"],
            moe_bias=model["moe_bias"],
            opt_state=opt["opt_state"],
        )

    def restore_items(self, step: int, **items: Any):
        """The Orbax `items` (name -> restore args) of `step`, as a mapping of name -> value."""
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def wait(self) -> None:
        """Waits for the pending save, then records the checksums of what it wrote.

        A failed save (disk full, permissions) raises CheckpointError in one line; Orbax
        leaves its temporary folder behind, which is never taken for a checkpoint."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001  Orbax re-raises the writer's error as is
            raise CheckpointError(
                f"saving a checkpoint in {self.directory} failed: {_one_line(e)}"
            ) from e
        self.seal()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _config_json(config) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return dict(config)


def model_config_from_run(config: dict[str, Any] | ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run's ConfigDict (or its JSON form), through `dsjax.run_config`
    (unknown keys and wrong types are one line naming the field)."""
    from dsjax.run_config import model_from_dict  # noqa: PLC0415

    return model_from_dict(config["model"])


def load_for_inference(workdir: str, step: int | None = None, *, dtype: str | None = None):
    """(ModelConfig, {"params", "moe_bias"}) from a train.py work directory's latest checkpoint.

    `dtype` ("float32", "bfloat16") overrides the compute dtype and casts the parameters.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir} has no checkpoints/ directory (not a train.py workdir)")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {directory}")
    reason = verify_step(os.path.abspath(workdir), step)
    if reason is not None:
        raise CheckpointError(f"the checkpoint at step {step} in {directory} is damaged: {reason}")
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    cfg = model_config_from_run(config["config"])
    from dsjax.model.transformer import abstract_variables  # local: model imports nothing from here

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        _unbox(abstract_variables(cfg)),
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract))
    )
    manager.close()
    variables = restored["model"]
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
        variables = {
            "params": jax.tree.map(lambda x: x.astype(dtype), variables["params"]),
            "moe_bias": variables["moe_bias"],
        }
    return cfg, variables


def _unbox(tree):
    from flax import linen as nn

    return nn.unbox(tree)
