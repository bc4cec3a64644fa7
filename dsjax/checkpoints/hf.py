"""Hugging Face checkpoint import/export for dsjax (SPEC §7).

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.core import meta

from dsjax.checkpoints import hf_fp8
from dsjax.checkpoints.hf_fp8 import DEFAULT_BLOCK, SCALE_SUFFIX, dequantize_fp8  # noqa: F401 (re-exported)
from dsjax.checkpoints.safetensors_io import NP_TO_ST as _NP_TO_ST
from dsjax.checkpoints.safetensors_io import ST_TO_NP as _ST_TO_NP
from dsjax.checkpoints.safetensors_io import SafetensorsFile as _SafetensorsFile
from dsjax.checkpoints.safetensors_io import read_json_object
from dsjax.model.config import DTYPES, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# config.json `architectures` whose checkpoints this module reads (Kimi-K2 and Moonlight use V3's).
SUPPORTED_ARCHITECTURES = (
    "DeepseekV3ForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV32ForCausalLM",
)

Path_ = tuple[str, ...]


# ====================================================================== the key table
@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One HF tensor and the slot of the dsjax variable tree it maps to.

    Attributes:
      key: the HF safetensors key.
      collection: "params" or "moe_bias".
      path: path of the leaf inside the collection.
      leaf_shape: full shape of that leaf (layer and expert axes included).
      layer: index along the leaf's leading layer axis (scanned stacks), else None.
      expert: index along the expert axis, else None.
      transpose: the HF tensor is the transpose of the slot (torch [out, in] vs Flax [in, out]).
      shape: the HF (torch) shape on disk.
      optional: may be absent from a checkpoint (the slot is then zero).
      alias: a duplicate of another leaf (MTP copies of embedding / head): skipped on load,
        written on save.
      block: the HF key prefix of the decoder layer it belongs to ("" for global tensors);
        saving fetches each leaf's layer slice once per block.
    """

    key: str
    collection: str
    path: Path_
    leaf_shape: tuple[int, ...]
    layer: int | None
    expert: int | None
    transpose: bool
    shape: tuple[int, ...]
    optional: bool = False
    alias: bool = False
    block: str = ""

    @property
    def index(self) -> tuple[int, ...]:
        """The index of this tensor's slot inside its leaf."""
        return tuple(i for i in (self.layer, self.expert) if i is not None)

    @property
    def tree_name(self) -> str:
        """`collection/a/b/c`, for messages."""
        return "/".join((self.collection, *self.path))


@dataclasses.dataclass(frozen=True)
class _Spec:
    """A template row: HF suffix, tree sub-path, torch shape, transposed, per-expert, optional."""

    suffix: str
    path: Path_
    shape: tuple[int, ...]
    transpose: bool = True
    per_expert: bool = False
    collection: str = "params"
    optional: bool = False


def _linear(suffix: str, path: str, out_dim: int, in_dim: int, **kw: Any) -> _Spec:
    """A linear weight: torch [out, in] on disk, transposed to a Flax [in, out] kernel."""
    return _Spec(suffix, tuple(path.split("/")), (out_dim, in_dim), True, **kw)


def _vector(suffix: str, path: str, dim: int, **kw: Any) -> _Spec:
    """A 1-D tensor (norm scale, router bias), stored as is."""
    return _Spec(suffix, tuple(path.split("/")), (dim,), False, **kw)


def _attention_specs(cfg: ModelConfig) -> list[_Spec]:
    """Norms and MLA projections of one decoder layer (q LoRA or plain q projection)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    specs = [_vector("input_layernorm.weight", "attn_norm/scale", d)]
    if cfg.q_lora_rank:
        q = cfg.q_lora_rank
        specs += [
            _linear("self_attn.q_a_proj.weight", "attn/q_a/kernel", q, d),
            _vector("self_attn.q_a_layernorm.weight", "attn/q_a_norm/scale", q),
            _linear("self_attn.q_b_proj.weight", "attn/q_b/kernel", h * cfg.qk_head_dim, q),
        ]
    else:
        specs.append(_linear("self_attn.q_proj.weight", "attn/q/kernel", h * cfg.qk_head_dim, d))
    specs += [
        _linear("self_attn.kv_a_proj_with_mqa.weight", "attn/kv_a/kernel", c + r, d),
        _vector("self_attn.kv_a_layernorm.weight", "attn/kv_a_norm/scale", c),
        _linear(
            "self_attn.kv_b_proj.weight",
            "attn/kv_b/kernel",
            h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            c,
        ),
        _linear("self_attn.o_proj.weight", "attn/o/kernel", d, h * cfg.v_head_dim),
        _vector("post_attention_layernorm.weight", "ffn_norm/scale", d),
    ]
    if cfg.use_dsa:  # DeepSeek-V3.2's lightning indexer (SPEC §10)
        n, i, ix = cfg.index_n_heads, cfg.index_head_dim, "self_attn.indexer."
        specs += [
            _linear(ix + "wq_b.weight", "attn/indexer/wq_b/kernel", n * i, cfg.q_lora_rank),
            _linear(ix + "wk.weight", "attn/indexer/wk/kernel", i, d),
            _vector(ix + "k_norm.weight", "attn/indexer/k_norm/scale", i),
            _vector(ix + "k_norm.bias", "attn/indexer/k_norm/bias", i),
            _linear(ix + "weights_proj.weight", "attn/indexer/weights_proj/kernel", n, d),
        ]
    return specs


def _swiglu_specs(hf_prefix: str, tree_prefix: str, d: int, f: int) -> list[_Spec]:
    """gate/up/down projections of a SwiGLU of width `f`."""
    return [
        _linear(f"{hf_prefix}.gate_proj.weight", f"{tree_prefix}/gate/kernel", f, d),
        _linear(f"{hf_prefix}.up_proj.weight", f"{tree_prefix}/up/kernel", f, d),
        _linear(f"{hf_prefix}.down_proj.weight", f"{tree_prefix}/down/kernel", d, f),
    ]


def _ffn_specs(cfg: ModelConfig, moe: bool) -> list[_Spec]:
    """The feed-forward part of a layer: dense SwiGLU, or router + bias + experts + shared."""
    d = cfg.hidden_size
    if not moe:
        return _swiglu_specs("mlp", "mlp", d, cfg.intermediate_size)
    e, fm = cfg.n_routed_experts, cfg.moe_intermediate_size
    specs = [
        _linear("mlp.gate.weight", "moe/router/kernel", e, d),
        # The router correction bias is absent from V2 (softmax) checkpoints: it is then zero.
        _vector(
            "mlp.gate.e_score_correction_bias", "moe/bias", e, collection="moe_bias", optional=True
        ),
    ]
    for name, (out_dim, in_dim) in (("gate", (fm, d)), ("up", (fm, d)), ("down", (d, fm))):
        specs.append(
            _linear(
                f"mlp.experts.{{e}}.{name}_proj.weight",
                f"moe/experts/{name}",
                out_dim,
                in_dim,
                per_expert=True,
            )
        )
    if cfg.n_shared_experts:
        specs += _swiglu_specs("mlp.shared_experts", "moe/shared", d, cfg.n_shared_experts * fm)
    return specs


def _expand(
    specs: list[_Spec],
    cfg: ModelConfig,
    hf_prefix: str,
    tree_prefix: Path_,
    layer: int | None,
    stack: int | None,
    block: str,
) -> Iterator[TensorEntry]:
    """Turns template rows into entries for one decoder layer (or the global tensors)."""
    for s in specs:
        slot = s.shape[::-1] if s.transpose else s.shape
        lead = (() if stack is None else (stack,)) + (
            (cfg.n_routed_experts,) if s.per_expert else ()
        )
        experts = range(cfg.n_routed_experts) if s.per_expert else (None,)
        for e in experts:
            suffix = s.suffix.format(e=e) if s.per_expert else s.suffix
            yield TensorEntry(
                key=hf_prefix + suffix,
                collection=s.collection,
                path=tree_prefix + s.path,
                leaf_shape=lead + slot,
                layer=layer,
                expert=e,
                transpose=s.transpose,
                shape=s.shape,
                optional=s.optional,
                block=block,
            )


def hf_tensor_table(cfg: ModelConfig) -> list[TensorEntry]:
    """Every HF tensor of `cfg`'s checkpoint (MTP layers included), in layer order.

    The single source of truth for the HF <-> dsjax correspondence: key, leaf path, layer and
    expert index, transpose. Alias entries (`alias=True`) are the MTP layers' copies of the
    embedding and output head.
    """
    d, v = cfg.hidden_size, cfg.vocab_size
    embed_spec = _Spec("model.embed_tokens.weight", ("embed", "embedding"), (v, d), False)
    # The output head: its own lm_head, or the embedding when tied.
    head_spec = (
        embed_spec if cfg.tie_word_embeddings else _linear("lm_head.weight", "lm_head/kernel", v, d)
    )
    table = list(_expand([embed_spec], cfg, "", (), None, None, ""))
    stacks = (
        ("dense_layers", 0, cfg.num_dense_layers, False),
        ("moe_layers", cfg.num_dense_layers, cfg.num_moe_layers, True),
    )
    for name, start, count, moe in stacks:
        specs = _attention_specs(cfg) + _ffn_specs(cfg, moe)
        for i in range(count):
            prefix = f"model.layers.{start + i}."
            table += _expand(specs, cfg, prefix, (name,), i, count, prefix)
    table += _expand(
        [_vector("model.norm.weight", "final_norm/scale", d)], cfg, "", (), None, None, ""
    )
    if not cfg.tie_word_embeddings:
        table += _expand([head_spec], cfg, "", (), None, None, "")
    for k in range(cfg.num_mtp_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        root = (f"mtp_{k}",)
        extras = [
            _vector("enorm.weight", "enorm/scale", d),
            _vector("hnorm.weight", "hnorm/scale", d),
            _linear("eh_proj.weight", "eh_proj/kernel", d, 2 * d),
            _vector("shared_head.norm.weight", "head_norm/scale", d),
        ]
        table += _expand(extras, cfg, prefix, root, None, None, prefix)
        block = _attention_specs(cfg) + _ffn_specs(cfg, cfg.mtp_is_moe)
        table += _expand(block, cfg, prefix, (*root, "block"), None, None, prefix)
        copies = [
            dataclasses.replace(embed_spec, suffix="embed_tokens.weight"),
            dataclasses.replace(head_spec, suffix="shared_head.head.weight"),
        ]
        for entry in _expand(copies, cfg, prefix, (), None, None, prefix):
            table.append(dataclasses.replace(entry, alias=True))
    return table


def leaf_shapes(cfg: ModelConfig) -> dict[tuple[str, Path_], tuple[int, ...]]:
    """`{(collection, path): shape}` of every leaf of the variable tree implied by `cfg`."""
    return {(e.collection, e.path): e.leaf_shape for e in hf_tensor_table(cfg) if not e.alias}


# ====================================================================== reading
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


def _layer_of(key: str) -> int | None:
    """N of a `model.layers.N.` key, else None."""
    m = _LAYER_RE.match(key)
    return int(m.group(1)) if m else None


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


def _implied_tensor_count(cfg: ModelConfig) -> int:
    """Number of required tensors of `cfg`'s checkpoint, by arithmetic over the templates:
    cheap for any config, unlike building the table."""

    def tally(specs: list[_Spec], repeat: int) -> int:
        per = sum(cfg.n_routed_experts if s.per_expert else 1 for s in specs if not s.optional)
        return per * repeat

    d = cfg.hidden_size
    globals_ = 2 + (0 if cfg.tie_word_embeddings else 1)  # embedding, final norm, head
    mtp_extra = [_vector(n, "n", d) for n in "abc"] + [_linear("p", "p", d, 2 * d)]
    mtp_block = mtp_extra + _attention_specs(cfg) + _ffn_specs(cfg, cfg.mtp_is_moe)
    return (
        globals_
        + tally(_attention_specs(cfg) + _ffn_specs(cfg, False), cfg.num_dense_layers)
        + tally(_attention_specs(cfg) + _ffn_specs(cfg, True), cfg.num_moe_layers)
        + tally(mtp_block, cfg.num_mtp_layers)
    )


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
    """Loads a Hugging Face DeepSeek-V3/V2 checkpoint directory into dsjax variables.

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
    except (TypeError, AttributeError, KeyError, OverflowError) as e:
        raise ValueError(f"{config_path} has a field of the wrong type: {e!r}") from None
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


# ====================================================================== saving
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
        nbytes = math.prod(e.shape) * _ST_TO_NP[codes[e.key]].itemsize
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
            arr = np.ascontiguousarray(fetch(e), dtype=_ST_TO_NP[codes[e.key]])
            if arr.shape != e.shape:
                raise ValueError(f"{e.key}: tensor has shape {arr.shape}, expected {e.shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
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
        nbytes = math.prod(e.shape) * _ST_TO_NP[codes[e.key]].itemsize
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
) -> None:
    """Writes `variables` as a Hugging Face checkpoint directory loadable by transformers.

    Writes config.json (`cfg.to_hf()`), safetensors shard(s) of at most `max_shard_bytes`
    (a larger single tensor gets a shard of its own) with per-expert keys and torch [out, in]
    layout, `model.safetensors.index.json` when there is more than one shard, and for each MTP
    layer copies of the embedding and output head. `dtype` casts every parameter (None keeps
    each leaf's dtype; a float8 leaf saved without fp8 is dequantised to float32); the router
    bias stays float32.

    fp8=True writes the official FP8 release layout (SPEC §7): every linear weight except the
    router and the output head as F8_E4M3 with a float32 `<name>_scale_inv` [ceil(out/128),
    ceil(in/128)], and `quantization_config` (fp8, e4m3, dynamic, 128x128) in config.json.
    FP8 leaves (a `keep_fp8=True` load: float8 `kernel` + `kernel_scale_inv`) are written bit
    for bit; float leaves are quantised per 128x128 block (scale = max-abs / 448).

    The files are written to a temporary directory beside `path` and renamed into place at
    the end: a failed save leaves an existing checkpoint at `path` untouched.
    """
    path = Path(path)
    variables = meta.unbox(variables)  # tolerate nn.Partitioned-boxed leaves straight from init
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
