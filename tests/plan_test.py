"""The planner: real XLA:TPU compiles of tiny and small for a v5e:2x2 slice (libtpu), its report
fields, the exit status of a config that cannot fit, and the HLO collective accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import small, tiny
from dsjax import run_config
from dsjax.model import sharding
from dsjax.plan import hlo_stats, tpu_specs
from dsjax.plan import planner as plan
from tests.conftest import ROOT

needs_libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason="libtpu not installed (pip install -r requirements-tpu.txt)",
)


@pytest.fixture(scope="module")
def v5e_2x2():
    return plan.make_target("v5e:2x2")


def _check_report(r, target):
    assert r["devices"] == 4 and r["hbm_bytes"] == target.hbm_bytes == 15.75 * 1024**3
    m = r["memory"]
    for key in ("params_bytes", "args_bytes", "total_bytes"):
        assert m[key] > 0, key
    assert m["temp_bytes"] >= 0 and m["total_bytes"] >= m["args_bytes"]
    assert r["fits"] is True and 0 < r["headroom_bytes"] < r["hbm_bytes"]
    assert r["compile_s"] > 0
    assert r["flops"]["analytic_per_device"] > 0 and r["flops"]["xla_per_device"] > 0
    ops = r["collectives"]["ops"]
    assert set(ops) == set(hlo_stats.COLLECTIVES)
    assert r["collectives"]["unknown_trip_counts"] == 0
    est = r["estimate"]
    assert est["compute_s"] > 0 and est["hbm_s"] > 0
    # the roofline: the step is the slowest of compute / HBM / ICI, MFU analytic FLOPs over it
    assert est["step_s"] == max(
        est[k] for k in ("compute_s", "hbm_s", "ici_s", "dcn_s") if k in est
    )
    mfu = r["flops"]["analytic_per_device"] / (est["step_s"] * target.peak_flops)
    assert est["mfu_upper_bound"] == pytest.approx(mfu) and 0 < mfu <= 1
    a = r["analytic_bytes"]  # HBM total: every entry but the host-memory ones
    in_hbm = [v for k, v in a.items() if k != "total" and not k.startswith("host_")]
    assert a["total"] == pytest.approx(sum(in_hbm)) and a["total"] > a["params"] > 0
    json.dumps(plan._jsonable(r))  # the --json output
    text = plan.format_report(r)
    for word in ("fits: YES", "temporaries", "collectives", "roofline", "MFU <="):
        assert word in text, word
    return ops


@needs_libtpu
@pytest.mark.parametrize("name", ["tiny", "small", "tiny_offload"])
def test_train_plan_compiles_for_v5e_2x2(v5e_2x2, name):
    config = {"tiny": tiny, "small": small, "tiny_offload": tiny}[name].get_config()
    offload = name.endswith("offload")
    if offload:  # optimizer state and layer inputs wait in host memory
        config.optim.host_offload = True
        config.train.remat = "offload"
    config.data.seq_len = 32
    config.train.batch_size = 8  # 2 per chip on the data=4 mesh
    # small's layers are straight-line (scan_unroll=4): there XLA:TPU's memory_analysis reports
    # temp_size 0 though its buffer assignment holds an HBM temp heap; the planner reads the
    # temporaries from the buffer assignment in the compiler's dump.
    r = plan.plan_train(config, v5e_2x2)
    ops = _check_report(r, v5e_2x2)
    assert r["mesh"]["data"] == 4 and r["devices"] == 4
    m = r["memory"]
    assert m["temp_bytes"] > 0 and m["total_bytes"] > m["args_bytes"] and m["peak_bytes"] > 0
    # data parallel: the gradients are all-reduced over the 4 chips, every step
    # (every gradient, f32 like the parameters; a ring all-reduce over 4 sends 2 x 3/4 of it)
    ar = ops["all-reduce"]
    assert ar["count"] > 0 and ar["result_bytes"] >= m["params_bytes"]
    assert ar["moved_bytes"] == pytest.approx(2 * 3 / 4 * ar["result_bytes"])
    assert r["memory"]["optimizer_bytes"] == pytest.approx(2 * r["memory"]["params_bytes"], 0.01)
    assert r["analytic_bytes"]["params"] == r["memory"]["params_bytes"]
    a = r["analytic_bytes"]
    if not offload:
        assert m["host_bytes"] == 0 and a["host_optimizer"] == a["host_activations"] == 0
        return
    # XLA:TPU's own host figures: the moments in and out (donated), the layer inputs as host
    # temporaries; the moments are not among the HBM arguments
    assert m["args_bytes"] < m["params_bytes"] + m["optimizer_bytes"] / 2
    assert m["host_bytes"] >= m["optimizer_bytes"] + a["host_activations"] > m["optimizer_bytes"]
    assert r["host_transfer_bytes"] == 2 * (a["host_optimizer"] + a["host_activations"]) > 0
    assert r["host_fits"] and r["host_memory_bytes"] == 64 * 1024**3  # 512 GiB / 8 chips
    assert "host memory (offloaded)" in plan.format_report(r)


@needs_libtpu
def test_decode_plan_compiles_for_v5e_2x2(v5e_2x2):
    config = tiny.get_config()
    config.mesh.update(data=1, fsdp=4)
    r = plan.plan_decode(config, v5e_2x2, batch=8, cache_len=128)
    _check_report(r, v5e_2x2)
    # pools [L, N/4, 64, C + R] per chip: 2 rows of 2 pages of 64 positions + its TRASH page,
    # 32 + 8 values, f32, 3 layers
    assert r["memory"]["cache_bytes"] == 3 * (2 * 2 + 1) * 64 * (32 + 8) * 4
    assert r["estimate"]["tokens_per_s"] == pytest.approx(8 / r["estimate"]["step_s"])  # B / step


@needs_libtpu
def test_decode_layout_plan_reads_weights_where_they_live(v5e_2x2):
    """The decode layout on expert 2 x tensor 2: the cache's rows over all 4 chips, no weight
    all-gathered (the FSDP plan above gathers every layer's), the HBM bound reported."""
    config = tiny.get_config()
    config.mesh.update(data=1, expert=2, tensor=2)
    r = plan.plan_decode(config, v5e_2x2, batch=8, cache_len=128, layout="decode")
    _check_report(r, v5e_2x2)
    assert r["layout"] == "decode"
    assert r["memory"]["cache_bytes"] == 3 * (2 * 2 + 1) * 64 * (32 + 8) * 4  # 2 of 8 rows per chip
    assert r["collectives"]["ops"]["all-gather"]["result_bytes"] < r["memory"]["params_bytes"] / 10
    bound = r["hbm_bound"]
    assert bound["bytes_per_device"] <= r["analytic_bytes"]["total"]
    assert bound["step_over_bound"] >= 1.0
    assert "HBM bound" in plan.format_report(r)


def test_xla_oom_figure_is_the_whole_requirement():
    """XLA:TPU's "HLO temporaries (X)" counts the arguments too: the total is X, not X + args."""
    err = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (33.39G) exceeds available HBM (31.25G)."
    )
    oom, _ = plan._oom_or_raise(err)
    gib = 1024**3
    target = plan.Target("t", (), None, 31.25 * gib, None, None)
    report: dict = {}
    memory = {"args_bytes": 28.99 * gib}
    plan._fill_fit(report, target, memory, oom)
    assert memory["total_bytes"] == pytest.approx(33.39 * gib)
    assert memory["temp_bytes"] == pytest.approx(4.40 * gib)
    assert report["fits"] is False and report["headroom_bytes"] == pytest.approx(-2.14 * gib)


@needs_libtpu
def test_a_config_that_cannot_fit_exits_1_with_the_numbers(tmp_path):
    """A 2^26-token vocabulary: embedding + head in f32 are 32 GiB per v5e chip (15.75 GiB)."""
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "dsjax.plan", "--config=configs/tiny.py", "--topology=v5e:2x2",
           "--mode=decode", "--batch=4", "--cache_len=16", "--config.model.vocab_size=67108864",
           f"--json={out}"]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stdout + p.stderr
    assert "fits: NO" in p.stdout and "15.75 GiB HBM" in p.stdout, p.stdout
    r = json.loads(out.read_text())
    assert r["fits"] is False and r["memory"]["params_bytes"] >= 32 * 1024**3
    assert r["headroom_bytes"] < 0


def test_missing_libtpu_and_missing_gpu_say_what_to_do(monkeypatch):
    with pytest.raises(plan.PlanError, match="GPU plans need the device") as e:
        plan.make_target("gpu")  # the test machine has no GPU
    assert e.value.code == 2
    monkeypatch.setattr(plan.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(plan.PlanError, match="pip install -r requirements-tpu.txt"):
        plan.make_target("v5p:4x8x8")


def test_topology_names():
    spec, dims = tpu_specs.parse_topology("v5p:4x8x8")
    assert spec.name == "v5p" and tpu_specs.num_chips(dims) == 256
    assert tpu_specs.parse_topology("v6e:16x32")[1] == (16, 32)
    for bad in ("v5p:4x8", "v7:2x2", "v5e2x2"):
        with pytest.raises(ValueError, match="topology"):
            tpu_specs.parse_topology(bad)


_HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%cond (p: (s32[], bf16[64,128])) -> pred[] {
  %p = (s32[], bf16[64,128]) parameter(0)
  %c = s32[]{:T(128)} constant(61)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], bf16[64,128])) -> (s32[], bf16[64,128]) {
  %ag = bf16[64,128]{1,0} all-gather(bf16[8,128]{1,0} %x), replica_groups=mesh['axis_0'=8,'axis_1'=4] {'axis_0'}, dimensions={0}
  %ar-start = (f32[1024]{0}, f32[1024]{0}) all-reduce-start(f32[1024]{0} %y), replica_groups=[8,4]<=[32], to_apply=%add
  ROOT %t = (s32[], bf16[64,128]) tuple(%i, %ag)
}

ENTRY %main (a: bf16[64,128]) -> bf16[64,128] {
  %w = (s32[], bf16[64,128]) while(%init), condition=%cond, body=%body
  %a2a = bf16[32,16]{1,0} all-to-all(bf16[32,16]{1,0} %z), replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %r = bf16[64,128] get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loop_bodies_per_iteration():
    """Hand-worked: the loop body runs 61 times (its condition is i < 61)."""
    c = hlo_stats.collectives(_HLO, num_devices=32)
    ops = c["ops"]
    assert c["unknown_trip_counts"] == 0
    ag = 64 * 128 * 2
    assert ops["all-gather"]["count"] == 61 and ops["all-gather"]["result_bytes"] == 61 * ag
    assert ops["all-gather"]["moved_bytes"] == pytest.approx(61 * ag * 7 / 8)  # group of 8
    ar = 1024 * 4
    assert ops["all-reduce"]["count"] == 61
    assert ops["all-reduce"]["moved_bytes"] == pytest.approx(61 * 2 * ar * 3 / 4)  # group of 4
    assert ops["all-to-all"]["count"] == 1
    assert ops["all-to-all"]["moved_bytes"] == pytest.approx(32 * 16 * 2 * 3 / 4)
    assert ops["reduce-scatter"]["count"] == 0


def test_collectives_count_one_branch_per_conditional():
    """A compiled program (XLA:CPU, 4 devices): a loop of 5 ticks, each running ONE case of a
    3-way `lax.switch` (a pipeline tick's form): an all-reduce of 1 KiB (moves 2 S 3/4 =
    1,536 B), an inner loop of 3 all-gathers to 1 KiB (3 x S 3/4 = 2,304 B), or nothing. One
    branch per execution, the heaviest: 5 x 3 all-gathers and no all-reduce (counting every
    branch on every tick gave 5 all-reduces besides)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])

    def gathers(c):
        step = lambda c, _: (jax.lax.all_gather(c[:64], "x", tiled=True) + c, None)  # noqa: E731
        return jax.lax.scan(step, c, None, length=3)[0]

    def body(x):
        def tick(c, i):
            cases = [lambda: jax.lax.psum(c, "x"), lambda: gathers(c), lambda: 2 * c]
            return jax.lax.switch(i % 3, cases), None

        return jax.lax.scan(tick, x, jnp.arange(5))[0]

    f = jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    hlo = jax.jit(f).lower(jnp.ones(256)).compile().as_text()
    assert " conditional(" in hlo and hlo.count(" while(") == 2  # nothing unrolled
    c = hlo_stats.collectives(hlo, num_devices=4)
    ops, S = c["ops"], 256 * 4
    assert c["unknown_trip_counts"] == 0
    assert ops["all-gather"]["count"] == 15
    assert ops["all-gather"]["moved_bytes"] == pytest.approx(15 * S * 3 / 4)
    assert ops["all-reduce"]["count"] == 0


_HLO_SLICES = """
ENTRY %main (x: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %dp = f32[1024]{0} all-reduce(f32[1024]{0} %x), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  %ici = f32[1024]{0} all-reduce(f32[1024]{0} %x), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %pp = f32[1024]{0} collective-permute(f32[1024]{0} %x), source_target_pairs={{0,4},{1,5}}
  %in = f32[1024]{0} collective-permute(f32[1024]{0} %x), source_target_pairs={{0,1},{4,5}}
  ROOT %a2a = f32[1024]{0} all-to-all(f32[1024]{0} %x), replica_groups={{0,1,4,5}}, dimensions={0}
}
"""


def test_collectives_split_bytes_between_slices():
    """Hand-worked, 2 slices of 4 devices: the all-reduce over pairs (0,4)... crosses DCN
    (2 S (K-1)/(K m) = S), the one inside each slice does not; a permute 0 -> 4 crosses, 0 -> 1
    does not; an all-to-all over {0,1,4,5} sends half its rows to the other slice."""
    ops = hlo_stats.collectives(_HLO_SLICES, num_devices=8, per_slice=4)["ops"]
    S = 1024 * 4
    assert ops["all-reduce"]["dcn_bytes"] == pytest.approx(S)
    assert ops["collective-permute"]["dcn_bytes"] == pytest.approx(S)
    assert ops["all-to-all"]["dcn_bytes"] == pytest.approx(S / 2)
    assert "dcn_bytes" not in hlo_stats.collectives(_HLO_SLICES, num_devices=8)["ops"]["all-reduce"]


_HLO_MEGASCALE = """
ENTRY %main (x: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %a = token[] after-all()
  %pp = (f32[1024]{0}, u32[], token[]) send(f32[1024]{0} %x, token[] %a), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ONE_TO_ONE"}
  %ar = (f32[256]{0}, u32[], token[]) send(f32[256]{0} %x, token[] %a), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %in = f32[1024]{0} collective-permute(f32[1024]{0} %x), source_target_pairs={{0,0},{1,1}}
}
"""


def test_collectives_read_megascale_sends_as_dcn():
    """XLA:TPU's multi-slice program is per slice: cross-slice transfers are host-transfer sends
    to the DCN runtime (a permute: its payload; an all-reduce over K = 2 slices: 2 S (K-1)/K),
    while the in-slice permute's pairs name only the slice's devices."""
    ops = hlo_stats.collectives(_HLO_MEGASCALE, num_devices=8, per_slice=4)["ops"]
    assert ops["collective-permute"]["dcn_bytes"] == pytest.approx(1024 * 4)
    assert ops["collective-permute"]["count"] == 2
    assert ops["all-reduce"]["dcn_bytes"] == pytest.approx(256 * 4)


@needs_libtpu
def test_num_slices_orders_devices_by_slice():
    """`--num_slices=2`: the devices of slice 0 come first, so the mesh's outer axis spans the
    slices; the DCN rate is the published per-chip figure."""
    target = plan.make_target("v5e:2x2", num_slices=2)
    assert len(target.devices) == 8 and target.slices == 2
    assert [d.slice_index for d in target.devices] == [0] * 4 + [1] * 4
    assert target.dcn_bytes_per_s == pytest.approx(25e9 / 8)
    with pytest.raises(plan.PlanError, match="num_slices=0"):
        plan.make_target("v5e:2x2", num_slices=0)


def test_requirements_tpu_pins_the_installed_jax():
    import jax

    with open(os.path.join(ROOT, "requirements-tpu.txt")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert f"jax[tpu]=={jax.__version__}" in lines


def test_a_known_compiler_bug_names_its_remedy():
    err = RuntimeError(
        "INTERNAL: Assigned barrier is not acceptable for opcode: ragged-all-to-all\nmore"
    )
    with pytest.raises(plan.PlanError, match="libtpu 0.0.52") as e:
        plan._oom_or_raise(err)
    assert e.value.code == 1 and "\n" not in str(e.value)
    with pytest.raises(plan.PlanError, match="failed on this plan: INTERNAL: other$"):
        plan._oom_or_raise(RuntimeError("INTERNAL: other"))


@needs_libtpu
def test_decode_plan_with_kept_fp8_weights(v5e_2x2):
    """--keep_fp8: the decode step compiled on the weights a keep_fp8 load of the FP8 release
    holds (float8 + 128x128 block scales split with their weights where whole blocks line up),
    reported per chip; the decode layout still gathers no weight."""
    config = tiny.get_config()
    config.mesh.update(data=1, expert=2, tensor=2)
    cfg = run_config.parse(config).model
    mesh = sharding.make_mesh(data=1, expert=2, tensor=2, devices=list(v5e_2x2.devices))
    _, plain, _ = plan.lower_decode(cfg, mesh, "decode", batch=8, cache_len=128)  # not compiled
    r = plan.plan_decode(config, v5e_2x2, batch=8, cache_len=128, layout="decode", keep_fp8=True)
    _check_report(r, v5e_2x2)
    assert r["keep_fp8"] and "weights kept FP8" in plan.format_report(r)
    kept = plan.kept_fp8(cfg, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), plain))
    experts = kept["params"]["moe_layers"]["moe"]["experts"]
    assert experts["gate"].dtype == jnp.float8_e4m3fn
    assert experts["gate_scale_inv"].shape == (2, 8, 1, 1)  # [L, E, 64/128, 32/128]
    assert kept["params"]["lm_head"]["kernel"].dtype == jnp.float32  # the head stays
    assert "router" in kept["params"]["moe_layers"]["moe"]
    assert kept["params"]["moe_layers"]["moe"]["router"]["kernel"].dtype == jnp.float32
    # per chip: every FP8 leaf a quarter of its float32 bytes, plus its scales
    assert r["memory"]["params_bytes"] < 0.6 * plan.shard_bytes(plain)
    assert r["collectives"]["ops"]["all-gather"]["result_bytes"] < r["memory"]["params_bytes"] / 10


def test_moe_exchange_figures_name_the_full_expert_gather():
    """Issue 22: V3 DualPipe on 2 x v5p-128 (stage 2, fsdp 2 x expert 64, 4 micro-batches of one
    4096-token sequence per shard): "auto" picks no token exchange, so each MoE layer run
    all-gathers all 256 experts (3 x 256 x 7168 x 2048 bf16, less the chip's 1/128)."""
    from configs import deepseek_v3

    config = deepseek_v3.get_config()
    config.train.batch_size = 512
    config.train.microbatches = 4
    config.train.pipeline_schedule = "dualpipe"
    run = run_config.parse(config)
    mesh = jax.sharding.AbstractMesh(
        (2, 1, 2, 64, 1, 1), ("stage", "data", "fsdp", "expert", "context", "tensor")
    )
    figures = plan.moe_exchange_figures(run.model, run, mesh)
    assert figures["tokens_per_shard"] == 4096 and figures["group"] == []
    assert figures["gather_bytes_per_layer"] == 3 * 256 * 7168 * 2048 * 2 * (1 - 1 / 128)
    # In rounds of 128 tokens the dropless buffers are 32x smaller: the tokens move, over
    # fsdp x expert, and no expert weight is gathered.
    config.model.moe_exchange_block = 128
    run = run_config.parse(config)
    figures = plan.moe_exchange_figures(run.model, run, mesh)
    assert figures["group"] == ["fsdp", "expert"] and figures["block"] == 128
    assert figures["gather_bytes_per_layer"] == 0
