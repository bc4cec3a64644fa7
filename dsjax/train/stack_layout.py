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
        leaves from model order into the stored order. Sharded arrays are consumed (donated,
        one leaf at a time, so the conversion holds one extra leaf at most)."""
        return self._permute(tree, self.order, donate=True)

    def model(self, tree, *, to_host: bool = False):
        """The inverse of `stored`, leaving `tree` as it is. `to_host`: sharded results in host
        memory (`pinned_host`, where the devices have it; what a checkpoint save reads), so the
        model-order copy takes no accelerator memory."""
        if self.order is None:
            return tree
        rows = tuple(int(i) for i in np.argsort(self.order))
        return self._permute(tree, rows, to_host=to_host)

    def _permute(self, tree, rows: tuple[int, ...] | None, **how):
        if rows is None:
            return tree
        if hasattr(tree, "opt_state") and hasattr(tree, "moe_bias"):  # a train state
            return tree.replace(
                params=self._permute(tree.params, rows, **how),
                opt_state=self._permute(tree.opt_state, rows, **how),
            )

        def leaf(path, x):
            under = any(getattr(k, "key", None) == STACK for k in path)
            if not under or getattr(x, "ndim", 0) == 0 or x.shape[0] != len(rows):
                return x
            return _take_rows(x, rows, **how)

        return jax.tree_util.tree_map_with_path(leaf, tree)


def stack_layout(cfg, train_cfg, stages: int) -> StackLayout:
    """The layout of the train state's MoE stack for `stages` pipeline ranks running
    `train_cfg`'s schedule (`run_config.pipeline_settings`); model order without a pipeline."""
    if stages <= 1 or not cfg.num_moe_layers:
        return StackLayout()
    schedule, microbatches = run_config.pipeline_settings(train_cfg, stages)
    return StackLayout.of(ps.make_schedule(schedule, stages, microbatches), cfg.num_moe_layers)


def _take_rows(x, rows: tuple[int, ...], donate: bool = False, to_host: bool = False):
    """x[rows] along the first axis: traced inside jit, numpy on the host, on one device by
    `jnp.take`, else a jitted gather into x's own sharding over its mesh (in device memory;
    the result back in x's memory kind, or `to_host` in pinned host memory where there is one)."""
    if isinstance(x, jax.core.Tracer):
        return jnp.take(x, np.asarray(rows), axis=0)
    if not isinstance(x, jax.Array):
        return np.take(np.asarray(x), rows, axis=0)
    target = x.sharding
    if not isinstance(target, jax.sharding.NamedSharding):  # one device
        return jnp.take(x, np.asarray(rows), axis=0)
    kinds = {m.kind for m in x.addressable_shards[0].device.addressable_memories()}
    if to_host and "pinned_host" in kinds:
        target = target.with_memory_kind("pinned_host")
    if x.sharding.memory_kind not in (None, "device"):  # host-offloaded: gather on the chips
        x, donate = jax.device_put(x, x.sharding.with_memory_kind("device")), True
    # One leaf's gather finishes before the next is dispatched: conversions are rare (init,
    # restore, save, eval), and dozens of collective programs in flight at once aborted
    # XLA:CPU's fake-device runtime (a CI worker, no message).
    y = jax.block_until_ready((_gather_donated if donate else _gather)(x, rows, x.sharding))
    return y if target.is_equivalent_to(y.sharding, y.ndim) else jax.device_put(y, target)


def _gather_rows(x, rows: tuple[int, ...], target):
    return jax.lax.with_sharding_constraint(jnp.take(x, np.asarray(rows), axis=0), target)


_gather = jax.jit(_gather_rows, static_argnums=(1, 2))
_gather_donated = jax.jit(_gather_rows, static_argnums=(1, 2), donate_argnums=0)
