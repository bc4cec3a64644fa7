"""DeepSeekMoE (SPEC §5): float32 router, group-limited top-k, dropless grouped-matmul experts.

Routing: scores `s` = sigmoid (V3) or softmax (V2) of `u W_g`; selection uses `s + b` where `b` is
the correction bias in the `moe_bias` collection (never a trained parameter); group-limited routing
keeps the `topk_group` best groups (group score: sum of top-2 biased scores for noaux_tc, max for
group_limited_greedy) and masks the rest with -inf; weights come from the unbiased scores.

Dispatch: the N*k token->expert assignments are sorted by expert and the experts run as grouped
matmuls (`jax.lax.ragged_dot`) over contiguous groups: no capacity, no dropped token, no expert
computed on tokens it was not chosen for.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from dsjax.config import ModelConfig
from dsjax.layers.mlp import Linear, SwiGLU
from dsjax.sharding import BATCH_AXES


def route(logits_NE: jnp.ndarray, bias_E: jnp.ndarray, cfg: ModelConfig):
    """Returns (expert ids [N, k] int32, combine weights [N, k] f32, scores [N, E] f32)."""
    logits_NE = logits_NE.astype(jnp.float32)
    if cfg.scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits_NE)
    else:
        scores = jax.nn.softmax(logits_NE, axis=-1)
    choice = scores + bias_E.astype(jnp.float32) if cfg.topk_method == "noaux_tc" else scores
    N, E = choice.shape
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        grouped = choice.reshape(N, cfg.n_group, E // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_score = grouped.max(-1)
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)
        keep_NG = jax.nn.one_hot(keep, cfg.n_group, dtype=jnp.bool_).any(axis=1)
        choice = jnp.where(keep_NG[:, :, None], grouped, -jnp.inf).reshape(N, E)
    _, idx_NK = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, idx_NK, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return idx_NK.astype(jnp.int32), weights * cfg.routed_scaling_factor, scores


def grouped_swiglu(
    x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, impl: str = "auto", tile: int = 128
):
    """SwiGLU per contiguous expert group of rows (rows sorted by expert; rows past the sum of
    the group sizes give zeros).

    impl "ragged_dot": `jax.lax.ragged_dot` (native grouped GEMM on GPU/TPU); "tiled": each
    group padded to whole tiles of `tile` rows, one expert per tile, batched matmuls over tiles
    (XLA:CPU lowers ragged_dot ~10x slower than this); "auto": tiled on CPU, else ragged_dot.
    """
    if impl == "auto":
        impl = "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
    if impl == "ragged_dot":
        gate = jax.lax.ragged_dot(x_MD, w_gate_EDF, group_sizes_E)
        up = jax.lax.ragged_dot(x_MD, w_up_EDF, group_sizes_E)
        y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_EFD, group_sizes_E)
        valid = jnp.arange(x_MD.shape[0]) < group_sizes_E.sum()
        return jnp.where(valid[:, None], y, 0)
    if impl != "tiled":
        raise ValueError(f"moe_impl={impl!r}: expected auto, ragged_dot or tiled")
    M, D = x_MD.shape
    E = group_sizes_E.shape[0]
    tile = max(1, min(tile, M))
    n_tiles = -(-M // tile) + E  # each group adds at most one partial tile
    padded = (group_sizes_E + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes_E) - group_sizes_E
    rows = jnp.arange(M)
    expert_of_row = jnp.repeat(jnp.arange(E), group_sizes_E, total_repeat_length=M)
    dest = (padded_end - padded)[expert_of_row] + rows - start[expert_of_row]
    dest = jnp.where(rows < group_sizes_E.sum(), dest, n_tiles * tile)  # out of range: dropped
    tile_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(n_tiles) * tile, side="right"), E - 1
    )
    x_TmD = (
        jnp.zeros((n_tiles * tile, D), x_MD.dtype)
        .at[dest]
        .set(x_MD, mode="drop")
        .reshape(n_tiles, tile, D)
    )
    gate = jnp.einsum("tmd,tdf->tmf", x_TmD, w_gate_EDF[tile_expert])
    up = jnp.einsum("tmd,tdf->tmf", x_TmD, w_up_EDF[tile_expert])
    y_TmD = jnp.einsum("tmf,tfd->tmd", jax.nn.silu(gate) * up, w_down_EFD[tile_expert])
    return y_TmD.reshape(n_tiles * tile, D).at[dest].get(mode="fill", fill_value=0)


def dispatch_combine(x_ND, idx_NK, weights_NK, num_experts, expert_fn):
    """Sort assignments by expert, run `expert_fn(x_sorted, group_sizes)`, unsort and combine."""
    N, K = idx_NK.shape
    flat_e = idx_NK.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    x_sorted = jnp.take(x_ND, order // K, axis=0)
    group_sizes = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
    y_sorted = expert_fn(x_sorted, group_sizes)
    y_NKD = jnp.take(y_sorted, jnp.argsort(order), axis=0).reshape(N, K, -1)
    out = jnp.einsum("nkd,nk->nd", y_NKD.astype(jnp.float32), weights_NK)
    return out.astype(x_ND.dtype)


def expert_parallel(x_ND, idx_NK, weights_NK, experts: Experts, mesh):
    """Dropless MoE over a mesh with an `expert` axis: each device holds E/ep experts and computes
    only the assignments routed to them.

    Inside `shard_map`: expert weights are all-gathered over `fsdp` (FSDP); the tokens (and their
    routing) of the `expert` group are all-gathered; each device sorts the assignments so its own
    experts' come first and runs them as grouped matmuls (others get weight 0 and no compute); the
    partial outputs are summed over `tensor` (hidden dim split) and reduce-scattered back to the
    tokens' owners over `expert`.
    """
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    dtype = jnp.dtype(experts.cfg.dtype)

    def local(x, idx, w, wg, wu, wd):
        wg = jax.lax.all_gather(wg, "fsdp", axis=1, tiled=True)
        wu = jax.lax.all_gather(wu, "fsdp", axis=1, tiled=True)
        wd = jax.lax.all_gather(wd, "fsdp", axis=2, tiled=True)
        x = jax.lax.all_gather(x, "expert", axis=0, tiled=True)
        idx = jax.lax.all_gather(idx, "expert", axis=0, tiled=True)
        w = jax.lax.all_gather(w, "expert", axis=0, tiled=True)
        e_local = wg.shape[0]
        local_id = idx - jax.lax.axis_index("expert") * e_local
        mine = (local_id >= 0) & (local_id < e_local)
        key = jnp.where(mine, local_id, e_local)  # other shards' experts: one trailing group

        def run(x_sorted, group_sizes):
            cfg = experts.cfg
            return grouped_swiglu(
                x_sorted, group_sizes[:e_local], wg, wu, wd, cfg.moe_impl, cfg.moe_tile
            )

        y = dispatch_combine(x, key, jnp.where(mine, w, 0.0), e_local + 1, run)
        y = jax.lax.psum(y, "tensor")
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

    w_in, w_out = P("expert", "fsdp", "tensor"), P("expert", "tensor", "fsdp")
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(batch, None), P(batch, None), P(batch, None), w_in, w_in, w_out),
        out_specs=P(batch, None),
    )
    cast = lambda a: a.astype(dtype)
    return fn(
        cast(x_ND), idx_NK, weights_NK, cast(experts.gate), cast(experts.up), cast(experts.down)
    )


def balance_stats(idx_BTK, scores_BTE, valid_BT, num_experts):
    """Per-expert token counts over valid tokens, and the sequence-wise balance loss (α = 1).

    `f_i = E / (k T) Σ_t 1[i ∈ I_t]`, `P_i = 1/T Σ_t s_it / Σ_j s_jt`, loss = Σ_i f_i P_i per
    sequence (T = its valid tokens), averaged over sequences that have any.
    """
    k = idx_BTK.shape[-1]
    valid = valid_BT.astype(jnp.float32)
    hits_BTE = jax.nn.one_hot(idx_BTK, num_experts, dtype=jnp.float32).sum(2) * valid[..., None]
    counts_E = hits_BTE.sum((0, 1))
    n_valid_B = valid.sum(1)
    denom_B = jnp.maximum(n_valid_B, 1.0)
    f_BE = hits_BTE.sum(1) * num_experts / (k * denom_B[:, None])
    probs = scores_BTE / (scores_BTE.sum(-1, keepdims=True) + 1e-20)
    p_BE = (probs * valid[..., None]).sum(1) / denom_B[:, None]
    per_seq = (f_BE * p_BE).sum(-1)
    has = (n_valid_B > 0).astype(jnp.float32)
    loss = (per_seq * has).sum() / jnp.maximum(has.sum(), 1.0)
    return counts_E, loss


class Experts(nn.Module):
    """The routed experts' stacked weights [E, ...] and their grouped SwiGLU."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = nn.initializers.normal(cfg.init_std)
        pdtype = jnp.dtype(cfg.param_dtype)

        def param(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, pdtype)

        self.gate = param("gate", (E, D, F), ("expert", "embed", "mlp"))
        self.up = param("up", (E, D, F), ("expert", "embed", "mlp"))
        self.down = param("down", (E, F, D), ("expert", "mlp", "embed"))

    def __call__(self, x_sorted_MD, group_sizes_E):
        dtype = jnp.dtype(self.cfg.dtype)
        return grouped_swiglu(
            x_sorted_MD.astype(dtype),
            group_sizes_E,
            self.gate.astype(dtype),
            self.up.astype(dtype),
            self.down.astype(dtype),
            self.cfg.moe_impl,
            self.cfg.moe_tile,
        )


class MoE(nn.Module):
    """Shared experts + routed experts. Returns (y_BTD, {"counts": [E], "balance": scalar})."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, valid_BT):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, T, D = x_BTD.shape
        E = cfg.n_routed_experts
        bias = self.variable("moe_bias", "bias", jnp.zeros, (E,), jnp.float32)
        # Router in float32 (SPEC §5); kernel path moe/router/kernel.
        router = Linear(
            D,
            E,
            ("embed", None),
            dtype=jnp.float32,
            param_dtype=pdtype,
            init_std=cfg.init_std,
            name="router",
        )
        x_ND = x_BTD.reshape(B * T, D)
        idx_NK, weights_NK, scores_NE = route(router(x_ND), bias.value, cfg)
        experts = Experts(cfg, name="experts")
        mesh = jax.sharding.get_abstract_mesh()
        shards = 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
        # Expert parallelism needs the tokens to split evenly over the batch shards (always true
        # for training batches, which are validated; not for the batch-1 init trace).
        if not mesh.empty and mesh.shape.get("expert", 1) > 1 and (B * T) % shards == 0:
            y_ND = expert_parallel(x_ND, idx_NK, weights_NK, experts, mesh)
        else:
            y_ND = dispatch_combine(x_ND.astype(dtype), idx_NK, weights_NK, E, experts)
        y_BTD = y_ND.reshape(B, T, D)
        if cfg.n_shared_experts:
            y_BTD = y_BTD + SwiGLU(
                D,
                cfg.n_shared_experts * cfg.moe_intermediate_size,
                dtype,
                pdtype,
                cfg.init_std,
                name="shared",
            )(x_BTD)
        counts, balance = balance_stats(
            idx_NK.reshape(B, T, -1), scores_NE.reshape(B, T, E), valid_BT, E
        )
        return y_BTD, {"counts": counts, "balance": balance}
