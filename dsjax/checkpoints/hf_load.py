"""Reading Hugging Face checkpoints: `load_hf_checkpoint` (the overview is in `hf.py`).

Validates before it allocates (config.json, index, every safetensors header, the tensor count
config.json implies, keys/shapes/dtypes against `hf_table.hf_tensor_table`, host memory), then
streams each tensor from the memory-mapped files into its preallocated stacked leaf.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from dsjax.checkpoints import hf_fp8
from dsjax.checkpoints.hf_fp8 import SCALE_SUFFIX, dequantize_fp8
from dsjax.checkpoints.hf_table import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    SUPPORTED_ARCHITECTURES,
    Path_,
    TensorEntry,
    _implied_tensor_count,
    _layer_of,
    hf_tensor_table,
)
from dsjax.checkpoints.safetensors_io import ST_TO_NP as _ST_TO_NP
from dsjax.checkpoints.safetensors_io import SafetensorsFile as _SafetensorsFile
from dsjax.checkpoints.safetensors_io import read_json_object
from dsjax.model.config import DTYPES, ModelConfig


def _checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, else model.safetensors."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = read_json_object(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError(f'{index} has no "weight_map" object of tensor name -> file name')
        names = list(dict.fromkeys(weight_map.values()))
        outside = [n for n in names if Path(n).name != n]
        if outside:
            raise ValueError(f"{index} lists shard(s) {outside} outside its directory")
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise ValueError(f"{index} lists shard(s) {missing} that do not exist")
        return [path / n for n in names]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _resolve_dtype(dtype: Any) -> str:
    """A dtype-like (jnp.float32, "bfloat16", ...) as a ModelConfig dtype name."""
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; expected one of {DTYPES}")
    return name


def _checkpoint_dtype(hf: Mapping[str, Any], where: dict[str, _SafetensorsFile]) -> str:
    """The checkpoint's parameter dtype: config.json `dtype`/`torch_dtype`, else the embedding's."""
    for field in ("dtype", "torch_dtype"):
        if hf.get(field) in DTYPES:
            return hf[field]
    key = "model.embed_tokens.weight"
    if key in where and where[key].dtype_code(key) in ("F32", "F16", "BF16"):
        return _ST_TO_NP[where[key].dtype_code(key)].name
    return "float32"


def _validate(
    path: Path,
    cfg: ModelConfig,
    hf_mtp: int,
    table: list[TensorEntry],
    where: dict[str, _SafetensorsFile],
    block: tuple[int, int],
) -> None:
    """Checks keys, shapes and dtypes from the headers alone, before any data is read."""
    by_key = {e.key: e for e in table}
    first_mtp = cfg.num_hidden_layers
    missing = [e for e in table if not e.alias and not e.optional and e.key not in where]
    if missing:
        mtp_missing = [e for e in missing if (_layer_of(e.key) or 0) >= first_mtp]
        if len(mtp_missing) == len(missing):
            names = ", ".join(e.key for e in mtp_missing[:4])
            more = f" and {len(mtp_missing) - 4} more" if len(mtp_missing) > 4 else ""
            raise ValueError(
                f"config.json num_nextn_predict_layers={hf_mtp} but MTP tensor(s) {names}{more} "
                f"are missing in {path} ({len(mtp_missing)} MTP tensors missing); pass "
                "load_mtp=False to load the model without MTP layers"
            )
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing tensor {missing[0].key} in {path}{more}")

    unexpected = []
    for key in where:
        if key in by_key or key.endswith("rotary_emb.inv_freq"):
            continue
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in by_key:
            continue
        layer = _layer_of(key)
        if layer is not None and layer >= first_mtp and cfg.num_mtp_layers == 0:
            continue  # MTP layers of a checkpoint loaded without MTP
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        unexpected.append(key)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(
            f"unexpected tensor {sorted(unexpected)[0]} in {path}{more}: it does not belong to "
            "the model described by config.json"
        )

    for e in table:
        if e.alias or e.key not in where:
            continue
        f = where[e.key]
        shape = f.shape(e.key)
        if shape != e.shape:
            raise ValueError(f"{e.key} has shape {shape} but config implies {e.shape} ({path})")
        code = f.dtype_code(e.key)
        scale_key = e.key + SCALE_SUFFIX
        if scale_key in where:
            if code != "F8_E4M3":
                raise ValueError(f"{e.key} has a {SCALE_SUFFIX} but dtype {code}, not F8_E4M3")
            if len(shape) != 2:
                raise ValueError(f"{e.key} is FP8 but not 2-D")
            expected = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
            got = where[scale_key].shape(scale_key)
            scale_code = where[scale_key].dtype_code(scale_key)
            if scale_code not in ("F32", "BF16", "F16"):
                raise ValueError(f"{scale_key} has dtype {scale_code}; FP8 scales are F32")
            if got != expected:
                raise ValueError(
                    f"{scale_key} has shape {got} but {e.key} {shape} with weight_block_size "
                    f"{list(block)} implies {expected}"
                )
        elif code == "F8_E4M3":
            raise ValueError(f"{e.key} is F8_E4M3 but has no {scale_key}")
        elif code not in _ST_TO_NP:
            raise ValueError(f"{e.key} has dtype {code}; supported: {sorted(_ST_TO_NP)}")


def _use_mtp(
    load_mtp: bool | str, hf: Mapping[str, Any], where: Mapping[str, Any], path: Path
) -> bool:
    """Whether to load the MTP layers config.json declares (see `load_hf_checkpoint`)."""
    if load_mtp != "auto":
        return bool(load_mtp)
    declared, layers = hf.get("num_nextn_predict_layers") or 0, hf.get("num_hidden_layers")
    if not isinstance(layers, int) or not isinstance(declared, int) or declared <= 0:
        return True  # nothing to decide here; from_hf reports bad values
    present = any((_layer_of(key) or -1) >= layers for key in where)
    if not present:
        warnings.warn(
            f"{path}: config.json says num_nextn_predict_layers={declared} but the checkpoint "
            f"holds no MTP tensors (model.layers.{layers}.* and up; transformers' "
            "save_pretrained does not save them): loading without MTP layers "
            "(num_mtp_layers=0)",
            stacklevel=3,
        )
    return present


def _check_sizes_against_files(path: Path, cfg: ModelConfig, where: Mapping[str, Any]) -> None:
    """config.json must not imply far more tensors than the files hold.

    Building the key table costs memory in proportion to the tensors the config implies
    (layers x experts), so a config.json with num_hidden_layers=10**6 is refused here, by
    arithmetic; a near miss goes on to `_validate`, which names the missing tensors.
    """
    count = _implied_tensor_count(cfg)
    if count > 2 * len(where) + 1024:
        what = (
            f"num_hidden_layers={cfg.num_hidden_layers}, n_routed_experts={cfg.n_routed_experts}, "
            f"num_mtp_layers={cfg.num_mtp_layers}"
        )
        raise ValueError(
            f"{path / CONFIG_FILE} ({what}) implies {count} tensors but the safetensors files "
            f"of {path} hold only {len(where)}: config.json does not describe these files"
        )


def available_host_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit (None if
    unknown)."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def _leaf_layout(
    table: list[TensorEntry], param_dtype: np.dtype, fp8_slots: set[tuple[str, Path_]]
) -> dict[tuple[str, Path_], tuple[tuple[int, ...], np.dtype]]:
    """`{(collection, path): (shape, dtype)}` of every leaf a load allocates: float leaves in
    `param_dtype` (the router bias float32), FP8 leaves float8_e4m3fn plus their float32
    `_scale_inv` siblings ([..., ceil(in/128), ceil(out/128)])."""
    layout: dict[tuple[str, Path_], tuple[tuple[int, ...], np.dtype]] = {}
    for e in table:
        slot = (e.collection, e.path)
        if e.alias or slot in layout:
            continue
        if slot in fp8_slots:
            layout[slot] = (e.leaf_shape, hf_fp8.FP8_DTYPE)
            scale_slot = (e.collection, hf_fp8.scale_path(e.path))
            layout[scale_slot] = (hf_fp8.kernel_scale_shape(e.leaf_shape), np.dtype(np.float32))
        else:
            dtype = np.dtype(np.float32) if e.collection == "moe_bias" else param_dtype
            layout[slot] = (e.leaf_shape, dtype)
    return layout


def _check_host_memory(
    path: Path, layout: Mapping[tuple[str, Path_], tuple[tuple[int, ...], np.dtype]]
) -> None:
    """The preallocated leaves (one model copy) must fit in the available host memory."""
    needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
    available = available_host_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"loading {path} needs {needed / 2**30:.1f} GiB of host memory for the parameters "
            f"but only {available / 2**30:.1f} GiB is available"
        )


def _copy_into(dest: np.ndarray, src: np.ndarray, transpose: bool, rows: int = 128) -> None:
    """`dest[...] = src.T` (or `src`), casting; the transpose goes in bands of `rows` source
    rows, several times faster than one strided copy of a large matrix."""
    if not transpose:
        dest[...] = src
        return
    for i in range(0, src.shape[0], rows):
        dest[:, i : i + rows] = src[i : i + rows].T


def _nest(flat: dict[tuple[str, Path_], Any]) -> dict[str, Any]:
    """`{(collection, path): leaf}` -> nested `{collection: {a: {b: leaf}}}`."""
    tree: dict[str, Any] = {}
    for (collection, path), leaf in flat.items():
        node = tree.setdefault(collection, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return tree


def load_hf_checkpoint(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    load_mtp: bool | str = "auto",
    config_overrides: Mapping[str, Any] | None = None,
    place: Callable[[np.ndarray], Any] | None = None,
    keep_fp8: bool = False,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Loads a Hugging Face DeepSeek-V3/V2/V3.2/V4 checkpoint directory into dsjax variables.

    DeepSeek-V4 (config.json `model_type: deepseek_v4`): the release's naming (or
    transformers' save_pretrained names), FP8 128x128 and FP4 1x32 power-of-two scales
    dequantised exactly, the MTP layer (`mtp.*`) and hash-routing tables (`moe_bias`
    `tid2eid`, int32); see `hf_v4.py`. With keep_fp8 its FP8 weights stay float8 (128x128
    `kernel_scale_inv` as below) and its FP4 routed experts float4_e2m1fn [E, in, out] (one
    code per byte) with `<name>_scale_inv` [E, ceil(in/32), out].

    Args:
      path: directory with config.json and model.safetensors (or sharded safetensors + index).
      dtype: parameter (and compute) dtype of the result; None keeps the checkpoint's own
        (config.json `dtype`/`torch_dtype`). FP8 weights are dequantised in float32 first.
        The router bias (`moe_bias`) is always float32.
      load_mtp: "auto" (default) loads the MTP layers when the checkpoint holds their tensors
        and drops them with one warning when it holds none (transformers' `save_pretrained`
        writes `num_nextn_predict_layers=1` but no MTP tensors); some but not all of them is
        an error naming the missing tensors. True requires them; False drops them. Dropped
        layers give a config with num_mtp_layers=0.
      config_overrides: extra ModelConfig fields (e.g. remat, attention_impl).
      place: called on each finished numpy leaf to make the returned array (default
        `jnp.asarray`); e.g. a `jax.device_put` with a sharding. Leaves are handed over one
        by one and the host copy dropped, so host memory peaks at about one model copy.
      keep_fp8: keep the FP8 weights of an FP8 checkpoint (the official release) as they are:
        each FP8 linear kernel becomes a float8_e4m3fn leaf [..., in, out] (the HF weight
        transposed; experts stacked per layer) with a float32 sibling `<name>_scale_inv`
        [..., ceil(in/128), ceil(out/128)] (the HF scale transposed), copied bit for bit from
        the files: no dequantised copy exists, host memory peaks at about one FP8 model copy.
        Other tensors follow `dtype`. A checkpoint without FP8 tensors has nothing to keep and
        loads as with keep_fp8=False. `dsjax.checkpoints.hf_fp8.dequantize_variables` turns the result
        into the keep_fp8=False one. Needs 128x128 blocks.

    Returns:
      (cfg, variables) with variables = {"params": ..., "moe_bias": ...} (moe_bias omitted
      when the model has no MoE layer).

    Raises:
      ValueError naming the offending tensor or config field on any mismatch.
    """
    path = Path(path)
    if load_mtp not in (True, False, "auto"):
        raise ValueError(f"load_mtp must be True, False or 'auto', got {load_mtp!r}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"no {CONFIG_FILE} in {path}")
    hf = read_json_object(config_path, "Hugging Face config.json")
    if hf.get("model_type") == "deepseek_v4":  # its own naming and quantisation (hf_v4.py)
        from dsjax.checkpoints.hf_v4 import load_v4

        name = None if dtype is None else _resolve_dtype(dtype)
        return load_v4(path, hf, name, load_mtp, config_overrides, place, keep_fp8)
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        raise ValueError(f"{config_path}: architectures={architectures!r} is not a list")
    if architectures and not set(map(str, architectures)) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(
            f"config.json architectures={architectures} is not supported; expected one of "
            f"{SUPPORTED_ARCHITECTURES}"
        )
    files = [_SafetensorsFile(p) for p in _checkpoint_files(path)]
    where: dict[str, _SafetensorsFile] = {}
    for f in files:
        for name in f.tensors:
            if name in where:
                raise ValueError(f"tensor {name} appears in both {where[name].path} and {f.path}")
            where[name] = f

    name = _checkpoint_dtype(hf, where) if dtype is None else _resolve_dtype(dtype)
    overrides: dict[str, Any] = {"dtype": name, "param_dtype": name}
    overrides.update(config_overrides or {})
    if not _use_mtp(load_mtp, hf, where, path):
        overrides["num_mtp_layers"] = 0
    try:
        cfg = ModelConfig.from_hf(hf, **overrides)
    except (TypeError, AttributeError, KeyError, OverflowError) as err:
        raise ValueError(f"{config_path} has a field of the wrong type: {err!r}") from None
    block = hf_fp8.block_size(hf)
    _check_sizes_against_files(path, cfg, where)  # before the table: it grows with the config
    table = hf_tensor_table(cfg)
    _validate(path, cfg, hf.get("num_nextn_predict_layers") or 0, table, where, block)
    param_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    scaled = {key[: -len(SCALE_SUFFIX)] for key in where if key.endswith(SCALE_SUFFIX)}
    fp8_slots = hf_fp8.kept_fp8_slots(table, scaled, block, config_path) if keep_fp8 else set()
    layout = _leaf_layout(table, param_dtype, fp8_slots)
    _check_host_memory(path, layout)

    leaves: dict[tuple[str, Path_], np.ndarray] = {}
    optional = {(e.collection, e.path) for e in table if e.optional}
    for slot, (shape, leaf_dtype) in layout.items():
        # Optional tensors default to zero; everything else is overwritten entirely.
        leaves[slot] = (np.zeros if slot in optional else np.empty)(shape, leaf_dtype)

    by_key = {e.key: e for e in table if not e.alias}
    for f in files:
        names = sorted(f.tensors, key=lambda n: f.tensors[n]["data_offsets"][0])
        for key in names:
            e = by_key.get(key)
            if e is None:
                continue
            arr = f.read(key)
            scale_key = key + SCALE_SUFFIX
            if (e.collection, e.path) in fp8_slots:  # raw FP8 bytes and the scale, transposed
                scale_leaf = leaves[(e.collection, hf_fp8.scale_path(e.path))]
                _copy_into(scale_leaf[e.index], where[scale_key].read(scale_key), True)
            elif scale_key in where:
                arr = dequantize_fp8(arr, where[scale_key].read(scale_key), block)
            _copy_into(leaves[(e.collection, e.path)][e.index], arr, e.transpose)
        f.close()
    for f in files:  # FP8 scale look-ups may have mapped another shard again
        f.close()

    place = place or jnp.asarray
    placed: dict[tuple[str, Path_], Any] = {}
    for slot in list(leaves):
        placed[slot] = place(leaves.pop(slot))
    return cfg, _nest(placed)
