"""Decoding on a device mesh: a mesh, the layout its rules follow, and the weights placed on it.

    dm = DecodeMesh.parse("expert=2,tensor=4")        # layout "decode" by default
    variables = dm.place(cfg, variables)              # each weight split as the layout says
    generate(cfg, variables, prompts, 32, mesh=dm)    # or serve.py --mesh=expert=2,tensor=4

The layout names a row set of the one rule table (`dsjax.model.sharding.logical_rules`):
"decode" splits the routed experts over `expert` and the widths (heads, mlp, vocab) over
`tensor` and nothing over data/fsdp/context, so a decode step reads each weight where it lives
instead of gathering FSDP shards; requests split over the batch axes, the attention core and the
latent cache over every chip (data-parallel attention). "fsdp" is the training layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.model import sharding
from dsjax.model.config import ModelConfig
from dsjax.model.transformer import abstract_variables

__all__ = ["DecodeMesh"]


@dataclasses.dataclass(frozen=True)
class DecodeMesh:
    """A mesh and the layout (`sharding.LAYOUTS`) whose rules place weights and activations on
    it. Hashable: jitted programs take it as a static argument."""

    mesh: Mesh
    layout: str = "decode"

    def __post_init__(self):
        sharding.logical_rules(self.layout)  # validates the name

    @classmethod
    def parse(cls, text: str, layout: str = "decode", devices=None) -> DecodeMesh:
        """`"expert=2,tensor=4"` (axes of `sharding.MESH_AXES`; `data` defaults to the rest)."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in sharding.MESH_AXES or not value.strip().lstrip("-").isdigit():
                raise ValueError(
                    f"--mesh={text!r}: expected comma-separated AXIS=SIZE with AXIS one of "
                    f"{', '.join(sharding.MESH_AXES)} (e.g. expert=2,tensor=4)"
                )
            sizes[name] = int(value)
        return cls(sharding.make_mesh(**sizes, devices=devices), layout)

    @property
    def rules(self):
        return sharding.logical_rules(self.layout)

    @property
    def row_axes(self) -> tuple[str, ...]:
        """The mesh axes a batch of requests (the latent cache's rows) splits over."""
        return sharding.DECODE_CACHE_AXES if self.layout == "decode" else sharding.BATCH_AXES

    @property
    def row_shards(self) -> int:
        """Chips a batch of requests splits over (the latent cache's rows): a batch padded to a
        multiple of this splits evenly everywhere."""
        return math.prod(self.mesh.shape[a] for a in self.row_axes)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and the layout's rules, for tracing and running the model's programs."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def shardings(self, cfg: ModelConfig, variables):
        """NamedShardings for `variables` ({"params", "moe_bias"}, as loaded): each leaf by its
        logical axes in the layout's rules; the block scales of a kept-FP8 checkpoint's weights
        split like their weights where the blocks line up (`sharding.variable_shardings`)."""
        declared = nn.get_partition_spec(abstract_variables(cfg))
        return sharding.variable_shardings(declared, variables, self.mesh, self.rules)

    def place_rows(self, tree, batch_axes):
        """`tree` on the mesh with each leaf's batch axis (`batch_axes`, a matching tree of ints)
        split over the chips requests split over (`row_shards`) where it divides, else whole."""
        axes = self.row_axes

        def put(x, a):
            spec = [None] * x.ndim
            if x.ndim and x.shape[a] % self.row_shards == 0:
                spec[a] = axes
            return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec(*spec)))

        return jax.tree.map(put, tree, batch_axes)

    def place(self, cfg: ModelConfig, variables):
        """`variables` moved onto the mesh, each weight split as the layout says."""
        return jax.device_put(variables, self.shardings(cfg, variables))
