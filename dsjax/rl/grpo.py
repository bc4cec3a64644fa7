"""GRPO (DeepSeekMath §4.1, DeepSeek-R1 §2.2; docs/spec.md §11): advantages, loss, jitted step.

For each prompt G completions o_1..o_G are sampled from the policy at rollout time (π_old);
rewards r_i give the group-relative advantages A_i = (r_i − mean(r)) / std(r) (std over the
group, population form; a group whose rewards are all equal gets A = 0). The objective, maximised,

    J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1−ε, 1+ε) A_i) − β D_KL,it ]

with ρ_it = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t) and the unbiased per-token estimator
D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1 to the frozen reference policy. Only completion tokens
count (prompt and padding positions have mask 0); each completion is averaged over its own length,
then completions are averaged (over the whole rollout batch: every group has G of them).

The state (`GRPOState`) carries the policy, its optimizer state and the frozen reference; the
update differentiates the policy parameters only. `rollout_logprobs` records π_old and π_ref
log-probs once per rollout batch; `grpo_update` is one optimisation pass over it (run μ times).
Both are jitted by the caller with the shardings of `grpo_state_shardings` (those of
`train_step.state_shardings`, the reference sharded like the policy).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Self

import flax
import jax
import jax.numpy as jnp
import optax

from dsjax.train.step import (
    TrainState,
    expert_counts_tree,
    load_imbalance,
    state_shardings,
    to_device,
    update_bias,
)

__all__ = [
    "GRPOState",
    "grpo_objective",
    "grpo_state_from",
    "grpo_state_shardings",
    "grpo_update",
    "group_advantages",
    "rollout_logprobs",
    "sequence_logprobs",
]


@flax.struct.dataclass
class GRPOState:
    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime

        def replace(self, **changes: Any) -> Self: ...

    step: jax.Array
    params: Any  # the policy π_θ
    moe_bias: Any
    opt_state: Any
    ref_params: Any  # the frozen reference π_ref (never updated)
    ref_moe_bias: Any


def grpo_state_from(params, moe_bias, tx) -> GRPOState:
    """A fresh GRPO state whose policy and reference both start at (params, moe_bias)."""
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (distinct buffers: donation)
    return GRPOState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        moe_bias=moe_bias,
        opt_state=tx.init(params),
        ref_params=copy(params),
        ref_moe_bias=copy(moe_bias),
    )


def grpo_state_shardings(model, tx, mesh, seq_len: int, host_offload: bool = False):
    """(abstract GRPOState, NamedSharding tree): train_step's shardings, reference = policy's."""
    abstract, sh = state_shardings(model, tx, mesh, seq_len, host_offload)

    def grpo(t: TrainState) -> GRPOState:
        return GRPOState(t.step, t.params, t.moe_bias, t.opt_state, t.params, t.moe_bias)

    return grpo(abstract), grpo(sh)


# ----------------------------------------------------------------------------- advantages
def group_advantages(rewards_NG: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(r − mean) / std within each group (row) of G rewards; 0 where std <= eps. [N, G] f32."""
    r = jnp.asarray(rewards_NG, jnp.float32)
    mean = r.mean(axis=-1, keepdims=True)
    std = r.std(axis=-1, keepdims=True)
    return jnp.where(std > eps, (r - mean) / jnp.where(std > eps, std, 1.0), 0.0)


# ----------------------------------------------------------------------------- log-probs
def sequence_logprobs(params, moe_bias, batch, *, model):
    """Per-position log π(targets) and the entropy of π, [B, T] float32 each, plus the model
    output (MoE statistics). `batch`: tokens/targets/positions/segment_ids [B, T]."""
    out = model.apply(
        {"params": params, "moe_bias": moe_bias},
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        run_mtp=False,
    )
    lp_BTV = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    logp_BT = jnp.take_along_axis(lp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    entropy_BT = -(jnp.exp(lp_BTV) * lp_BTV).sum(-1)
    return logp_BT, entropy_BT, out


def rollout_logprobs(state: GRPOState, batch, *, model):
    """(old_logp_BT under the policy as it is now, ref_logp_BT under the reference)."""
    old, _, _ = sequence_logprobs(state.params, state.moe_bias, batch, model=model)
    ref, _, _ = sequence_logprobs(state.ref_params, state.ref_moe_bias, batch, model=model)
    return old, ref


# ----------------------------------------------------------------------------- loss
def _per_completion_mean(x_BT, mask_BT):
    """Mean of x over each completion's own tokens, then over completions with >= 1 token."""
    n_B = mask_BT.sum(-1)
    per_B = (x_BT * mask_BT).sum(-1) / jnp.maximum(n_B, 1.0)
    valid_B = (n_B > 0).astype(jnp.float32)
    return (per_B * valid_B).sum() / jnp.maximum(valid_B.sum(), 1.0)


def grpo_objective(logp_BT, old_logp_BT, ref_logp_BT, adv_B, mask_BT, *, epsilon, beta):
    """(loss = −J, metrics) for one rollout batch (see the module docstring); all [B, T] f32
    except adv_B; mask_BT is 1 on completion tokens."""
    mask = mask_BT.astype(jnp.float32)
    ratio = jnp.exp(logp_BT - old_logp_BT)
    adv = adv_B[:, None].astype(jnp.float32)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon) * adv)
    log_ref_ratio = ref_logp_BT - logp_BT
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
    objective = _per_completion_mean(surrogate - beta * kl, mask)
    clipped = (jnp.abs(ratio - 1.0) > epsilon).astype(jnp.float32)
    n_tok = jnp.maximum(mask.sum(), 1.0)
    metrics = {
        "kl": _per_completion_mean(kl, mask),
        "clip_fraction": (clipped * mask).sum() / n_tok,
        "ratio_mean": (ratio * mask).sum() / n_tok,
    }
    return -objective, metrics


# ----------------------------------------------------------------------------- the step
def grpo_update(
    state: GRPOState,
    batch,
    old_logp_BT,
    ref_logp_BT,
    *,
    model,
    tx,
    schedule,
    epsilon: float,
    beta: float,
    balance_weight: float,
    bias_update_rate: float,
):
    """One optimisation pass over a rollout batch: gradient of −J (+ α·balance) with respect to
    the policy parameters only, AdamW, then the routing-bias update from this batch's loads.
    `batch`: tokens/targets/positions/segment_ids/mask [B, T], advantages [B]."""

    def loss_fn(params):
        logp, entropy, out = sequence_logprobs(params, state.moe_bias, batch, model=model)
        loss, m = grpo_objective(
            logp,
            old_logp_BT,
            ref_logp_BT,
            batch["advantages"],
            batch["mask"],
            epsilon=epsilon,
            beta=beta,
        )
        balance = jnp.float32(0.0) if out.balance_loss is None else out.balance_loss.sum()
        m["entropy"] = _per_completion_mean(jax.lax.stop_gradient(entropy), batch["mask"])
        m["balance"] = balance
        m["pg_loss"] = loss
        return loss + balance_weight * balance, (m, out)

    (loss, (metrics, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_state, back = to_device(state.opt_state)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    opt_state = back(opt_state)
    params = optax.apply_updates(state.params, updates)
    moe_bias, counts = state.moe_bias, {}
    if "moe_layers" in moe_bias:  # MTP modules do not run here: their biases stay
        main = {"moe_layers": moe_bias["moe_layers"]}
        counts = expert_counts_tree(main, out)
        moe_bias = {**moe_bias, **update_bias(main, counts, bias_update_rate)}
    metrics.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        lr=schedule(state.step),
        load_imbalance=load_imbalance(counts) if counts else jnp.float32(1.0),
    )
    new = state.replace(step=state.step + 1, params=params, moe_bias=moe_bias, opt_state=opt_state)
    return new, metrics


def jit_grpo_fns(model, tx, schedule, shardings, mesh, grpo_cfg, train_cfg):
    """(rollout_logprobs, grpo_update) jitted with the state's shardings (state donated to the
    update); batches are sharded over the mesh's batch axes."""
    from dsjax.model import sharding  # noqa: PLC0415

    rep = sharding.replicated(mesh)
    b2, b1 = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    batch_sh = {k: b2 for k in ("tokens", "targets", "positions", "segment_ids", "mask")}
    batch_sh["advantages"] = b1
    logp = jax.jit(
        functools.partial(rollout_logprobs, model=model),
        in_shardings=(shardings, batch_sh),
        out_shardings=(b2, b2),
    )
    update = jax.jit(
        functools.partial(
            grpo_update,
            model=model,
            tx=tx,
            schedule=schedule,
            epsilon=float(grpo_cfg.epsilon),
            beta=float(grpo_cfg.beta),
            balance_weight=float(train_cfg.balance_loss_weight),
            bias_update_rate=float(
                train_cfg.bias_update_rate
                if grpo_cfg.bias_update_rate is None
                else grpo_cfg.bias_update_rate
            ),
        ),
        in_shardings=(shardings, batch_sh, b2, b2),
        out_shardings=(shardings, rep),
        donate_argnums=0,
    )
    return logp, update
