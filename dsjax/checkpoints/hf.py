"""Hugging Face checkpoint import/export for dsjax (docs/spec.md §7).

On disk a DeepSeek-V3 checkpoint is a directory holding `config.json` and safetensors file(s):
one `model.safetensors` or shards listed in `model.safetensors.index.json`. Tensors use torch's
[out, in] layout and one key per expert (`model.layers.N.mlp.experts.E.up_proj.weight`). dsjax
keeps Flax kernels ([in, out]) with the layers of each stack (`dense_layers`, `moe_layers`)
stacked on a leading axis for `nn.scan`, and the experts of a layer stacked on a second axis.

Everything about the correspondence lives in one table, `hf_tensor_table(cfg)`: one
`TensorEntry` per HF key saying which leaf it belongs to, at which (layer, expert) index, and
whether it is transposed. Loading and saving both walk that table.

Loading validates before it allocates: config.json, the index and every safetensors header
are checked (`safetensors_io.py`: types, offsets, byte sizes; ValueError naming the file), the
number of tensors config.json implies is checked against the files by arithmetic before the
table is built (a config with 10**6 layers is refused in bounded memory), keys, shapes and
dtypes against the table, and the parameters' size against the available host memory. Then it
streams: the files are memory-mapped (`np.memmap`, FP8 `F8_E4M3` and `BF16` through
`ml_dtypes`), every leaf is preallocated once in the target dtype, and each tensor is copied straight from the mapped file into its slot of the
stacked leaf, one shard at a time. Peak host memory is therefore about one copy of the model
(plus one dequantised tensor), never a dict of per-expert tensors followed by a stack.

FP8 checkpoints (the official release: `F8_E4M3` weights with `_scale_inv` 128x128 block scales)
are dequantised to `dtype` by default; `keep_fp8=True` keeps them as float8_e4m3fn kernels with
`kernel_scale_inv` siblings (about a quarter of the float32 bytes), and
`save_hf_checkpoint(..., fp8=True)` writes that layout back. The format itself, quantisation
and dequantisation live in `hf_fp8.py`.

Saving writes safetensors by hand too, one tensor at a time, into a temporary directory next to
the target that is renamed into place at the end, so an interrupted save never damages an
existing checkpoint.

This module is the public face; the code lives in `hf_table.py` (the key table), `hf_load.py`
(reading), `hf_save.py` (writing) and `hf_fp8.py` (the FP8 format).
"""

from __future__ import annotations

from dsjax.checkpoints.hf_fp8 import DEFAULT_BLOCK, SCALE_SUFFIX, dequantize_fp8
from dsjax.checkpoints.hf_load import available_host_memory, load_hf_checkpoint
from dsjax.checkpoints.hf_save import save_hf_checkpoint
from dsjax.checkpoints.hf_table import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    SUPPORTED_ARCHITECTURES,
    TensorEntry,
    hf_tensor_table,
    leaf_shapes,
)

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_BLOCK",
    "INDEX_FILE",
    "SCALE_SUFFIX",
    "SINGLE_FILE",
    "SUPPORTED_ARCHITECTURES",
    "TensorEntry",
    "available_host_memory",
    "dequantize_fp8",
    "hf_tensor_table",
    "leaf_shapes",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
]
