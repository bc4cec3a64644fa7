"""Orbax checkpoints of a training run: model variables, optimizer state, data iterator, config.

Layout: `WORKDIR/checkpoints/<step>/{model, optimizer, data, config}`. `model` holds
`{"params", "moe_bias"}` alone so inference restores it without the optimizer state; `data` is the
Grain iterator position (one JSON file per process); `config` the run's ConfigDict as JSON.
Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint. Restoring takes the target shardings, so a
checkpoint restores onto a different mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from dsjax.config import ModelConfig


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` (async saves, keep the last N)."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, config, *, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`); returns whether it saved."""
        args = ocp.args.Composite(
            model=ocp.args.StandardSave({"params": state.params, "moe_bias": state.moe_bias}),
            optimizer=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(_config_json(config)),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iter):
        """Restores `step` into the shapes/shardings of `abstract_state`; moves `data_iter`."""
        target_model = {"params": abstract_state.params, "moe_bias": abstract_state.moe_bias}
        target_opt = {"step": abstract_state.step, "opt_state": abstract_state.opt_state}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(target_model),
                optimizer=ocp.args.StandardRestore(target_opt),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        model, opt = restored["model"], restored["optimizer"]
        return abstract_state.replace(
            step=opt["step"],
            params=model["params"],
            moe_bias=model["moe_bias"],
            opt_state=opt["opt_state"],
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _config_json(config) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return dict(config)


def model_config_from_run(config: dict[str, Any] | ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run's ConfigDict (or its JSON form)."""
    model = dict(config["model"])
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(model) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown field(s) {unknown}")
    return ModelConfig(**model)


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
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    cfg = model_config_from_run(config["config"])
    from dsjax.model import abstract_variables  # local: model imports nothing from here

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
