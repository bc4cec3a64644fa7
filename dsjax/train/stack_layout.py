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
    """`order`: the model layer each stored row of the MoE stack holds, -1 for a padding row
    (a zero row no chunk reads, so that every rank stores an equal block); None: model order."""

    order: tuple[int, ...] | None = None

    @classmethod
    def of(cls, s: ps.Schedule, layers: int) -> StackLayout:
        """The layout schedule `s` runs on, for `layers` MoE layers."""
        order = pipeline.stack_order(s, layers)
        if len(order) == layers and (order == np.arange(layers)).all():
            return cls()
        return cls(tuple(int(i) for i in order))

    @property
    def layers(self) -> int | None:
        """MoE layers of the model (None: model order, any count)."""
        return None if self.order is None else sum(i >= 0 for i in self.order)

    def stored(self, tree, shardings=None):
        """`tree` (params, gradients, optimizer state or a TrainState) with its MoE stack
        leaves from model order into the stored order, padding rows zero. Sharded arrays are
        consumed (donated, one leaf at a time, so the conversion holds one extra leaf at most).
        `shardings` (a tree like `tree`; default each leaf's own): where the results go."""
        if self.order is None:
            return tree
        return self._permute(tree, self.order, shardings, donate=True)

    def model(self, tree, *, to_host: bool = False):
        """The inverse of `stored` (padding rows dropped), leaving `tree` as it is. `to_host`:
        sharded results in host memory (`pinned_host`, where the devices have it; what a
        checkpoint save reads), so the model-order copy takes no accelerator memory."""
        if self.order is None:
            return tree
        where = {layer: row for row, layer in enumerate(self.order) if layer >= 0}
        rows = tuple(where[i] for i in range(len(where)))
        return self._permute(tree, rows, None, to_host=to_host)

    def abstract(self, tree):
        """`tree` of `jax.ShapeDtypeStruct` in model order with its stack leaves' shapes as
        stored (their shardings kept): what the step is lowered on."""
        if self.order is None:
            return tree

        def leaf(x):
            return jax.ShapeDtypeStruct(
                (len(self.order), *x.shape[1:]), x.dtype, sharding=getattr(x, "sharding", None)
            )

        return self._map_stack(tree, self.layers, lambda x, _: leaf(x), None)

    def model_shardings(self, abstract):
        """`abstract` (model order) with each stack leaf's sharding split over its first axis
        only where the model's layer count divides over it (else that axis replicated): the
        placement a model-order copy (a restored checkpoint) can take."""
        if self.order is None:
            return abstract

        def leaf(x, _):
            s = getattr(x, "sharding", None)
            if not isinstance(s, jax.sharding.NamedSharding) or _divides(x.shape[0], s):
                return x
            spec = jax.sharding.PartitionSpec(None, *tuple(s.spec)[1:])
            return jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=jax.sharding.NamedSharding(s.mesh, spec)
            )

        return self._map_stack(abstract, self.layers, leaf, None)

    def _permute(self, tree, rows: tuple[int, ...], shardings, **how):
        source = self.layers if len(rows) == len(self.order or ()) else len(self.order or ())
        return self._map_stack(
            tree, source, lambda x, target: _take_rows(x, rows, target, **how), shardings
        )

    def _map_stack(self, tree, rows_in, fn, shardings):
        """fn(leaf, its target sharding or None) on each MoE stack leaf of `rows_in` rows."""
        if hasattr(tree, "opt_state") and hasattr(tree, "moe_bias"):  # a train state
            return tree.replace(
                params=self._map_stack(tree.params, rows_in, fn, shardings and shardings.params),
                opt_state=self._map_stack(
                    tree.opt_state, rows_in, fn, shardings and shardings.opt_state
                ),
            )

        def leaf(path, x, target=None):
            under = any(getattr(k, "key", None) == STACK for k in path)
            if not under or getattr(x, "ndim", 0) == 0 or x.shape[0] != rows_in:
                return x
            return fn(x, target)

        if shardings is None:
            return jax.tree_util.tree_map_with_path(leaf, tree)
        return jax.tree_util.tree_map_with_path(leaf, tree, shardings)


def stack_layout(cfg, train_cfg, stages: int) -> StackLayout:
    """The layout of the train state's MoE stack for `stages` pipeline ranks running
    `train_cfg`'s schedule (`run_config.pipeline_settings`); model order without a pipeline."""
    if stages <= 1 or not cfg.num_moe_layers:
        return StackLayout()
    schedule, microbatches = run_config.pipeline_settings(train_cfg, stages)
    return StackLayout.of(ps.make_schedule(schedule, stages, microbatches), cfg.num_moe_layers)


def _divides(n: int, s: jax.sharding.NamedSharding) -> bool:
    first = tuple(s.spec)[0] if len(tuple(s.spec)) else None
    axes = () if first is None else (first,) if isinstance(first, str) else tuple(first)
    return n % int(np.prod([s.mesh.shape[a] for a in axes], dtype=np.int64)) == 0


def _take_rows(x, rows: tuple[int, ...], target=None, donate: bool = False,
               to_host: bool = False):  # fmt: skip
    """x[rows] along the first axis, a row -1 zeros: traced inside jit, numpy on the host, on
    one device by `jnp.take`, else a jitted gather into `target` (default x's own sharding,
    its first axis replicated where the result's rows do not divide over it), in device memory
    (the result back in x's memory kind, or `to_host` in pinned host memory where there is one)."""
    idx = np.asarray(rows)
    idx = np.where(idx < 0, x.shape[0], idx)  # out of bounds: filled with zeros
    if isinstance(x, jax.core.Tracer):
        return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        return np.concatenate([x, np.zeros_like(x[:1])]).take(idx, axis=0)
    if not isinstance(x.sharding, jax.sharding.NamedSharding):  # one device
        return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)
    if target is None:
        target = x.sharding
        if not _divides(len(rows), target):
            spec = jax.sharding.PartitionSpec(None, *tuple(target.spec)[1:])
            target = jax.sharding.NamedSharding(target.mesh, spec, memory_kind=target.memory_kind)
    kinds = {m.kind for m in x.addressable_shards[0].device.addressable_memories()}
    if to_host and "pinned_host" in kinds:
        target = target.with_memory_kind("pinned_host")
    if x.sharding.memory_kind not in (None, "device"):  # host-offloaded: gather on the chips
        x, donate = jax.device_put(x, x.sharding.with_memory_kind("device")), True
    on_chips = (
        target.with_memory_kind("device") if target.memory_kind not in (None, "device") else target
    )
    # One leaf's gather finishes before the next is dispatched: conversions are rare (init,
    # restore, save, eval), and dozens of collective programs in flight at once aborted
    # XLA:CPU's fake-device runtime (a CI worker, no message).
    gather = _gather_donated if donate else _gather
    y = jax.block_until_ready(gather(x, tuple(int(i) for i in idx), on_chips))
    return y if target.is_equivalent_to(y.sharding, y.ndim) else jax.device_put(y, target)


def _gather_rows(x, rows: tuple[int, ...], target):
    y = jnp.take(x, np.asarray(rows), axis=0, mode="fill", fill_value=0)
    return jax.lax.with_sharding_constraint(y, target)


_gather = jax.jit(_gather_rows, static_argnums=(1, 2))
_gather_donated = jax.jit(_gather_rows, static_argnums=(1, 2), donate_argnums=0)
