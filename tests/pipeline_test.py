"""Pipeline parallelism (SPEC §13): each schedule over `stage`, with data and expert axes beside
it, gives one device's loss, gradients and expert counts; dropping one backward chunk breaks it."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from dsjax.model import sharding
from dsjax.model.transformer import Transformer, init_variables
from dsjax.train import pipeline
from dsjax.train import step as ts
from dsjax.train.stack_layout import StackLayout, stack_layout

B, T, M = 16, 16, 4  # 4 micro-batches of 4 rows: one row per data x expert shard
FP8_TOL = 1e-2  # e4m3 keeps 3 mantissa bits: one flipped rounding step moves a value 1/16


@pytest.fixture(scope="module")
def setup():
    # 1 dense + 6 MoE layers: 3 per rank of stage=2; DualPipe's 4 chunks get 2, 2, 1 and 1 (the
    # short ones padded with masked identity layers), so one compile covers uneven chunks too.
    config, model, params, moe_bias, batch = _setup(7)
    reference = _accumulated(config, model, params, moe_bias, batch)
    return config, model, params, moe_bias, batch, reference


def _setup(layers):
    config = tiny.get_config()
    config.model.num_hidden_layers = layers
    cfg = ts.model_config(config)
    variables = init_variables(cfg, jax.random.key(0))
    params = variables["params"]
    # A non-zero routing bias, different per layer: the chunks must use their own layers' rows.
    moe_bias = jax.tree.map(
        lambda b: b + 0.01 * jax.random.normal(jax.random.key(3), b.shape), variables["moe_bias"]
    )
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(0, cfg.vocab_size, (B, T)),
        "targets": rng.integers(0, cfg.vocab_size, (B, T)),
        "positions": np.tile(np.arange(T), (B, 1)),
        "segment_ids": np.ones((B, T)),
        "weights": rng.uniform(0.5, 1.0, (B, T)),
    }
    batch = {
        k: jnp.asarray(v, jnp.float32 if k == "weights" else jnp.int32) for k, v in batch.items()
    }
    return config, Transformer(cfg), params, moe_bias, batch


def _accumulated(config, model, params, moe_bias, batch):
    """(loss, grads, expert counts) of the M micro-batches without a pipeline, averaged as
    grad_accum = M does (on one device, or on the mesh in scope)."""
    train_cfg = ts.train_options(config)
    grad_fn = jax.jit(
        jax.value_and_grad(
            functools.partial(ts.loss_fn, model=model, train_cfg=train_cfg), has_aux=True
        )
    )
    loss = grads = counts = None
    micro = jax.tree.map(lambda x: x.reshape(M, B // M, T), batch)
    for m in range(M):
        (value, aux), g = grad_fn(params, moe_bias, {k: v[m] for k, v in micro.items()})
        c = ts.expert_counts_tree(moe_bias, aux["out"])
        acc = lambda a, b: b if a is None else jax.tree.map(jnp.add, a, b)  # noqa: E731
        loss, grads, counts = acc(loss, value / M), acc(grads, g), acc(counts, c)
    grads = jax.tree.map(lambda g: g / M, grads)
    return loss, grads, counts


def _program(config, model, schedule, mesh):
    """The compiled pipeline with its tick table as an argument (one compile serves mutations),
    called with the MoE stack in model order: the train state's row order (`StackLayout`) is
    put in and taken out outside the program, which holds the pipeline alone (`.hlo`)."""
    fn = functools.partial(
        pipeline.pipeline_grads,
        model=model,
        train_cfg=ts.train_options(config),
        schedule=schedule,
        microbatches=M,
    )
    jitted, compiled = jax.jit(lambda p, b, x, t: fn(p, b, x, table_arrays=t)), []

    def run(p, b, x, t):
        stages = jax.sharding.get_abstract_mesh().shape["stage"]
        layout = StackLayout.of(
            pipeline.ps.make_schedule(schedule, stages, M), model.cfg.num_moe_layers
        )
        p = layout.stored(p)
        compiled[:] = compiled or [jitted.lower(p, b, x, t).compile()]
        loss, grads, metrics, counts = compiled[0](p, b, x, t)
        return loss, layout.model(grads), metrics, counts

    run.hlo = lambda: compiled[0].as_text()  # type: ignore[attr-defined]
    return run


def _tables(schedule, stages):
    from dsjax.train.pipeline_schedule import make_schedule

    return pipeline.tables(make_schedule(schedule, stages, M)).arrays


def _assert_matches(result, reference, tol=1e-5):
    loss, grads, metrics, counts = result
    ref_loss, ref_grads, ref_counts = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=tol)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=tol)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = ref_grads
        for p in path:
            r = r[p.key]
        scale = float(jnp.abs(r).max()) + 1e-12
        err = float(jnp.abs(g - r).max()) / scale
        assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), counts, ref_counts)


@pytest.mark.parametrize(
    "schedule,mesh_sizes",
    [
        ("gpipe", dict(stage=2, data=2, expert=2)),
        ("1f1b", dict(stage=2, data=2, expert=2)),
        ("dualpipe", dict(stage=2, data=2, expert=2)),
    ],
)
def test_schedule_matches_one_device(setup, schedule, mesh_sizes):
    """Each schedule gives one device's loss, gradients and counts. DualPipe runs uneven chunks
    (6 MoE layers on 4 chunks: 2, 2, 1, 1 layers, the short ones padded with masked identity
    layers); GPipe and 1F1B even ones (3 layers a rank)."""
    config, model, params, moe_bias, batch, reference = setup
    mesh = sharding.make_mesh(**mesh_sizes)
    stages = mesh_sizes["stage"]
    s = pipeline.ps.make_schedule(schedule, stages, M)
    sizes = pipeline.chunk_sizes(s, 6)
    assert sizes == ((2, 2, 1, 1) if schedule == "dualpipe" else (3, 3)), sizes
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        program = _program(config, model, schedule, mesh)
        table = {k: jnp.asarray(v) for k, v in _tables(schedule, stages).items()}
        _assert_matches(program(params, moe_bias, batch, table), reference)
        if schedule != "dualpipe":
            return
        _assert_no_weights_cross_stages(program.hlo(), config, stages)
        # Mutation: drop the backward chunk of one micro-batch on rank 1 -> must not match.
        b_on = np.asarray(table["b_on"]).copy()
        tick = int(np.flatnonzero(b_on[:, 1])[0])
        b_on[tick, 1] = 0
        mutated = program(params, moe_bias, batch, {**table, "b_on": jnp.asarray(b_on)})
    with pytest.raises(AssertionError, match="relative error"):
        _assert_matches(mutated, reference)


def _assert_no_weights_cross_stages(hlo: str, config, stages: int) -> None:
    """What crosses `stage` in the compiled step (the mesh's outer axis, so a stage's devices
    are consecutive: hlo_stats' "slices") is the activations and input gradients each tick
    sends one rank up or down, and all-reduces (the replicated parameters' gradients, the
    counts, the metrics): no gather, exchange or permute of weights or their gradients."""
    from dsjax.plan import hlo_stats

    ops = hlo_stats.collectives(hlo, 8, per_slice=8 // stages)["ops"]
    tab = pipeline.tables(pipeline.ps.make_schedule("dualpipe", stages, M))
    sends = tab.arrays["f_on"].shape[0] * sum(d != 0 for _, d in tab.channels)
    activation = (B // M // 4) * T * config.model.hidden_size * 4  # f32 [b, T, D], b per shard
    assert ops["all-gather"]["dcn_bytes"] == ops["all-to-all"]["dcn_bytes"] == 0, ops
    assert 0 < ops["collective-permute"]["dcn_bytes"] <= sends * activation, ops


def test_uneven_layers_refuse_with_one_line():
    cfg = ts.model_config(tiny.get_config())  # 2 MoE layers
    with pytest.raises(ValueError, match=r"mesh.stage=4 exceeds the model's 2 MoE layers"):
        pipeline.check_pipeline(cfg, 4, "1f1b", 8)
    assert pipeline.check_pipeline(cfg, 2, "1f1b", 4) == 1
    # DualPipe's chunks within a rank may differ by one layer (here 1 and 0).
    assert pipeline.check_pipeline(cfg, 2, "dualpipe", 4) == 1


def test_checkpoint_restores_across_stage_counts(tmp_path):
    """Checkpoints hold the MoE stack in model order whatever `stage` (split in contiguous
    blocks): a stage=1 checkpoint restores onto stage=4 and back, value for value, and the
    train state's DualPipe row order there (`StackLayout`) goes in and out exactly."""
    import grain

    from dsjax.checkpoints.orbax_io import Checkpointer

    config = tiny.get_config()
    config.model.num_hidden_layers = 9
    model, tx = Transformer(ts.model_config(config)), ts.make_optimizer(config)[0]
    meshes = [sharding.make_mesh(data=8), sharding.make_mesh(stage=4, data=2)]
    with jax.set_mesh(meshes[0]):
        state, _, _ = ts.create_sharded_state(jax.random.key(3), model, tx, meshes[0], 16)
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    for step, mesh in enumerate([meshes[1], meshes[0]], start=1):
        ck = Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
        ck.save(step, state, data_iter, config, force=True)
        ck.close()
        with jax.set_mesh(mesh):
            _, abstract, _ = ts.create_sharded_state(jax.random.key(0), model, tx, mesh, 16)
            restored = Checkpointer(str(tmp_path), every=1, keep=2).restore(
                step, abstract, data_iter
            )
        for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        gate = restored.params["moe_layers"]["moe"]["experts"]["gate"]
        assert gate.addressable_shards[0].data.shape[0] == 8 // mesh.shape["stage"]
        if mesh.shape["stage"] > 1:  # rank 0 stores layers 0 and 7 (DualPipe's chunks 0 and 7)
            layout = StackLayout.of(pipeline.ps.make_schedule("dualpipe", 4, 8), 8)
            want = np.asarray(gate)[[0, 7]]
            stored = layout.stored(restored)  # consumes `restored`
            shard = stored.params["moe_layers"]["moe"]["experts"]["gate"].addressable_shards[0]
            np.testing.assert_array_equal(shard.data, want)
            restored = layout.model(stored, to_host=True)  # as `_Loop.save` gives Orbax
        state = restored


def test_train_step_with_stages_and_grad_accum_matches_stage_1(setup):
    """train_step under stage=2 (DualPipe, 4 micro-batches inside each of 2 accumulation steps,
    the state's MoE stack in the pipeline's row order, `StackLayout`) gives stage=1's
    grad_accum=4 step: loss, gradient norm, the updated parameters and routing biases."""
    config, model, params, moe_bias, batch, _ = setup
    config = config.copy_and_resolve_references()  # the fixture's stays as it is
    tx, lr = ts.make_optimizer(config)
    out = []
    for sizes, accum in ((dict(data=2, expert=2), 8), (dict(stage=2, data=2, expert=2), 2)):
        config.train.grad_accum, config.train.microbatches = accum, 4
        config.train.pipeline_schedule = "dualpipe"
        mesh = sharding.make_mesh(**sizes, devices=jax.devices()[: math.prod(sizes.values())])
        train_cfg = ts.train_options(config)
        layout = stack_layout(model.cfg, train_cfg, mesh.shape["stage"])
        state = ts.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            moe_bias=moe_bias,
            opt_state=tx.init(params),
        )
        step = functools.partial(
            ts.train_step, model=model, tx=tx, schedule=lr, train_cfg=train_cfg
        )
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
            new, m = jax.jit(step)(layout.stored(state), batch)
            # Back to model order on the host (numpy): the on-device gathers (one program per
            # leaf, all in flight at once on XLA:CPU's 8 fake devices) aborted a CI worker.
            out.append((layout.model(jax.device_get(new)), jax.device_get(m)))
    (a, ma), (b, mb) = out
    assert layout.order is not None  # stage=2 ran on a permuted stack
    for k in ("loss", "main_ce", "grad_norm", "tokens"):
        np.testing.assert_allclose(mb[k], ma[k], rtol=1e-5, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, atol=1e-7), a.moe_bias, b.moe_bias)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, atol=1e-5), a.params, b.params)


def test_fp8_with_stages_matches_stage_1():
    """The FP8 recipe (model.fp8, docs/spec.md §8) pipelined over stage=2 (DualPipe) gives the
    loss, gradients and expert counts of stage=1 on the same data x expert shards (the same
    1x128 / 128x1 quantisation tiles), within FP8's own reproducibility: a last-bit difference
    in a GEMM input can move one e4m3 rounding step (8 MoE layers, 2 a chunk)."""
    config, _, params, moe_bias, batch = _setup(9)
    config.model.fp8 = True
    model = Transformer(ts.model_config(config))
    with jax.set_mesh(sharding.make_mesh(data=2, expert=2, devices=jax.devices()[:4])):
        with nn.logical_axis_rules(sharding.LOGICAL_RULES):
            reference = _accumulated(config, model, params, moe_bias, batch)
    with jax.set_mesh(sharding.make_mesh(stage=2, data=2, expert=2)):
        with nn.logical_axis_rules(sharding.LOGICAL_RULES):
            program = _program(config, model, "dualpipe", None)
            table = {k: jnp.asarray(v) for k, v in _tables("dualpipe", 2).items()}
            result = program(params, moe_bias, batch, table)
    # The reference lives on 4 devices, the pipeline's result on 8: compare on the host.
    _assert_matches(jax.device_get(result), jax.device_get(reference), tol=FP8_TOL)
