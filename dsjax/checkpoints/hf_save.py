"""Writing Hugging Face checkpoints: `save_hf_checkpoint` (the overview is in `hf.py`).

Safetensors are written by hand, one tensor at a time, into a temporary directory beside the
target that is renamed into place at the end, so an interrupted save never damages an existing
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.core import meta

from dsjax.checkpoints import hf_fp8
from dsjax.checkpoints.hf_table import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    Path_,
    TensorEntry,
    hf_tensor_table,
)
from dsjax.checkpoints.safetensors_io import EXTRA_TO_NP
from dsjax.checkpoints.safetensors_io import NP_TO_ST as _NP_TO_ST
from dsjax.checkpoints.safetensors_io import ST_TO_NP as _ST_TO_NP
from dsjax.model.config import DTYPES, ModelConfig


def _get_leaf(variables: Mapping[str, Any], collection: str, path: Path_) -> Any:
    """The leaf at `collection/path` of a variables tree (ValueError naming it if absent)."""
    node: Any = variables
    for part in (collection, *path):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"variables lack leaf {'/'.join((collection, *path))}")
        node = node[part]
    return node


def _leaf_paths(node: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Paths of every leaf of a nested mapping."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _leaf_paths(v, (*prefix, str(k)))
    else:
        yield prefix


_ALL_CODES = {**_ST_TO_NP, **EXTRA_TO_NP}


class _HostSlices:
    """Fetches (leaf, layer) slices to host memory, keeping only the current block's slices."""

    def __init__(self, variables: Mapping[str, Any]):
        self.variables = variables
        self.block: str | None = None
        self.cache: dict[tuple[str, Path_, int | None], np.ndarray] = {}

    def tensor(self, e: TensorEntry) -> np.ndarray:
        """Tensor `e` in HF layout (a view of the cached host slice)."""
        if e.block != self.block:
            self.cache.clear()
            self.block = e.block
        slot = (e.collection, e.path, e.layer)
        host = self.cache.get(slot)
        if host is None:
            leaf = _get_leaf(self.variables, e.collection, e.path)
            host = np.asarray(leaf if e.layer is None else leaf[e.layer])
            self.cache[slot] = host
        arr = host if e.expert is None else host[e.expert]
        return arr.T if e.transpose else arr


def _write_shard(
    file: Path,
    entries: list[TensorEntry],
    codes: dict[str, str],
    fetch: Callable[[TensorEntry], np.ndarray],
) -> None:
    """Writes one safetensors file, streaming tensors one at a time (header first)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        nbytes = math.prod(e.shape) * _ALL_CODES[codes[e.key]].itemsize
        header[e.key] = {
            "dtype": codes[e.key],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            arr = np.ascontiguousarray(fetch(e), dtype=_ALL_CODES[codes[e.key]])
            if arr.shape != e.shape:
                raise ValueError(f"{e.key}: tensor has shape {arr.shape}, expected {e.shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def _plan_shards(
    entries: list[TensorEntry], codes: dict[str, str], max_shard_bytes: int
) -> list[list[TensorEntry]]:
    """Splits entries, in order, into shards of at most `max_shard_bytes` (one oversized
    tensor gets a shard of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e.shape) * _ALL_CODES[codes[e.key]].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def _replace_dir(tmp: Path, path: Path) -> None:
    """Moves `tmp` to `path`; an existing `path` is moved aside first and deleted last."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old)


def save_hf_checkpoint(
    path: str | os.PathLike,
    cfg: ModelConfig,
    variables: Mapping[str, Any],
    *,
    max_shard_bytes: int = 4 << 30,
    dtype: Any = None,
    fp8: bool = False,
    fp4_experts: bool = False,
) -> None:
    """Writes `variables` as a Hugging Face checkpoint directory loadable by transformers.

    Writes config.json (`cfg.to_hf()`), safetensors shard(s) of at most `max_shard_bytes`
    (a larger single tensor gets a shard of its own) with per-expert keys and torch [out, in]
    layout, `model.safetensors.index.json` when there is more than one shard, and for each MTP
    layer copies of the embedding and output head. `dtype` casts every parameter (None keeps
    each leaf's dtype; a float8 leaf saved without fp8 is dequantised to float32); the router
    bias stays float32.

    fp8=True writes the official FP8 release layout (docs/spec.md §7): every linear weight but the
    router and the output head as F8_E4M3 with a float32 `<name>_scale_inv` [ceil(out/128),
    ceil(in/128)], and `quantization_config` (fp8, e4m3, dynamic, 128x128) in config.json.
    FP8 leaves (a `keep_fp8=True` load: float8 `kernel` + `kernel_scale_inv`) are written bit
    for bit; float leaves are quantised per 128x128 block (scale = max-abs / 448).

    The files are written to a temporary directory beside `path` and renamed into place at
    the end: a failed save leaves an existing checkpoint at `path` untouched.

    DeepSeek-V4 (`cfg.arch == "v4"`): the official release naming and layout (`hf_v4.py`);
    fp8=True writes FP8 with power-of-two 128x128 scales where the release has FP8, and
    `fp4_experts=True` the routed experts in FP4 (1x32 power-of-two scales).
    """
    path = Path(path)
    variables = meta.unbox(variables)  # tolerate nn.Partitioned-boxed leaves straight from init
    if cfg.is_v4:
        from dsjax.checkpoints.hf_v4 import save_v4

        return save_v4(
            path, cfg, variables, max_shard_bytes=max_shard_bytes, dtype=dtype, fp8=fp8,
            fp4_experts=fp4_experts,
        )  # fmt: skip
    if fp4_experts:
        raise ValueError("fp4_experts=True is DeepSeek-V4's layout (cfg.arch == 'v4')")
    out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    table = hf_tensor_table(cfg)

    covered: set[tuple[str, Path_]] = set()
    fp8_leaves: set[tuple[str, Path_]] = set()
    for e in table:
        slot = (e.collection, e.path)
        if slot in covered:
            continue
        covered.add(slot)
        leaf = _get_leaf(variables, e.collection, e.path)
        if tuple(leaf.shape) != e.leaf_shape:
            raise ValueError(
                f"variables leaf {e.tree_name} has shape {tuple(leaf.shape)} but cfg implies "
                f"{e.leaf_shape}"
            )
        if np.dtype(leaf.dtype) == hf_fp8.FP8_DTYPE and not e.alias:
            if e.collection != "params" or not hf_fp8.fp8_eligible(e.path, e.transpose):
                raise ValueError(
                    f"variables leaf {e.tree_name} is float8_e4m3fn but {e.key} is never FP8 "
                    "(embedding, norms, router and output head stay in high precision)"
                )
            scale_slot = (e.collection, hf_fp8.scale_path(e.path))
            parent = _get_leaf(variables, e.collection, e.path[:-1])
            hf_fp8.check_fp8_leaf(e.tree_name, e.leaf_shape, parent.get(scale_slot[1][-1]))
            fp8_leaves.add(slot)
            covered.add(scale_slot)
    for collection in ("params", "moe_bias"):
        for p in _leaf_paths(variables.get(collection, {})):
            if (collection, p) not in covered:
                raise ValueError(
                    f"variables leaf {'/'.join((collection, *p))} has no Hugging Face tensor "
                    "for this config"
                )

    if cfg.scoring_func == "softmax":
        # V2 checkpoints have no router correction bias.
        table = [e for e in table if e.collection != "moe_bias"]
    quantise = {
        e.key
        for e in table
        if fp8 and e.collection == "params" and hf_fp8.fp8_eligible(e.path, e.transpose)
    }
    codes: dict[str, str] = {}
    entries: list[TensorEntry] = []
    for e in table:
        entries.append(e)
        if e.key in quantise:
            codes[e.key] = "F8_E4M3"
            entries.append(hf_fp8.scale_entry(e))
            codes[entries[-1].key] = "F32"
            continue
        if e.collection == "moe_bias":
            np_dtype = np.dtype(np.float32)
        elif (e.collection, e.path) in fp8_leaves:
            np_dtype = out_dtype or np.dtype(np.float32)  # dequantised
        else:
            np_dtype = out_dtype or np.dtype(_get_leaf(variables, e.collection, e.path).dtype)
        if np_dtype not in _NP_TO_ST:
            raise ValueError(f"cannot save {e.tree_name} as {np_dtype}")
        codes[e.key] = _NP_TO_ST[np_dtype]
    shards = _plan_shards(entries, codes, max_shard_bytes)

    hf = cfg.to_hf()
    hf.pop("quantization_config", None)
    if fp8:
        hf["quantization_config"] = json.loads(json.dumps(hf_fp8.QUANTIZATION_CONFIG))
    name = _ST_TO_NP[codes["model.embed_tokens.weight"]].name
    if name in DTYPES:
        hf["torch_dtype"] = hf["dtype"] = name

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        fetch = hf_fp8.Fp8Fetch(_HostSlices(variables).tensor, fp8_leaves, quantise)
        if len(shards) == 1:
            _write_shard(tmp / SINGLE_FILE, shards[0], codes, fetch)
        else:
            weight_map: dict[str, str] = {}
            total = 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_shard(tmp / fname, shard, codes, fetch)
                for e in shard:
                    weight_map[e.key] = fname
                    total += math.prod(e.shape) * _ST_TO_NP[codes[e.key]].itemsize
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
