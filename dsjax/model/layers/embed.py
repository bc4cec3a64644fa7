"""The token embedding lookup under a mesh, without materialising every token's embedding.

The table [V, D] is stored with D split over the chips that also split the tokens (`embed` ->
fsdp x expert x context in `dsjax.model.sharding`) and V over `tensor`. Left to itself, XLA looks
every token of the global batch up in each chip's D slice ([B, T, D/G] per chip) and then
reshards that to the tokens' layout with an all-reduce of a zero-padded [B, T, D] buffer: for V3
at 131K tokens x 8 sequences on v5p-256 a 14 GiB bf16 buffer per chip, and its 28 GiB float32
cotangent in the backward pass.

`embed_lookup` instead runs in `shard_map`: each chip all-gathers the token ids of its D group
(int32, 4 bytes per token), looks them up in its own [V/tensor, D/G] slice, and one all-to-all
over the group hands every chip the full D of its own tokens ([n, D]). Autodiff gives the
backward by the same route: the cotangent's all-to-all back and a scatter-add into the local
slice only. With V split over `tensor`, out-of-range ids contribute zero and the slices are
summed over `tensor` (a vocabulary-parallel embedding). Where D is whole (the decode layout,
`dsjax.model.sharding.logical_rules("decode")`) and V split, each chip looks its own tokens up
in its V slice and the slices are summed: no gather of the table. The split is read from the
rules in effect (`sharding.active_rules`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from dsjax.model.sharding import BATCH_AXES, active_rules


def _split(mesh, axes) -> tuple[str, ...]:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def embed_lookup(table_VD: jax.Array, tokens_BT: jax.Array, dtype) -> jax.Array:
    """`table[tokens]` in `dtype`: [B, T] int -> [B, T, D]. Under a mesh whose batch axes and
    `context` split the tokens evenly, the lookup of `embed_lookup`'s module docstring; else
    `jnp.take`."""
    mesh = jax.sharding.get_abstract_mesh()
    plain = lambda: jnp.take(table_VD.astype(dtype), tokens_BT, axis=0)  # noqa: E731
    if mesh.empty or tokens_BT.ndim != 2:
        return plain()
    v_spec, d_spec = nn.logical_to_mesh_axes(("vocab", "embed"), active_rules()) or (None, None)
    vocab, group = _split(mesh, v_spec), _split(mesh, d_spec)
    batch, context = _split(mesh, BATCH_AXES), _split(mesh, "context")
    B, T = tokens_BT.shape
    V, D = table_VD.shape
    G = math.prod(mesh.shape[a] for a in group)
    V_split = math.prod(mesh.shape[a] for a in vocab)
    fits = (
        B % math.prod(mesh.shape[a] for a in batch) == 0
        and T % math.prod(mesh.shape[a] for a in context) == 0
        and D % G == 0
        and V % V_split == 0
        and set(group) <= set(batch + context)  # the D group's chips hold tokens to swap
    )
    if not (group or vocab) or not fits:
        return plain()

    def local(table, tokens):
        b, t = tokens.shape
        ids = tokens.reshape(-1)
        if group:
            ids = jax.lax.all_gather(ids, group, tiled=True)  # [G * n]
        if vocab:
            start = jax.lax.axis_index(vocab) * table.shape[0]
            ids = ids - start
            inside = (ids >= 0) & (ids < table.shape[0])
            rows = jnp.take(table.astype(dtype), jnp.where(inside, ids, 0), axis=0)
            rows = jax.lax.psum(jnp.where(inside[:, None], rows, 0), vocab)
        else:
            rows = jnp.take(table.astype(dtype), ids, axis=0)  # [G * n, D / G]
        if group:
            rows = jax.lax.all_to_all(rows, group, 0, 1, tiled=True)  # [n, D]
        return rows.reshape(b, t, -1)

    tok = P(batch or None, context or None)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(vocab or None, group or None), tok),
        out_specs=P(batch or None, context or None, None),
    )
    return fn(table_VD, tokens_BT)
