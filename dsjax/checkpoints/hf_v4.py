"""DeepSeek-V4 checkpoints (HF `model_type: deepseek_v4`, docs/spec.md §12): reading and writing the
release format, called by `load_hf_checkpoint` / `save_hf_checkpoint`.

Tensors follow `hf_table_v4.v4_tensor_table` (official names; transformers' save_pretrained
names are accepted too, see `canonical_key`). Quantised tensors carry a sibling
`<name>.scale` (`F8_E8M0`: powers of two):
  FP8  weight F8_E4M3 [out, in], scale [ceil(out/128), ceil(in/128)];
  FP4  (routed experts of the instruct models) weight I8 [out, in/2], two e2m1 codes per byte
       (low nibble first), scale [out, in/32].
Both are dequantised to float32 exactly on load, then cast to the requested dtype. Saving with
`fp8=True` writes the release layout (FP8 where the release has it, routed experts FP8 or, with
`fp4_experts=True`, FP4) with power-of-two scales chosen so that a load/save cycle reproduces
every byte.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsjax.checkpoints import hf_fp8, hf_save
from dsjax.checkpoints.hf_load import _check_host_memory, _checkpoint_files, _copy_into, _nest
from dsjax.checkpoints.hf_table import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, Path_, TensorEntry
from dsjax.checkpoints.hf_table_v4 import (
    canonical_key,
    float32_leaf,
    fp8_in_release,
    is_routed_expert,
    v4_tensor_table,
)
from dsjax.checkpoints.safetensors_io import (
    EXTRA_TO_NP,
    NP_TO_EXTRA,
    NP_TO_ST,
    ST_TO_NP,
    SafetensorsFile,
)
from dsjax.model.config import ModelConfig

SCALE = ".scale"
FP8_BLOCK = (128, 128)
FP4_GROUP = 32
FP4_DTYPE = np.dtype(ml_dtypes.float4_e2m1fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(FP8_BLOCK),
    "scale_fmt": "ue8m0",
}


def scale_key(key: str) -> str:
    return key[: -len(".weight")] + SCALE


# ====================================================================== FP4
def dequantize_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """FP4 (e2m1) weights [out, in/2] int8 (low nibble = even column) with power-of-two scales
    [out, in/32] -> float32 [out, in]."""
    b = np.asarray(packed).view(np.uint8)
    codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1)
    w = codes.astype(np.uint8).view(FP4_DTYPE).astype(np.float32)
    return w * np.repeat(np.asarray(scale, np.float32), FP4_GROUP, axis=-1)[:, : w.shape[1]]


def quantize_fp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (int8 [out, in/2] packed e2m1 codes, e8m0 scales [out, in/32]):
    per 32 columns `s = 2^ceil(log2(max|w| / 6))` (halved when the max would round to 3),
    codes round to nearest even, saturating at ±6."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    if cols % FP4_GROUP:
        raise ValueError(f"FP4 needs the input dim ({cols}) to be a multiple of {FP4_GROUP}")
    groups = w.reshape(rows, cols // FP4_GROUP, FP4_GROUP)
    amax = np.abs(groups).max(-1)
    scale = hf_fp8.pow2_ceil(np.where(amax > 0, amax / 6.0, 1.0))
    # As for FP8 (`quantize_fp8(pow2=True)`): a group whose max rounds down to 3 gets half the
    # scale, so quantise(dequantise(q)) == q.
    top = (amax / scale).astype(FP4_DTYPE).astype(np.float32)
    scale = np.where((amax > 0) & (top <= 3.0), scale / 2, scale)
    q = np.clip(groups / scale[..., None], -6.0, 6.0)
    codes = q.reshape(rows, cols).astype(FP4_DTYPE).view(np.uint8)
    codes = codes & 0xF
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return packed, scale.astype(E8M0)


# ====================================================================== load
def _index(path: Path) -> dict[str, tuple[SafetensorsFile, str]]:
    """Official key -> (file, key as written)."""
    where: dict[str, tuple[SafetensorsFile, str]] = {}
    for p in _checkpoint_files(path):
        f = SafetensorsFile(p)
        for name in f.tensors:
            key = canonical_key(name)
            if key in where:
                raise ValueError(f"tensor {key} appears twice in {path} ({name})")
            where[key] = (f, name)
    return where


def _read(where, key: str) -> np.ndarray:
    f, name = where[key]
    return f.read(name, extra=True)


def _quantized(where, e: TensorEntry) -> tuple[str, np.ndarray, np.ndarray] | None:
    """("fp8" | "fp4", weight as stored, scale float32) for a quantised tensor `e` (shapes
    checked), None for a plain one."""
    f, name = where[e.key]
    code = f.dtype_code(name)
    sk = scale_key(e.key) if e.key.endswith(".weight") else None
    if sk is None or sk not in where:
        if code in ("F8_E4M3", "I8"):
            raise ValueError(f"{e.key} is {code} but has no {sk}")
        return None
    scale = _read(where, sk).astype(np.float32)
    out, inp = e.shape
    if code == "F8_E4M3":
        want = (math.ceil(out / FP8_BLOCK[0]), math.ceil(inp / FP8_BLOCK[1]))
        if f.shape(name) != e.shape or scale.shape != want:
            raise ValueError(
                f"{e.key}: FP8 weight {f.shape(name)} / scale {scale.shape}, expected {e.shape}"
                f" / {want}"
            )
        return "fp8", _read(where, e.key), scale
    if code == "I8":
        want = (out, math.ceil(inp / FP4_GROUP))
        if f.shape(name) != (out, inp // 2) or scale.shape != want:
            raise ValueError(
                f"{e.key}: FP4 weight {f.shape(name)} / scale {scale.shape}, expected "
                f"{(out, inp // 2)} / {want}"
            )
        return "fp4", _read(where, e.key), scale
    raise ValueError(f"{e.key} has a {SCALE} but dtype {code} (expected F8_E4M3 or I8)")


def _dequantized(where, e: TensorEntry) -> np.ndarray:
    """Tensor `e` from the files in float32 (or its integer type), FP8/FP4 dequantised."""
    q = _quantized(where, e)
    if q is None:
        f, name = where[e.key]
        if f.shape(name) != e.shape:
            raise ValueError(f"{e.key} has shape {f.shape(name)} but config implies {e.shape}")
        return _read(where, e.key)
    kind, w, scale = q
    if kind == "fp8":
        return hf_fp8.dequantize_fp8(w, scale, FP8_BLOCK)
    return dequantize_fp4(w, scale)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """int8 [out, in/2] (two e2m1 codes per byte, low nibble first) -> float4_e2m1fn [out, in]."""
    b = np.asarray(packed).view(np.uint8)
    return np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1).view(FP4_DTYPE)


def pack_fp4(w4: np.ndarray) -> np.ndarray:
    """float4_e2m1fn [out, in] -> int8 [out, in/2] (the inverse of `unpack_fp4`)."""
    codes = np.ascontiguousarray(w4, FP4_DTYPE).view(np.uint8) & 0xF
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)


# Leaves a keep_fp8 load may hold low-precision: Linear kernels and routed-expert stacks (the
# modules that read `<name>_scale_inv`); FP4 only in the expert stacks (as in the release).
_KEEPABLE = ("kernel", "gate", "up", "down")
KEPT_DTYPES = {"fp8": hf_fp8.FP8_DTYPE, "fp4": FP4_DTYPE}


def kept_scale_shape(kind: str, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """`<name>_scale_inv` of a kept leaf [..., in, out]: FP8 [..., ceil(in/128), ceil(out/128)],
    FP4 [..., ceil(in/32), out] (the HF scale transposed)."""
    *lead, n_in, n_out = leaf_shape
    if kind == "fp8":
        return (*lead, math.ceil(n_in / FP8_BLOCK[1]), math.ceil(n_out / FP8_BLOCK[0]))
    return (*lead, math.ceil(n_in / FP4_GROUP), n_out)


def _kept_slots(table: list[TensorEntry], where) -> dict[tuple[str, Path_], str]:
    """(collection, path) -> "fp8" | "fp4" for the leaves a keep_fp8 load keeps quantised:
    keepable leaves whose every tensor (all experts) is stored with the same quantisation."""
    kinds: dict[tuple[str, Path_], list[tuple[str, str | None]]] = {}
    for e in table:
        if e.collection == "params" and e.transpose and e.path[-1] in _KEEPABLE:
            q = _quantized(where, e)
            kinds.setdefault((e.collection, e.path), []).append((e.key, q and q[0]))
    kept: dict[tuple[str, Path_], str] = {}
    for slot, rows in kinds.items():
        found = {k for _, k in rows}
        if found == {None}:
            continue
        if len(found) > 1:
            (ka, a), (kb, b) = rows[0], next(r for r in rows if r[1] != rows[0][1])
            raise ValueError(
                f"keep_fp8=True: leaf {'/'.join((slot[0], *slot[1]))} stacks {ka} "
                f"({a or 'not quantised'}) and {kb} ({b or 'not quantised'}); one leaf cannot "
                "hold both: load with keep_fp8=False"
            )
        kind = found.pop()
        if kind is None or (kind == "fp4" and slot[1][-1] == "kernel"):
            continue  # an FP4 Linear: not in the release, dequantised
        kept[slot] = kind
    return kept


def load_v4(
    path: Path,
    hf: dict[str, Any],
    dtype_name: str | None,
    load_mtp: bool | str,
    config_overrides: Mapping[str, Any] | None,
    place: Callable[[np.ndarray], Any] | None,
    keep_fp8: bool = False,
) -> tuple[ModelConfig, dict[str, Any]]:
    """`load_hf_checkpoint` for a deepseek_v4 directory (see its docstring). `keep_fp8`: FP8
    weights stay float8_e4m3fn and FP4 experts float4_e2m1fn (one code per byte), each with a
    float32 `<name>_scale_inv` sibling (`kept_scale_shape`), copied exactly from the files."""
    where = _index(path)
    has_mtp = any(k.startswith("mtp.") for k in where)
    declared = hf.get("num_nextn_predict_layers", 1) or 0
    overrides: dict[str, Any] = {}
    if dtype_name is None:
        dtype_name = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
        dtype_name = dtype_name if dtype_name in ("float32", "bfloat16", "float16") else "float32"
    overrides.update(dtype=dtype_name, param_dtype=dtype_name)
    if load_mtp is False or (load_mtp == "auto" and not has_mtp):
        if load_mtp == "auto" and declared:
            warnings.warn(
                f"{path}: config.json says num_nextn_predict_layers={declared} but the "
                "checkpoint holds no mtp.* tensors: loading without MTP layers",
                stacklevel=3,
            )
        overrides["num_mtp_layers"] = 0
    overrides.update(config_overrides or {})
    try:
        cfg = ModelConfig.from_hf(hf, **overrides)
    except (TypeError, AttributeError, KeyError, OverflowError) as err:
        raise ValueError(f"{path / CONFIG_FILE} has a field of the wrong type: {err!r}") from None
    table = v4_tensor_table(cfg)
    known = {e.key for e in table}
    missing = [e.key for e in table if e.key not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing tensor {missing[0]} in {path}{more}")
    unexpected = sorted(
        k for k in where
        if k not in known
        and not (k.endswith(SCALE) and k[: -len(SCALE)] + ".weight" in known)
        and not (k.startswith("mtp.") and cfg.num_mtp_layers == 0)
        and not k.endswith("inv_freq")
    )  # fmt: skip
    if unexpected:
        raise ValueError(
            f"unexpected tensor {unexpected[0]} in {path}: it does not belong to the model "
            "described by config.json"
        )
    param_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    kept = _kept_slots(table, where) if keep_fp8 else {}
    layout: dict[tuple[str, tuple[str, ...]], tuple[tuple[int, ...], np.dtype]] = {}
    for e in table:
        slot = (e.collection, e.path)
        if e.collection == "moe_bias":
            kind = np.int32 if e.path[-1] == "tid2eid" else np.float32
            layout[slot] = (e.leaf_shape, np.dtype(kind))
        elif slot in kept:
            layout[slot] = (e.leaf_shape, KEPT_DTYPES[kept[slot]])
            scale_shape = kept_scale_shape(kept[slot], e.leaf_shape)
            layout[(e.collection, hf_fp8.scale_path(e.path))] = (scale_shape, np.dtype(np.float32))
        else:
            dt = np.dtype(np.float32) if float32_leaf(e.path) else param_dtype
            layout[slot] = (e.leaf_shape, dt)
    _check_host_memory(path, layout)
    leaves = {slot: np.empty(shape, dt) for slot, (shape, dt) in layout.items()}
    for e in table:
        slot = (e.collection, e.path)
        if slot in kept:  # the stored codes and scales, transposed into [in, out] leaves
            _, w, scale = _quantized(where, e)  # type: ignore[misc]
            scale_leaf = leaves[(e.collection, hf_fp8.scale_path(e.path))]
            _copy_into(scale_leaf[e.index] if e.index else scale_leaf, scale, True)
            arr = unpack_fp4(w) if kept[slot] == "fp4" else w
            _copy_into(leaves[slot][e.index] if e.index else leaves[slot], arr, True)
            continue
        arr = _dequantized(where, e)
        if e.path[-1] == "tid2eid":
            if arr.size and (arr.min() < 0 or arr.max() >= cfg.n_routed_experts):
                raise ValueError(f"{e.key} holds expert ids outside [0, {cfg.n_routed_experts})")
        leaf = leaves[(e.collection, e.path)]
        _copy_into(leaf[e.index] if e.index else leaf, arr, e.transpose)
    for f, _ in where.values():
        f.close()
    place = place or jnp.asarray
    return cfg, _nest({slot: place(leaves.pop(slot)) for slot in list(leaves)})


# ====================================================================== save
def _check_kept_leaf(variables: Mapping[str, Any], e: TensorEntry, kind: str) -> Path_:
    """A low-precision leaf must be a keepable weight with a `_scale_inv` sibling of
    `kept_scale_shape`; returns the sibling's path."""
    name = "/".join((e.collection, *e.path))
    if e.collection != "params" or not e.transpose or e.path[-1] not in _KEEPABLE:
        raise ValueError(f"variables leaf {name} is {KEPT_DTYPES[kind]} but {e.key} is never")
    if kind == "fp4" and e.path[-1] == "kernel":
        raise ValueError(f"variables leaf {name} is FP4: only routed experts may be")
    path = hf_fp8.scale_path(e.path)
    parent = hf_save._get_leaf(variables, e.collection, e.path[:-1])
    scale, want = parent.get(path[-1]), kept_scale_shape(kind, e.leaf_shape)
    if scale is None or tuple(scale.shape) != want:
        got = None if scale is None else tuple(scale.shape)
        raise ValueError(
            f"variables leaf {name} ({kind}) needs {path[-1]} of shape {want}, got {got}"
        )
    return path


def _scale_entry(e: TensorEntry, kind: str) -> TensorEntry:
    """The row that fetches a kept leaf's scale sibling in HF layout."""
    return dataclasses.replace(
        e, path=hf_fp8.scale_path(e.path), leaf_shape=kept_scale_shape(kind, e.leaf_shape)
    )


def _e8m0(key: str, scale: np.ndarray) -> np.ndarray:
    """float32 scales -> F8_E8M0, refusing any that are not powers of two."""
    s8 = scale.astype(E8M0)
    if not np.array_equal(s8.astype(np.float32), scale):
        raise ValueError(f"{key}: kept scales are not all powers of two (E8M0 cannot hold them)")
    return s8


def _dequantize_kept(kind: str, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A kept weight in HF layout [out, in] and its HF-layout scale -> float32."""
    if kind == "fp8":
        return hf_fp8.dequantize_fp8(np.ascontiguousarray(w), scale, FP8_BLOCK)
    w = np.asarray(w, np.float32)
    return w * np.repeat(scale, FP4_GROUP, axis=-1)[:, : w.shape[1]]


def save_v4(
    path: Path,
    cfg: ModelConfig,
    variables: Mapping[str, Any],
    *,
    max_shard_bytes: int,
    dtype: Any,
    fp8: bool,
    fp4_experts: bool,
) -> None:
    """`save_hf_checkpoint` for arch "v4" (see its docstring)."""
    if fp4_experts and not fp8:
        raise ValueError("fp4_experts=True is the release layout: pass fp8=True too")
    out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    table = v4_tensor_table(cfg)
    covered = set()
    kept: dict[tuple[str, Path_], str] = {}  # low-precision leaves (a keep_fp8 load)
    for e in table:
        leaf = hf_save._get_leaf(variables, e.collection, e.path)
        if tuple(leaf.shape) != e.leaf_shape:
            raise ValueError(
                f"variables leaf {e.tree_name} has shape {tuple(leaf.shape)} but cfg implies "
                f"{e.leaf_shape}"
            )
        covered.add((e.collection, e.path))
        kind = next((k for k, dt in KEPT_DTYPES.items() if np.dtype(leaf.dtype) == dt), None)
        if kind is not None and (e.collection, e.path) not in kept:
            kept[(e.collection, e.path)] = kind
            covered.add((e.collection, _check_kept_leaf(variables, e, kind)))
    for collection in ("params", "moe_bias"):
        for p in hf_save._leaf_paths(variables.get(collection, {})):
            if (collection, p) not in covered:
                raise ValueError(
                    f"variables leaf {'/'.join((collection, *p))} has no DeepSeek-V4 tensor"
                )

    entries: list[TensorEntry] = []
    codes: dict[str, str] = {}
    quant: dict[str, str] = {}  # weight key -> "fp8" | "fp4"
    for e in table:
        entries.append(e)
        if e.collection == "moe_bias":
            codes[e.key] = "I64" if e.path[-1] == "tid2eid" else "F32"
            continue
        kind = None
        if fp8 and is_routed_expert(e.key):
            kind = "fp4" if fp4_experts else "fp8"
        elif fp8 and fp8_in_release(e.key):
            kind = "fp8"
        if kind is not None:
            quant[e.key] = kind
            out, inp = e.shape
            if kind == "fp4":
                codes[e.key] = "I8"
                entries[-1] = dataclasses.replace(e, shape=(out, inp // 2))
                shape = (out, math.ceil(inp / FP4_GROUP))
            else:
                codes[e.key] = "F8_E4M3"
                shape = (math.ceil(out / FP8_BLOCK[0]), math.ceil(inp / FP8_BLOCK[1]))
            entries.append(dataclasses.replace(e, key=scale_key(e.key), shape=shape))
            codes[scale_key(e.key)] = "F8_E8M0"
            continue
        leaf_dtype = np.dtype(hf_save._get_leaf(variables, e.collection, e.path).dtype)
        if (e.collection, e.path) in kept:
            leaf_dtype = np.dtype(np.float32)  # dequantised
        np_dtype = np.dtype(np.float32) if float32_leaf(e.path) else (out_dtype or leaf_dtype)
        if np_dtype not in NP_TO_ST:
            raise ValueError(f"cannot save {e.tree_name} as {np_dtype}")
        codes[e.key] = NP_TO_ST[np_dtype]

    host = hf_save._HostSlices(variables)
    pending: dict[str, np.ndarray] = {}

    def fetch(e: TensorEntry) -> np.ndarray:
        if e.key in pending:
            return pending.pop(e.key)
        arr = host.tensor(e)
        kind = quant.get(e.key)
        leaf_kind = kept.get((e.collection, e.path))
        if leaf_kind is not None:
            s = np.asarray(host.tensor(_scale_entry(e, leaf_kind)), np.float32)
            if kind == leaf_kind:  # written as kept, bit for bit
                pending[scale_key(e.key)] = _e8m0(e.key, s)
                return pack_fp4(arr) if kind == "fp4" else arr
            arr = _dequantize_kept(leaf_kind, arr, s)
        if kind == "fp8":
            w8, s = hf_fp8.quantize_fp8(np.asarray(arr, np.float32), FP8_BLOCK, pow2=True)
            pending[scale_key(e.key)] = s.astype(E8M0)
            return w8
        if kind == "fp4":
            packed, s = quantize_fp4(arr)
            pending[scale_key(e.key)] = s
            return packed
        return arr

    all_codes = {**ST_TO_NP, **EXTRA_TO_NP}
    shards = hf_save._plan_shards(entries, codes, max_shard_bytes)
    hf = cfg.to_hf()
    if fp8:
        hf["quantization_config"] = json.loads(json.dumps(QUANTIZATION_CONFIG))
        if fp4_experts:
            hf["quantization_config"]["expert_dtype"] = "fp4"
    embed_code = codes["embed.weight"]
    if all_codes[embed_code].name in ("float32", "bfloat16", "float16"):
        hf["torch_dtype"] = hf["dtype"] = all_codes[embed_code].name

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        if len(shards) == 1:
            hf_save._write_shard(tmp / SINGLE_FILE, shards[0], codes, fetch)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                hf_save._write_shard(tmp / fname, shard, codes, fetch)
                weight_map.update({e.key: fname for e in shard})
            index = {"metadata": {}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        hf_save._replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["NP_TO_EXTRA", "dequantize_fp4", "load_v4", "quantize_fp4", "save_v4"]
