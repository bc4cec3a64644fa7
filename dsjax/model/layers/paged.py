"""Cache pages as the model reads and writes them (docs/spec.md §14).

A program over page pools passes `Pages` to `Transformer(...)(..., pages=)`: every cache leaf in
the `cache` collection is then a pool of pages instead of one contiguous row per request,
[L, N, page, ...] in a scanned stack (its layers carried through the scan, each layer writing
its own slice in place) and [N, page, ...] in an MTP module. Request b's position p lives at
page `table_BP[b, p // page]`, offset p mod page; entries past a request's pages (and rows that
must not write) point at TRASH (page 0), whose contents nobody reads unmasked.

- `write`: scatters the new tokens' entries to their pages in place (positions past the table
  go to TRASH);
- `gather`: a layer's pages of each row as a contiguous [B, P * page, ...] view (the XLA gather
  path of the attention: one layer at a time, never the whole stack);
- `kernel_attention`: absorbed MLA over the pages by the Pallas kernel
  `dsjax.model.kernels.paged_mla`, reading each page in place (`impl`).

Under a decode mesh (`Pages.shards`: the mesh axes the rows split over, data-parallel attention)
the pools' page axis splits over the same axes and each chip holds its own rows' pages: the
tables then hold shard-local page ids (each shard's local page 0 is its TRASH) and all three run
in `shard_map` over those axes, so no page or table crosses a chip (`shard_tables` lays out
tables so).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

__all__ = ["IMPLS", "Pages", "TRASH", "gather", "resolve_impl", "shard_tables", "write"]

TRASH = 0  # the page unused page-table entries point at (= dsjax.inference.page_pool.TRASH)

# "xla": gather the pages, then the model's attention; "pallas": the Pallas TPU kernel;
# "pallas_interpret": the same kernel in Pallas' interpreter (any backend; tests);
# "auto": "pallas" on TPU, else "xla".
IMPLS = ("auto", "xla", "pallas", "pallas_interpret")

# The kernel takes T * heads query rows per request in VMEM: decode (T = 1) and speculative
# verification (T = 2) use it; longer prompt chunks take the gather path.
KERNEL_MAX_TOKENS = 2


@struct.dataclass
class Pages:
    """Page tables of a program's rows: table_BP [B, P] int32 page ids covering positions
    0..P*page-1. `layer`: the scanned stack's layer being run (set by the stack; None outside
    one, e.g. the MTP module). `impl`: how absorbed attention reads the pages (`IMPLS`).
    `shards`: the mesh axes (of the enclosing `jax.set_mesh`) that the rows and the pools' page
    axis split over, the tables holding shard-local ids (see the module docstring); () for
    global ids (one device, or GSPMD's gather across chips)."""

    table_BP: Any
    layer: Any = None
    impl: str = struct.field(pytree_node=False, default="xla")
    shards: tuple[str, ...] = struct.field(pytree_node=False, default=())


def resolve_impl(impl: str) -> str:
    """`impl` with "auto" resolved for the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"paged attention impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "xla"
    return impl


def _local_write(pool, table_BP, layer, positions_BT, values_BTX):
    page = pool.shape[-2]
    P_ = table_BP.shape[1]
    k_BT = positions_BT // page
    ids_BT = jnp.take_along_axis(table_BP, jnp.clip(k_BT, 0, P_ - 1), axis=1)
    ids_BT = jnp.where((k_BT >= 0) & (k_BT < P_), ids_BT, TRASH)
    lead = () if layer is None else (layer,)
    return pool.at[lead + (ids_BT, positions_BT % page)].set(values_BTX.astype(pool.dtype))


def _local_gather(pool, table_BP, layer):
    lead = () if layer is None else (layer,)
    g = pool[lead + (table_BP,)]  # one gather, also inside a scanned stack
    B, P_ = table_BP.shape
    return g.reshape((B, P_ * pool.shape[-2]) + pool.shape[-1:])


def _sharded(fn, pages: Pages, pool_ndims: tuple[int, ...], n_rows: int, out):
    """`fn(*pools, table, layer, *rows)` in shard_map over `pages.shards`: pools split on their
    page axis (the third from the end), the table and `n_rows` further row arrays on their first,
    the layer index whole; `out` "pool" (the first pool's spec) or "rows"."""
    axes = pages.shards
    pool_specs = tuple(P(*([None] * (d - 3)), axes, None, None) for d in pool_ndims)
    row = P(axes)
    in_specs = (*pool_specs, row, P(), *([row] * n_rows))
    return jax.shard_map(
        fn,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=in_specs,
        out_specs=pool_specs[0] if out == "pool" else row,
        check_vma=False,  # pallas_call declares no varying axes
    )


def write(pool, pages: Pages, positions_BT, values_BTX):
    """`pool` ([L, N, page, X] with `pages.layer`, else [N, page, X]) with values_BTX [B, T, X]
    written at each row's positions_BT (page `table[b, p // page]`, offset p mod page; positions
    past the table go to TRASH)."""
    if not pages.shards:
        return _local_write(pool, pages.table_BP, pages.layer, positions_BT, values_BTX)
    fn = _sharded(_local_write, pages, (pool.ndim,), 2, "pool")
    return fn(pool, pages.table_BP, pages.layer, positions_BT, values_BTX)


def gather(pool, pages: Pages):
    """The rows' pages of `pool` (this layer's) as contiguous caches [B, P * page, X]."""
    if not pages.shards:
        return _local_gather(pool, pages.table_BP, pages.layer)
    fn = _sharded(_local_gather, pages, (pool.ndim,), 0, "rows")
    return fn(pool, pages.table_BP, pages.layer)


def shard_tables(rows: int, pages_per_row: int, shards: int) -> tuple[np.ndarray, int]:
    """(tables [rows, pages_per_row] int32, pool pages) for rows that each own
    `pages_per_row` pages of a pool split evenly over `shards` chips with the rows: row r (of
    shard r // (rows / shards)) gets consecutive shard-local ids from 1, page 0 of every shard
    is its TRASH. The pool holds shards * (rows / shards * pages_per_row + 1) pages."""
    if rows % shards:
        raise ValueError(f"shard_tables: {rows} rows do not split over {shards} shards")
    per = rows // shards
    local = np.arange(rows) % per
    tables = 1 + local[:, None] * pages_per_row + np.arange(pages_per_row)[None]
    return tables.astype(np.int32), shards * (per * pages_per_row + 1)


def shard_count(shards: tuple[str, ...]) -> int:
    """Chips the `shards` axes of the enclosing mesh make (1 for none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in shards) if shards else 1


def kernel_applies(pages: Pages, T: int) -> bool:
    """Whether absorbed attention over `pages` for T new tokens per row runs the kernel."""
    return resolve_impl(pages.impl) != "xla" and T <= KERNEL_MAX_TOKENS


def kernel_attention(q_BTHL, latent_pool, k_pe_pool, pages: Pages, positions_BT, *, scale):
    """Absorbed attention by the Pallas kernel over the pages in place -> o_BTHC [B, T, H, C]
    (query t of row b at position positions_BT[b, t]); under `pages.shards`, each chip over its
    own rows and pages."""
    from dsjax.model.kernels.paged_mla import paged_mla_decode

    B, T, H, L = q_BTHL.shape
    interpret = resolve_impl(pages.impl) == "pallas_interpret"

    def local(latent, k_pe, table_BP, layer, q_BQL, pos_BT):
        if layer is None:  # [N, page, X]: one layer
            latent, k_pe, layer = latent[None], k_pe[None], jnp.int32(0)
        return paged_mla_decode(
            q_BQL, latent, k_pe, table_BP, pos_BT, layer, heads=H, scale=scale,
            interpret=interpret,
        )  # fmt: skip

    fn = local
    if pages.shards:
        fn = _sharded(local, pages, (latent_pool.ndim, k_pe_pool.ndim), 2, "rows")
    o_BQC = fn(
        latent_pool, k_pe_pool, pages.table_BP, pages.layer, q_BTHL.reshape(B, T * H, L),
        positions_BT,
    )  # fmt: skip
    return o_BQC.reshape(B, T, H, -1)
