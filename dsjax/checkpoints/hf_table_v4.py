"""DeepSeek-V4's tensor table (docs/spec.md §12): one `TensorEntry` per tensor of the released
checkpoint, in the official naming (`embed.weight`, `layers.{i}.attn.wq_a.weight`,
`layers.{i}.ffn.experts.{e}.w1.weight`, `mtp.{k}.…`) that transformers' `deepseek_v4`
conversion mapping reads.

dsjax keeps V4's layers in the groups of `v4_blocks.layer_groups`: unrolled `layers_{i}` (no
layer axis) or scanned `blocks_{s}/block_{j}` (a leading repeat axis; `v4_blocks.layer_slot`
says where layer i lives), and each layer's routed experts stacked ([E, in, out]). The hash-routing table `tid2eid` [vocab, k] (hash layers) and the
routing bias (the others) live in the `moe_bias` collection.

transformers' `save_pretrained` writes a mix of names (`model.` + the official names, but
`model.embed_tokens.weight`, `model.hc_head.hc_fn` …); `canonical_key` maps those back so both
load.
"""

from __future__ import annotations

import dataclasses

from dsjax.checkpoints.hf_table import TensorEntry
from dsjax.model.config import CSA, HCA, SLIDING, ModelConfig
from dsjax.model.v4_blocks import layer_groups, layer_slot

Path_ = tuple[str, ...]

# transformers' save_pretrained names -> official names (after dropping a leading "model.").
_HF_SAVED = {
    "embed_tokens.weight": "embed.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}


def canonical_key(key: str) -> str:
    """The official name of a tensor key as transformers' save_pretrained writes it."""
    if key.startswith("model."):
        key = key[len("model.") :]
    if key.endswith(".attn.norm.weight"):  # its reverse rename of `.norm.` -> `.kv_norm.`
        return key[: -len("norm.weight")] + "kv_norm.weight"
    return _HF_SAVED.get(key, key)


@dataclasses.dataclass(frozen=True)
class _Row:
    key: str
    path: str
    shape: tuple[int, ...]
    transpose: bool = False
    collection: str = "params"
    experts: int = 0  # > 0: "{e}" in key, stacked on the leaf's first axis


def _linear(key: str, path: str, out_dim: int, in_dim: int) -> _Row:
    return _Row(key, path, (out_dim, in_dim), True)


def _compressor_rows(pre: str, tree: str, cfg: ModelConfig, rate: int, dim: int, c: int):
    D = cfg.hidden_size
    return [
        _linear(f"{pre}.wkv.weight", f"{tree}/wkv/kernel", c * dim, D),
        _linear(f"{pre}.wgate.weight", f"{tree}/wgate/kernel", c * dim, D),
        _Row(f"{pre}.ape", f"{tree}/ape", (rate, c * dim)),
        _Row(f"{pre}.norm.weight", f"{tree}/norm/scale", (dim,)),
    ]


def _block_rows(cfg: ModelConfig, layer_type: str, hashed: bool) -> list[_Row]:
    """One decoder block, keys relative to its prefix, paths relative to its tree node."""
    D, H, d, g = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
    n, E, F, V = cfg.hc_mult, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.vocab_size
    q, r = cfg.q_lora_rank, cfg.o_lora_rank
    rows: list[_Row] = []
    for hc in ("attn", "ffn"):
        rows += [
            _linear(f"hc_{hc}_fn", f"hc_{hc}/fn", (2 + n) * n, n * D),
            _Row(f"hc_{hc}_base", f"hc_{hc}/base", ((2 + n) * n,)),
            _Row(f"hc_{hc}_scale", f"hc_{hc}/scale", (3,)),
        ]
    rows += [
        _Row("attn_norm.weight", "attn_norm/scale", (D,)),
        _Row("ffn_norm.weight", "ffn_norm/scale", (D,)),
        _linear("attn.wq_a.weight", "attn/wq_a/kernel", q, D),
        _Row("attn.q_norm.weight", "attn/q_norm/scale", (q,)),
        _linear("attn.wq_b.weight", "attn/wq_b/kernel", H * d, q),
        _linear("attn.wkv.weight", "attn/wkv/kernel", d, D),
        _Row("attn.kv_norm.weight", "attn/kv_norm/scale", (d,)),
        _linear("attn.wo_a.weight", "attn/wo_a/kernel", g * r, H * d // g),
        _linear("attn.wo_b.weight", "attn/wo_b/kernel", D, g * r),
        _Row("attn.attn_sink", "attn/sinks", (H,)),
    ]
    if layer_type == HCA:
        rows += _compressor_rows(
            "attn.compressor", "attn/compressor", cfg, cfg.compress_rate_hca, d, 1
        )
    if layer_type == CSA:
        m, hi, ci = cfg.compress_rate_csa, cfg.index_n_heads, cfg.index_head_dim
        rows += _compressor_rows("attn.compressor", "attn/compressor", cfg, m, d, 2)
        rows += _compressor_rows(
            "attn.indexer.compressor", "attn/indexer/compressor", cfg, m, ci, 2
        )
        rows += [
            _linear("attn.indexer.wq_b.weight", "attn/indexer/wq_b/kernel", hi * ci, q),
            _linear("attn.indexer.weights_proj.weight", "attn/indexer/weights_proj/kernel", hi, D),
        ]
    rows.append(_linear("ffn.gate.weight", "moe/router/kernel", E, D))
    if hashed:
        k = cfg.num_experts_per_tok
        rows.append(_Row("ffn.gate.tid2eid", "moe/tid2eid", (V, k), collection="moe_bias"))
    else:
        rows.append(_Row("ffn.gate.bias", "moe/bias", (E,), collection="moe_bias"))
    for w, name, shape in (("w1", "gate", (F, D)), ("w3", "up", (F, D)), ("w2", "down", (D, F))):
        rows.append(
            _Row(f"ffn.experts.{{e}}.{w}.weight", f"moe/experts/{name}", shape, True, experts=E)
        )
    for w, name, (o, i) in (("w1", "gate", (F, D)), ("w3", "up", (F, D)), ("w2", "down", (D, F))):
        rows.append(_linear(f"ffn.shared_experts.{w}.weight", f"moe/shared/{name}/kernel", o, i))
    return rows


def _entries(
    rows: list[_Row], key_prefix: str, tree: Path_, block: str, layer: int | None = None,
    repeats: int = 0,
):  # fmt: skip
    """Entries of `rows` under `tree`; `layer`: the index on a scanned group's leading axis
    (`repeats` long)."""
    for row in rows:
        slot = row.shape[::-1] if row.transpose else row.shape
        path = tree + tuple(row.path.split("/"))
        for e in range(row.experts) if row.experts else (None,):
            yield TensorEntry(
                key=key_prefix + (row.key.format(e=e) if row.experts else row.key),
                collection=row.collection,
                path=path,
                leaf_shape=((repeats,) if layer is not None else ())
                + ((row.experts,) if row.experts else ())
                + slot,
                layer=layer,
                expert=e,
                transpose=row.transpose,
                shape=row.shape,
                block=block,
            )


def v4_tensor_table(cfg: ModelConfig) -> list[TensorEntry]:
    """Every tensor of a DeepSeek-V4 checkpoint of `cfg` (MTP layers included), in order."""
    D, V, n = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    table = list(_entries([_Row("embed.weight", "embed/embedding", (V, D))], "", (), ""))
    repeats = {g.name: g.repeats for g in layer_groups(cfg)}
    for i, layer_type in enumerate(cfg.layer_types):
        rows = _block_rows(cfg, layer_type, i < cfg.num_hash_layers)
        tree, layer = layer_slot(cfg, i)
        table += _entries(rows, f"layers.{i}.", tree, f"layers.{i}.", layer, repeats[tree[0]])
    head = [
        _linear("hc_head_fn", "hc_head/hc_fn", n, n * D),
        _Row("hc_head_base", "hc_head/hc_base", (n,)),
        _Row("hc_head_scale", "hc_head/hc_scale", (1,)),
    ]
    table += _entries(
        [*head, _Row("norm.weight", "final_norm/scale", (D,)), _linear("head.weight", "lm_head/kernel", V, D)],
        "", (), "",
    )  # fmt: skip
    for k in range(cfg.num_mtp_layers):
        pre, tree = f"mtp.{k}.", (f"mtp_{k}",)
        extras = [
            _Row("enorm.weight", "enorm/scale", (D,)),
            _Row("hnorm.weight", "hnorm/scale", (D,)),
            _linear("e_proj.weight", "e_proj/kernel", D, D),
            _linear("h_proj.weight", "h_proj/kernel", D, D),
            _Row("norm.weight", "norm/scale", (D,)),
        ] + head
        table += _entries(extras, pre, tree, pre)
        table += _entries(_block_rows(cfg, SLIDING, False), pre, (*tree, "block"), pre)
    return table


# Which tensors the release stores in FP8 (128x128 blocks, `.scale` e8m0): the attention's
# linear projections, the shared experts, the indexer's query projection, MTP's e/h projections
# (and the routed experts of the base models; FP4 in the instruct ones). The compressors, the
# indexer's weights_proj, the router, norms, hc_*, ape, sinks, embedding and head are not.
_FP8_SUFFIXES = (
    "attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight",
    "attn.wo_b.weight", "attn.indexer.wq_b.weight", "e_proj.weight", "h_proj.weight",
)  # fmt: skip


def fp8_in_release(key: str) -> bool:
    """Whether the release stores `key` as FP8 with 128x128 e8m0 block scales."""
    return key.endswith(_FP8_SUFFIXES) or ".shared_experts." in key


def is_routed_expert(key: str) -> bool:
    return ".ffn.experts." in key


def float32_leaf(path: Path_) -> bool:
    """Leaves V4 keeps in float32 whatever the parameter dtype (as the reference does): the mHC
    weights, the attention sinks and the compressors' position biases."""
    return path[-1] in ("sinks", "ape") or any(p in ("hc_attn", "hc_ffn", "hc_head") for p in path)
