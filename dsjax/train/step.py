"""Training step: TrainState, optimizer, loss, train_step/eval_step, routing-bias update, sharded init.

Loss = main cross-entropy + λ · mean over MTP depths of their cross-entropies + α · the
sequence-wise balance loss summed over MoE layers, all over real tokens only. After each optimizer
step the routing correction bias of every MoE layer moves by γ · sign(mean load − load), from the
token counts of the whole global batch (docs/spec.md §5) — outside the optimizer, which never
sees it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Self, cast

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax.core import meta

from dsjax import run_config
from dsjax.model import sharding
from dsjax.model.config import ModelConfig
from dsjax.model.layers.context import (
    context_size,
    fold_context,
    shift_ahead,
    to_context_layout,
)
from dsjax.model.transformer import (
    ModelOutput,
    Transformer,
    cheap_compile_options,
    head_kernel,
)
from dsjax.run_config import RunConfig, TrainOptions
from dsjax.train.stack_layout import StackLayout


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite loss, ...); the message names the step."""


@flax.struct.dataclass
class TrainState:
    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime

        def replace(self, **changes: Any) -> Self: ...

    step: Any  # a jax.Array; also the tree of its sharding or abstract shape
    params: Any
    moe_bias: Any
    opt_state: Any


# ----------------------------------------------------------------------------- config
def model_config(config: ml_collections.ConfigDict | RunConfig) -> ModelConfig:
    """The ModelConfig of a run (its ConfigDict or RunConfig), through `dsjax.run_config`:
    `config.model` plus the remat policy and DSA stage from `config.train`."""
    return run_config.parse(config).model


def validate_config(config: ml_collections.ConfigDict | RunConfig, mesh) -> RunConfig:
    """The validated RunConfig; raises ValueError naming the field and its rule for a run that
    cannot work. With a `mesh` (None skips them) also the rules that involve the device layout."""
    run = run_config.parse(config)
    if mesh is not None:
        run_config.check_mesh(run, mesh)
    return run


def train_options(config: ml_collections.ConfigDict | RunConfig | TrainOptions) -> TrainOptions:
    """The typed `config.train` that the jitted step reads."""
    if isinstance(config, TrainOptions):
        return config
    return run_config.parse(config).train


def make_optimizer(config: ml_collections.ConfigDict | RunConfig):
    """AdamW (no decay on norm scales), warm-up then cosine, global-norm clipping."""
    run = run_config.parse(config)
    o, steps = run.optim, run.train.steps
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=max(steps, o.warmup_steps + 1),
        end_value=o.lr * o.min_lr_ratio,
    )

    stage = run.train.dsa_stage

    def decay_mask(params):  # not norm scales, nor what no gradient trains (see _decays)
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) != "scale" and _decays(path, stage),
            params,
        )

    moment_dtype = o.moment_dtype
    if moment_dtype == "float32":
        adamw = optax.adamw(
            schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask
        )
    else:
        adamw = optax.chain(
            scale_by_adam_in(jnp.dtype(moment_dtype), b1=o.b1, b2=o.b2),
            optax.add_decayed_weights(o.weight_decay, decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    clip = optax.clip_by_global_norm(o.clip_norm)
    if stage == "warmup":  # DSA warm-up: every parameter but the indexers' frozen
        clip = indexer_only(clip)
    tx = optax.chain(clip, adamw)
    return tx, schedule


def is_indexer_param(path) -> bool:
    """A parameter of a DSA lightning indexer (`.../attn/indexer/...`)."""
    return any(getattr(p, "key", None) == "indexer" for p in path)


def _decays(path, stage: str) -> bool:
    """Weight decay applies to a parameter the stage trains: in the DSA warm-up only the
    indexers; otherwise all but the indexers when their loss is off (no gradient reaches them)."""
    if stage == "warmup":
        return is_indexer_param(path)
    return stage != "off" or not is_indexer_param(path)


def indexer_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to the gradients with every non-indexer entry zeroed first, so Adam sees
    zero there and (with no decay on them) the update is exactly zero: the DSA warm-up trains
    only the lightning indexers, and clipping measures their gradient alone. The state is
    inner's, so the optimizer state has the same tree in every stage (checkpoints carry over)."""

    def update(updates, state, params=None):
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u: u if is_indexer_param(path) else jnp.zeros_like(u), updates
        )
        return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update)


def scale_by_adam_in(moment_dtype, b1: float, b2: float, eps: float = 1e-8):
    """Adam's scaling with BOTH moments stored in `moment_dtype` (DeepSeek-V3 keeps them in BF16);
    the update math runs in float32: m, v are read up to f32, updated, bias-corrected, and stored
    back rounded. The state is an `optax.ScaleByAdamState` like optax.adam's."""

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, moment_dtype)  # noqa: E731
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        c = count.astype(jnp.float32)
        c1, c2 = 1.0 - b1**c, 1.0 - b2**c

        def one(g, m, v):
            g = g.astype(jnp.float32)
            m = b1 * m.astype(jnp.float32) + (1.0 - b1) * g
            v = b2 * v.astype(jnp.float32) + (1.0 - b2) * jnp.square(g)
            u = (m / c1) / (jnp.sqrt(v / c2) + eps)
            return u, m.astype(moment_dtype), v.astype(moment_dtype)

        out = jax.tree.map(one, grads, state.mu, state.nu)
        is_triple = lambda x: isinstance(x, tuple)  # noqa: E731
        pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_triple)  # noqa: E731
        updates = jax.tree.map(lambda u, g: u.astype(g.dtype), pick(0), grads)
        return updates, optax.ScaleByAdamState(count=count, mu=pick(1), nu=pick(2))

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- loss
def cross_entropy_sums(logits_BTV, targets_BT, weights_BT):
    """(Σ w·CE, Σ w) in float32."""
    logits = logits_BTV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return ((lse - picked) * weights_BT).sum(), weights_BT.sum()


@jax.custom_vjp
def linear_cross_entropy_sums(head_input_BTD, kernel_DV, targets_BT, weights_BT):
    """(Σ w·CE, Σ w) of the logits `head_input @ kernel` (float32), fused with its gradient.

    The same value as `cross_entropy_sums(head_input @ kernel, ...)`, but the backward pass is
    written out: d logits = (softmax − one-hot) · w, one elementwise fusion, then the two head
    matmuls. Autodiff of the plain form builds the one-hot part with a scatter into a zeroed
    [B·T, V] buffer and adds it to the softmax part (three passes over the logits, the scatter
    serial on CPU). Leading dims are free ([B, T] or [B, chunk]); `kernel_DV` is used as given
    (cast it to the compute dtype first) and the logits are saved for the backward pass."""
    return _linear_ce_fwd(head_input_BTD, kernel_DV, targets_BT, weights_BT)[0]


def _linear_ce_fwd(h_BTD, kernel_DV, targets_BT, weights_BT):
    logits = jnp.einsum(
        "...d,dv->...v",
        h_BTD.astype(kernel_DV.dtype),
        kernel_DV,
        preferred_element_type=jnp.float32,
    )
    if logits.ndim == 3:
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    lse = jax.nn.logsumexp(logits, axis=-1)
    ce = lse - jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    w = weights_BT.astype(jnp.float32)
    sums = ((ce * w).sum(), w.sum())
    return sums, (h_BTD, kernel_DV, targets_BT, weights_BT, logits, lse, ce)


def _linear_ce_bwd(res, g):
    h_BTD, kernel_DV, targets_BT, weights_BT, logits, lse, ce = res
    g_sum, g_count = g
    scale = (g_sum * weights_BT.astype(jnp.float32))[..., None]
    onehot = jnp.arange(logits.shape[-1]) == targets_BT[..., None]
    d_logits = ((jnp.exp(logits - lse[..., None]) - onehot) * scale).astype(kernel_DV.dtype)
    d_h = jnp.einsum("...v,dv->...d", d_logits, kernel_DV, preferred_element_type=jnp.float32)
    d_kernel = jnp.einsum(
        "...d,...v->dv",
        h_BTD.astype(kernel_DV.dtype),
        d_logits,
        preferred_element_type=jnp.float32,
    )
    d_weights = (g_sum * ce + g_count).astype(weights_BT.dtype)
    return d_h.astype(h_BTD.dtype), d_kernel.astype(kernel_DV.dtype), None, d_weights


linear_cross_entropy_sums.defvjp(_linear_ce_fwd, _linear_ce_bwd)


def chunked_cross_entropy_sums(head_input_BTD, kernel_DV, targets_BT, weights_BT, chunk: int):
    """(Σ w·CE, Σ w) like `cross_entropy_sums(head_input @ kernel, ...)`, computed `chunk`
    positions of every sequence at a time (a chunk's logits are [B, chunk, V] float32) inside a
    rematerialised scan, so the [B,T,V] logits never exist whole, in the forward or the backward
    pass. `kernel_DV` is used as given (cast it to the compute dtype first); T is padded to a
    multiple of `chunk` with zero-weight positions. `chunk` ≥ T is one fused call, no scan."""
    B, T, D = head_input_BTD.shape
    if chunk >= T:
        return linear_cross_entropy_sums(head_input_BTD, kernel_DV, targets_BT, weights_BT)
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        head_input_BTD = jnp.pad(head_input_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        weights_BT = jnp.pad(weights_BT, ((0, 0), (0, pad)))

    def chunks(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(carry, xs):
        s, m = linear_cross_entropy_sums(*xs[:1], kernel_DV, *xs[1:])
        return (carry[0] + s, carry[1] + m), None

    zero = jnp.float32(0.0)
    xs = (chunks(head_input_BTD), chunks(targets_BT), chunks(weights_BT.astype(jnp.float32)))
    (ce_sum, n_tok), _ = jax.lax.scan(body, (zero, zero), xs)
    return ce_sum, n_tok


def mtp_weights(batch, k: int):
    """Depth-k label weights [B, T]: position i predicts targets[i+k] from inputs[i+k]; valid only
    when both positions are real and belong to the same document (zero for the last k)."""
    seg, w = batch["segment_ids"], batch["weights"]
    same = (seg[:, k:] == seg[:, :-k]).astype(jnp.float32)
    return jnp.pad(w[:, k:] * w[:, :-k] * same, ((0, 0), (0, k)))


def loss_fn(params, moe_bias, batch, *, model: Transformer, train_cfg: TrainOptions):
    # The head is applied in `output_loss`, fused with the cross-entropy.
    out = cast(
        ModelOutput,
        model.apply(
            {"params": params, "moe_bias": moe_bias},
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            logits=False,
            token_index_BT=batch.get("token_index"),  # context parallelism's zig-zag layout
        ),
    )
    return output_loss(out, params, batch, cfg=model.cfg, train_cfg=train_cfg)


def output_loss(out: ModelOutput, params, batch, *, cfg: ModelConfig, train_cfg: TrainOptions):
    """(loss, aux) of a model output taken with `logits=False`: the head fused with the chunked
    cross-entropy, MTP, balance and indexer losses (the part of `loss_fn` after the model)."""
    # ce_chunk 0: the whole sequence at once.
    chunk = train_cfg.ce_chunk or batch["inputs"].shape[1]
    kernel = head_kernel(cfg, params).astype(jnp.dtype(cfg.dtype))
    # Gathered whole along D (FSDP) for the cross-entropy chunks: left to itself, XLA may instead
    # move every chip's tokens to the chips holding a D slice of the head and materialise the
    # logits of all of them there (31.6 GiB per chip for V3 with context parallelism at 131K).
    kernel = nn.with_logical_constraint(kernel, (None, "vocab"))

    def ce(h, t, w):  # context parallelism: each chip's share of a sequence is its own row
        h, t, w = fold_context(h, t, w)
        return chunked_cross_entropy_sums(h, kernel, t, w, min(chunk, h.shape[1]))

    main_in, mtp_in = out.head_input, out.mtp_head_input
    ce_sum, n = ce(main_in, batch["targets"], batch["weights"])
    main = ce_sum / jnp.maximum(n, 1.0)
    loss = main
    aux = {"main_ce": main, "tokens": n, "out": out}
    if mtp_in:
        mtp = []
        for k, x in enumerate(mtp_in, start=1):
            if "token_index" in batch:  # permuted layout: full-length, targets laid out with it
                t, w = batch["mtp_targets"][:, k - 1], batch["mtp_weights"][:, k - 1]
            else:
                t, w = shift_ahead(batch["targets"], k), mtp_weights(batch, k)
            s, m = ce(x, t, w)
            mtp.append(s / jnp.maximum(m, 1.0))
        aux["mtp_ce"] = sum(mtp) / len(mtp)
        loss = loss + train_cfg.mtp_weight * aux["mtp_ce"]
    balance: jax.Array | float = 0.0
    if out.balance_loss is not None:
        balance = out.balance_loss.sum()
    if out.mtp_balance_loss is not None:
        balance = balance + out.mtp_balance_loss.sum()
    aux["balance"] = jnp.asarray(balance, jnp.float32)
    loss = loss + train_cfg.balance_loss_weight * aux["balance"]
    if out.indexer_kl is not None:  # DSA stages: the indexers' KL, the only loss they get
        if cfg.dsa_stage == "warmup":  # main model frozen: no backward pass through it
            loss = jax.lax.stop_gradient(loss)
        aux["indexer_kl"] = out.indexer_kl
        loss = loss + train_cfg.indexer_loss_weight * out.indexer_kl
    return loss, aux


def routing_biases(moe_bias):
    """The `moe_bias` tree without DeepSeek-V4's hash-routing tables (`tid2eid`, fixed
    integers): the routing biases the balancing rule updates."""
    if not isinstance(moe_bias, dict):
        return moe_bias
    kept = {k: routing_biases(v) for k, v in moe_bias.items() if k != "tid2eid"}
    return {k: v for k, v in kept.items() if not isinstance(v, dict) or v}


def expert_counts_tree(moe_bias, out: ModelOutput):
    """Per-expert token counts arranged like `routing_biases(moe_bias)`."""
    counts: dict[str, Any] = {}
    if "moe_layers" in moe_bias:
        counts["moe_layers"] = {"moe": {"bias": out.expert_counts}}
    # DeepSeek-V4 (`v4_blocks.layer_groups`): out.expert_counts stacks the top-k routed layers
    # in layer order: unrolled `layers_{i}`, scanned `blocks_{s}` (repeat-major, then `block_{j}`).
    groups = sorted(
        (int(name.split("_")[1]), name) for name in moe_bias
        if name.startswith(("layers_", "blocks_"))
    )  # fmt: skip
    row = 0
    for _, name in groups:
        if name.startswith("layers_"):
            if "bias" in moe_bias[name]["moe"]:
                assert out.expert_counts is not None  # a routed layer reports its counts
                counts[name] = {"moe": {"bias": out.expert_counts[row]}}
                row += 1
            continue
        period = sorted(moe_bias[name], key=lambda j: int(j.split("_")[1]))
        routed = [j for j in period if "bias" in moe_bias[name][j]["moe"]]
        if not routed:
            continue
        assert out.expert_counts is not None
        r = moe_bias[name][routed[0]]["moe"]["bias"].shape[0]
        part = out.expert_counts[row : row + r * len(routed)].reshape(r, len(routed), -1)
        counts[name] = {j: {"moe": {"bias": part[:, q]}} for q, j in enumerate(routed)}
        row += r * len(routed)
    for name in moe_bias:
        if name.startswith("mtp_"):
            k = int(name.split("_")[1])
            assert out.mtp_expert_counts is not None
            counts[name] = {"block": {"moe": {"bias": out.mtp_expert_counts[k]}}}
    return counts


def _merge(full, part):
    """`full` with the leaves present in `part` replaced."""
    if not isinstance(full, dict):
        return part
    return {k: _merge(v, part[k]) if k in part else v for k, v in full.items()}


def update_bias(moe_bias, counts, rate: float):
    """Auxiliary-loss-free balancing: b_i <- b_i + γ sign(mean_j c_j - c_i), per layer (hash
    tables untouched)."""
    new = jax.tree.map(
        lambda b, c: b + rate * jnp.sign(c.mean(-1, keepdims=True) - c),
        routing_biases(moe_bias),
        counts,
    )
    return _merge(moe_bias, new)


def load_imbalance(counts) -> jax.Array:
    """max/mean expert load, averaged over MoE layers (1.0 = perfectly balanced)."""
    ratios = [
        (c.max(-1) / jnp.maximum(c.mean(-1), 1e-9)).reshape(-1) for c in jax.tree.leaves(counts)
    ]
    return jnp.concatenate(ratios).mean() if ratios else jnp.float32(1.0)


# ----------------------------------------------------------------------------- steps
def _split_micro(batch, n: int):
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def prepare_batch(batch, model):
    """The batch as `loss_fn` takes it under the mesh in scope: with `context` > 1 the sequence is
    split over it, in the zig-zag layout that balances causal attention (`dsjax.model.layers.context`)."""
    C = context_size()
    if C == 1 or model.cfg.is_v4:  # V4: contiguous shards (its attention reads the halo)
        return batch
    return to_context_layout(batch, C, model.cfg.num_mtp_layers, mtp_weights)


def train_step(state: TrainState, batch, *, model, tx, schedule, train_cfg: TrainOptions):
    """One optimizer step over `grad_accum` micro-batches, then the routing-bias update.

    Under a mesh whose `stage` axis is > 1 each accumulation micro-batch is itself pipelined
    (`config.train.pipeline_schedule` over `config.train.microbatches`, dsjax/train/pipeline.py),
    and `state`'s MoE stack (params, optimizer moments) is in the schedule's row order
    (`dsjax.train.stack_layout.stack_layout(...).stored(state)`; model order for GPipe/1F1B)."""
    n_micro = train_cfg.grad_accum
    batch = prepare_batch(batch, model)
    grads_of = _pipelined_grads if pipeline_stages() > 1 else _grads
    grads_of = functools.partial(grads_of, model=model, train_cfg=train_cfg)

    def micro(carry, mb):
        grads_acc, sums = carry
        new, grads, counts = grads_of(state.params, state.moe_bias, mb)
        sums = jax.tree.map(jnp.add, sums, {"metrics": new, "counts": counts})
        return (jax.tree.map(jnp.add, grads_acc, grads), sums), None

    zeros_counts = jax.tree.map(jnp.zeros_like, routing_biases(state.moe_bias))
    zero_metrics = {k: jnp.float32(0.0) for k in ("loss", "main_ce", "mtp_ce", "balance", "tokens")}
    if model.cfg.dsa_stage != "off":
        zero_metrics["indexer_kl"] = jnp.float32(0.0)
    init = (
        jax.tree.map(jnp.zeros_like, state.params),
        {"metrics": zero_metrics, "counts": zeros_counts},
    )
    if n_micro == 1:  # no zeroed accumulators, no scan: one pass over the batch
        (grads, sums), _ = micro(init, batch)
    else:
        (grads, sums), _ = jax.lax.scan(micro, init, _split_micro(batch, n_micro))
        grads = jax.tree.map(lambda g: g / n_micro, grads)
    metrics = {k: v / n_micro for k, v in sums["metrics"].items()}
    metrics["tokens"] = sums["metrics"]["tokens"]
    opt_state, back = to_device(state.opt_state)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    opt_state = back(opt_state)
    params = optax.apply_updates(state.params, updates)
    moe_bias = update_bias(state.moe_bias, sums["counts"], train_cfg.bias_update_rate)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(state.step)
    metrics["load_imbalance"] = load_imbalance(sums["counts"])
    new_state = state.replace(
        step=state.step + 1, params=params, moe_bias=moe_bias, opt_state=opt_state
    )
    return new_state, metrics


def pipeline_stages() -> int:
    """The `stage` axis size of the mesh in scope (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "stage" not in mesh.axis_names else int(mesh.shape["stage"])


def _grads(params, moe_bias, mb, *, model, train_cfg):
    """(metrics, grads, expert counts like `moe_bias`) of one micro-batch on the whole mesh."""
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, train_cfg=train_cfg), has_aux=True
    )
    (loss, aux), grads = grad_fn(params, moe_bias, mb)
    counts = expert_counts_tree(moe_bias, aux["out"])
    new = {
        "loss": loss,
        "main_ce": aux["main_ce"],
        "mtp_ce": aux.get("mtp_ce", jnp.float32(0.0)),
        "balance": aux["balance"],
        "tokens": aux["tokens"],
    }
    if "indexer_kl" in aux:
        new["indexer_kl"] = aux["indexer_kl"]
    return new, grads, counts


def _pipelined_grads(params, moe_bias, mb, *, model, train_cfg):
    """`_grads` through the pipeline over `stage` (means over its micro-batches)."""
    from dsjax.train.pipeline import pipeline_grads

    schedule, microbatches = run_config.pipeline_settings(train_cfg, pipeline_stages())
    _, grads, metrics, counts = pipeline_grads(
        params, moe_bias, mb, model=model, train_cfg=train_cfg,
        schedule=schedule, microbatches=microbatches,
    )  # fmt: skip
    # Means over the pipeline's micro-batches (tokens: their sum), as `_grads` gives for one.
    return (
        {k: metrics[k] for k in ("loss", "main_ce", "mtp_ce", "balance", "tokens")},
        grads,
        counts,
    )


def jit_train_step(
    model: Transformer,
    tx,
    schedule,
    config: ml_collections.ConfigDict | RunConfig | TrainOptions,
    *,
    shardings=None,
    mesh=None,
    donate: bool = True,
):
    """The jitted `train_step` (the one place it is built): `(state, batch) -> (state, metrics)`
    with the state donated. With `shardings` (the state's, from `state_shardings`) and `mesh`,
    the batch is split over the mesh's batch axes and the metrics come back replicated."""
    train_cfg = train_options(config)
    fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule, train_cfg=train_cfg)
    donate_argnums = (0,) if donate else ()
    options = compiler_options(train_cfg, mesh)
    if shardings is None:
        return jax.jit(fn, donate_argnums=donate_argnums, compiler_options=options)
    return jax.jit(
        fn,
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=donate_argnums,
        compiler_options=options,
    )


# XLA:TPU (libtpu 0.0.42) keeps ragged all-to-alls synchronous unless told otherwise; with this
# they become start/done pairs the latency-hiding scheduler can move other work between.
ASYNC_EXCHANGE_OPTIONS = {"xla_tpu_enable_async_ragged_all_to_all": "true"}


def compiler_options(train_cfg: TrainOptions, mesh=None) -> dict[str, str] | None:
    """XLA options of the train step: on TPU with a pipeline (`stage` > 1) and
    `train.async_exchange`, the asynchronous expert exchange (`ASYNC_EXCHANGE_OPTIONS`), so a
    DualPipe tick's forward-chunk exchange overlaps its backward chunk's matmuls and vice
    versa. `mesh` None: the mesh in scope (`jax.set_mesh`) and the default backend."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        platform = jax.default_backend()
    else:
        platform = mesh.devices.flat[0].platform
    stages = 1 if mesh.empty else dict(mesh.shape).get("stage", 1)
    if platform == "tpu" and stages > 1 and train_cfg.async_exchange:
        return dict(ASYNC_EXCHANGE_OPTIONS)
    return None


def to_device(tree):
    """(tree with every leaf in device memory, `back`): `back(new_tree)` returns each leaf to the
    memory it came from. Under jit, state kept in host memory between steps (`state_shardings(...,
    host_offload=True)`) is copied onto the chips for the update and back after it."""
    spaces = [jax.typeof(x).memory_space for x in jax.tree.leaves(tree)]
    if all(s != jax.memory.Space.Host for s in spaces):
        return tree, lambda new: new
    treedef = jax.tree.structure(tree)

    def back(new):
        leaves = jax.tree.leaves(new)
        return treedef.unflatten(
            [jax.device_put(x, s) for x, s in zip(leaves, spaces, strict=True)]
        )

    on_device = [jax.device_put(x, jax.memory.Space.Device) for x in jax.tree.leaves(tree)]
    return treedef.unflatten(on_device), back


def eval_step(params, moe_bias, batch, *, model):
    """Sums for the held-out loss: (Σ w·CE, Σ w)."""
    out = model.apply(
        {"params": params, "moe_bias": moe_bias},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
    )
    return cross_entropy_sums(out.logits, batch["targets"], batch["weights"])


# ----------------------------------------------------------------------------- state
def init_state(rng, *, model: Transformer, tx, seq_len: int) -> TrainState:
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = nn.unbox(model.init(rng, tokens))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        moe_bias=variables.get("moe_bias", {}),
        opt_state=tx.init(params),
    )


def state_shardings(model: Transformer, tx, mesh, seq_len: int, host_offload: bool = False,
                    layout: StackLayout | None = None):  # fmt: skip
    """(abstract state, NamedSharding tree) from the logical axis names of every parameter.

    `host_offload`: the optimizer state (AdamW moments) lives in host memory (`pinned_host`)
    between steps, sharded as on the chips; `train_step` copies it in for the update.
    `layout`: the shardings are those of the MoE stack as `layout` stores it (its rows padded per
    pipeline rank, so `stage` divides them); the abstract state stays in model order."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
    logical = nn.get_partition_spec(boxed)
    # Unboxed without `nn.unbox`'s logical constraint (which fails on these abstract leaves
    # when the caller holds a mesh and the rules).
    shapes = jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, meta.Partitioned) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, meta.Partitioned),
    )
    if layout is not None:  # fitted (`sharding.fit_spec`) to the stored rows, not the model's
        shapes = dict(shapes, params=layout.abstract(shapes["params"]))
    var_shardings = sharding.logical_to_sharding(logical, mesh, shapes=shapes)
    # The key is made inside the trace: under an abstract (AOT) mesh no concrete array may exist.
    abstract = jax.eval_shape(
        lambda: init_state(jax.random.key(0), model=model, tx=tx, seq_len=seq_len)
    )
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract.opt_state,
        var_shardings["params"],
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
    )
    if host_offload:
        opt_shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
    shardings = TrainState(
        step=replicated,
        params=var_shardings["params"],
        moe_bias=var_shardings.get("moe_bias", {}),  # dense configs have no routing bias
        opt_state=opt_shardings,
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return abstract, shardings


def create_sharded_state(rng, model, tx, mesh, seq_len: int, host_offload: bool = False,
                         layout: StackLayout | None = None):  # fmt: skip
    """Initialises the state directly into its shardings (no host-side full copy): (state,
    abstract state, shardings). `layout`: the state's MoE stack initialised in that stored row
    order (`dsjax.train.stack_layout`; default model order); the abstract state stays in model
    order, what a checkpoint holds (`StackLayout.model_shardings`: the stack's first axis
    replicated where the model's layers do not divide over it)."""
    layout = layout or StackLayout()
    abstract, shardings = state_shardings(model, tx, mesh, seq_len, host_offload, layout)
    init = jax.jit(
        lambda r: layout.stored(init_state(r, model=model, tx=tx, seq_len=seq_len)),
        out_shardings=shardings,
    )
    compiled = init.lower(rng).compile(compiler_options=cheap_compile_options())
    return compiled(rng), layout.model_shardings(abstract), shardings
