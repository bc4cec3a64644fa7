"""The row order of the MoE layer stack in the train state (docs/spec.md §13).

Under a pipeline (`mesh.stage` > 1) the train state stores `params["moe_layers"]` and the
optimizer moments of it in the schedule's row order (`pipeline.stack_order`: DualPipe's rank r
holds chunks r and 2N-1-r), so the step runs each rank's layers where they are stored and no
weight or gradient crosses `stage`. Everything outside the step sees model order: the loop
converts at its seam (`StackLayout.stored` once after init/restore; `StackLayout.model` for
checkpoints, evaluation and generation), so checkpoints do not depend on the mesh. The routing
biases (`moe_bias`, replicated) stay in model order. GPipe and 1F1B store model order already.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import run_config
from dsjax.train import pipeline
from dsjax.train import pipeline_schedule as ps

STACK = "moe_layers"


@dataclasses.dataclass(frozen=True)
class StackLayout:
    """`order`: the model layer each stored row of the MoE stack holds; None: model order."""

    order: tuple[int, ...] | None = None

    @classmethod
    def of(cls, s: ps.Schedule, layers: int) -> StackLayout:
        """The layout schedule `s` runs on, for `layers` MoE layers."""
        order = pipeline.stack_order(s, layers)
        if (order == np.arange(layers)).all():
            return cls()
        return cls(tuple(int(i) for i in order))

    def stored(self, tree):
        """`tree` (params, gradients, optimizer state or a TrainState) with its MoE stack
        leaves from model order into the stored order."""
        return self._permute(tree, self.order)

    def model(self, tree):
        """The inverse of `stored`."""
        if self.order is None:
            return tree
        return self._permute(tree, tuple(int(i) for i in np.argsort(self.order)))

    def _permute(self, tree, rows: tuple[int, ...] | None):
        if rows is None:
            return tree
        if hasattr(tree, "opt_state") and hasattr(tree, "moe_bias"):  # a train state
            return tree.replace(
                params=self._permute(tree.params, rows),
                opt_state=self._permute(tree.opt_state, rows),
            )

        def leaf(path, x):
            under = any(getattr(k, "key", None) == STACK for k in path)
            if not under or getattr(x, "ndim", 0) == 0 or x.shape[0] != len(rows):
                return x
            return _take_rows(x, rows)

        return jax.tree_util.tree_map_with_path(leaf, tree)


def stack_layout(cfg, train_cfg, stages: int) -> StackLayout:
    """The layout of the train state's MoE stack for `stages` pipeline ranks running
    `train_cfg`'s schedule (`run_config.pipeline_settings`); model order without a pipeline."""
    if stages <= 1 or not cfg.num_moe_layers:
        return StackLayout()
    schedule, microbatches = run_config.pipeline_settings(train_cfg, stages)
    return StackLayout.of(ps.make_schedule(schedule, stages, microbatches), cfg.num_moe_layers)


def _take_rows(x, rows: tuple[int, ...]):
    """x[rows] along the first axis: traced inside jit, numpy on the host, else a jitted gather
    into x's own sharding (a mesh's; device memory for the gather when x lives in host memory)."""
    if isinstance(x, jax.core.Tracer):
        return jnp.take(x, np.asarray(rows), axis=0)
    if not isinstance(x, jax.Array):
        return np.take(np.asarray(x), rows, axis=0)
    target = x.sharding
    if not isinstance(target, jax.sharding.NamedSharding):  # one device
        return jnp.take(x, np.asarray(rows), axis=0)
    if getattr(target, "memory_kind", None) not in (None, "device"):
        on_chip = jax.device_put(x, target.with_memory_kind("device"))
        return jax.device_put(_gather(on_chip, rows, on_chip.sharding), target)
    return _gather(x, rows, target)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gather(x, rows: tuple[int, ...], target):
    return jax.lax.with_sharding_constraint(jnp.take(x, np.asarray(rows), axis=0), target)
