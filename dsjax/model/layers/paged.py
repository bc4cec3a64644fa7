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
- `absorbed_attention`: absorbed MLA over the pages, by the XLA gather path or by the Pallas
  kernel `dsjax.model.kernels.paged_mla` reading each page in place (`impl`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["IMPLS", "Pages", "TRASH", "gather", "resolve_impl", "write"]

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
    one, e.g. the MTP module). `impl`: how absorbed attention reads the pages (`IMPLS`)."""

    table_BP: Any
    layer: Any = None
    impl: str = struct.field(pytree_node=False, default="xla")


def resolve_impl(impl: str) -> str:
    """`impl` with "auto" resolved for the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"paged attention impl={impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "xla"
    return impl


def _lead(pages: Pages) -> tuple:
    return () if pages.layer is None else (pages.layer,)


def write(pool, pages: Pages, positions_BT, values_BTX):
    """`pool` ([L, N, page, X] with `pages.layer`, else [N, page, X]) with values_BTX [B, T, X]
    written at each row's positions_BT (page `table[b, p // page]`, offset p mod page; positions
    past the table go to TRASH)."""
    page = pool.shape[-2]
    P = pages.table_BP.shape[1]
    k_BT = positions_BT // page
    ids_BT = jnp.take_along_axis(pages.table_BP, jnp.clip(k_BT, 0, P - 1), axis=1)
    ids_BT = jnp.where((k_BT >= 0) & (k_BT < P), ids_BT, TRASH)
    return pool.at[_lead(pages) + (ids_BT, positions_BT % page)].set(values_BTX.astype(pool.dtype))


def gather(pool, pages: Pages):
    """The rows' pages of `pool` (this layer's) as contiguous caches [B, P * page, X]."""
    g = pool[_lead(pages) + (pages.table_BP,)]  # one gather, also inside a scanned stack
    B, P = pages.table_BP.shape
    return g.reshape((B, P * pool.shape[-2]) + pool.shape[-1:])


def kernel_applies(pages: Pages, T: int) -> bool:
    """Whether absorbed attention over `pages` for T new tokens per row runs the kernel."""
    return resolve_impl(pages.impl) != "xla" and T <= KERNEL_MAX_TOKENS


def kernel_attention(q_BTHL, latent_pool, k_pe_pool, pages: Pages, positions_BT, *, scale):
    """Absorbed attention by the Pallas kernel over the pages in place -> o_BTHC [B, T, H, C]
    (query t of row b at position positions_BT[b, t])."""
    from dsjax.model.kernels.paged_mla import paged_mla_decode

    B, T, H, L = q_BTHL.shape
    if pages.layer is None:  # [N, page, X]: one layer
        latent_pool, k_pe_pool, layer = latent_pool[None], k_pe_pool[None], jnp.int32(0)
    else:
        layer = pages.layer
    o_BQC = paged_mla_decode(
        q_BTHL.reshape(B, T * H, L),
        latent_pool,
        k_pe_pool,
        pages.table_BP,
        positions_BT,
        layer,
        heads=H,
        scale=scale,
        interpret=resolve_impl(pages.impl) == "pallas_interpret",
    )
    return o_BQC.reshape(B, T, H, -1)
