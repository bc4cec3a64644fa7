"""Training step: TrainState, optimizer, loss, train_step/eval_step, routing-bias update, sharded init.

Loss = main cross-entropy + λ · mean over MTP depths of their cross-entropies + α · the
sequence-wise balance loss summed over MoE layers, all over real tokens only. After each optimizer
step the routing correction bias of every MoE layer moves by γ · sign(mean load − load), from the
token counts of the whole global batch (SPEC §5) — outside the optimizer, which never sees it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from dsjax import sharding
from dsjax.config import ModelConfig
from dsjax.model import ModelOutput, Transformer, cheap_compile_options


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite loss, ...); the message names the step."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    moe_bias: Any
    opt_state: Any


# ----------------------------------------------------------------------------- config
def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run: `config.model` plus the remat policy from `config.train`."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model = dict(config.model)
    unknown = sorted(set(model) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown field(s) {unknown}")
    model["remat"] = config.train.remat
    return ModelConfig(**model)


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
    """Raises ValueError naming the field for a run that cannot work."""
    t = config.train
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every"):
        if int(t[name]) < 1:
            raise ValueError(f"config.train.{name}={t[name]} must be >= 1")
    shards = sharding.batch_shards(mesh)
    if t.batch_size % (t.grad_accum * shards):
        raise ValueError(
            f"config.train.batch_size={t.batch_size} must divide into grad_accum={t.grad_accum} "
            f"micro-batches across {shards} data shards (mesh data x fsdp x expert)"
        )
    if t.batch_size % jax.process_count():
        raise ValueError(
            f"config.train.batch_size={t.batch_size} must divide by the "
            f"{jax.process_count()} processes"
        )
    cfg = model_config(config)
    if config.data.seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} exceeds "
            f"config.model.max_position_embeddings={cfg.max_position_embeddings}"
        )
    if cfg.n_routed_experts and cfg.n_routed_experts % mesh.shape["expert"]:
        raise ValueError(
            f"config.model.n_routed_experts={cfg.n_routed_experts} must divide by "
            f"config.mesh.expert={mesh.shape['expert']}"
        )


def make_optimizer(config: ml_collections.ConfigDict):
    """AdamW (no decay on norm scales), warm-up then cosine, global-norm clipping."""
    o, steps = config.optim, config.train.steps
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=max(steps, o.warmup_steps + 1),
        end_value=o.lr * o.min_lr_ratio,
    )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) != "scale", params
        )

    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask),
    )
    return tx, schedule


# ----------------------------------------------------------------------------- loss
def cross_entropy_sums(logits_BTV, targets_BT, weights_BT):
    """(Σ w·CE, Σ w) in float32."""
    logits = logits_BTV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return ((lse - picked) * weights_BT).sum(), weights_BT.sum()


def mtp_weights(batch, k: int):
    """Depth-k label weights: position i predicts targets[i+k] from inputs[i+k]; valid only when
    both positions are real and belong to the same document."""
    seg, w = batch["segment_ids"], batch["weights"]
    same = (seg[:, k:] == seg[:, :-k]).astype(jnp.float32)
    return w[:, k:] * w[:, :-k] * same


def loss_fn(params, moe_bias, batch, *, model: Transformer, train_cfg):
    out: ModelOutput = model.apply(
        {"params": params, "moe_bias": moe_bias},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
    )
    ce_sum, n = cross_entropy_sums(out.logits, batch["targets"], batch["weights"])
    main = ce_sum / jnp.maximum(n, 1.0)
    loss = main
    aux = {"main_ce": main, "tokens": n, "out": out}
    if out.mtp_logits:
        mtp = []
        for k, logits in enumerate(out.mtp_logits, start=1):
            s, m = cross_entropy_sums(logits, batch["targets"][:, k:], mtp_weights(batch, k))
            mtp.append(s / jnp.maximum(m, 1.0))
        aux["mtp_ce"] = sum(mtp) / len(mtp)
        loss = loss + train_cfg.mtp_weight * aux["mtp_ce"]
    balance = 0.0
    if out.balance_loss is not None:
        balance = out.balance_loss.sum()
    if out.mtp_balance_loss is not None:
        balance = balance + out.mtp_balance_loss.sum()
    aux["balance"] = jnp.asarray(balance, jnp.float32)
    loss = loss + train_cfg.balance_loss_weight * aux["balance"]
    return loss, aux


def expert_counts_tree(moe_bias, out: ModelOutput):
    """Per-expert token counts arranged like the `moe_bias` tree."""
    counts = {}
    if "moe_layers" in moe_bias:
        counts["moe_layers"] = {"moe": {"bias": out.expert_counts}}
    for name in moe_bias:
        if name.startswith("mtp_"):
            k = int(name.split("_")[1])
            counts[name] = {"block": {"moe": {"bias": out.mtp_expert_counts[k]}}}
    return counts


def update_bias(moe_bias, counts, rate: float):
    """Auxiliary-loss-free balancing: b_i <- b_i + γ sign(mean_j c_j - c_i), per layer."""
    return jax.tree.map(
        lambda b, c: b + rate * jnp.sign(c.mean(-1, keepdims=True) - c), moe_bias, counts
    )


def load_imbalance(counts) -> jax.Array:
    """max/mean expert load, averaged over MoE layers (1.0 = perfectly balanced)."""
    ratios = [
        (c.max(-1) / jnp.maximum(c.mean(-1), 1e-9)).reshape(-1) for c in jax.tree.leaves(counts)
    ]
    return jnp.concatenate(ratios).mean() if ratios else jnp.float32(1.0)


# ----------------------------------------------------------------------------- steps
def _split_micro(batch, n: int):
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def train_step(state: TrainState, batch, *, model, tx, schedule, train_cfg):
    """One optimizer step over `grad_accum` micro-batches, then the routing-bias update."""
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, train_cfg=train_cfg), has_aux=True
    )
    n_micro = train_cfg.grad_accum

    def micro(carry, mb):
        grads_acc, sums = carry
        (loss, aux), grads = grad_fn(state.params, state.moe_bias, mb)
        counts = expert_counts_tree(state.moe_bias, aux["out"])
        new = {
            "loss": loss,
            "main_ce": aux["main_ce"],
            "mtp_ce": aux.get("mtp_ce", jnp.float32(0.0)),
            "balance": aux["balance"],
            "tokens": aux["tokens"],
        }
        sums = jax.tree.map(jnp.add, sums, {"metrics": new, "counts": counts})
        return (jax.tree.map(jnp.add, grads_acc, grads), sums), None

    zeros_counts = jax.tree.map(jnp.zeros_like, state.moe_bias)
    zero_metrics = {k: jnp.float32(0.0) for k in ("loss", "main_ce", "mtp_ce", "balance", "tokens")}
    init = (
        jax.tree.map(jnp.zeros_like, state.params),
        {"metrics": zero_metrics, "counts": zeros_counts},
    )
    (grads, sums), _ = jax.lax.scan(micro, init, _split_micro(batch, n_micro))
    grads = jax.tree.map(lambda g: g / n_micro, grads)
    metrics = {k: v / n_micro for k, v in sums["metrics"].items()}
    metrics["tokens"] = sums["metrics"]["tokens"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    moe_bias = update_bias(state.moe_bias, sums["counts"], train_cfg.bias_update_rate)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(state.step)
    metrics["load_imbalance"] = load_imbalance(sums["counts"])
    new_state = state.replace(
        step=state.step + 1, params=params, moe_bias=moe_bias, opt_state=opt_state
    )
    return new_state, metrics


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


def state_shardings(model: Transformer, tx, mesh, seq_len: int):
    """(abstract state, NamedSharding tree) from the logical axis names of every parameter."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
    logical = nn.get_partition_spec(boxed)
    var_shardings = sharding.logical_to_sharding(logical, mesh)
    abstract = jax.eval_shape(
        functools.partial(init_state, model=model, tx=tx, seq_len=seq_len), jax.random.key(0)
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
    shardings = TrainState(
        step=replicated,
        params=var_shardings["params"],
        moe_bias=var_shardings["moe_bias"],
        opt_state=opt_shardings,
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return abstract, shardings


def create_sharded_state(rng, model, tx, mesh, seq_len: int):
    """Initialises the state directly into its shardings (no host-side full copy)."""
    abstract, shardings = state_shardings(model, tx, mesh, seq_len)
    init = jax.jit(
        functools.partial(init_state, model=model, tx=tx, seq_len=seq_len),
        out_shardings=shardings,
    )
    compiled = init.lower(rng).compile(compiler_options=cheap_compile_options())
    return compiled(rng), abstract, shardings
