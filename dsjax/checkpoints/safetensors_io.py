"""The safetensors file format, read by hand, and strict JSON-object files (config, index).

A safetensors file is `<u64 little-endian header length N><N bytes of JSON header><data>`; the
header maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets
relative to the start of the data) plus an optional `__metadata__` entry. `SafetensorsFile`
validates the whole header when it opens a file — types, dtype byte sizes against shapes, and
offsets against the file size — so every later step can trust it, and it maps the data lazily
(`np.memmap`) so reading a tensor copies nothing. FP8 `F8_E4M3` and `BF16` come from `ml_dtypes`.

Every malformed input raises ValueError naming the file (and the tensor), never a TypeError or
KeyError from deep inside the loader.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# safetensors dtype code <-> numpy dtype (the codes the loader can convert).
ST_TO_NP: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
}
NP_TO_ST: dict[np.dtype, str] = {v: k for k, v in ST_TO_NP.items()}
# Codes only DeepSeek-V4 checkpoints use (`read(..., extra=True)`): the hash-routing table
# (I64 / I32), FP4 experts packed two per byte (I8) and power-of-two block scales (F8_E8M0).
EXTRA_TO_NP: dict[str, np.dtype] = {
    "I8": np.dtype(np.int8),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
NP_TO_EXTRA: dict[np.dtype, str] = {v: k for k, v in EXTRA_TO_NP.items()}
# Byte width of every code the format defines: offsets are checked even for unsupported dtypes.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "F8_E8M0": 1, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_JSON_BYTES = 64 << 20  # config.json / index.json larger than this are not checkpoints


def read_json_object(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file if it is not UTF-8 JSON, not an
    object, or larger than `max_bytes` (`what` says what the file should be, for messages)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size} bytes; a {what} is at most {max_bytes}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 {what}: {e}") from None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not a valid {what} (JSON): {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: Path, name: str, info: Any, data_bytes: int) -> None:
    """One header entry: a dict with a dtype code, a shape of ints >= 0 and in-range offsets
    whose span matches shape x itemsize."""
    where = f"tensor {name!r} in the safetensors header of {path}"
    if not isinstance(info, dict):
        raise ValueError(f"{where} is a {type(info).__name__}, not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise ValueError(f"{where} has no {field!r}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str):
        raise ValueError(f"{where}: dtype {code!r} is not a string")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise ValueError(f"{where}: data_offsets {offsets} out of range (data is {data_bytes} B)")
    itemsize = _ITEMSIZE.get(code)
    if itemsize is not None and end - begin != math.prod(shape) * itemsize:
        raise ValueError(
            f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {code} "
            f"needs {math.prod(shape) * itemsize}"
        )


class SafetensorsFile:
    """A safetensors file: header parsed and validated eagerly, data memory-mapped lazily."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path} is not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise ValueError(f"{path} is not a safetensors file (header length {n})")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                raise ValueError(f"{path} has a corrupt safetensors header: {err}") from None
        if not isinstance(header, dict):
            raise ValueError(
                f"{path} has a corrupt safetensors header: a JSON {type(header).__name__}, "
                "not an object"
            )
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        for name, info in header.items():
            _check_entry(path, name, info, size - self.data_start)
        self.tensors: dict[str, dict[str, Any]] = header
        self._mm: np.memmap | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` from the header."""
        return tuple(self.tensors[name]["shape"])

    def dtype_code(self, name: str) -> str:
        """safetensors dtype code (F32, BF16, F8_E4M3, ...) of tensor `name`."""
        return self.tensors[name]["dtype"]

    def nbytes(self, name: str) -> int:
        """Bytes of tensor `name` in the file."""
        begin, end = self.tensors[name]["data_offsets"]
        return end - begin

    def read(self, name: str, extra: bool = False) -> np.ndarray:
        """A read-only view of tensor `name` backed by the memory map (no copy); `extra` also
        accepts the `EXTRA_TO_NP` codes."""
        info = self.tensors[name]
        code = info["dtype"]
        codes = {**ST_TO_NP, **EXTRA_TO_NP} if extra else ST_TO_NP
        if code not in codes:
            raise ValueError(f"{name} in {self.path} has dtype {code}; supported: {sorted(codes)}")
        dtype = codes[code]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end == begin:
            return np.zeros(shape, dtype)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.data_start + begin : self.data_start + end]
        return raw.view(dtype).reshape(shape)

    def close(self) -> None:
        """Drops the memory map (its pages leave the process once nothing references them)."""
        self._mm = None
