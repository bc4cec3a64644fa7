"""The FP8 release format of DeepSeek-V3 checkpoints (docs/spec.md §7), in NumPy.

Used by `dsjax.checkpoints.hf`.

On disk (HF, torch [out, in] layout) a weight is FP8 (`F8_E4M3`, float8_e4m3fn) exactly when a
sibling `<name>_scale_inv` exists: float32 [ceil(out/b0), ceil(in/b1)] with (b0, b1) config.json's
`quantization_config.weight_block_size` (the release: 128x128), and
`W[i, j] = W8[i, j] * S[i // b0, j // b1]`.

In dsjax variables (Flax [in, out] kernels) an FP8 Linear holds `kernel` float8_e4m3fn [in, out]
and the sibling leaf `kernel_scale_inv` float32 [ceil(in/128), ceil(out/128)]: the HF weight and
its scale, both transposed, so `W[i, j] = kernel[i, j] * kernel_scale_inv[i // 128, j // 128]`.
Routed experts: `gate`/`up`/`down` float8 [E, in, out] with `gate_scale_inv` ... [E, ceil(in/128),
ceil(out/128)]; scanned stacks add the leading layer axis to both.

Quantisation (saving float weights as FP8) follows docs/spec.md §8: per 128x128 block,
`s = max|block| / 448`, `W8 = round_e4m3(W / s)` (an all-zero block gets s = 1).

Which weights are FP8: every linear projection except the router (`mlp.gate.weight`) and the
output head (`lm_head`, `shared_head.head`); never the embedding or norms — the tensors HF
transformers' fine-grained FP8 quantizer replaces (`nn.Linear` and the experts, its default
skip list keeping `lm_head`; the router is not an `nn.Linear`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
FP4_DTYPE = np.dtype(ml_dtypes.float4_e2m1fn)  # DeepSeek-V4's FP4 experts (kept by keep_fp8)
FP4_GROUP = 32
FP8_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(DEFAULT_BLOCK),
}
# Linear kernels that stay in high precision (docs/spec.md §7, §8): the MoE router and the
# output head.
_NEVER_FP8 = {("moe", "router", "kernel"), ("lm_head", "kernel")}

Path_ = tuple[str, ...]


# ====================================================================== which tensors
def fp8_eligible(path: Path_, transpose: bool) -> bool:
    """Whether the leaf at `path` (a params path) is stored in FP8 by the release format.

    Linear weights (transposed on load) are, except the router and the output head.
    """
    return transpose and tuple(path[-3:]) not in _NEVER_FP8 and tuple(path) not in _NEVER_FP8


def scale_path(path: Path_) -> Path_:
    """The sibling scale leaf of an FP8 leaf: `.../kernel` -> `.../kernel_scale_inv`."""
    return (*path[:-1], path[-1] + SCALE_SUFFIX)


def scale_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the block-scale grid of a [rows, cols] matrix with blocks `block`."""
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def kernel_scale_shape(kernel_shape: tuple[int, ...], block: int = DEFAULT_BLOCK[0]) -> tuple:
    """`kernel_scale_inv` shape of a dsjax kernel [..., in, out]: [..., ceil(in/b), ceil(out/b)]."""
    *lead, rows, cols = kernel_shape
    return (*lead, *scale_grid(rows, cols, (block, block)))


def block_size(hf: Mapping[str, Any]) -> tuple[int, int]:
    """FP8 weight block size from config.json `quantization_config` (default 128x128)."""
    quant = hf.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise ValueError(f"config.json quantization_config={quant!r} is not an object")
    method = quant.get("quant_method", "fp8")
    if quant and method != "fp8":
        raise ValueError(
            f"config.json quantization_config.quant_method={method!r} is not supported (fp8 only)"
        )
    block = quant.get("weight_block_size") or DEFAULT_BLOCK
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)
        or min(block) <= 0
    ):
        raise ValueError(f"config.json quantization_config.weight_block_size={block!r} is invalid")
    return int(block[0]), int(block[1])


# ====================================================================== (de)quantisation
# float8_e4m3fn bit pattern -> float32 value: a table lookup is faster than ml_dtypes' cast.
_FP8_TO_F32 = np.arange(256, dtype=np.uint8).view(FP8_DTYPE).astype(np.float32)


def dequantize_fp8(w8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """`W[..., i, j] = W8[..., i, j] * S[..., i // b0, j // b1]` in float32.

    Any layout: HF [out, in] weights with their scale and `block=(b0, b1)`, or dsjax kernels
    [..., in, out] with `kernel_scale_inv` (block (128, 128)). Ragged edge blocks included; one
    float32 product per element, so the result is the float64 product rounded once.
    """
    w8 = np.asarray(w8)
    if w8.dtype != FP8_DTYPE:
        raise ValueError(f"dequantize_fp8 expects float8_e4m3fn weights, got {w8.dtype}")
    *lead, rows, cols = w8.shape
    scale = np.asarray(scale_inv, np.float32)
    expected = (*lead, *scale_grid(rows, cols, block))
    if scale.shape != expected:
        raise ValueError(
            f"scale_inv has shape {scale.shape} but weight {w8.shape} with block {list(block)} "
            f"implies {expected}"
        )
    w = _FP8_TO_F32[w8.view(np.uint8)]
    b0, b1 = block
    for r in range(scale.shape[-2]):
        rows_ = slice(r * b0, min((r + 1) * b0, rows))
        w[..., rows_, :] *= np.repeat(scale[..., r, :], b1, axis=-1)[..., None, :cols]
    return w


def pow2_ceil(x: np.ndarray) -> np.ndarray:
    """The smallest power of two >= x (x > 0), float32."""
    m, e = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(1.0, np.where(m == 0.5, e - 1, e)).astype(np.float32)


def quantize_fp8(
    w: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK, pow2: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Block-quantises `w` [..., rows, cols] to (float8_e4m3fn weights, float32 scale_inv).

    Per block: `s = max|block| / 448` (1 for an all-zero block), `W8 = round_e4m3(W / s)` in
    float32 (round to nearest even, clipped to ±448). scale_inv: [..., ceil(rows/b0),
    ceil(cols/b1)]. Non-finite weights raise ValueError (they have no FP8 encoding).
    `pow2` (DeepSeek-V4's ue8m0 scales): `s = 2^ceil(log2(max|block| / 448))`, halved when the
    block's max would round to 224, so that re-quantising a dequantised block gives back the
    same bytes.
    """
    w = np.asarray(w, np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError("cannot quantise a weight holding inf or NaN to FP8")
    *lead, rows, cols = w.shape
    gr, gc = scale_grid(rows, cols, block)
    b0, b1 = block
    padded = np.zeros((*lead, gr * b0, gc * b1), np.float32)
    padded[..., :rows, :cols] = w
    tiles = padded.reshape(*lead, gr, b0, gc, b1)
    amax = np.abs(tiles).max(axis=(-3, -1))
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
    if pow2:
        scale = pow2_ceil(scale)
        # A block whose largest value rounds down to 224 would be re-quantised with half the
        # scale after a dequantise: halve it now (its max then rounds to 448), so that
        # quantise(dequantise(q)) == q.
        top = (amax / scale).astype(FP8_DTYPE).astype(np.float32)
        scale = np.where((amax > 0) & (top <= FP8_MAX / 2), scale / 2, scale).astype(np.float32)
    q = np.clip(tiles / scale[..., :, None, :, None], -FP8_MAX, FP8_MAX)
    w8 = q.reshape(*lead, gr * b0, gc * b1)[..., :rows, :cols].astype(FP8_DTYPE)
    return w8, scale


# ====================================================================== variable trees
def _walk(node: Any, prefix: Path_ = ()):
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk(v, (*prefix, str(k)))
    else:
        yield prefix, node


def fp8_leaf_paths(variables: Mapping[str, Any]) -> list[Path_]:
    """Paths (collection first) of every float8_e4m3fn leaf of a variables tree."""
    return [p for p, leaf in _walk(variables) if np.dtype(leaf.dtype) == FP8_DTYPE]


def dequantize_variables(variables: Mapping[str, Any], dtype: Any = np.float32) -> dict[str, Any]:
    """A copy of `variables` with every FP8 kernel (and DeepSeek-V4 FP4 expert stack)
    dequantised to `dtype` (NumPy arrays) and its `*_scale_inv` sibling dropped; other leaves
    are kept as they are.

    Raises ValueError naming the leaf when an FP8 leaf has no scale sibling of the right shape.
    """
    fp8 = set(fp8_leaf_paths(variables))
    fp4 = {p for p, leaf in _walk(variables) if np.dtype(leaf.dtype) == FP4_DTYPE}
    scales = {scale_path(p) for p in fp8 | fp4}

    def rebuild(node: Any, prefix: Path_) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {}
        for k, v in node.items():
            p = (*prefix, str(k))
            if p in scales:
                continue
            if p in fp8:
                scale = node.get(k + SCALE_SUFFIX)
                check_fp8_leaf("/".join(p), tuple(v.shape), scale)
                out[k] = dequantize_fp8(np.asarray(v), np.asarray(scale), DEFAULT_BLOCK)
                out[k] = out[k].astype(dtype)
            elif p in fp4:
                out[k] = _dequantize_fp4_leaf("/".join(p), v, node.get(k + SCALE_SUFFIX), dtype)
            else:
                out[k] = rebuild(v, p)
        return out

    return rebuild(variables, ())


def _dequantize_fp4_leaf(name: str, w4: Any, scale: Any, dtype: Any) -> np.ndarray:
    """A DeepSeek-V4 FP4 expert leaf [..., in, out] with `_scale_inv` [..., ceil(in/32), out]."""
    *lead, n_in, n_out = w4.shape
    want = (*lead, math.ceil(n_in / FP4_GROUP), n_out)
    if scale is None or tuple(scale.shape) != want:
        got = None if scale is None else tuple(scale.shape)
        raise ValueError(
            f"variables leaf {name} is FP4 but {name}{SCALE_SUFFIX} is {got}, not {want}"
        )
    s = np.repeat(np.asarray(scale, np.float32), FP4_GROUP, axis=-2)[..., :n_in, :]
    return (np.asarray(w4).astype(np.float32) * s).astype(dtype)


def check_fp8_leaf(name: str, kernel_shape: tuple[int, ...], scale: Any) -> None:
    """An FP8 kernel leaf `name` needs a `_scale_inv` sibling of shape `kernel_scale_shape`."""
    if scale is None:
        raise ValueError(
            f"variables leaf {name} is float8_e4m3fn but has no sibling {name}{SCALE_SUFFIX} "
            "(FP8 weights need their 128x128 block scales)"
        )
    expected = kernel_scale_shape(kernel_shape)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"variables leaf {name}{SCALE_SUFFIX} has shape {tuple(scale.shape)} but "
            f"{name} {kernel_shape} with 128x128 blocks implies {expected}"
        )


# ====================================================================== loading with keep_fp8
def kept_fp8_slots(
    table: list[Any], scaled: set[str], block: tuple[int, int], config_file: Any
) -> set[tuple[str, Path_]]:
    """The `(collection, path)` leaves a `keep_fp8=True` load keeps in FP8.

    `table` holds `dsjax.checkpoints.hf.TensorEntry` rows, `scaled` the checkpoint keys that have a
    `_scale_inv` sibling. A leaf is kept when it is FP8-eligible and every tensor stacked into it
    (all layers, all experts) is FP8; FP8 tensors of other leaves are dequantised as usual. A
    checkpoint without FP8 tensors gives the empty set (nothing to keep: a plain load).

    Raises ValueError when the block is not 128x128 (the dsjax FP8 kernels' block) or when one
    leaf stacks FP8 and non-FP8 tensors (it cannot hold both), naming a tensor of each kind.
    """
    by_slot: dict[tuple[str, Path_], list[Any]] = {}
    for e in table:
        if not e.alias and e.collection == "params" and fp8_eligible(e.path, e.transpose):
            by_slot.setdefault((e.collection, e.path), []).append(e)
    kept = set()
    for slot, entries in by_slot.items():
        fp8 = [e for e in entries if e.key in scaled]
        if not fp8:
            continue
        plain = [e for e in entries if e.key not in scaled]
        if plain:
            raise ValueError(
                f"keep_fp8=True: leaf {'/'.join((slot[0], *slot[1]))} stacks {fp8[0].key} (FP8) and "
                f"{plain[0].key} (no {SCALE_SUFFIX}, not FP8); one leaf cannot hold both: "
                "load with keep_fp8=False"
            )
        kept.add(slot)
    if kept and tuple(block) != DEFAULT_BLOCK:
        raise ValueError(
            f"keep_fp8=True needs {config_file} quantization_config.weight_block_size "
            f"{list(DEFAULT_BLOCK)} (dsjax FP8 kernels use 128x128 blocks), got {list(block)}; "
            "load with keep_fp8=False to dequantise"
        )
    return kept


# ====================================================================== saving
def scale_entry(e: Any) -> Any:
    """The `<key>_scale_inv` row of FP8 weight row `e` (a `dsjax.checkpoints.hf.TensorEntry`): HF shape
    [ceil(out/128), ceil(in/128)], dsjax leaf `<path>_scale_inv`, transposed like the weight."""
    out_dim, in_dim = e.shape
    return dataclasses.replace(
        e,
        key=e.key + SCALE_SUFFIX,
        path=scale_path(e.path),
        leaf_shape=kernel_scale_shape(e.leaf_shape),
        shape=scale_grid(out_dim, in_dim, DEFAULT_BLOCK),
    )


class Fp8Fetch:
    """Tensors to write, in HF layout, for a save with FP8 weights and/or FP8 leaves.

    `host(e)` returns row `e`'s tensor from the variables (HF layout). For a weight in
    `quantise` (keys written as FP8): an FP8 leaf is written as it is (bit-exact) and its scale
    leaf after it; a float leaf is block-quantised and the scale kept until its row is fetched.
    A weight not in `quantise` whose leaf is FP8 (a save with fp8=False) is dequantised.
    """

    def __init__(
        self,
        host: Callable[[Any], np.ndarray],
        fp8_leaves: set[tuple[str, Path_]],
        quantise: set[str],
    ):
        self.host = host
        self.fp8_leaves = fp8_leaves
        self.quantise = quantise
        self.pending: dict[str, np.ndarray] = {}

    def __call__(self, e: Any) -> np.ndarray:
        if e.key.endswith(SCALE_SUFFIX) and e.key[: -len(SCALE_SUFFIX)] in self.quantise:
            base = (e.collection, e.path[:-1] + (e.path[-1][: -len(SCALE_SUFFIX)],))
            if base in self.fp8_leaves:
                return np.asarray(self.host(e), np.float32)
            return self.pending.pop(e.key)
        fp8_leaf = (e.collection, e.path) in self.fp8_leaves
        if e.key in self.quantise:
            if fp8_leaf:
                return self.host(e)
            w8, scale = quantize_fp8(self.host(e), DEFAULT_BLOCK)
            self.pending[e.key + SCALE_SUFFIX] = scale
            return w8
        if fp8_leaf:
            scale = np.asarray(self.host(scale_entry(e)), np.float32)
            return dequantize_fp8(np.asarray(self.host(e)), scale, DEFAULT_BLOCK)
        return self.host(e)
