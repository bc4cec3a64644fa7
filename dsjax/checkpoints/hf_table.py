"""The Hugging Face <-> dsjax tensor table (docs/spec.md §7): one `TensorEntry` per HF key.

On disk a DeepSeek-V3 checkpoint uses torch's [out, in] layout and one key per expert
(`model.layers.N.mlp.experts.E.up_proj.weight`); dsjax keeps Flax kernels ([in, out]) with the
layers of each stack (`dense_layers`, `moe_layers`) stacked on a leading axis for `nn.scan`, and
the experts of a layer stacked on a second axis. `hf_tensor_table(cfg)` says, for every HF key,
which leaf it belongs to, at which (layer, expert) index and whether it is transposed; loading
(`hf_load.py`) and saving (`hf_save.py`) both walk it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from dsjax.model.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# config.json `architectures` whose checkpoints this module reads (Kimi-K2 and Moonlight use V3's).
SUPPORTED_ARCHITECTURES = (
    "DeepseekV3ForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV32ForCausalLM",
    "DeepseekV4ForCausalLM",
)

Path_ = tuple[str, ...]


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
    if cfg.use_dsa:  # DeepSeek-V3.2's lightning indexer (docs/spec.md §10)
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


def _layer_of(key: str) -> int | None:
    """N of a `model.layers.N.` key, else None."""
    m = _LAYER_RE.match(key)
    return int(m.group(1)) if m else None


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
