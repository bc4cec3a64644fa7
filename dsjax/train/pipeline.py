"""Pipeline-parallel loss and gradients in SPMD JAX: GPipe, 1F1B, DualPipe (SPEC §13).

`pipeline_grads(params, moe_bias, batch, model=..., train_cfg=..., schedule=..., microbatches=M)`
returns what `jax.value_and_grad(loss_fn)` averaged over M micro-batches would (the loss, the
gradients, the metrics and the expert counts of the routing-bias update), computed by the ranks
of the mesh axis `stage` following a schedule of `dsjax.train.pipeline_schedule`.

How: the MoE layer stack is cut into the schedule's chunks (contiguous layers; DualPipe: rank r
holds chunks r and 2N-1-r), and the train state stores it in that row order (`stack_order`,
`dsjax.train.stack_layout`), so a rank's chunks are its own block of it: no weight moves. Inside `shard_map` over `stage` (the other mesh axes stay automatic,
so data/fsdp/expert/tensor sharding and the expert all-to-all work as without a pipeline) a
`lax.scan` runs the schedule's ticks. At each tick a rank looks up its row of the tick table and
runs at most one forward chunk and one backward chunk — of different micro-batches: DualPipe's
F&B pair — then sends activations and input gradients one rank up or down by `ppermute`.
A backward chunk is `jax.vjp` of its forward, recomputed from the chunk input saved in an
activation slot at the forward (chunk-granular rematerialisation). The first chunk also runs the
embedding and the dense layers; the last one the final norm, head, cross-entropy and MTP.
Everything outside the MoE stack is replicated over `stage`; its gradient is summed over `stage`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from dsjax.model import sharding
from dsjax.model.config import ModelConfig
from dsjax.model.layers.embed import embed_lookup
from dsjax.model.layers.norms import RMSNorm
from dsjax.model.transformer import (
    ModelOutput,
    MTPModule,
    _stack,
    abstract_variables,
    mtp_ahead,
)
from dsjax.train import pipeline_schedule as ps

AXIS = "stage"
METRICS = ("loss", "main_ce", "mtp_ce", "balance", "tokens")


def check_pipeline(cfg: ModelConfig, stages: int, schedule: str, microbatches: int) -> int:
    """Layers of the longest chunk; ValueError (one line naming the fields) for a split that
    cannot work. The MoE stack is stored in one block of `rank_rows` rows per rank over `stage`
    (a rank holding fewer layers pads its block with rows no chunk reads, `stack_order`); the
    chunks may differ by one layer (`chunk_sizes`)."""
    s = ps.make_schedule(schedule, stages, microbatches)
    L = cfg.num_moe_layers
    if L < stages:
        raise ValueError(
            f"config.mesh.stage={stages} exceeds the model's {L} MoE layers (one per stage "
            "at least)"
        )
    if cfg.dsa_stage != "off":
        raise ValueError(f"config.train.dsa_stage={cfg.dsa_stage!r}: pipelines run with 'off'")
    return max(chunk_sizes(s, L))


def rank_layers(s: ps.Schedule, L: int) -> tuple[int, ...]:
    """MoE layers each rank holds: L / ranks, the first L % ranks ranks one more."""
    return tuple(L // s.ranks + (r < L % s.ranks) for r in range(s.ranks))


def rank_rows(s: ps.Schedule, L: int) -> int:
    """Rows of each rank's block of the stored stack: its most layers (`rank_layers`)."""
    return max(rank_layers(s, L))


def chunk_sizes(s: ps.Schedule, L: int) -> tuple[int, ...]:
    """Layers of each chunk (contiguous, in model order): each rank's chunks together hold its
    `rank_layers`, split as evenly as they go (DualPipe with an odd count: rank r's chunk r one
    layer longer than its chunk 2N-1-r). The shorter chunks run masked identity layers up to
    the longest (`_masked_stack`); those are not parameters of the model."""
    sizes = [0] * s.chunks
    for r, n in enumerate(rank_layers(s, L)):
        mine = s.rank_chunks(r)
        for j, c in enumerate(mine):
            sizes[c] = n // len(mine) + (j < n % len(mine))
    return tuple(sizes)


def chunk_rows(s: ps.Schedule, L: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [C, Lc], valid [C, Lc]): the model layer of each row of each chunk padded to the
    longest, Lc layers; a padding row repeats the chunk's first layer and is not valid."""
    sizes = chunk_sizes(s, L)
    Lc, starts = max(sizes), np.cumsum((0, *sizes[:-1]))
    i = np.arange(Lc)
    valid = i[None, :] < np.asarray(sizes)[:, None]
    rows = np.where(valid, starts[:, None] + i[None, :], starts[:, None])
    return rows.astype(np.int32), valid


@dataclasses.dataclass(frozen=True)
class _Tables:
    """The tick table as int32 arrays [ticks, ranks] (see `tables`)."""

    arrays: dict[str, np.ndarray]
    channels: tuple[tuple[str, int], ...]  # (kind "F"/"B", direction +1/-1/0) used
    act_slots: int
    grad_slots: int
    local_chunks: tuple[tuple[int, ...], ...]


def tables(s: ps.Schedule) -> _Tables:
    """Per tick and rank: the forward (on, mb, chunk, local slot, activation slot, first, last),
    the backward (the same, plus its gradient slot), and what arrives at the end of the tick on
    each channel, into which slot. Activation slots hold a chunk's input from its arrival to its
    backward; gradient slots a chunk's output gradient likewise."""
    t = ps.ticks(s)
    T, N, C = t.length, s.ranks, s.chunks
    local = tuple(s.rank_chunks(r) for r in range(N))
    a = {k: np.zeros((T, N), np.int32) for k in ("f_on", "f_mb", "f_chunk", "f_local", "f_act")}
    a.update({k: np.zeros((T, N), np.int32) for k in ("b_on", "b_mb", "b_chunk", "b_local")})
    a.update({k: np.zeros((T, N), np.int32) for k in ("b_act", "b_grad")})
    arrive: dict[tuple[str, int, int], int] = {}  # (kind, mb, chunk) -> tick it lands
    for i in range(T):
        for r in range(N):
            if (f := t.fwd[i][r]) is not None and f[1] + 1 < C:
                arrive[("F", f[0], f[1] + 1)] = i
            if (b := t.bwd[i][r]) is not None and b[1] > 0:
                arrive[("B", b[0], b[1] - 1)] = i
    act, grad = _slots(t, arrive, "F"), _slots(t, arrive, "B")
    channels: set[tuple[str, int]] = set()
    recv = {
        (kind, d): (np.zeros((T, N), np.int32), np.zeros((T, N), np.int32))
        for kind in "FB"
        for d in (1, -1, 0)
    }
    for (kind, mb, c), i in arrive.items():
        src_chunk = c - 1 if kind == "F" else c + 1
        src, dst = s.chunk_rank[src_chunk], s.chunk_rank[c]
        d = dst - src
        channels.add((kind, d))
        on, slot = recv[(kind, d)]
        on[i, dst] = 1
        slot[i, dst] = (act if kind == "F" else grad)[(mb, c)]
    for i in range(T):
        for r in range(N):
            if (f := t.fwd[i][r]) is not None:
                mb, c = f
                a["f_on"][i, r], a["f_mb"][i, r], a["f_chunk"][i, r] = 1, mb, c
                a["f_local"][i, r] = local[r].index(c)
                a["f_act"][i, r] = act.get((mb, c), 0)
            if (b := t.bwd[i][r]) is not None:
                mb, c = b
                a["b_on"][i, r], a["b_mb"][i, r], a["b_chunk"][i, r] = 1, mb, c
                a["b_local"][i, r] = local[r].index(c)
                a["b_act"][i, r] = act.get((mb, c), 0)
                a["b_grad"][i, r] = grad.get((mb, c), 0)
    for kind, d in channels:
        on, slot = recv[(kind, d)]
        a[f"recv_{kind}{d}_on"], a[f"recv_{kind}{d}_slot"] = on, slot
    return _Tables(
        a,
        tuple(sorted(channels)),
        max(act.values(), default=0) + 1,
        max(grad.values(), default=0) + 1,
        local,
    )


def _slots(t: ps.TickTable, arrive, kind: str) -> dict[tuple[int, int], int]:
    """Slot per (mb, chunk) for what arrives of `kind`, live from the end of its arrival tick
    to its backward tick (read at the start of it; free for an arrival at its end)."""
    s = t.schedule
    end: dict[tuple[int, int], int] = {}
    for i in range(t.length):
        for r in range(s.ranks):
            if (b := t.bwd[i][r]) is not None:
                end[b] = i
    events = sorted((i, key[1:]) for key, i in arrive.items() if key[0] == kind)
    free: dict[int, list[int]] = {r: [] for r in range(s.ranks)}
    used = dict.fromkeys(range(s.ranks), 0)
    releases = sorted((end[key], key) for _, key in events)
    slot: dict[tuple[int, int], int] = {}
    j = 0
    for i, key in events:
        while j < len(releases) and releases[j][0] <= i:
            rel = releases[j][1]
            if rel in slot:
                free[s.chunk_rank[rel[1]]].append(slot[rel])
            j += 1
        r = s.chunk_rank[key[1]]
        if free[r]:
            slot[key] = free[r].pop()
        else:
            slot[key] = used[r]
            used[r] += 1
    return slot


# ----------------------------------------------------------------------------- the model in pieces
def _pre(cfg: ModelConfig, shared, mb) -> jax.Array:
    """Embedding and the dense layers of one micro-batch: the first chunk's prologue."""
    x = embed_lookup(shared["embed"]["embedding"], mb["inputs"], jnp.dtype(cfg.dtype))
    if cfg.num_dense_layers:
        stack = _stack(cfg, False, cfg.num_dense_layers, "train", "dense_layers")
        x, _ = stack.apply(
            {"params": shared["dense_layers"]}, x, mb["positions"], mb["segment_ids"], None
        )
    return x


def _post(cfg: ModelConfig, train_cfg, shared, shared_bias, h, mb):
    """Final norm, MTP modules, head and losses of one micro-batch: the last chunk's epilogue.
    Returns (loss without the main stack's balance term, metrics, MTP expert counts [D, E])."""
    from dsjax.train.step import output_loss  # step imports this module

    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "embed")
    head_input = cast(jax.Array, norm.apply({"params": shared["final_norm"]}, h))
    mtp_in, counts, balance = [], [], []
    for k in range(1, cfg.num_mtp_layers + 1):
        tokens, seg = mtp_ahead(mb["inputs"], mb["segment_ids"], None, k, "train")
        emb = embed_lookup(shared["embed"]["embedding"], tokens, dtype)
        name = f"mtp_{k - 1}"
        variables = {"params": shared[name], "moe_bias": shared_bias.get(name, {})}
        mtp = MTPModule(cfg, "train").apply(variables, h, emb, mb["positions"], seg)
        h, normed, s = cast(tuple[jax.Array, jax.Array, dict], mtp)
        mtp_in.append(normed)
        if "counts" in s:
            counts.append(s["counts"])
            balance.append(s["balance"])
    out = ModelOutput(
        logits=None,
        mtp_logits=None,
        hidden=h,
        expert_counts=None,
        balance_loss=None,
        mtp_expert_counts=jnp.stack(counts) if counts else None,
        mtp_balance_loss=jnp.stack(balance) if balance else None,
        head_input=head_input,
        mtp_head_input=tuple(mtp_in) if mtp_in else None,
    )
    loss, aux = output_loss(out, shared, mb, cfg=cfg, train_cfg=train_cfg)
    metrics = {
        "main_ce": aux["main_ce"],
        "mtp_ce": aux.get("mtp_ce", jnp.float32(0.0)),
        "balance": aux["balance"],
        "tokens": aux["tokens"],
    }
    return loss, metrics, out.mtp_expert_counts


def _when(skip: bool, pred, fn, otherwise=None):
    """`fn()` where `pred` (a traced bool) holds, else `otherwise()` (default: zeros like fn's
    output). `skip`: by `lax.cond`, so a false `pred` costs nothing; else both are computed
    and selected (`jnp.where`; `SKIP_IDLE`)."""
    if otherwise is None:
        otherwise = lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(fn))  # noqa: E731
        if not skip:
            return jax.tree.map(lambda a: jnp.where(pred, a, jnp.zeros_like(a)), fn())
    if skip:
        return jax.lax.cond(pred, fn, otherwise)
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), fn(), otherwise())


def _slots_run(skip: bool, f_on, b_on, forward, backward):
    """(forward(), backward()) of a tick, each zeros where its slot is idle. `skip`: one
    `lax.switch` over the four on/off cases, so an idle slot costs nothing while a busy pair
    stays one straight-line program (XLA interleaves the two chunks); else both computed and
    masked."""
    if not skip:
        return _when(False, f_on == 1, forward), _when(False, b_on == 1, backward)
    zeros = lambda fn: jax.tree.map(jnp.zeros_like, jax.eval_shape(fn))  # noqa: E731
    zf, zb = zeros(forward), zeros(backward)
    branches = [
        lambda: (zf, zb),
        lambda: (forward(), zb),
        lambda: (zf, backward()),
        lambda: (forward(), backward()),
    ]
    return jax.lax.switch(f_on + 2 * b_on, branches)


# Idle slots, prologues and epilogues skipped by `lax.cond` / `lax.switch` (True) or computed
# and masked (False); None: skipped except on XLA:CPU, where the collectives inside the branches
# deadlock the fake devices now and then (a DualPipe test passed once and hung the next run),
# although they stay within one `stage` rank's devices, which all take the same branch.
SKIP_IDLE: bool | None = None


def _masked_stack(cfg, layers: int, p_chunk, bias, x, mb, valid=None):
    """The MoE stack of a chunk padded to `layers` rows, one layer at a time (a `lax.scan` of
    one-layer stacks: the layer stack's own `nn.scan` of two or more MoE layers inside the
    `stage` shard_map stops XLA:TPU's SPMD partitioner at the expert exchange's `axis_index`,
    "PartitionId instruction is not supported"). A row that is not `valid` (None: all are) is
    the identity (its output is its input, its counts and balance loss zero, so it gets no
    gradient and moves no routing bias)."""
    one = _stack(cfg, True, 1, "train", "moe_layers")
    if valid is None:
        valid = jnp.ones((layers,), bool)

    def layer(h, row):
        p, b, ok = row
        variables = {
            "params": jax.tree.map(lambda a: a[None], p),
            "moe_bias": {"moe": {"bias": b[None]}},
        }
        y, stats = one.apply(variables, h, mb["positions"], mb["segment_ids"], None)
        stats = jax.tree.map(lambda a: jnp.where(ok, a[0], jnp.zeros_like(a[0])), stats)
        return jnp.where(ok, y, h), stats

    return jax.lax.scan(layer, x, (p_chunk, bias, valid))


def _chunk(cfg, train_cfg, layers: int, p_chunk, shared, x_in, bias, shared_bias, mb, first, last,
           valid=None, skip: bool = False):  # fmt: skip
    """One chunk's forward: (output [b,T,D], loss share, (counts [layers,E], metrics, MTP counts)).

    `first`/`last` (traced booleans) add the prologue (the input is then the micro-batch's tokens,
    not `x_in`) and the epilogue; the loss share is α·(this chunk's balance losses) plus, on the
    last chunk, the cross-entropies and MTP terms. `valid` [layers] (uneven chunks; None: all): which rows
    are real layers (`_masked_stack`). `skip`: see `_when`."""
    x = _when(skip, first, lambda: _pre(cfg, shared, mb).astype(x_in.dtype), lambda: x_in)
    h, stats = _masked_stack(cfg, layers, p_chunk, bias, x, mb, valid)
    tail = _when(skip, last, lambda: _post(cfg, train_cfg, shared, shared_bias, h, mb))
    tail_loss, metrics, mtp_counts = tail
    balance = stats["balance"].sum()
    loss = train_cfg.balance_loss_weight * balance + tail_loss
    metrics = {**metrics, "balance": metrics["balance"] + balance}
    return h, loss, (stats["counts"], metrics, mtp_counts)


def stack_order(s: ps.Schedule, L: int) -> np.ndarray:
    """The model layer of each row of the MoE stack as the train state stores it under `s`
    (docs/spec.md §13): rank r's block of `rank_rows` rows holds its chunks' layers, chunk by
    chunk in local-slot order (DualPipe: chunk r, then chunk 2N-1-r; GPipe/1F1B: model order),
    so the step reads every rank's layers where they are stored and moves no weights. A rank
    holding fewer layers than `rank_rows` ends its block with padding rows, -1 here: zeros in
    the state that no chunk reads (no gradient, no update) and no checkpoint holds."""
    sizes = chunk_sizes(s, L)
    starts = np.cumsum((0, *sizes[:-1]))
    P_ = rank_rows(s, L)
    blocks = []
    for r in range(s.ranks):
        mine = [starts[c] + np.arange(sizes[c]) for c in s.rank_chunks(r)]
        block = np.concatenate(mine)
        blocks.append(np.concatenate([block, np.full(P_ - len(block), -1)]))
    return np.concatenate(blocks).astype(np.int32)


def _local_rows(s: ps.Schedule, L: int) -> np.ndarray:
    """[ranks, chunks per rank, Lc]: the row of each rank's stored block that each row of its
    local chunks, padded to the longest (Lc), reads; a padding row reads the block's first row
    (`_masked_stack` makes it the identity). Rows past a rank's layers are never read."""
    sizes = chunk_sizes(s, L)
    Lc = max(sizes)
    i = np.arange(Lc)
    out = []
    for r in range(s.ranks):
        mine = np.asarray([sizes[c] for c in s.rank_chunks(r)])
        starts = np.cumsum((0, *mine[:-1]))
        out.append(np.where(i[None, :] < mine[:, None], starts[:, None] + i[None, :], 0))
    return np.stack(out).astype(np.int32)


# ----------------------------------------------------------------------------- placement
@functools.lru_cache(maxsize=8)
def _declared_specs(cfg: ModelConfig) -> dict[str, tuple]:
    """Logical axis names of each declared parameter, keyed by its path in `params`."""
    declared = nn.get_partition_spec(abstract_variables(cfg))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(declared, is_leaf=lambda x: isinstance(x, P))
    return {jax.tree_util.keystr(path): tuple(spec) for path, spec in leaves}


def param_specs(cfg: ModelConfig, params, mesh):
    """The PartitionSpec (mesh axes of `mesh`, the rule table in scope) of each leaf of `params`
    as the train state places it; leaves the model does not declare (FP8 scales) unconstrained.
    The pipeline pins what it builds from the parameters (the chunk-ordered stack, the gradient
    accumulators of the tick loop) to these, so that XLA does not choose replicated buffers."""
    rules = sharding.rules_for_mesh(mesh, sharding.active_rules())
    declared = _declared_specs(cfg)

    def spec(path, x):
        names = declared.get(jax.tree_util.keystr(path))
        if names is None or len(names) != x.ndim:
            return P(*([P.UNCONSTRAINED] * x.ndim))
        axes = nn.logical_to_mesh_axes(names, rules) or (None,) * x.ndim
        return sharding.fit_spec(P(*tuple(axes)), x.shape, mesh)

    return jax.tree_util.tree_map_with_path(spec, params)


def _constrain(tree, specs):
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, specs)


def _without_stage(spec: P, lead: int) -> P:
    """`spec` of a stage-stacked parameter [L, ...] for its rank's local view [lead..., ...]."""
    return P(*([None] * lead), *tuple(spec)[1:])


def _activation_spec(mesh, lead: int) -> P:
    """[lead..., b, T, D] activations (slots, micro-batches) laid out as the model's."""
    rules = sharding.rules_for_mesh(mesh, sharding.active_rules())
    axes = nn.logical_to_mesh_axes(("batch", "length", "embed"), rules)
    return P(*([None] * lead), *tuple(axes or (None,) * 3))


def pipeline_grads(
    params,
    moe_bias,
    batch,
    *,
    model,
    train_cfg,
    schedule: str,
    microbatches: int,
    table_arrays: dict[str, jax.Array] | None = None,
    skip: bool | None = None,
):
    """(loss, grads, metrics, counts) of the batch split into `microbatches`, pipelined over the
    mesh axis `stage` of the mesh in scope (`jax.set_mesh`). `loss` and the metrics are means over
    micro-batches (`tokens` a sum), `grads` like `params`, `counts` like `moe_bias`.
    `params["moe_layers"]` (and its gradient) is in the stored row order, `stack_order`
    (`dsjax.train.stack_layout` converts); `moe_bias` (and the counts) in model order.
    `table_arrays` replaces `tables(...).arrays` (same keys and shapes; tests alter it).
    `skip`: idle slots, prologues and epilogues skipped by `lax.cond` rather than computed and
    masked (default `SKIP_IDLE`)."""
    cfg: ModelConfig = model.cfg
    mesh = jax.sharding.get_abstract_mesh()
    N = mesh.shape[AXIS]
    layers = check_pipeline(cfg, N, schedule, microbatches)
    s = ps.make_schedule(schedule, N, microbatches)
    tab = tables(s)
    k = s.chunks // N  # chunks per rank
    M = microbatches
    rows, valid = chunk_rows(s, cfg.num_moe_layers)
    uneven = not valid.all()
    specs = param_specs(cfg, params, mesh)
    stack_specs = specs["moe_layers"]
    shared_specs = {n: v for n, v in specs.items() if n != "moe_layers"}
    # Inside the shard_map over `stage` (manual) the other axes stay automatic: the rank's
    # chunks, the accumulators of its gradients and the activation slots are pinned to the
    # parameters' / the model's layout over data x fsdp x expert (else XLA may replicate them).
    local_specs = jax.tree.map(lambda sp: _without_stage(sp, 2), stack_specs)
    slot_spec = _activation_spec(mesh, 1)
    stacked = _constrain(params["moe_layers"], stack_specs)  # `stack_order`: no reordering
    shared = {n: v for n, v in params.items() if n != "moe_layers"}
    bias_stack = moe_bias["moe_layers"]["moe"]["bias"]  # [L, E], model order, replicated
    shared_bias = {n: v for n, v in moe_bias.items() if n != "moe_layers"}
    mbs = jax.tree.map(lambda x: x.reshape(M, x.shape[0] // M, *x.shape[1:]), batch)
    mbs = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, P(*tuple(slot_spec)[: x.ndim])), mbs
    )
    b, T = mbs["inputs"].shape[1:3]
    act_shape = (b, T, cfg.hidden_size)
    act_dtype = jnp.dtype(cfg.dtype)
    if table_arrays is None:
        table_arrays = {n: jnp.asarray(v) for n, v in tab.arrays.items()}
    arrays = table_arrays
    if skip is None:
        from dsjax.model.layers.moe import _platform  # noqa: PLC0415

        skip = _platform() != "cpu" if SKIP_IDLE is None else SKIP_IDLE
    chunk = functools.partial(_chunk, cfg, train_cfg, layers, skip=skip)
    rows_j, valid_j = jnp.asarray(rows), jnp.asarray(valid)
    by_rank = _local_rows(s, cfg.num_moe_layers).reshape(N, -1)
    same_rows = bool((by_rank == by_rank[0]).all())  # static rows unless the ranks differ

    def body(stacked, shared, bias_stack, shared_bias, mbs, arrays):
        r = jax.lax.axis_index(AXIS)
        # The rank's stored block -> its chunks, each padded to `layers` rows (a local gather).
        local_rows = by_rank[0] if same_rows else jnp.asarray(by_rank)[r]
        if uneven:
            local = jax.tree.map(lambda x: jnp.take(x, local_rows, axis=0), stacked)
        else:
            local = stacked
        local = jax.tree.map(lambda x: x.reshape(k, layers, *x.shape[1:]), local)
        local = _constrain(local, local_specs)
        row = lambda name, i: arrays[name][i, r]  # noqa: E731

        def run(kind, i, carry):
            on, mb_i, c = row(f"{kind}_on", i), row(f"{kind}_mb", i), row(f"{kind}_chunk", i)
            p = jax.tree.map(lambda x: x[row(f"{kind}_local", i)], local)
            mb = jax.tree.map(lambda x: x[mb_i], mbs)
            if uneven:
                bias = jnp.take(bias_stack, rows_j[c], axis=0)
            else:
                bias = jax.lax.dynamic_slice_in_dim(bias_stack, c * layers, layers)
            x_in = carry["act"][row(f"{kind}_act", i)]
            first, last = c == 0, c == s.chunks - 1
            return on, mb_i, c, p, mb, bias, x_in, first, last

        def chunk_of(c):
            return functools.partial(chunk, valid=valid_j[c]) if uneven else chunk

        def tick(carry, i):
            on, _, c, p, mb, bias, x_in, first, last = run("f", i, carry)
            on_b, _, cb, pb, mbb, biasb, xb, firstb, lastb = run("b", i, carry)
            g_y = jnp.where(lastb, 0.0, carry["grad"][row("b_grad", i)]).astype(act_dtype)

            def forward():  # the forward chunk
                return chunk_of(c)(p, shared, x_in, bias, shared_bias, mb, first, last)

            def backward():  # the VJP of the backward chunk's forward, recomputed
                f = (
                    lambda p_, sh_, x_: chunk_of(cb)(  # noqa: E731
                        p_, sh_, x_, biasb, shared_bias, mbb, firstb, lastb
                    )[:2]
                )
                _, vjp = jax.vjp(f, pb, shared, xb)
                return vjp((g_y, jnp.float32(1.0 / M)))

            f_out, (g_p, g_sh, g_x) = _slots_run(skip, on, on_b, forward, backward)
            g_p = _constrain(g_p, jax.tree.map(lambda sp: P(*tuple(sp)[1:]), local_specs))
            g_sh = _constrain(g_sh, shared_specs)
            # XLA's while-loop all-reduce code motion would sink the gradients' reduce-scatters
            # out of the tick loop, accumulating them unscattered (buffers fsdp x expert times
            # larger), and with a bf16 reduce-scatter converted to fp32 it stops on a RET_CHECK
            # (libtpu 0.0.42, fsdp 16 x expert 8): the barrier keeps them reduced every tick.
            g_p, g_sh = jax.lax.optimization_barrier((g_p, g_sh))
            y, _, (counts, metrics, mtp_counts) = f_out
            if uneven:  # padding rows repeat a real row with zero counts
                carry["counts"] = carry["counts"].at[rows_j[c]].add(counts)
            else:
                carry["counts"] = jax.lax.dynamic_update_slice_in_dim(
                    carry["counts"],
                    jax.lax.dynamic_slice_in_dim(carry["counts"], c * layers, layers) + counts,
                    c * layers,
                    0,
                )
            carry["metrics"] = jax.tree.map(jnp.add, carry["metrics"], metrics)
            if mtp_counts is not None:
                carry["mtp_counts"] = carry["mtp_counts"] + mtp_counts
            lb = row("b_local", i)
            carry["g_local"] = _constrain(
                jax.tree.map(lambda acc, g: acc.at[lb].add(g), carry["g_local"], g_p),
                local_specs,
            )
            carry["g_shared"] = _constrain(
                jax.tree.map(jnp.add, carry["g_shared"], g_sh), shared_specs
            )
            # Transfers: forward outputs to the next chunk's rank, input gradients to the
            # previous chunk's; each lands in the slot the table names.
            for kind, d in tab.channels:
                payload = y if kind == "F" else g_x.astype(act_dtype)
                if d:
                    pairs = [(j, j + d) for j in range(N) if 0 <= j + d < N]
                    payload = jax.lax.ppermute(payload, AXIS, pairs)
                store = "act" if kind == "F" else "grad"
                on_r = row(f"recv_{kind}{d}_on", i)
                slot = row(f"recv_{kind}{d}_slot", i)
                carry[store] = jax.lax.with_sharding_constraint(
                    carry[store].at[slot].set(jnp.where(on_r, payload, carry[store][slot])),
                    slot_spec,
                )
            return carry, None

        L_total = bias_stack.shape[0]
        carry0: dict[str, Any] = {
            "act": jax.lax.with_sharding_constraint(
                jnp.zeros((tab.act_slots, *act_shape), act_dtype), slot_spec
            ),
            "grad": jax.lax.with_sharding_constraint(
                jnp.zeros((tab.grad_slots, *act_shape), act_dtype), slot_spec
            ),
            "counts": jnp.zeros((L_total, bias_stack.shape[1]), jnp.float32),
            "metrics": {m: jnp.float32(0.0) for m in METRICS if m != "loss"},
            "g_local": _constrain(jax.tree.map(jnp.zeros_like, local), local_specs),
            "g_shared": _constrain(jax.tree.map(jnp.zeros_like, shared), shared_specs),
        }
        if cfg.num_mtp_layers and cfg.mtp_is_moe:
            carry0["mtp_counts"] = jnp.zeros(
                (cfg.num_mtp_layers, cfg.n_routed_experts), jnp.float32
            )
        carry, _ = jax.lax.scan(tick, carry0, jnp.arange(tab.arrays["f_on"].shape[0]))
        g_stacked = jax.tree.map(lambda g: g.reshape(k * layers, *g.shape[2:]), carry["g_local"])
        if uneven:  # back to the stored block; padding rows get zero gradients
            g_stacked = jax.tree.map(
                lambda g, x: jnp.zeros_like(x).at[local_rows].add(g), g_stacked, stacked
            )
        summed = jax.lax.psum(
            (carry["g_shared"], carry["counts"], carry["metrics"], carry.get("mtp_counts")), AXIS
        )
        return g_stacked, summed

    fn = jax.shard_map(
        body,
        in_specs=(P(AXIS), P(), P(), P(), P(), P()),
        out_specs=(P(AXIS), P()),
        axis_names={AXIS},
        check_vma=False,
    )
    g_stacked, (g_shared, counts, metric_sums, mtp_counts) = fn(
        stacked, shared, bias_stack, shared_bias, mbs, arrays
    )
    grads = dict(g_shared)
    grads["moe_layers"] = _constrain(g_stacked, stack_specs)
    grads = {n: grads[n] for n in params}
    metrics = {m: v / M for m, v in metric_sums.items()}
    metrics["tokens"] = metric_sums["tokens"]
    metrics["loss"] = (
        metrics["main_ce"]
        + (train_cfg.mtp_weight * metrics["mtp_ce"] if cfg.num_mtp_layers else 0.0)
        + train_cfg.balance_loss_weight * metrics["balance"]
    )
    count_tree: dict[str, Any] = {"moe_layers": {"moe": {"bias": counts}}}
    for name in moe_bias:
        if name.startswith("mtp_") and mtp_counts is not None:
            count_tree[name] = {"block": {"moe": {"bias": mtp_counts[int(name.split("_")[1])]}}}
    return metrics["loss"], grads, metrics, count_tree
