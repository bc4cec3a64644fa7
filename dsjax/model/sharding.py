"""The one table of logical axis names -> mesh axes, and mesh construction.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and every large
activation a logical constraint; this file alone decides how those names map onto the mesh axes
`stage`, `data`, `fsdp`, `expert`, `context`, `tensor`. Flax resolves a logical name with the first rule whose mesh axis
is not already used by the same array, so `embed` shards parameters over `fsdp` but falls back to
replicated for activations whose batch dimension already took `fsdp`.

`context` is context parallelism: activations' sequence (`length`) dimension splits over it, and
parameters shard over it like over `fsdp` (a context-parallel mesh is also a weight-sharding one).
Only attention needs the other chips' tokens; it receives their MLA latent (`dsjax.model.layers.context`).

Layouts (`LAYOUTS`, `logical_rules(layout)`): rows of the table may name the one layout they apply
to; untagged rows apply to all. "fsdp" (the default, `LOGICAL_RULES`): parameters split over
fsdp x expert x context as above, gathered layer by layer; right for training and prefill, but a
decode step then gathers every weight once per step. "decode": no parameter is split over data,
fsdp or context (their `embed` / `q_lora` / `kv_lora` dims stay whole); the routed experts split
over `expert` and the widths (heads, mlp, vocab) over `tensor`, so every weight byte lives on
one chip of an expert x tensor group and no step gathers weights. Requests split over the batch
axes; the attention core and the latent cache (`cache_batch`) split them over `tensor` too
(data-parallel attention: the heads' projections stay tensor-parallel, the small absorbed
queries move to the chip holding their request's cache, and its output back).

Divisibility (`fit_spec`): where a parameter's dimension is not divided by the product of the
mesh axes its row names, it splits over the longest leading run of them that divides it, else
stays whole (V4-Pro's 1,536 q latent over fsdp x expert x context = 1 x 8 x 128 splits 8 ways,
over fsdp x expert). Every placement of parameters applies it: `logical_to_sharding(shapes=)`
(train state, optimizer state, planner), `variable_shardings` (decode), the pipeline's pins.

`stage` is pipeline parallelism (SPEC §13, `dsjax.train.pipeline`): the MoE layer stack's layer
dimension (logical `stage_layers`) splits over it in contiguous blocks, one per pipeline rank; the
rest of the model is replicated over it. It is the outermost axis, so across TPU slices (DCN)
only the pipeline's activations and gradients travel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dsjax.model import fp8

MESH_AXES = ("stage", "data", "fsdp", "expert", "context", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")
# A flattened [B*T] token dimension splits over the batch axes and then the sequence's `context`.
TOKEN_AXES = (*BATCH_AXES, "context")

LAYOUTS = ("fsdp", "decode")
# Rows of the attention core and the latent cache in the decode layout: every chip its own.
DECODE_CACHE_AXES = (*BATCH_AXES, "tensor")

# logical name -> mesh axes [-> the one layout the row applies to]. Order matters: the first
# row whose mesh axes are not already used wins (a None row pins the name to replicated).
RULE_TABLE: tuple[tuple, ...] = (
    ("batch", BATCH_AXES),
    # The attention core's and the latent cache's rows: in the decode layout over tensor too
    # (data-parallel attention); elsewhere as `batch`.
    ("cache_batch", DECODE_CACHE_AXES, "decode"),
    ("cache_batch", BATCH_AXES),
    ("length", "context"),
    ("expert", "expert"),  # before `embed`: rules are applied in this order
    # Decode layout: no weight split over fsdp / expert / context on these dims (no gathers).
    ("embed", None, "decode"),
    ("q_lora", None, "decode"),
    ("kv_lora", None, "decode"),
    # Parameters' embed dim over fsdp x expert x context (mesh order, so that XLA can turn the
    # gradients' reductions into reduce-scatters): weights without an expert dim
    # (attention, dense and shared FFNs, embedding, head) are then not replicated over the expert
    # or context axes; expert weights, whose expert dim took `expert`, fall through to the next.
    ("embed", ("fsdp", "expert", "context")),
    ("embed", ("fsdp", "context")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    # The latent ranks of the MLA up-projections (q_b [q_lora, H*K], kv_b [kv_lora, H*(K+V)]),
    # else replicated on every chip when tensor=1 (V3: 12 GiB fp32 per chip); activations' batch
    # dims have taken these axes, so their latent dims stay whole.
    ("q_lora", ("fsdp", "expert", "context")),
    ("q_lora", ("fsdp", "context")),
    ("q_lora", "fsdp"),
    ("kv_lora", ("fsdp", "expert", "context")),
    ("kv_lora", ("fsdp", "context")),
    ("kv_lora", "fsdp"),
    ("head_dim", None),
    # DeepSeek-V4: the grouped output projection's input (one group of heads' outputs) shards
    # like the q latent; the mHC streams and their small mixing weights stay whole.
    ("o_in", None, "decode"),
    ("o_in", ("fsdp", "expert", "context")),
    ("o_in", ("fsdp", "context")),
    ("o_in", "fsdp"),
    ("hc", None),
    ("hc_in", None),
    ("hc_mix", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("stage_layers", "stage"),  # the MoE stack's layer dim: one block per pipeline rank
    ("norm", None),
)


def logical_rules(layout: str = "fsdp") -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The rows of `RULE_TABLE` for `layout` ("fsdp" or "decode"), as flax takes them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    return tuple((row[0], row[1]) for row in RULE_TABLE if len(row) == 2 or row[2] == layout)


# The default ("fsdp") layout's rules.
LOGICAL_RULES = logical_rules("fsdp")


def dim_axes(names: tuple[str | None, ...], rules) -> list[tuple[str, ...]]:
    """The mesh axes each dimension of an array with logical axes `names` splits over under
    `rules` (() for a whole dimension)."""
    spec = nn.logical_to_mesh_axes(names, rules)
    out = []
    for axes in spec if spec is not None else [None] * len(names):
        out.append((axes,) if isinstance(axes, str) else tuple(axes or ()))
    return out


def active_rules() -> tuple:
    """The rules of the enclosing `nn.logical_axis_rules(...)`, else `LOGICAL_RULES`: for code
    that places arrays itself (shard_map specs) the way the parameters were placed."""
    return tuple(nn.get_logical_axis_rules()) or LOGICAL_RULES


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    expert: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    context: int = 1,
    stage: int = 1,
) -> Mesh:
    """A 6-axis mesh (stage, data, fsdp, expert, context, tensor); at most one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [stage, data, fsdp, expert, context, tensor]
    for name, size in zip(MESH_AXES, sizes, strict=True):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size}: must be a positive size or -1 (the rest)")
    if sizes.count(-1) > 1:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: at most one axis may be -1"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: {len(devices)} devices do not divide by "
                f"the fixed axes' product {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: product {math.prod(sizes)} != "
            f"{len(devices)} devices"
        )
    array = np.asarray(devices).reshape(sizes)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh) -> PartitionSpec:
    """`spec` made to divide an array of `shape`: a dimension whose mesh axes' product does not
    divide it splits over the longest leading run of those axes (in the rule's order) whose
    product does, else stays whole. E.g. a 1,536 dim under ("fsdp", "expert", "context") =
    1 x 8 x 128 splits over ("fsdp", "expert"), 8 ways. Dimensions that divide are unchanged."""
    out = list(spec)
    for i, axes in enumerate(out):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = names
        while kept and shape[i] % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        if kept != names:
            out[i] = kept[0] if len(kept) == 1 else (kept or None)
    return PartitionSpec(*out)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_RULES, shapes=None):
    """Maps a tree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings.

    `shapes`: the same tree's arrays (or ShapeDtypeStructs); each spec is then cut to what its
    array's dimensions divide (`fit_spec`). Without it a spec that does not divide its array
    fails where the sharding is used."""
    specs = nn.logical_to_mesh(logical_tree, rules)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    if shapes is not None:
        specs = jax.tree.map(
            lambda spec, x: fit_spec(spec, x.shape, mesh), specs, shapes, is_leaf=is_spec
        )
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=is_spec)


def scale_spec(
    kernel_spec: PartitionSpec, kernel_shape: tuple[int, ...], blocks: tuple[int, int], mesh: Mesh
) -> PartitionSpec:
    """The PartitionSpec of the block scales `<name>_scale_inv` [..., ceil(in/b0), ceil(out/b1)]
    of a stored low-precision weight `<name>` [..., in, out] placed by `kernel_spec`: leading
    dims as the weight's; each grid dim split like the weight's dim where every shard of that
    dim holds whole blocks (dim % (block x shards) == 0, so a shard's scales are its weight
    shard's), else whole (every chip holds the small grid)."""
    spec = list(kernel_spec) + [None] * (len(kernel_shape) - len(kernel_spec))
    for i, block in zip((-2, -1), blocks, strict=True):
        axes = spec[i]
        shards = math.prod(
            mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())
        )
        if kernel_shape[i] % (block * shards):
            spec[i] = None
    return PartitionSpec(*spec)


def variable_shardings(declared, variables, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for `variables` (a nested dict, arrays or ShapeDtypeStructs): each leaf
    the model declares (`declared`, logical PartitionSpecs from `nn.get_partition_spec`) by its
    logical axes under `rules`, cut to what its dimensions divide (`fit_spec`); the block
    scales `<name>_scale_inv` of a stored FP8/FP4 weight (a `keep_fp8` load) by `scale_spec`
    from their weight's; any other leaf whole."""
    specs = nn.logical_to_mesh(declared, rules)
    key = jax.tree_util.keystr
    spec_of = {
        key(p): s
        for p, s in jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
    }
    leaf_of = {key(p): x for p, x in jax.tree_util.tree_leaves_with_path(variables)}

    def one(path, leaf):
        if key(path) in spec_of:
            return NamedSharding(mesh, fit_spec(spec_of[key(path)], leaf.shape, mesh))
        name = str(getattr(path[-1], "key", ""))
        if name.endswith(fp8.SCALE_SUFFIX):
            weight = key((*path[:-1], jax.tree_util.DictKey(name[: -len(fp8.SCALE_SUFFIX)])))
            if weight in spec_of and weight in leaf_of:
                w = leaf_of[weight]
                w_spec = fit_spec(spec_of[weight], tuple(w.shape), mesh)
                spec = scale_spec(w_spec, tuple(w.shape), fp8.scale_blocks(w), mesh)
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, variables)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over data/fsdp/expert."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def rules_for_mesh(mesh: Mesh | jax.sharding.AbstractMesh, rules=LOGICAL_RULES):
    """`rules` with the mesh axes that `mesh` lacks dropped (a rule left with none maps to None).

    For a mesh of your own with only some of data/fsdp/expert/tensor (e.g. `("data", "fsdp")`):
    `with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for_mesh(mesh)): ...` and
    `logical_to_sharding(specs, mesh, rules_for_mesh(mesh))`.
    """
    names = set(mesh.axis_names)
    out = []
    for logical, axes in rules:
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in names)
        out.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(out)
