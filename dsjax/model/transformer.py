"""The DeepSeek-V3 model: blocks, scanned dense and MoE stacks, MTP modules, Transformer.

One definition serves training, generation and serving:
`Transformer(cfg).apply(variables, tokens_BT, positions_BT=None, segment_ids_BT=None, mode="train")`.
Segment id 0 marks padding (excluded from MoE statistics); packed documents have ids 1, 2, ...
and, when positions are not given, positions restart at 0 at each document start.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from dsjax.model.config import ModelConfig
from dsjax.model.layers.context import tokens_ahead
from dsjax.model.layers.embed import embed_lookup
from dsjax.model.layers.mla import MLA
from dsjax.model.layers.mlp import Linear, SwiGLU
from dsjax.model.layers.moe import MoE
from dsjax.model.layers.norms import RMSNorm
from dsjax.model.v4_blocks import ATTN_OUT, FFN_OUT, LAYER_IN, V4MTP, cache_shapes, v4_layers

# Names of the block outputs that the "save_*" policies keep for the backward pass (each one
# [B,T,D] in the compute dtype per layer) instead of recomputing the sub-layer that made it, and
# of the block input, which "offload" keeps in host memory.
# (ATTN_OUT, FFN_OUT, LAYER_IN; defined beside the V4 block, which names them too.)
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # "full", but each layer's input (the one [B,T,D] that "full" keeps per layer) waits for the
    # backward pass in host memory (pinned_host) instead of HBM; it is copied back layer by layer.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_IN],
        offload_src="device",
        offload_dst="pinned_host",
    ),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The MLA output only: the backward pass skips re-running attention (its projections and the
    # O(T^2) core); the FFN/MoE (dispatch, all-to-alls) is recomputed.
    "save_attn": jax.checkpoint_policies.save_only_these_names(ATTN_OUT),
    # MLA and FFN/MoE outputs: no sub-layer forward is recomputed except the cheap norms; the
    # internals (MoE dispatch buffers, attention scores) are still not kept.
    "save_attn_ffn": jax.checkpoint_policies.save_only_these_names(ATTN_OUT, FFN_OUT),
}


@flax.struct.dataclass
class ModelOutput:
    """`logits` [B,T,V] (float32); `mtp_logits[k-1]` [B,T,V] at position t predicts token t+k+1
    (None if D=0); its last k positions see a placeholder token and are meaningless;
    `hidden` [B,T,D] the last block's output (before the final norm); MoE statistics per MoE layer:
    `expert_counts` [L_moe,E] tokens routed per expert, `balance_loss` [L_moe] (α = 1), and the
    same for the MTP blocks (`mtp_expert_counts` [D,E], `mtp_balance_loss` [D]) when they are MoE.

    With `logits=False` (the chunked cross-entropy of training) `logits` and `mtp_logits` are None
    and `head_input` [B,T,D] (the final-normed hidden) and `mtp_head_input[k-1]` [B,T,D] hold
    what the output projection would have been applied to (see `head_kernel`).

    `indexer_kl` (scalar float32, None unless `cfg.dsa_stage` is "warmup"/"sparse" in train
    mode): the DSA lightning indexers' KL loss, summed over layers (MTP blocks included), each
    layer's the mean over real query tokens (see dsjax/model/layers/indexer.py)."""

    logits: jax.Array | None
    mtp_logits: tuple[jax.Array, ...] | None
    hidden: jax.Array
    expert_counts: jax.Array | None
    balance_loss: jax.Array | None
    mtp_expert_counts: jax.Array | None
    mtp_balance_loss: jax.Array | None
    head_input: jax.Array | None = None
    mtp_head_input: tuple[jax.Array, ...] | None = None
    indexer_kl: jax.Array | None = None
    # DeepSeek-V4: the mHC streams after the last layer [B, T, n, D] (the MTP module's input).
    streams: jax.Array | None = None


class Block(nn.Module):
    """Pre-norm decoder block: `h = x + MLA(norm(x))`, `out = h + FFN(norm(h))`."""

    cfg: ModelConfig
    moe: bool
    mode: str = "train"

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, token_index_BT=None, pages=None):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x_BTD = checkpoint_name(
            nn.with_logical_constraint(x_BTD, ("batch", "length", "embed")), LAYER_IN
        )
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="attn_norm")(x_BTD)
        attn_BTD, indexer_kl = MLA(cfg, self.mode, with_indexer_kl=True, name="attn")(
            h, positions_BT, segment_ids_BT, token_index_BT, pages
        )
        x_BTD = x_BTD + checkpoint_name(attn_BTD, ATTN_OUT)
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="ffn_norm")(x_BTD)
        if self.moe:
            y, stats = MoE(cfg, name="moe")(h, segment_ids_BT > 0)
        else:
            y = SwiGLU(
                cfg.hidden_size,
                cfg.intermediate_size,
                dtype,
                pdtype,
                cfg.init_std,
                fp8=cfg.fp8,
                name="mlp",
            )(h)
            stats = {}
        y = checkpoint_name(y, FFN_OUT)
        x_BTD = nn.with_logical_constraint(x_BTD + y, ("batch", "length", "embed"))
        if indexer_kl is not None:
            stats = {**stats, "indexer_kl": indexer_kl}
        return x_BTD, stats


class _ScanBlock(Block):
    """Block with the scan calling convention: (carry, broadcast args) -> (carry, per-layer out)."""

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, token_index_BT):
        return super().__call__(x_BTD, positions_BT, segment_ids_BT, token_index_BT)


class _PagedScanBlock(Block):
    """Block over a paged cache in a scanned stack: the pages (broadcast) and the layer index
    (scanned); the stack's page pools are carried through the scan whole, each layer writing
    its own slice in place (`layers.paged`)."""

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, token_index_BT, pages, layer):
        pages = pages.replace(layer=layer)
        return super().__call__(x_BTD, positions_BT, segment_ids_BT, token_index_BT, pages)


def _stack(
    cfg: ModelConfig, moe: bool, length: int, mode: str, name: str, paged: bool = False
) -> nn.Module:
    """The scanned stack of `length` blocks. `paged`: over a paged cache (the blocks take the
    pages and their layer index, the cache collection is carried instead of split by layer:
    no second copy of it is written)."""
    if paged:
        return nn.scan(
            _PagedScanBlock,
            variable_axes={"params": 0, "moe_bias": 0},
            variable_carry="cache",
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 4 + (0,),
            length=length,
            unroll=min(cfg.scan_unroll, length),
            metadata_params={nn.PARTITION_NAME: "stage_layers" if moe else "layers"},
        )(cfg, moe, mode, name=name)
    block = _ScanBlock
    if cfg.remat != "none" and mode == "train":
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, "moe_bias": 0, "cache": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        unroll=min(cfg.scan_unroll, length),
        # The MoE stack's layers split over the pipeline's `stage` axis (sharding.py).
        metadata_params={nn.PARTITION_NAME: "stage_layers" if moe else "layers"},
    )
    return scanned(cfg, moe, mode, name=name)


class MTPModule(nn.Module):
    """Multi-token prediction depth k (docs/spec.md §6).

    `h^k = Block(M [norm(Emb(t_{i+k})); norm(h^{k-1}_i)])`.

    `MTPModule(cfg, mode)(h_prev_BTD, emb_next_BTD, positions_BT, segment_ids_BT)` ->
    (h_BTD, normed_BTD, stats): h_prev_BTD [B, T, D] the previous depth's hidden states (the main
    model's for k = 1); emb_next_BTD [B, T, D] the shared embedding of the tokens k positions
    ahead; positions/segment ids [B, T] as for `Transformer`. h_BTD is this depth's hidden state
    (input of depth k+1), normed_BTD its head-normed form (apply the shared output head to get
    logits predicting token t+k+1), stats the block's MoE statistics ({} when dense).
    Parameters: enorm, hnorm [D], eh_proj [2D, D] (M), block (one decoder block), head_norm [D].
    """

    cfg: ModelConfig
    mode: str = "train"

    @nn.compact
    def __call__(
        self, h_prev_BTD, emb_next_BTD, positions_BT, segment_ids_BT, token_index_BT=None,
        pages=None,
    ):  # fmt: skip
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        e = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="enorm")(emb_next_BTD)
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="hnorm")(h_prev_BTD)
        x = Linear(
            2 * cfg.hidden_size,
            cfg.hidden_size,
            (None, "embed"),
            dtype=dtype,
            param_dtype=pdtype,
            init_std=cfg.init_std,
            fp8=cfg.fp8,
            name="eh_proj",
        )(jnp.concatenate([e, h], axis=-1))
        h_out, stats = Block(cfg, cfg.mtp_is_moe, self.mode, name="block")(
            x, positions_BT, segment_ids_BT, token_index_BT, pages
        )
        normed = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed", name="head_norm")(h_out)
        return h_out, normed, stats


def mtp_ahead(tokens_BT, segment_ids_BT, token_index_BT, k: int, mode: str):
    """(tokens k positions ahead [B, T], the depth-k block's segment ids [B, T]) for MTP depth k.

    Every depth keeps all T slots (any layout, train or inference), so the MTP block's sequence
    shards and tiles like the main model's (T - k tokens divide neither mesh axes nor 128-token
    FP8 tiles evenly). The last k positions of the sequence see a placeholder token: in training
    they get segment 0 (no statistics, zero loss weight); in inference their cache slots are
    rewritten once the real tokens are known."""
    T = tokens_BT.shape[1]
    if mode == "train" and T - k <= 0:
        raise ValueError(f"MTP depth {k} needs more than {k} tokens; got T={T}")
    if token_index_BT is not None:
        # Sorts and gathers along T leave the result unsharded: without this constraint the MTP
        # embedding is built whole ([B, T, D]) on every chip and resharded by an all-reduce
        # (V3 at 131K on v5p-256: 14 GiB + its f32 grad).
        next_tokens = nn.with_logical_constraint(
            tokens_ahead(tokens_BT, token_index_BT, k), ("batch", "length")
        )
        index_BT = token_index_BT
    else:
        next_tokens = jnp.concatenate(
            [tokens_BT[:, k:], jnp.repeat(tokens_BT[:, -1:], k, axis=1)], axis=1
        )
        index_BT = jnp.arange(T)[None, :]
    seg = jnp.where(index_BT + k < T, segment_ids_BT, 0) if mode == "train" else segment_ids_BT
    return next_tokens, seg


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes."""
    B, T = segment_ids_BT.shape
    t = jnp.arange(T, dtype=jnp.int32)
    change = jnp.concatenate(
        [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    start = jax.lax.cummax(jnp.where(change, t, 0), axis=1)
    return t - start


class Transformer(nn.Module):
    """DeepSeek-V3: embedding, dense then MoE stacks, final norm, untied head, D MTP modules.

    `Transformer(cfg).apply(variables, tokens_BT, positions_BT=None, segment_ids_BT=None,
    mode="train", run_mtp=None, logits=True, token_index_BT=None) -> ModelOutput`:
    tokens_BT [B, T] int32; positions_BT [B, T] (default: restart at 0 at each segment start);
    segment_ids_BT [B, T] (default all 1; 0 = padding, excluded from MoE statistics; packed
    documents 1, 2, ...). `mode`: "train" (no cache), "prefill" / "decode" (latent cache in the
    `cache` collection: pass `mutable=["cache"]`; see `init_cache`). `run_mtp` defaults to
    mode == "train". `logits=False` returns the head inputs instead of the [B, T, V] logits
    (chunked cross-entropy). Variables: {"params", "moe_bias"} (+ "cache").
    `token_index_BT` [B, T] (train only): the tokens are a permutation of their sequence (context
    parallelism's zig-zag layout, `dsjax.model.layers.context`) and this is each slot's index in it; the
    MTP modules then keep all T slots (`mtp_*[k-1]` [B, T, ...]; the sequence's last k tokens are
    placeholders in segment 0).
    `pages` (`dsjax.model.layers.paged.Pages`, prefill/decode): the `cache` collection holds
    page pools ([L, N, page, ...] per scanned stack, [N, page, ...] per MTP module) read and
    written through the rows' page tables (docs/spec.md §14) instead of contiguous rows.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=pdtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), ("vocab", "embed")
            ),
        )
        self.final_norm = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed")
        if cfg.is_v4:  # DeepSeek-V4: the mHC streams collapse before the final norm
            from dsjax.model.layers.mhc import HyperHead

            self.hc_head = HyperHead(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                dtype=dtype,
                param_dtype=pdtype,
                init_std=cfg.init_std,
            )

    def lookup(self, tokens_BT: jax.Array) -> jax.Array:
        """Token embeddings [B, T, D] in the compute dtype (`layers.embed.embed_lookup`)."""
        return embed_lookup(self.embed.embedding, tokens_BT, jnp.dtype(self.cfg.dtype))

    def head(self, normed_BTD: jax.Array) -> jax.Array:
        """Output projection in float32 logits."""
        if self.cfg.tie_word_embeddings:
            kernel = self.embed.embedding.T
        else:
            kernel = self.lm_head.kernel
        dtype = jnp.dtype(self.cfg.dtype)
        logits = jnp.dot(
            normed_BTD.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32
        )
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    @nn.compact
    def __call__(
        self,
        tokens_BT,
        positions_BT=None,
        segment_ids_BT=None,
        mode: str = "train",
        run_mtp: bool | None = None,
        logits: bool = True,
        token_index_BT=None,
        pages=None,
    ) -> ModelOutput:
        cfg = self.cfg
        B, T = tokens_BT.shape
        if token_index_BT is not None and mode != "train":
            raise ValueError(
                f"token_index_BT (a permuted layout) is for mode='train', not {mode!r}"
            )
        if pages is not None and (mode == "train" or cfg.is_v4):
            raise ValueError("pages (a paged cache) need a V3 model in mode 'prefill' or 'decode'")
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        if positions_BT is None:
            positions_BT = segment_positions(segment_ids_BT)
        segment_ids_BT = segment_ids_BT.astype(jnp.int32)
        positions_BT = positions_BT.astype(jnp.int32)

        x = self.lookup(tokens_BT)
        if cfg.is_v4:
            return self._v4(x, tokens_BT, positions_BT, segment_ids_BT, mode, run_mtp, logits)
        stats: dict[str, Any] = {}
        dense_stats: dict[str, Any] = {}
        paged = pages is not None
        for moe, n, name in ((False, cfg.num_dense_layers, "dense_layers"),
                             (True, cfg.num_moe_layers, "moe_layers")):  # fmt: skip
            if not n:
                continue
            args: tuple[Any, ...] = (x, positions_BT, segment_ids_BT, token_index_BT)
            if paged:
                args += (pages, jnp.arange(n, dtype=jnp.int32))
            x, layer_stats = _stack(cfg, moe, n, mode, name, paged)(*args)
            if moe:
                stats = layer_stats
            else:
                dense_stats = layer_stats
        hidden = x
        head_input = self.final_norm(hidden)
        want_logits = logits
        logits_BTV = self.head(head_input) if want_logits else None

        mtp_logits: tuple[jax.Array, ...] | None = None
        mtp_counts, mtp_balance, mtp_inputs = [], [], []
        indexer_kls = [
            d["indexer_kl"].sum() for d in (dense_stats, stats) if "indexer_kl" in d
        ]  # [L] per scanned stack
        run_mtp = (mode == "train") if run_mtp is None else run_mtp
        if cfg.num_mtp_layers and run_mtp:
            mtp_list, h = [], hidden
            for k in range(1, cfg.num_mtp_layers + 1):
                next_tokens, mtp_seg = mtp_ahead(tokens_BT, segment_ids_BT, token_index_BT, k, mode)
                h, normed, s = MTPModule(cfg, mode, name=f"mtp_{k - 1}")(
                    h, self.lookup(next_tokens), positions_BT, mtp_seg, token_index_BT, pages,
                )  # fmt: skip
                mtp_inputs.append(normed)
                if want_logits:
                    mtp_list.append(self.head(normed))
                if "counts" in s:
                    mtp_counts.append(s["counts"])
                    mtp_balance.append(s["balance"])
                if "indexer_kl" in s:
                    indexer_kls.append(s["indexer_kl"])
            mtp_logits = tuple(mtp_list) if want_logits else None
        return ModelOutput(
            logits=logits_BTV,
            mtp_logits=mtp_logits,
            hidden=hidden,
            expert_counts=stats.get("counts"),
            balance_loss=stats.get("balance"),
            mtp_expert_counts=jnp.stack(mtp_counts) if mtp_counts else None,
            mtp_balance_loss=jnp.stack(mtp_balance) if mtp_balance else None,
            head_input=None if want_logits else head_input,
            mtp_head_input=None if want_logits or not mtp_inputs else tuple(mtp_inputs),
            indexer_kl=sum(indexer_kls) if indexer_kls else None,
        )

    def _v4(self, x, tokens_BT, positions_BT, segment_ids_BT, mode, run_mtp, want_logits):
        """DeepSeek-V4's body (`v4_blocks`): mHC streams through the layers, HyperHead, final
        norm; MTP depth k sees the main streams (depth 1) or the previous depth's."""
        cfg = self.cfg
        T = tokens_BT.shape[1]
        policy = REMAT_POLICIES[cfg.remat] if cfg.remat != "none" and mode == "train" else None
        streams, stats = v4_layers(
            cfg, mode, x, tokens_BT, positions_BT, segment_ids_BT, policy=policy
        )
        hidden = self.hc_head(streams)
        head_input = self.final_norm(hidden)
        mtp_inputs, mtp_counts, mtp_balance = [], [], []
        run_mtp = (mode == "train") if run_mtp is None else run_mtp
        if cfg.num_mtp_layers and run_mtp:
            h = streams
            for k in range(1, cfg.num_mtp_layers + 1):
                if mode == "train" and T - k <= 0:
                    raise ValueError(f"MTP depth {k} needs more than {k} tokens; got T={T}")
                nxt = jnp.concatenate([tokens_BT[:, k:], jnp.repeat(tokens_BT[:, -1:], k, 1)], 1)
                seg = segment_ids_BT
                if mode == "train":  # the last k positions see a placeholder token
                    seg = jnp.where(jnp.arange(T)[None, :] + k < T, segment_ids_BT, 0)
                h, normed, s = V4MTP(cfg, mode, name=f"mtp_{k - 1}")(
                    h, self.lookup(nxt), nxt, positions_BT, seg
                )
                mtp_inputs.append(normed)
                mtp_counts.append(s["counts"])
                mtp_balance.append(s["balance"])
        return ModelOutput(
            logits=self.head(head_input) if want_logits else None,
            mtp_logits=tuple(self.head(m) for m in mtp_inputs) if want_logits and mtp_inputs
            else None,
            hidden=hidden,
            expert_counts=stats.get("counts"),
            balance_loss=stats.get("balance"),
            mtp_expert_counts=jnp.stack(mtp_counts) if mtp_counts else None,
            mtp_balance_loss=jnp.stack(mtp_balance) if mtp_balance else None,
            head_input=None if want_logits else head_input,
            mtp_head_input=None if want_logits or not mtp_inputs else tuple(mtp_inputs),
            streams=streams,
        )  # fmt: skip


def head_kernel(cfg: ModelConfig, params) -> jax.Array:
    """The output projection [D, V] (the tied embedding transposed when `tie_word_embeddings`)."""
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def init_variables(cfg: ModelConfig, rng: jax.Array, batch: int = 1, seq_len: int = 8):
    """Initialised {"params", "moe_bias"} (unboxed) for `cfg`; use `abstract_variables` for shapes."""
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    init = jax.jit(Transformer(cfg).init).lower(rng, tokens)
    return nn.unbox(init.compile(compiler_options=cheap_compile_options())(rng, tokens))


def cheap_compile_options() -> dict[str, str | bool]:
    """XLA options for run-once programs (initialisation): on CPU, skip the LLVM optimisation
    that dominates their compile time (random-number kernels); elsewhere, the defaults."""
    return {"xla_backend_optimization_level": "0"} if jax.default_backend() == "cpu" else {}


def abstract_variables(cfg: ModelConfig):
    """Shapes and logical-axis metadata of the variables, without allocating them."""
    tokens = jax.ShapeDtypeStruct((1, max(2, cfg.num_mtp_layers + 1)), jnp.int32)
    return jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)


def init_cache(cfg: ModelConfig, batch: int, max_len: int):
    """Zero decode cache for `batch` rows of `max_len` positions: latent + rotated key per layer."""
    if cfg.is_v4:  # from the shapes (`v4_blocks.cache_shapes`): no prefill trace at max_len
        return jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(cfg, batch, max_len)
        )
    tokens = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(
        lambda t: Transformer(cfg).init(jax.random.key(0), t, mode="prefill", run_mtp=True), tokens
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


# The cache layout, declared here with `init_cache`: leaves of the scanned stacks are
# [L, B, S, ...] (nn.scan adds the leading layer axis), MTP modules' leaves [B, S, ...];
# DeepSeek-V4's scanned groups `blocks_{s}` (`v4_blocks.layer_groups`) [repeats, B, ...], its
# unrolled `layers_{i}` [B, ...].
SCANNED_CACHE_STACKS = ("dense_layers", "moe_layers")


def cache_batch_axis(top_level_name: str) -> int:
    """Batch axis of the cache leaves under `init_cache(...)[top_level_name]`; the sequence
    (slot) axis is the next one."""
    scanned = top_level_name in SCANNED_CACHE_STACKS or top_level_name.startswith("blocks_")
    return 1 if scanned else 0


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from shapes only.

    `total`: the main model (MTP excluded); `activated`: what one token computes with: the main
    model minus the input embedding table (a lookup) minus the routed experts it is not sent to
    (the convention behind DeepSeek's "37B activated"); `mtp`: the MTP modules (their embedding
    and head are shared, so not counted).
    """
    params = nn.unbox(abstract_variables(cfg))["params"]
    total = mtp = experts = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(p, "key", str(p)) for p in path]
        n = int(leaf.size)
        if keys[0].startswith("mtp_"):
            mtp += n
            continue
        total += n
        if "experts" in keys:
            experts += n
    routed_fraction = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    activated = total - embedding - experts + round(experts * routed_fraction)
    return {"total": total, "activated": activated, "mtp": mtp}
