"""DeepSeekMoE (docs/spec.md §5): float32 router, group-limited top-k, dropless grouped experts.

Routing: scores `s` = sigmoid (V3) or softmax (V2) of `u W_g`; selection uses `s + b` where `b` is
the correction bias in the `moe_bias` collection (never a trained parameter); group-limited routing
keeps the `topk_group` best groups (group score: sum of top-2 biased scores for noaux_tc, max for
group_limited_greedy) and masks the rest with -inf; weights come from the unbiased scores.

Dispatch: the N*k token->expert assignments are sorted by expert and the experts run as grouped
matmuls (`jax.lax.ragged_dot`) over contiguous groups: no capacity, no dropped token, no expert
computed on tokens it was not chosen for.

Under a mesh (`sharded_experts`) the routed experts run in `shard_map` over the batch axes: each
shard sorts only its own tokens' assignments (a global sort would make XLA gather every token onto
every chip), and with an `expert` axis the assignments travel to the shard holding their expert and
back by ragged all-to-all (`expert_all_to_all`), dropless.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from dsjax.model import fp8 as fp8_lib
from dsjax.model.config import ModelConfig
from dsjax.model.layers.grouped_loop import looped_matmul
from dsjax.model.layers.mlp import Linear, SwiGLU, swiglu
from dsjax.model.sharding import TOKEN_AXES, active_rules, dim_axes


def expert_scores(logits_NE: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """Router scores [N, E] f32: sigmoid (V3), softmax (V2) or sqrt(softplus) (V4)."""
    logits_NE = logits_NE.astype(jnp.float32)
    if cfg.scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits_NE)
    if cfg.scoring_func == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits_NE))
    return jax.nn.softmax(logits_NE, axis=-1)


def _combine_weights(scores_NE, idx_NK, cfg: ModelConfig):
    weights = jnp.take_along_axis(scores_NE, idx_NK, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor


def route_hashed(logits_NE, token_ids_N, table_VK, cfg: ModelConfig):
    """DeepSeek-V4's hash routing: experts `table[token id]` (a fixed [vocab, k] table), weighted
    by their normalised scores. Returns what `route` does."""
    scores = expert_scores(logits_NE, cfg)
    idx_NK = jnp.take(table_VK, token_ids_N, axis=0).astype(jnp.int32)
    return idx_NK, _combine_weights(scores, idx_NK, cfg), scores


def route(logits_NE: jnp.ndarray, bias_E: jnp.ndarray, cfg: ModelConfig):
    """Returns (expert ids [N, k] int32, combine weights [N, k] f32, scores [N, E] f32)."""
    scores = expert_scores(logits_NE, cfg)
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
    return idx_NK.astype(jnp.int32), _combine_weights(scores, idx_NK, cfg), scores


def _platform() -> str:
    """The platform the program is built for: the mesh's devices' (a TPU mesh compiled ahead of
    time on a CPU host says "tpu"), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def grouped_swiglu(
    x_MD,
    group_sizes_E,
    w_gate_EDF,
    w_up_EDF,
    w_down_EFD,
    impl: str = "auto",
    tile: int = 128,
    platform: str | None = None,
    fp8: bool = False,
    scales=None,
    zero_tail: bool = True,
    limit: float = 0.0,
):
    """SwiGLU per contiguous expert group of rows (rows sorted by expert; rows past the sum of
    the group sizes give zeros, or with `zero_tail=False` and impl "ragged_dot" whatever the
    grouped GEMM leaves there, for callers that never read them).

    impl "ragged_dot": `jax.lax.ragged_dot` (the TPU's native grouped GEMM); "tiled": each
    group padded to whole tiles of `tile` rows, one expert per tile, batched matmuls over tiles;
    "looped": each group as a few 2-D GEMMs in loops (`grouped_loop.looped_matmul`; the FP8
    recipe and stored-FP8 weights take "tiled" instead); "auto": ragged_dot on TPU, tiled on GPU,
    looped on CPU (`platform` defaults to the mesh's, see `_platform`). Measured
    (benchmarks/RESULTS.md): XLA:CPU lowers ragged_dot ~5x slower than tiling, and the tiled
    batched GEMM ~2x slower than the looped 2-D GEMMs; on an H100 (jax 0.11.2) ragged_dot fwd+bwd of 65536 rows x 24 experts took 129 ms
    and 18.5 GiB of temporaries against 24.7 ms and 3.5 GiB tiled by 512 rows. `tile` 0 picks
    per platform: 128 on CPU, 512 on GPU.

    `fp8`: the three matmuls in the FP8 recipe (`dsjax.model.fp8.grouped_matmul`: per-expert 128x128
    weight blocks, 1x128 activation tiles, FP32 accumulation, FP8 residuals), both impls.
    `scales`: (gate, up, down) `scale_inv` blocks [E, ceil(in/128), ceil(out/128)] when the
    weights are stored float8 (used directly under `fp8`, else dequantised to x's dtype).
    `limit` > 0: DeepSeek-V4's clamped SwiGLU (`mlp.swiglu`).
    """
    impl, tile = _resolve_impl(impl, tile, platform)
    quantized = fp8 or scales is not None
    if impl == "looped" and (quantized or _few_rows(x_MD.shape[0], group_sizes_E.shape[0])):
        impl = "tiled"
    if impl == "looped":
        gate = looped_matmul(x_MD, w_gate_EDF, group_sizes_E)
        up = looped_matmul(x_MD, w_up_EDF, group_sizes_E)
        return looped_matmul(swiglu(gate, up, limit), w_down_EFD, group_sizes_E)
    s_gate, s_up, s_down = scales if scales is not None else (None, None, None)
    if impl == "ragged_dot" and quantized:
        mm = lambda a, w, s: fp8_lib.grouped_matmul(  # noqa: E731
            "ragged", a, w, group_sizes_E, s, fp8, x_MD.dtype
        ).astype(x_MD.dtype)
        h = swiglu(mm(x_MD, w_gate_EDF, s_gate), mm(x_MD, w_up_EDF, s_up), limit, fp8)
        y = mm(h, w_down_EFD, s_down)
        if not zero_tail:
            return y
        valid = jnp.arange(x_MD.shape[0]) < group_sizes_E.sum()
        return jnp.where(valid[:, None], y, 0)
    if impl == "ragged_dot":
        gate = jax.lax.ragged_dot(x_MD, w_gate_EDF, group_sizes_E)
        up = jax.lax.ragged_dot(x_MD, w_up_EDF, group_sizes_E)
        y = jax.lax.ragged_dot(swiglu(gate, up, limit), w_down_EFD, group_sizes_E)
        if not zero_tail:
            return y
        valid = jnp.arange(x_MD.shape[0]) < group_sizes_E.sum()
        return jnp.where(valid[:, None], y, 0)
    M, D = x_MD.shape
    tile = tile_rows(tile, M, group_sizes_E.shape[0])
    dest, tile_expert, n_tiles = _tile_layout(group_sizes_E, M, tile)
    x_TmD = (
        jnp.zeros((n_tiles * tile, D), x_MD.dtype)
        .at[dest]
        .set(x_MD, mode="drop")
        .reshape(n_tiles, tile, D)
    )
    y_TmD = _tiled_swiglu(x_TmD, tile_expert, w_gate_EDF, w_up_EDF, w_down_EFD, fp8, scales, limit)
    return y_TmD.reshape(n_tiles * tile, D).at[dest].get(mode="fill", fill_value=0)


def _resolve_impl(impl: str, tile: int, platform: str | None) -> tuple[str, int]:
    """("ragged_dot" | "tiled" | "looped", tile rows) for `impl` "auto" and `tile` 0 on
    `platform`."""
    platform = platform or _platform()
    if impl == "auto":
        impl = {"tpu": "ragged_dot", "cpu": "looped"}.get(platform, "tiled")
    if impl not in ("ragged_dot", "tiled", "looped"):
        raise ValueError(f"moe_impl={impl!r}: expected auto, ragged_dot, tiled or looped")
    return impl, tile or (512 if platform == "gpu" else 128)


def _few_rows(M: int, E: int) -> bool:
    """Too few rows per expert (decode) for the looped impl: its per-chunk loop steps cost more
    than the tiled impl's padding there (batch-8 decode of issue 8's shape, M = 32, E = 16)."""
    return M < 16 * E


def tile_rows(tile: int, M: int, E: int) -> int:
    """Rows per tile for M expert-sorted rows over E experts: the configured `tile`, capped for
    few rows (decode) at the smallest power of two >= M/E, at least 8. The static layout always
    reserves E partial tiles, so a large tile pads small batches with E·tile rows of compute
    (batch-8 decode of issue 8's shape, M = 32, E = 16: tile 8 computes 160 rows instead of 544;
    the whole generate call 231 ms instead of 281-287)."""
    per_expert = -(-M // E)
    fit = max(8, 1 << (per_expert - 1).bit_length())
    return max(1, min(tile, M, fit))


def _tile_layout(group_sizes_E, M: int, tile: int):
    """Where the M expert-sorted rows go when each expert's group is padded to whole tiles.

    Returns (dest [M] int: the padded slot of each sorted row, M·tile-out-of-range for rows past
    the sum of the group sizes; tile_expert [n_tiles] int: each tile's expert; n_tiles: the static
    worst case ceil(M / tile) + E, since each group adds at most one partial tile)."""
    E = group_sizes_E.shape[0]
    n_tiles = -(-M // tile) + E
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
    return dest, tile_expert, n_tiles


def _tiled_swiglu(
    x_TmD, tile_expert, w_gate_EDF, w_up_EDF, w_down_EFD, fp8=False, scales=None, limit=0.0
):
    """SwiGLU of every tile [t, m, D] with its own expert's weights -> [t, m, D]."""
    if fp8 or scales is not None:
        s_gate, s_up, s_down = scales if scales is not None else (None, None, None)
        mm = lambda a, w, s: fp8_lib.grouped_matmul(  # noqa: E731
            "tiled", a, w, tile_expert, s, fp8, x_TmD.dtype
        ).astype(x_TmD.dtype)
        h_TmF = swiglu(mm(x_TmD, w_gate_EDF, s_gate), mm(x_TmD, w_up_EDF, s_up), limit, fp8)
        return mm(h_TmF, w_down_EFD, s_down)
    gate = jnp.einsum("tmd,tdf->tmf", x_TmD, _take_experts(*_match(w_gate_EDF, tile_expert)))
    up = jnp.einsum("tmd,tdf->tmf", x_TmD, _take_experts(*_match(w_up_EDF, tile_expert)))
    h_TmF = swiglu(gate, up, limit)
    return jnp.einsum("tmf,tfd->tmd", h_TmF, _take_experts(*_match(w_down_EFD, tile_expert)))


_match = fp8_lib.match_varying  # custom VJPs inside shard_map need their inputs' varying axes


@jax.custom_vjp
def _take_experts(w_E__, tile_expert_t):
    """w[tile_expert]: each tile's expert weights. Its backward sums the tiles' weight gradients
    per expert with a one-hot [E, t] matmul (a dense GEMM) instead of a serial scatter-add."""
    return w_E__.at[tile_expert_t].get(mode="promise_in_bounds")


def _take_experts_fwd(w_E__, tile_expert_t):
    return _take_experts(w_E__, tile_expert_t), (tile_expert_t, w_E__.shape[0])


def _take_experts_bwd(res, g_t__):
    tile_expert_t, E = res
    onehot_Et = (jnp.arange(E)[:, None] == tile_expert_t[None, :]).astype(g_t__.dtype)
    g_flat = g_t__.reshape(g_t__.shape[0], -1)
    dw = jnp.dot(onehot_Et, g_flat, preferred_element_type=jnp.float32)
    return dw.reshape(E, *g_t__.shape[1:]).astype(g_t__.dtype), None


_take_experts.defvjp(_take_experts_fwd, _take_experts_bwd)


@jax.custom_vjp
def _expand_rows(x_ND, token_of_slot_S, slot_NK):
    """x[token_of_slot] with zero rows where token_of_slot == N (padding slots) -> [S, D].
    Backward: each token sums its K slots' gradients (a gather, not a scatter-add)."""
    return jnp.take(x_ND, token_of_slot_S, axis=0, mode="fill", fill_value=0)


def _expand_rows_fwd(x_ND, token_of_slot_S, slot_NK):
    return _expand_rows(x_ND, token_of_slot_S, slot_NK), slot_NK


def _expand_rows_bwd(slot_NK, g_SD):
    return g_SD.at[slot_NK].get(mode="promise_in_bounds").sum(axis=1), None, None


_expand_rows.defvjp(_expand_rows_fwd, _expand_rows_bwd)


@jax.custom_vjp
def _collect_rows(y_SD, slot_A, assignment_of_slot_S):
    """y[slot]: each (token, k) assignment's output row -> [A, D]. Backward: each slot takes its
    assignment's gradient (zero for padding slots), again a gather."""
    return y_SD.at[slot_A].get(mode="promise_in_bounds")


def _collect_rows_fwd(y_SD, slot_A, assignment_of_slot_S):
    return _collect_rows(y_SD, slot_A, assignment_of_slot_S), assignment_of_slot_S


def _collect_rows_bwd(assignment_of_slot_S, g_AD):
    d_y = jnp.take(g_AD, assignment_of_slot_S, axis=0, mode="fill", fill_value=0)
    return d_y, None, None


_collect_rows.defvjp(_collect_rows_fwd, _collect_rows_bwd)


def tiled_dispatch_combine(
    x_ND,
    idx_NK,
    weights_NK,
    w_gate_EDF,
    w_up_EDF,
    w_down_EFD,
    tile,
    fp8=False,
    scales=None,
    limit=0.0,
):
    """Routed experts with the tiled grouped matmul, each token row moved straight into its
    expert's padded tile and back: `dispatch_combine` + `grouped_swiglu(impl="tiled")` in one.

    Only integer index maps are scattered (slot of each assignment, assignment of each slot);
    the activations move by gathers in both passes (autodiff of the sort-then-pad form scatters
    [N·K, D] rows twice per pass, serially on CPU). Returns Σ_k w_nk · expert_k(x_n) [N, D] f32.
    """
    N, K = idx_NK.shape
    M, D = N * K, x_ND.shape[1]
    flat_e = idx_NK.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)  # sorted row r holds assignment order[r]
    group_sizes = jnp.bincount(flat_e, length=w_gate_EDF.shape[0]).astype(jnp.int32)
    tile = tile_rows(tile, M, w_gate_EDF.shape[0])
    dest, tile_expert, n_tiles = _tile_layout(group_sizes, M, tile)
    S = n_tiles * tile
    slot_A = jnp.zeros(M, jnp.int32).at[order].set(dest.astype(jnp.int32))
    assignment_S = jnp.full(S, M, jnp.int32).at[dest].set(order.astype(jnp.int32), mode="drop")
    x_TmD = _expand_rows(*_match(x_ND, assignment_S // K, slot_A.reshape(N, K))).reshape(
        n_tiles, tile, D
    )
    y_TmD = _tiled_swiglu(x_TmD, tile_expert, w_gate_EDF, w_up_EDF, w_down_EFD, fp8, scales, limit)
    y_NKD = _collect_rows(*_match(y_TmD.reshape(S, D), slot_A, assignment_S)).reshape(N, K, D)
    return jnp.einsum("nkd,nk->nd", y_NKD.astype(jnp.float32), weights_NK)


def sorted_dispatch_combine(x_ND, idx_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, limit=0.0):
    """Routed experts with the looped grouped matmul: token rows gathered into expert order,
    outputs gathered back (both passes move activations by gathers, as in
    `tiled_dispatch_combine`). Returns Σ_k w_nk · expert_k(x_n) [N, D] f32."""
    N, K = idx_NK.shape
    order, group_sizes = _sort_by_expert(idx_NK, w_gate_EDF.shape[0])
    order = order.astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(N * K, dtype=jnp.int32))
    x_MD = _expand_rows(*_match(x_ND, order // K, inverse.reshape(N, K)))
    gate = looped_matmul(x_MD, w_gate_EDF, group_sizes)
    up = looped_matmul(x_MD, w_up_EDF, group_sizes)
    y_MD = looped_matmul(swiglu(gate, up, limit), w_down_EFD, group_sizes)
    y_NKD = _collect_rows(*_match(y_MD, inverse, order)).reshape(N, K, -1)
    return jnp.einsum("nkd,nk->nd", y_NKD.astype(jnp.float32), weights_NK)


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


def gathered_combine(x_ND, idx_NK, weights_NK, experts):
    """Routed experts for very few tokens: each (token, slot)'s expert weights gathered.

    Under `cfg.fp8` each (token, slot) is a one-row tile of the FP8 tiled grouped matmul."""
    dtype = x_ND.dtype
    N, K = idx_NK.shape
    if experts.cfg.fp8:
        x_R1D = jnp.repeat(x_ND, K, axis=0)[:, None]
        tile_expert = idx_NK.reshape(-1)
        (w_gate, s_gate), (w_up, s_up), (w_down, s_down) = experts.stored()
        mm = lambda a, w, s: fp8_lib.grouped_matmul(  # noqa: E731
            "tiled", a, w, tile_expert, s, True
        ).astype(dtype)
        limit = experts.cfg.swiglu_limit
        h_R1F = swiglu(mm(x_R1D, w_gate, s_gate), mm(x_R1D, w_up, s_up), limit, True)
        y = mm(h_R1F, w_down, s_down).reshape(N, K, -1)
        return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights_NK).astype(dtype)
    w_gate, w_up, w_down = experts.weights(dtype)
    g = jnp.einsum("nd,nkdf->nkf", x_ND, w_gate[idx_NK])
    u = jnp.einsum("nd,nkdf->nkf", x_ND, w_up[idx_NK])
    y = jnp.einsum("nkf,nkfd->nkd", swiglu(g, u, experts.cfg.swiglu_limit), w_down[idx_NK])
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights_NK).astype(dtype)


def _exclusive_cumsum(a, axis=0):
    return jnp.cumsum(a, axis=axis) - a


def exchange_padded(x_MD, out_RD, input_offsets, send_sizes, output_offsets, recv_sizes, axis):
    """`jax.lax.ragged_all_to_all` semantics over `all_to_all` of padded slices.

    XLA:CPU has no ragged-all-to-all (jax 0.10.2: "HLO opcode `ragged-all-to-all` is not
    supported by XLA:CPU ThunkEmitter"), so on CPU each of the U = P*S slices (slice u goes to
    shard u // S; rows `input_offsets[u]` .. `+ send_sizes[u]`) is packed into a row of a
    [U, M, D] buffer (M = rows of x, the largest possible slice), the buffer is exchanged with
    `all_to_all`, and each received slice is written at the offset its sender chose
    (`output_offsets` travel by all_to_all too). Rows of `out_RD` no slice covers keep their
    value, as in ragged_all_to_all. A slice that would run past the end of `out_RD` writes NaN
    into its last row (ragged_all_to_all has no defined result there). Differentiable: gathers,
    scatters and all_to_all have transposes. Traffic is padded (U * M rows): the CPU/reference
    path, not the fast one.
    """
    M, D = x_MD.shape
    R = out_RD.shape[0]
    U = input_offsets.shape[0]
    P_ = jax.lax.axis_size(axis)
    q = jnp.arange(M)
    src = input_offsets[:, None] + q[None, :]  # [U, M]
    send_mask = q[None, :] < send_sizes[:, None]
    packed_UMD = jnp.where(send_mask[..., None], x_MD.at[src].get(mode="fill", fill_value=0), 0)
    got = jax.lax.all_to_all(packed_UMD.reshape(P_, -1, D), axis, 0, 0, tiled=False)
    their_offsets = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)
    dst = their_offsets[:, None] + q[None, :]
    inside = q[None, :] < recv_sizes[:, None]
    rows = got.reshape(U * M, D)
    if jnp.issubdtype(rows.dtype, jnp.floating):  # a slice past the buffer's end: loud, as the
        overrun = (inside & (dst >= R)).reshape(-1, 1)  # real collective would fault
        rows = jnp.where(overrun, jnp.nan, rows)
    dst = jnp.where(inside, jnp.minimum(dst, R - 1), R)  # padding rows: dropped
    return out_RD.at[dst.reshape(-1)].set(rows, mode="drop")


def exchange(x_MD, out_RD, input_offsets, send_sizes, output_offsets, recv_sizes, axis, platform):
    """`ragged_all_to_all` over `axis` (its own transpose is the reverse exchange), or on CPU the
    padded equivalent `exchange_padded`. Differentiable in `x_MD` only (see `ragged_exchange`)."""
    if platform == "cpu":
        return exchange_padded(
            x_MD, out_RD, input_offsets, send_sizes, output_offsets, recv_sizes, axis
        )
    return jax.lax.ragged_all_to_all(
        x_MD, out_RD, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis
    )


def ragged_exchange(x_MD, rows: int, input_offsets, send_sizes, output_offsets, recv_sizes,
                    axis, platform):  # fmt: skip
    """`exchange` of x's slices into a zeroed [rows, D] buffer, with a written-out backward: the
    reverse exchange of the cotangent (slices swap roles), nothing else.

    Autodiff of `ragged_all_to_all(x, zeros, ...)` inside `shard_map` also differentiates the
    zero buffer: it is invariant over the token axes, so JAX marks it varying (`pvary`) and the
    transpose all-reduces its [rows, D] cotangent over every token axis (psum_invariant) and
    masks it (select) — for V3 on v5p-256 two 3.5 GiB buffers and a 3.5 GiB all-reduce over 256
    chips per MoE layer, all discarded. x_MD [M, D]; offsets and sizes [U] int32 as for
    `jax.lax.ragged_all_to_all`. Returns [rows, D]."""
    fn = _ragged_exchange_fn(rows, axis, platform)
    return fn(*fp8_lib.match_varying(x_MD, input_offsets, send_sizes, output_offsets, recv_sizes))


def _zeros_like_varying(shape, dtype, like):
    """Zeros [shape] carrying `like`'s varying mesh axes (inside shard_map), so a collective that
    writes into them types-checks without a differentiable `pvary`."""
    return fp8_lib.match_varying(jnp.zeros(shape, dtype), like)[0]


def _ragged_exchange_fn(rows: int, axis, platform):
    def impl(x_MD, input_offsets, send_sizes, output_offsets, recv_sizes):
        out = _zeros_like_varying((rows, x_MD.shape[1]), x_MD.dtype, x_MD)
        return exchange(
            x_MD, out, input_offsets, send_sizes, output_offsets, recv_sizes, axis, platform
        )

    fwd_only = jax.custom_vjp(impl)

    def fwd(x_MD, input_offsets, send_sizes, output_offsets, recv_sizes):
        y = impl(x_MD, input_offsets, send_sizes, output_offsets, recv_sizes)
        return y, (input_offsets, send_sizes, output_offsets, recv_sizes, x_MD.shape[0])

    def bwd(res, g_RD):
        *slices, M = res
        return _exchange_back(g_RD, M, *slices, axis, platform), None, None, None, None

    fwd_only.defvjp(fwd, bwd)
    return fwd_only


def _exchange_back(g_RD, M: int, input_offsets, send_sizes, output_offsets, recv_sizes,
                   axis, platform):  # fmt: skip
    """The transpose of a forward `exchange` with these slices: the received rows g_RD go back
    to their senders, into an [M, D] buffer laid out as the sender's x. As jax.lax's own
    transpose: each sender learns where its slices landed (all_to_all of the offsets)."""
    landed = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)
    origin = jax.lax.all_to_all(input_offsets, axis, 0, 0, tiled=True)
    out = _zeros_like_varying((M, g_RD.shape[1]), g_RD.dtype, g_RD)
    return exchange(g_RD, out, landed, recv_sizes, origin, send_sizes, axis, platform)


def _pack_fp8(q_nD, s_nS):
    """FP8 rows and their f32 tile scales as one byte payload [n, D + 4 S] (one exchange)."""
    q = jax.lax.bitcast_convert_type(q_nD, jnp.uint8)
    s = jax.lax.bitcast_convert_type(s_nS, jnp.uint8).reshape(s_nS.shape[0], -1)
    return jnp.concatenate([q, s], axis=1)


def _unpack_fp8(payload, D: int):
    q = jax.lax.bitcast_convert_type(payload[:, :D], fp8_lib.E4M3)
    s = payload[:, D:].reshape(payload.shape[0], -1, 4)
    return q, jax.lax.bitcast_convert_type(s, jnp.float32)


def _fp8_dispatch_fn(rows: int, axis, platform):
    """FP8 dispatch (DeepSeek-V3 §3.3: the dispatch payload in FP8, the combine in BF16): a
    custom VJP over (quantise, exchange, expert gate and up GEMMs).

    `fn(x_nD, src_M, w_gate, w_up, input_offsets, send_sizes, output_offsets, recv_sizes,
    group_sizes) -> (gate, up)` f32 [rows, F]: the sender quantises its n tokens once (1×128
    tiles), gathers rows `src_M` (each assignment's token, sorted by expert) and ships FP8 bytes
    plus scales — half the bf16 bytes — into the receiver's [rows, ...] buffer, whose grouped
    GEMMs use them as they are (no second quantisation of the receive buffer, the largest
    activation of the layer). The backward computes dx of both GEMMs on the receiver (bf16),
    sends it back (`_exchange_back`) and scatter-adds it onto the tokens; dW from the saved FP8
    rows as in `fp8.grouped_backward`. Ragged (`ragged_dot`) layout only; `cfg.moe_fp8_dispatch`.
    Bit-for-bit the same FP8 values reach the GEMMs as without it (quantisation is per row)."""

    def fwd(x_nD, src_M, w_gate, w_up, input_offsets, send_sizes, output_offsets, recv_sizes,
            group_sizes):  # fmt: skip
        D = x_nD.shape[1]
        q, s = fp8_lib.quantize_tiles(x_nD, axis=-1)
        payload = jnp.take(_pack_fp8(q, s), src_M, axis=0)
        out = _zeros_like_varying((rows, payload.shape[1]), payload.dtype, payload)
        slices = (input_offsets, send_sizes, output_offsets, recv_sizes)
        q_R, s_R = _unpack_fp8(exchange(payload, out, *slices, axis, platform), D)
        dt = fp8_lib.dot_dtype_for(x_nD.dtype)
        x_R = fp8_lib.dequantize_tiles(q_R, s_R, axis=-1, dtype=dt)  # once for both GEMMs
        blocks = [fp8_lib.quantize_blocks(w) for w in (w_gate, w_up)]
        gate, up = (fp8_lib.grouped_forward("ragged", x_R, *b, group_sizes, dt) for b in blocks)
        protos = (jnp.zeros((0, D), x_nD.dtype), jnp.zeros((0,), w_gate.dtype))
        res = (q_R, s_R, blocks, src_M, slices, group_sizes, x_nD.shape[0], protos)
        return (gate, up), res

    def bwd(res, cts):
        q_R, s_R, blocks, src_M, slices, group_sizes, n, (x_proto, w_proto) = res
        x_t = fp8_lib.tokens_requantized("ragged", q_R, s_R, fp8_lib.dot_dtype_for(x_proto.dtype))
        (dx_g, dw_g), (dx_u, dw_u) = (
            fp8_lib.grouped_backward(
                "ragged", d, q_R, s_R, *b, group_sizes, x_proto.dtype, w_proto.dtype, x_t
            )
            for d, b in zip(cts, blocks, strict=True)
        )
        dx_M = _exchange_back(dx_g + dx_u, src_M.shape[0], *slices, axis, platform)
        dx_n = _zeros_like_varying((n, dx_M.shape[1]), jnp.float32, dx_M).at[src_M].add(dx_M)
        return dx_n.astype(x_proto.dtype), None, dw_g, dw_u, None, None, None, None, None

    fn = jax.custom_vjp(lambda *args: fwd(*args)[0])
    fn.defvjp(fwd, bwd)
    return lambda *args: fn(*fp8_lib.match_varying(*args))


def _sort_by_expert(idx_nK, num_experts):
    """Local sort of a shard's assignments: (order [nK], per-expert counts [E] int32)."""
    flat_e = idx_nK.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    return order, jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)


def _combine(y_sorted_MD, order, weights_nK):
    """Unsorts the expert outputs back to (token, slot) and sums them with the routing weights."""
    n, K = weights_nK.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y_nKD = jnp.take(y_sorted_MD, inverse, axis=0).reshape(n, K, -1)
    return jnp.einsum("nkd,nk->nd", y_nKD.astype(jnp.float32), weights_nK)


def exchange_rows(cfg: ModelConfig, group_size: int, tokens: int) -> int:
    """Rows of a receiver's buffer in the expert all-to-all: the dropless worst case
    G * n * min(K, E/G) (every shard of the group may send every token here, each at most once
    per local expert), or with `cfg.moe_capacity_factor` c > 0
    ceil(c * n * K) rounded up to 8 rows, when that is smaller: assignments past it are dropped."""
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    worst = group_size * tokens * min(K, E // group_size)
    factor = float(cfg.moe_capacity_factor)
    if factor > 0:
        return min(worst, -(-math.ceil(factor * tokens * K) // 8) * 8)
    return worst


def expert_all_to_all(
    x_nD, idx_nK, weights_nK, w_gate, w_up, w_down, cfg, axis, platform, scales=None
):
    """Expert parallelism inside `shard_map`, dropless by default: this shard's n tokens go to the
    expert shards holding their experts and come back (two ragged all-to-alls over `axis`, a mesh
    axis name or a tuple of them; shard g of the group holds experts g*E_l .. (g+1)*E_l - 1).

    Shapes (per shard, P = size of `axis`, E_l = E / P local experts, F_l local mlp width):
    x_nD, idx_nK, weights_nK; w_gate/w_up [E_l, D, F_l], w_down [E_l, F_l, D]; `scales` their
    `scale_inv` blocks when stored FP8 (`grouped_swiglu`). Returns y_nD float32 (partial over a
    `tensor` split of F).

    1. Sort the n*K assignments by expert (local argsort).
    2. all_gather the per-expert counts [P, E] (P*E ints): every shard knows every slice's size.
    3. Exchange one slice per (sender, expert): the slice for expert e lands in receiver e // E_l
       at (start of e's group there) + (rows of e from lower senders), so the receiver's buffer
       is already grouped by expert — no permutation. The buffer has a static size R
       (`exchange_rows`): the dropless worst case P * n * min(K, E_l) — nothing is dropped for
       any routing; a balanced load fills n*K of the R rows — or a capacity c * n * K. Slices
       are clipped at R (every shard computes the same clip from the gathered counts), so under
       a capacity the rows past it — the receiver's last local experts', higher senders first
       within an expert — are not sent and those assignments contribute zero.
    4. Grouped SwiGLU over the E_l local experts; the reverse exchange (same slices, roles
       swapped) returns each row to its sender's sorted position; unsort and combine.
    """
    n, K = idx_nK.shape
    E = cfg.n_routed_experts
    P_ = jax.lax.axis_size(axis)
    E_l = E // P_
    me = jax.lax.axis_index(axis)
    order, counts_E = _sort_by_expert(idx_nK, E)
    counts_PE = jax.lax.all_gather(counts_E, axis, axis=0, tiled=False)  # [sender, expert]
    starts_PE = _exclusive_cumsum(counts_PE, axis=1)  # each sender's sorted slice starts
    group_start_E = _exclusive_cumsum(counts_PE.sum(0).reshape(P_, E_l), axis=1).reshape(E)
    at_PE = group_start_E[None, :] + _exclusive_cumsum(counts_PE, axis=0)  # at the receiver
    R = exchange_rows(cfg, P_, n)
    sent_PE = jnp.clip(R - at_PE, 0, counts_PE)  # = counts_PE unless past a capacity
    mine_PL = jax.lax.dynamic_slice_in_dim(sent_PE, me * E_l, E_l, axis=1)  # [sender, local]
    at_PL = jax.lax.dynamic_slice_in_dim(at_PE, me * E_l, E_l, axis=1)
    group_sizes = mine_PL.sum(0)
    slices = (starts_PE[me], sent_PE[me], at_PE[me], mine_PL.reshape(-1))
    ragged = _resolve_impl(cfg.moe_impl, cfg.moe_tile, platform)[0] == "ragged_dot"
    if cfg.fp8 and cfg.moe_fp8_dispatch and ragged and scales is None:
        gate, up = _fp8_dispatch_fn(R, axis, platform)(
            x_nD, order // K, w_gate, w_up, *slices, group_sizes
        )
        h = swiglu(gate.astype(x_nD.dtype), up.astype(x_nD.dtype), cfg.swiglu_limit, True)
        y_grouped = fp8_lib.grouped_matmul("ragged", h, w_down, group_sizes, None, True)
        y_grouped = y_grouped.astype(x_nD.dtype)
    else:
        x_grouped = ragged_exchange(jnp.take(x_nD, order // K, axis=0), R, *slices, axis, platform)
        # Rows past the groups are never sent back: no need to zero them (a [R, D] select).
        y_grouped = grouped_swiglu(
            x_grouped, group_sizes, w_gate, w_up, w_down, cfg.moe_impl, cfg.moe_tile, platform,
            cfg.fp8, scales, zero_tail=False, limit=cfg.swiglu_limit,
        )  # fmt: skip
    back_offsets_PL = jax.lax.dynamic_slice_in_dim(starts_PE, me * E_l, E_l, axis=1)
    y_sorted = ragged_exchange(
        y_grouped, n * K,
        at_PL.reshape(-1), mine_PL.reshape(-1), back_offsets_PL.reshape(-1), sent_PE[me],
        axis, platform,
    )  # fmt: skip
    return _combine(y_sorted, order, weights_nK)


def exchange_block(cfg: ModelConfig, tokens: int) -> int:
    """Tokens per round of the expert exchange for a shard of `tokens`: `cfg.moe_exchange_block`
    when set and smaller, else all of them (one round)."""
    block = cfg.moe_exchange_block
    return min(block, tokens) if block else tokens


def blocked_all_to_all(
    x_nD, idx_nK, weights_nK, w_gate, w_up, w_down, cfg, axis, platform, scales=None
):
    """`expert_all_to_all` over the shard's n tokens in blocks of c = `exchange_block` tokens: a
    `lax.scan` over ceil(n / c) blocks, each a whole exchange (dispatch, grouped SwiGLU over the
    local experts, combine) with a receive buffer of `exchange_rows(cfg, G, c)` rows. The last
    block is padded with tokens routed to expert E (out of range: counted nowhere, sent nowhere,
    weight 0). Each block is rematerialised (`jax.checkpoint`): the backward keeps one block's
    buffers, not ceil(n / c) of them, and reruns that block's forward (its two exchanges
    included) before its transpose. Same outputs and gradients as one round; under a capacity
    factor the capacity applies per block. Returns y_nD float32."""
    n, K = idx_nK.shape
    c = exchange_block(cfg, n)
    if c == n:
        return expert_all_to_all(
            x_nD, idx_nK, weights_nK, w_gate, w_up, w_down, cfg, axis, platform, scales
        )
    blocks = -(-n // c)
    pad = blocks * c - n
    E = cfg.n_routed_experts

    def split(a, fill):
        a = jnp.pad(a, ((0, pad), (0, 0)), constant_values=fill)
        return a.reshape(blocks, c, a.shape[1])

    def body(carry, block):
        x, idx, w = block
        y = expert_all_to_all(x, idx, w, w_gate, w_up, w_down, cfg, axis, platform, scales)
        return carry, y

    xs = (split(x_nD, 0), split(idx_nK, E), split(weights_nK, 0))
    _, y = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, xs)
    return y.reshape(blocks * c, -1)[:n]


def exchange_group(cfg: ModelConfig, mesh, tokens_per_shard: int, choice: str = "auto"):
    """The mesh axes the routed experts are split over for the token all-to-all: () (no
    exchange: every shard all-gathers all E experts over fsdp), ("expert",), ("fsdp", "expert"),
    or with context parallelism ("expert", "context") / ("fsdp", "expert", "context") (context
    splits tokens like fsdp, so its chips can exchange them too).

    "auto" takes the candidate with the fewest elements per shard, counting the expert weights a
    shard holds while the layer runs (E/G experts, whole D) and the dispatch buffers (rows R =
    n*K without exchange, else the dropless worst case G * c * min(K, E/G) for a round of c =
    `exchange_block` tokens, `cfg.moe_exchange_block` or n; each row D wide plus
    three F/tensor wide intermediates). At V3 widths the weights dominate: all-gathering 256
    experts (22.5 GB bf16 per layer) costs far more than moving the tokens, so pure-FSDP meshes
    exchange tokens over fsdp. Candidates need E divisible by the group size.
    """
    size = lambda a: mesh.shape[a] if a in mesh.axis_names else 1  # noqa: E731
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    F_l = F // size("tensor")
    options = {
        "none": (),
        "expert": ("expert",),
        "fsdp_expert": ("fsdp", "expert"),
        "expert_context": ("expert", "context"),
        "fsdp_expert_context": ("fsdp", "expert", "context"),
    }
    if choice != "auto":
        if choice not in options:
            raise ValueError(f"MoE.exchange={choice!r}: expected auto, {', '.join(options)}")
        group = tuple(a for a in options[choice] if size(a) > 1)
        G = math.prod(size(a) for a in group)
        if E % G:
            raise ValueError(f"MoE.exchange={choice!r}: n_routed_experts={E} must divide by {G}")
        return group

    def cost(group):
        G = math.prod(size(a) for a in group)
        block = exchange_block(cfg, tokens_per_shard)
        rows = tokens_per_shard * K if G == 1 else exchange_rows(cfg, G, block)
        return (E // G) * 3 * D * F_l + rows * (D + 3 * F_l)

    candidates = {tuple(a for a in g if size(a) > 1) for g in options.values()}
    dividing = [g for g in candidates if E % math.prod(size(a) for a in g) == 0]
    return min(sorted(dividing), key=cost)


def sharded_experts(x_ND, idx_NK, weights_NK, experts: Experts, mesh, choice: str = "auto"):
    """The routed experts under a mesh, in `shard_map` over the batch axes: no step ever sees
    another shard's tokens except through the expert all-to-all.

    x_ND, idx_NK, weights_NK are split over the batch axes (data, fsdp, expert) and context
    present in `mesh`. The expert weights enter split over the exchange group (`exchange_group`)
    on E and over tensor on F; any fsdp / context split of D they are stored with is all-gathered
    (one layer at a time) — when fsdp is in the group, XLA moves each shard's weights by an
    all-to-all instead.
    Without a group each shard sorts its own assignments and runs all E experts; with one,
    `expert_all_to_all`. Partial sums over the tensor-split mlp width are psum'd over tensor.
    Under the FP8 recipe stored FP8 (or FP4) experts enter with their scales (`_sharded_operands`).
    Returns y_ND in the compute dtype.
    """
    cfg = experts.cfg
    dtype = jnp.dtype(cfg.dtype)
    names = mesh.axis_names
    ax = lambda a: a if a in names and mesh.shape[a] > 1 else None  # noqa: E731
    batch = tuple(a for a in TOKEN_AXES if a in names)
    shards = math.prod(mesh.shape[a] for a in batch)
    E = cfg.n_routed_experts
    group = exchange_group(cfg, mesh, x_ND.shape[0] // shards, choice)
    # The axes the stored weights split D over (in the "fsdp" layout fsdp, and context like
    # fsdp; in the "decode" layout none: see sharding.py) that the exchange does not use:
    # gathered here, so their gradient is reduce-scattered.
    stored_d = dim_axes(("expert", "embed", "mlp"), active_rules())[1]
    gather_d = tuple(a for a in ("fsdp", "context") if ax(a) and a in stored_d and a not in group)
    platform = _platform()
    impl, tile = _resolve_impl(cfg.moe_impl, cfg.moe_tile, platform)

    n_d = math.prod(mesh.shape[a] for a in gather_d)
    scales, weights = _sharded_operands(experts, dtype, n_d, mesh.shape.get("tensor", 1))

    def local(x, idx, w, *operands):
        if gather_d:  # D: axis 1 of gate / up [E, D, F], axis 2 of down [E, F, D]; scales alike
            operands = tuple(
                jax.lax.all_gather(a, gather_d, axis=2 if i % 3 == 2 else 1, tiled=True)
                for i, a in enumerate(operands)
            )
        (wg, wu, wd), sc = operands[:3], operands[3:] or None
        if group:
            y = blocked_all_to_all(x, idx, w, wg, wu, wd, cfg, group, platform, sc)
        elif impl == "looped" and not cfg.fp8 and not _few_rows(idx.size, E):
            y = sorted_dispatch_combine(x, idx, w, wg, wu, wd, cfg.swiglu_limit)
        elif impl in ("tiled", "looped"):
            y = tiled_dispatch_combine(x, idx, w, wg, wu, wd, tile, cfg.fp8, sc, cfg.swiglu_limit)
        else:
            order, group_sizes = _sort_by_expert(idx, E)
            x_sorted = jnp.take(x, order // idx.shape[1], axis=0)
            y_sorted = grouped_swiglu(
                x_sorted,
                group_sizes,
                wg,
                wu,
                wd,
                impl,
                tile,
                platform,
                cfg.fp8,
                sc,
                limit=cfg.swiglu_limit,
            )
            y = _combine(y_sorted, order, w)
        if ax("tensor"):
            y = jax.lax.psum(y, "tensor")
        return y.astype(dtype)

    e_spec = group or None
    d_spec = gather_d or None
    w_in = P(e_spec, d_spec, ax("tensor"))
    w_out = P(e_spec, ax("tensor"), d_spec)
    tokens = P(batch, None)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, *((w_in, w_in, w_out) * (1 + (scales is not None)))),
        out_specs=tokens,
    )
    return fn(x_ND.astype(dtype), idx_NK, weights_NK, *weights, *(scales or ()))


def _sharded_operands(experts: Experts, dtype, n_d: int, n_f: int):
    """(scales or None, (gate, up, down)) for `sharded_experts`, whose shards split D n_d and F
    n_f ways: stored FP8 blocks under the FP8 recipe when every shard holds whole 128-blocks
    (else dequantised, frozen, and re-quantised by the recipe); weights in `dtype` otherwise."""
    cfg = experts.cfg
    stored = experts.stored()
    if not cfg.fp8 or stored[0][1] is None:
        return None, experts.weights(dtype)
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    if all(n == 1 or dim % (fp8_lib.BLOCK * n) == 0 for dim, n in ((D, n_d), (F, n_f))):
        return tuple(s for _, s in stored), tuple(w for w, _ in stored)
    return None, jax.lax.stop_gradient(experts.weights(dtype))


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

    def stored(self):
        """((gate, scale_inv or None), (up, ...), (down, ...)) as stored: a weight may be
        float8_e4m3fn [E, in, out] with `<name>_scale_inv` [E, ceil(in/128), ceil(out/128)].
        DeepSeek-V4's FP4 experts (float4_e2m1fn, scales [E, ceil(in/32), out]; no GEMM here
        reads 32x1-group scales): under `cfg.fp8` the same values as FP8 128x128 blocks
        (`fp8.fp4_to_fp8_blocks`, exact), else dequantised to float32; frozen either way."""
        out = []
        for name, w in (("gate", self.gate), ("up", self.up), ("down", self.down)):
            scale = None
            if self.has_variable("params", f"{name}_scale_inv"):
                scale = self.get_variable("params", f"{name}_scale_inv")
                if fp8_lib.is_fp4(w) and self.cfg.fp8:
                    w, scale = jax.lax.stop_gradient(fp8_lib.fp4_to_fp8_blocks(w, scale))
                elif fp8_lib.is_fp4(w):
                    w = jax.lax.stop_gradient(fp8_lib.dequantize_weight(w, scale))
                    scale = None
            out.append((w, scale))
        return tuple(out)

    def weights(self, dtype):
        """(gate, up, down) in `dtype`, dequantised blockwise where stored FP8."""
        return tuple(
            w.astype(dtype) if s is None else fp8_lib.dequantize_weight(w, s, dtype)
            for w, s in self.stored()
        )

    def _operands(self, dtype):
        """(scales or None, (gate, up, down)) as the grouped matmuls take them: the FP8 recipe
        quantises the master (or stored FP8) weights itself; otherwise weights in `dtype`."""
        (w_gate, s_gate), (w_up, s_up), (w_down, s_down) = self.stored()
        if self.cfg.fp8:
            return (None if s_gate is None else (s_gate, s_up, s_down)), (w_gate, w_up, w_down)
        return None, self.weights(dtype)

    def routed(self, x_ND, idx_NK, weights_NK):
        """Σ_k weights_nk · expert_{idx_nk}(x_n) -> [N, D] in the compute dtype, for all of a
        device's tokens: the tiled grouped matmul with direct row moves, or a sort + ragged_dot."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        impl, tile = _resolve_impl(cfg.moe_impl, cfg.moe_tile, None)
        if impl == "ragged_dot":
            return dispatch_combine(
                x_ND.astype(dtype), idx_NK, weights_NK, cfg.n_routed_experts, self
            )
        scales, (w_gate, w_up, w_down) = self._operands(dtype)
        few = _few_rows(idx_NK.size, cfg.n_routed_experts)
        if impl == "looped" and not cfg.fp8 and scales is None and not few:
            y = sorted_dispatch_combine(
                x_ND.astype(dtype), idx_NK, weights_NK, w_gate, w_up, w_down, cfg.swiglu_limit
            )
            return y.astype(dtype)
        y = tiled_dispatch_combine(
            x_ND.astype(dtype),
            idx_NK,
            weights_NK,
            w_gate,
            w_up,
            w_down,
            tile,
            cfg.fp8,
            scales,
            cfg.swiglu_limit,
        )
        return y.astype(dtype)

    def __call__(self, x_sorted_MD, group_sizes_E):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        scales, (w_gate, w_up, w_down) = self._operands(dtype)
        return grouped_swiglu(
            x_sorted_MD.astype(dtype),
            group_sizes_E,
            w_gate,
            w_up,
            w_down,
            cfg.moe_impl,
            cfg.moe_tile,
            fp8=cfg.fp8,
            scales=scales,
            limit=cfg.swiglu_limit,
        )


class MoE(nn.Module):
    """Shared experts + routed experts. Returns (y_BTD, {"counts": [E], "balance": scalar}).

    `MoE(cfg)(x_BTD, valid_BT)`: x_BTD [B, T, D]; valid_BT [B, T] bool (tokens counted in the
    statistics; all tokens are routed). y_BTD [B, T, D] in the compute dtype; counts [E] f32
    tokens routed per expert; balance: the sequence-wise balance loss (α = 1). Variables:
    params router [D, E] (f32 logits), experts gate/up [E, D, F], down [E, F, D], shared (a
    SwiGLU of width n_shared*F); moe_bias bias [E] (the routing correction, not trained).

    `exchange` picks the mesh axes the routed experts split over for the token all-to-all
    ("auto", "none", "expert", "fsdp_expert", "expert_context", "fsdp_expert_context"; see
    `exchange_group`).

    `hashed` (DeepSeek-V4's first layers): experts come from the fixed table moe_bias
    `tid2eid` [vocab, k] int32 indexed by `token_ids_BT` (`route_hashed`) instead of the
    biased top-k; that layer has no `bias`."""

    cfg: ModelConfig
    exchange: str = "auto"
    hashed: bool = False

    @nn.compact
    def __call__(self, x_BTD, valid_BT, token_ids_BT=None):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, T, D = x_BTD.shape
        E = cfg.n_routed_experts
        if self.hashed:
            if token_ids_BT is None:
                raise ValueError("a hash-routed MoE layer needs the token ids")
            table = self.variable(
                "moe_bias", "tid2eid", jnp.zeros, (cfg.vocab_size, cfg.num_experts_per_tok),
                jnp.int32,
            )  # fmt: skip
        else:
            bias = self.variable("moe_bias", "bias", jnp.zeros, (E,), jnp.float32)
        # Router in float32 (docs/spec.md §5); kernel path moe/router/kernel.
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
        if self.hashed:
            idx_NK, weights_NK, scores_NE = route_hashed(
                router(x_ND), token_ids_BT.reshape(-1), table.value, cfg
            )
        else:
            idx_NK, weights_NK, scores_NE = route(router(x_ND), bias.value, cfg)
        experts = Experts(cfg, name="experts")
        mesh = jax.sharding.get_abstract_mesh()
        shards = 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in TOKEN_AXES)
        # Under a mesh each batch shard dispatches its own tokens (shard_map). That needs the
        # tokens to split evenly over the batch shards: always true for training batches (they
        # are validated), not for the batch-1 init trace, which takes the global path.
        if not mesh.empty and (B * T) % shards == 0:
            y_ND = sharded_experts(x_ND, idx_NK, weights_NK, experts, mesh, self.exchange)
        elif B * T * idx_NK.shape[1] <= E:  # decode-sized: copy only the selected experts
            y_ND = gathered_combine(x_ND.astype(dtype), idx_NK, weights_NK, experts)
        else:
            y_ND = experts.routed(x_ND, idx_NK, weights_NK)
        y_BTD = y_ND.reshape(B, T, D)
        if cfg.n_shared_experts:
            y_BTD = y_BTD + SwiGLU(
                D,
                cfg.n_shared_experts * cfg.moe_intermediate_size,
                dtype,
                pdtype,
                cfg.init_std,
                fp8=cfg.fp8,
                limit=cfg.swiglu_limit,
                name="shared",
            )(x_BTD)
        counts, balance = balance_stats(
            idx_NK.reshape(B, T, -1), scores_NE.reshape(B, T, E), valid_BT, E
        )
        return y_BTD, {"counts": counts, "balance": balance}
