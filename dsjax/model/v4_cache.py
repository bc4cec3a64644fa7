"""DeepSeek-V4's decode caches (docs/spec.md §12 "Decode caches"): one typed struct per layer.

    V4LayerCache (every layer, the MTP block too)
      window      [B, W, d]    the last W key=value vectors, a ring: position p in slot p mod W
      window_pos  [B, W]       position + 1 held by each slot (0: empty)
      compressor  CompressorCache | None   (CSA and HCA layers)
      indexer     CompressorCache | None   (CSA layers: the lightning indexer's keys)

    CompressorCache (rate m, width c, overlap: CSA-style 2-window pooling)
      entries     [B, N, c]    compressed entries, entry w at index w, N = max_len // m
      kv          [B, K, k·c]  projected values of the last K tokens, slot p mod K (K = 2m with
                               overlap, holding the closing window and the one before; else m)
      gate        [B, K, k·c]  their gate logits + ape (float32); k = 2 with overlap, else 1
      pos         [B, K]       position + 1 held by each slot (0: empty)

Everything is indexed by absolute position, never shifted: rewriting a position (a rejected
draft's slot, a finished row's repeated step) reproduces the same state, and a forward
treats the slots holding positions at or after its first new token as stale
(`dsjax/model/layers/v4_decode.py`). `window`, `entries` and `kv` use the compute dtype.

Bytes: the window and the compressor buffers are fixed per request; entries grow with the
context (`cache_bytes`). The serving engine keeps the entries (compressor and indexer) in its
page pool, [.., pages, page_size // m, c] (`page_size`), and the rest one row per slot
(`dsjax/inference/engine_programs.py`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dsjax.model.config import CSA, HCA, SLIDING, ModelConfig

# Logical axes of every cache leaf (the one sharding rule table maps them, dsjax.model.sharding).
ENTRY_AXES = ("cache_batch", None, None)
POS_AXES = ("cache_batch", None)


@struct.dataclass
class CompressorCache:
    """A compressor's decode state (see the module docstring)."""

    entries: Any  # jax.Array (jax.ShapeDtypeStruct in `*_shapes`)
    kv: Any
    gate: Any
    pos: Any

    AXES = dict(entries=ENTRY_AXES, kv=ENTRY_AXES, gate=ENTRY_AXES, pos=POS_AXES)


@struct.dataclass
class V4LayerCache:
    """One V4 layer's decode state (see the module docstring)."""

    window: Any  # jax.Array (jax.ShapeDtypeStruct in `*_shapes`)
    window_pos: Any
    compressor: Any = None  # CompressorCache | None
    indexer: Any = None

    AXES = dict(window=ENTRY_AXES, window_pos=POS_AXES)


def compressor_shapes(batch: int, max_len: int, rate: int, dim: int, overlap: bool, dtype):
    """`CompressorCache` of jax.ShapeDtypeStructs."""
    K, width = (2 * rate, 2 * dim) if overlap else (rate, dim)
    sds = jax.ShapeDtypeStruct
    return CompressorCache(
        entries=sds((batch, max_len // rate, dim), dtype),
        kv=sds((batch, K, width), dtype),
        gate=sds((batch, K, width), jnp.float32),
        pos=sds((batch, K), jnp.int32),
    )


def layer_cache_shapes(cfg: ModelConfig, layer_type: str, batch: int, max_len: int):
    """`V4LayerCache` of jax.ShapeDtypeStructs for one layer of `layer_type`."""
    dtype = jnp.dtype(cfg.dtype)
    W, d = cfg.sliding_window, cfg.head_dim
    sds = jax.ShapeDtypeStruct
    comp = index = None
    if layer_type == CSA:
        comp = compressor_shapes(batch, max_len, cfg.compress_rate_csa, d, True, dtype)
        index = compressor_shapes(
            batch, max_len, cfg.compress_rate_csa, cfg.index_head_dim, True, dtype
        )
    elif layer_type == HCA:
        comp = compressor_shapes(batch, max_len, cfg.compress_rate_hca, d, False, dtype)
    elif layer_type != SLIDING:
        raise ValueError(f"unknown DeepSeek-V4 layer type {layer_type!r}")
    return V4LayerCache(
        window=sds((batch, W, d), dtype),
        window_pos=sds((batch, W), jnp.int32),
        compressor=comp,
        indexer=index,
    )


def zeros_layer_cache(cfg: ModelConfig, layer_type: str, batch: int, max_len: int):
    """A fresh (all empty) `V4LayerCache`."""
    shapes = layer_cache_shapes(cfg, layer_type, batch, max_len)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cache_axes(cache: Any) -> Any:
    """The logical axes of every leaf of a `V4LayerCache` (a pytree of tuples, same structure)."""

    def of(struct_obj):
        if struct_obj is None:
            return None
        fields = {}
        for f in dataclasses.fields(struct_obj):
            value = getattr(struct_obj, f.name)
            if isinstance(value, CompressorCache):
                fields[f.name] = of(value)
            elif value is not None:
                fields[f.name] = type(struct_obj).AXES[f.name]
        return struct_obj.replace(**fields)

    return of(cache)


def compression_rates(cfg: ModelConfig) -> tuple[int, ...]:
    """The compression rates of `cfg`'s layers, ascending (CSA's and HCA's where used)."""
    rates = {cfg.compress_rate_csa: CSA, cfg.compress_rate_hca: HCA}
    return tuple(sorted(r for r, t in rates.items() if t in cfg.layer_types))


def engine_page_size(cfg: ModelConfig, requested: int | None, default: int = 64) -> int:
    """The engine's cache page size for DeepSeek-V4: a page of `page_size` positions holds
    page_size / rate compressed entries of each layer, so it must be a multiple of every
    compression rate. `requested` None: the least multiple of `default` that is."""
    rates = compression_rates(cfg)
    if requested is None:
        return math.lcm(default, *rates)
    if any(requested % r for r in rates):
        raise ValueError(
            f"page_size={requested}: a DeepSeek-V4 cache page holds whole compressed entries, "
            f"so it must be a multiple of every compression rate {rates}"
        )
    return requested


def _nbytes(tree) -> int:
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, mtp: bool = True) -> dict[str, Any]:
    """DeepSeek-V4 decode-cache bytes for `batch` requests of `max_len` positions (the planner's
    and RESULTS' figure), from the shapes above (nothing allocated).

    Returns {"total", "fixed" (windows + compressor buffers, per request times batch),
    "entries" (compressed entries and indexer keys), "per_token" (entries bytes per request
    per position: what grows with the context), "per_request" (total / batch), "layers"
    [per-layer totals], "mtp" (the MTP blocks' windows)}."""
    layers = [layer_cache_shapes(cfg, t, batch, max_len) for t in cfg.layer_types]
    mtp_caches = [layer_cache_shapes(cfg, SLIDING, batch, max_len)] * (
        cfg.num_mtp_layers if mtp else 0
    )
    entries = sum(
        _nbytes(c.entries) for lc in layers for c in (lc.compressor, lc.indexer) if c is not None
    )
    total = sum(_nbytes(lc) for lc in [*layers, *mtp_caches])
    per_token_entries = 0.0
    for t in cfg.layer_types:
        item = jnp.dtype(cfg.dtype).itemsize
        if t == CSA:
            per_token_entries += (cfg.head_dim + cfg.index_head_dim) * item / cfg.compress_rate_csa
        elif t == HCA:
            per_token_entries += cfg.head_dim * item / cfg.compress_rate_hca
    return {
        "total": total,
        "fixed": total - entries,
        "entries": entries,
        "per_token": per_token_entries,
        "per_request": total / batch,
        "layers": [_nbytes(lc) for lc in layers],
        "mtp": sum(_nbytes(c) for c in mtp_caches),
    }


def latent_cache_bytes_per_token(cfg: ModelConfig) -> int:
    """DeepSeek-V3's latent cache per position (main layers, compute dtype): (kv_lora_rank +
    qk_rope_head_dim) values per layer, plus V3.2's indexer key when `use_dsa`."""
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim + (cfg.index_head_dim if cfg.use_dsa else 0)
    return width * cfg.num_hidden_layers * jnp.dtype(cfg.dtype).itemsize
