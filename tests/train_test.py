"""Training: learning, exact resume after SIGKILL, sharded == unsharded, multi-process, balancing,
clean stops, restore onto another mesh, and the one-line errors of bad configs."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from dsjax.checkpoints.orbax_io import Checkpointer, load_for_inference
from dsjax.model import sharding
from dsjax.model.transformer import Transformer, init_variables
from dsjax.run_config import TrainOptions
from dsjax.testing import synthetic_batch
from dsjax.train import data, metrics
from dsjax.train import step as ts
from dsjax.train.loop import TrainingError, train_and_evaluate
from tests.conftest import ROOT


def tiny_config(tokenizer_dir, **train):
    c = tiny.get_config()
    c.data.tokenizer = tokenizer_dir
    c.train.sample_tokens = 0
    for k, v in train.items():
        group, name = k.split("__")
        c[group][name] = v
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- learning
def test_tiny_model_learns_on_the_builtin_corpus(tmp_path, tokenizer_dir):
    c = tiny_config(tokenizer_dir, train__steps=80, train__eval_every=40, checkpoint__every=40)
    c.train.sample_tokens = 8
    summary = train_and_evaluate(c, str(tmp_path))
    rows = read_metrics(tmp_path)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert evals[0][0] == 0 and evals[-1][0] == 80
    start, end = evals[0][1], evals[-1][1]
    assert start == pytest.approx(math.log(c.model.vocab_size), abs=0.3)  # near-uniform init
    assert end < start - 1.0, evals  # at least one nat better on held-out code
    logged = [r for r in rows if "loss" in r]
    for key in (
        "loss",
        "main_ce",
        "mtp_ce",
        "balance",
        "grad_norm",
        "lr",
        "tokens_per_sec",
        "tflops_per_sec",
        "load_imbalance",
    ):
        assert all(math.isfinite(r[key]) for r in logged), key
    png = (tmp_path / "loss.png").read_bytes()  # a PNG of the 8 x 4.5 in figure at 100 dpi
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (800).to_bytes(4) + (450).to_bytes(4)
    assert isinstance(summary["sample"], str) and summary["sample"].startswith(
        c.train.sample_prompt
    )
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["40", "80"]
    _check_bits_per_byte(c, rows, summary, str(tmp_path))
    parsed, lines = summary["sample_python_lines"]["parse"], summary["sample_python_lines"]["lines"]
    assert 0 <= parsed <= lines and lines >= 1


def _check_bits_per_byte(c, rows, summary, workdir):
    """eval_bpb at every eval = eval_loss · Σw / ln 2 / Σ bytes, with the count and the bytes taken
    on the host from the same eval batches; per-segment byte sums equal the decoded text's bytes."""
    tok = data.get_tokenizer(c, workdir)
    table = np.asarray(metrics.token_byte_lengths(tok, c.model.vocab_size))
    it = data.make_iterator(
        c, tok, "eval", process_index=0, process_count=1, num_epochs=None, prefetch=0
    )
    count = n_bytes = 0.0
    checked = 0
    for batch in itertools.islice(it, c.train.eval_batches):
        w = batch["weights"] > 0
        count, n_bytes = count + batch["weights"].sum(), n_bytes + table[batch["targets"]][w].sum()
        for row in range(w.shape[0]):
            for seg in set(batch["segment_ids"][row][w[row]].tolist()):
                ids = batch["targets"][row][w[row] & (batch["segment_ids"][row] == seg)]
                text = tok.decode(ids.tolist())
                if "\ufffd" not in text:  # a row may cut a multi-byte character
                    assert table[ids].sum() == len(text.encode("utf-8"))
                    checked += 1
    assert checked > 0 and n_bytes > count  # BPE tokens hold more than a byte on average
    evals = [r for r in rows if "eval_loss" in r]
    for r in evals:
        assert r["eval_bpb"] == pytest.approx(r["eval_loss"] * count / math.log(2) / n_bytes, 1e-5)
    assert summary["eval_loss_initial"] == evals[0]["eval_loss"]
    assert summary["eval_bpb_initial"] == evals[0]["eval_bpb"]
    assert summary["eval_bpb"] == evals[-1]["eval_bpb"] < evals[0]["eval_bpb"]
    assert summary["plot"] == os.path.join(workdir, "loss.png")


# ----------------------------------------------------------------------------- resume
def _train_cmd(workdir, tokenizer_dir, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.tokenizer={tokenizer_dir}",
        "--config.train.sample_tokens=0",
        *extra,
    ]


def _env(devices=1):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_resume_after_sigkill_is_exact(tmp_path, tokenizer_dir):
    args = [
        "--config.train.steps=40",
        "--config.checkpoint.every=20",
        "--config.train.log_every=1",
        "--config.train.eval_every=1000",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(
        _train_cmd(full, tokenizer_dir, *args),
        env=_env(),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        _train_cmd(cut, tokenizer_dir, *args),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = cut / "checkpoints" / "20"
    deadline = time.time() + 300
    while not (done.is_dir() and not list(done.parent.glob("*tmp*"))):
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "checkpoints" / "40").exists(), "killed too late to test resuming"
    subprocess.run(
        _train_cmd(cut, tokenizer_dir, *args), env=_env(), cwd=ROOT, check=True, capture_output=True
    )
    a = {r["step"]: r["loss"] for r in read_metrics(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(cut) if "loss" in r}
    assert sorted(b) == list(range(1, 41))  # no duplicated or missing steps after the resume
    assert a == b  # bit-identical losses, before and after the resume
    _, va = load_for_inference(str(full))
    _, vb = load_for_inference(str(cut))
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb), strict=True):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_exits_cleanly(tmp_path, tokenizer_dir):
    # steps=40 as in the resume test: the same compiled train step (the schedule's length is part
    # of the program), loaded from the persistent cache. SIGTERM comes at step 3, 37 steps early.
    args = [
        "--config.train.steps=40",
        "--config.checkpoint.every=100000",
        "--config.train.log_every=1",
    ]
    proc = subprocess.Popen(
        _train_cmd(tmp_path, tokenizer_dir, *args),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert len(steps) == 1 and steps[0] >= 2
    assert "SIGTERM" in err


# ----------------------------------------------------------------------------- sharding
def _run_steps(config, mesh, batches):
    cfg = ts.model_config(config)
    model = Transformer(cfg)
    tx, schedule = ts.make_optimizer(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, _, shardings = ts.create_sharded_state(
            jax.random.key(0), model, tx, mesh, config.data.seq_len, config.optim.host_offload
        )
        step = ts.jit_train_step(model, tx, schedule, config, shardings=shardings, mesh=mesh)
        losses = []
        for b in batches:
            state, m = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
            losses.append(float(m["loss"]))
    return losses, state


def _mesh_config():
    config = tiny.get_config()
    config.data.seq_len = 16
    return config


@pytest.fixture(scope="module")
def mesh_run():
    """(config, batches, mesh, losses, final state) of 3 steps of tiny on a 2 x 2 x 2 mesh."""
    config = _mesh_config()
    batches = [synthetic_batch(ts.model_config(config), 8, 16, seed=s) for s in range(3)]
    mesh = sharding.make_mesh(data=2, fsdp=2, expert=2, tensor=1)
    return (config, batches, mesh, *_run_steps(config, mesh, batches))


def test_sharded_training_equals_single_device(mesh_run):
    config, batches, _, got, state = mesh_run
    cfg = ts.model_config(config)
    single = sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    ref, _ = _run_steps(config, single, batches)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    experts = state.params["moe_layers"]["moe"]["experts"]["gate"]  # [L, E, D, F]
    mesh = mesh_run[2]
    want = NamedSharding(mesh, PartitionSpec(None, "expert", "fsdp"))  # (fsdp, context=1) too
    assert experts.sharding.is_equivalent_to(want, experts.ndim), experts.sharding.spec
    shard_shape = experts.addressable_shards[0].data.shape
    assert shard_shape[1] == cfg.n_routed_experts // 2 and shard_shape[2] == cfg.hidden_size // 2
    emb = state.params["embed"]["embedding"]
    # weights without an expert dim shard their embed dim over fsdp x expert (2 x 2)
    assert emb.addressable_shards[0].data.shape == (cfg.vocab_size, cfg.hidden_size // 4)
    mu = state.opt_state[1][0].mu["embed"]["embedding"]  # Adam moment follows its parameter
    assert mu.sharding == emb.sharding


def test_host_offload_trains_the_same_and_checkpoints(mesh_run, tmp_path):
    """Optimizer state in host memory between steps and layer inputs offloaded by remat: the
    same losses and state as on the chips; the state stays in host memory, saves and restores."""
    config, batches, mesh, ref_losses, ref = mesh_run
    config = _mesh_config()
    config.optim.host_offload = True
    config.train.remat = "offload"
    ts.validate_config(config, mesh)
    losses, state = _run_steps(config, mesh, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
    assert kinds == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {"device"}
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    ck = Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
    it = iter(grain.MapDataset.range(4).to_iter_dataset())
    ck.save(3, state, it, config, force=True)
    ck.close()
    model, tx = Transformer(ts.model_config(config)), ts.make_optimizer(config)[0]
    abstract, _ = ts.state_shardings(model, tx, mesh, 16, host_offload=True)
    restored = Checkpointer(str(tmp_path), every=1, keep=1).restore(3, abstract, it)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert x.sharding.memory_kind == y.sharding.memory_kind
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_a_different_mesh(mesh_run, tmp_path):
    """mesh_run's state (data 2 x fsdp 2 x expert 2) saved, then restored onto data 2 x expert 4
    (shardings from the abstract state: nothing compiled); the data position comes back too."""
    config, _, _, _, state = mesh_run
    model, tx = Transformer(ts.model_config(config)), ts.make_optimizer(config)[0]
    mesh_b = sharding.make_mesh(data=2, fsdp=1, expert=4)
    ck = Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
    dummy = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(dummy)
    ck.save(5, state, dummy, config, force=True)
    ck.close()
    abstract_b, _ = ts.state_shardings(model, tx, mesh_b, 16)
    with jax.set_mesh(mesh_b):
        fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
        restored = Checkpointer(str(tmp_path), every=1, keep=1).restore(5, abstract_b, fresh)
    assert next(fresh) == 1  # the data position came back too
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    gate = restored.params["moe_layers"]["moe"]["experts"]["gate"]
    assert gate.sharding.mesh.shape == mesh_b.shape and gate.sharding.spec[1] == "expert"
    assert gate.addressable_shards[0].data.shape[1] == gate.shape[1] // 4


# ----------------------------------------------------------------------------- balancing
@pytest.fixture(scope="module")
def bias_run():
    """tiny (T=32) with frozen weights (lr 0: only the routing bias moves) and a skewed starting
    bias; `run(rate)` -> (per-step load imbalance of 40 steps, final state). One compiled train
    step serves every rate: the rate is an argument of the program (`train_step` reads it from
    `train_cfg` only as a number), not a constant baked into one program per rate."""
    config = tiny.get_config()
    config.data.seq_len = 32
    config.optim.lr = 0.0
    cfg = ts.model_config(config)
    model = Transformer(cfg)
    tx, schedule = ts.make_optimizer(config)
    train_cfg = ts.train_options(config)
    state = jax.jit(functools.partial(ts.init_state, model=model, tx=tx, seq_len=32))(
        jax.random.key(0)
    )
    # A skewed starting bias: a few experts win most tokens until the rule corrects it.
    skew = jnp.linspace(-0.5, 0.5, cfg.n_routed_experts)
    state = state.replace(moe_bias=jax.tree.map(lambda b: b + skew, state.moe_bias))

    @jax.jit
    def step(state, batch, rate):
        opts = dataclasses.replace(train_cfg, bias_update_rate=rate)
        return ts.train_step(state, batch, model=model, tx=tx, schedule=schedule, train_cfg=opts)

    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg, 8, 32))

    def run(rate):
        s, imbalance = state, []
        for _ in range(40):
            s, m = step(s, batch, jnp.float32(rate))
            imbalance.append(float(m["load_imbalance"]))
        return imbalance, s

    return run


@pytest.mark.parametrize("rate", [0.0, 0.05])
def test_bias_update_balances_load_only_when_enabled(bias_run, rate):
    imbalance, state = bias_run(rate)
    assert imbalance[0] > 2.5  # the skewed router overloads a few experts
    if rate:
        assert np.mean(imbalance[-5:]) < 0.6 * imbalance[0], imbalance
    else:
        assert imbalance[-1] == pytest.approx(imbalance[0]), imbalance
    # The bias is not an optimizer variable.
    opt_paths = {
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
    }
    assert not any("bias" in p for p in opt_paths)
    assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(state.params)


# ----------------------------------------------------------------------------- failures
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer_dir, monkeypatch):
    """The learning rate turns NaN at the third update: its loss is still finite but the
    parameters are not, so step 3 is not saved and checkpoint 2 stays the last good one."""
    import optax

    monkeypatch.setattr(
        optax,
        "warmup_cosine_decay_schedule",
        lambda **kw: lambda count: jnp.where(count >= 2, jnp.nan, 1e-3),
    )
    c = tiny_config(
        tokenizer_dir,
        train__steps=6,
        checkpoint__every=1,
        train__log_every=1,
        optim__warmup_steps=1,
    )
    with pytest.raises(TrainingError, match=r"after step 3 are not finite.*last good .* step 2"):
        train_and_evaluate(c, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--config.train.stpes=3", "stpes"),
        ("--config.mesh.data=3", "mesh"),
        ("--config.train.batch_size=0", "batch_size"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, flag, message):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--config=configs/tiny.py",
            f"--workdir={tmp_path}",
            flag,
        ],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_host_offload_must_be_a_bool():
    config = tiny.get_config()  # a config written without configs/base.py's typed field
    config.optim = ml_collections.ConfigDict({**config.optim.to_dict(), "host_offload": "yes"})
    with pytest.raises(ValueError, match="config.optim.host_offload='yes'"):
        ts.validate_config(config, None)


def test_batch_must_divide_over_data_shards():
    config = tiny.get_config()
    config.train.batch_size = 6
    with pytest.raises(ValueError, match="batch_size=6"):
        ts.validate_config(config, sharding.make_mesh(data=4, fsdp=2))


# ----------------------------------------------------------------------------- multi-process
def test_two_processes_train_together_and_agree(tmp_path, tokenizer_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "--config.train.steps=4",
        "--config.train.log_every=1",
        "--config.checkpoint.every=4",
        "--config.train.eval_every=1000",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            _train_cmd(tmp_path, tokenizer_dir, *args, f"--process_id={i}"),
            env=_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    losses = [[ln for ln in out.splitlines() if ln.startswith("done:")] for out, _ in outs]
    assert len(losses[0]) == 1 and losses[0] == losses[1], outs
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


# ----------------------------------------------------------------------------- memory levers
def test_dense_config_trains_with_bf16_moments_and_chunked_ce():
    """n_routed_experts=0 (every layer dense) trains on a sharded mesh, here with both memory
    levers on: AdamW moments stored in bf16 and the cross-entropy over chunks (T=16, chunk 6:
    a padded last chunk)."""
    config = tiny.get_config()
    config.model.n_routed_experts = 0
    config.data.seq_len = 16
    config.optim.warmup_steps = 1  # step 0 has lr 0; steps 1, 2 learn
    config.optim.moment_dtype = "bfloat16"
    config.train.ce_chunk = 6
    cfg = ts.model_config(config)
    batch = synthetic_batch(cfg, 8, 16)
    mesh = sharding.make_mesh(data=2, fsdp=4, expert=1, tensor=1)
    losses, state = _run_steps(config, mesh, [batch] * 3)
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[2] < losses[0] - 1e-3, losses
    assert state.moe_bias == {} and "moe_layers" not in state.params
    adam = state.opt_state[1][0]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    emb = state.params["embed"]["embedding"]
    assert adam.mu["embed"]["embedding"].sharding == emb.sharding


def _adam_reference(grads, steps, b1, b2, eps, round_to):
    """float64 NumPy Adam whose stored moments are rounded to `round_to` after every step."""
    m = np.zeros_like(grads[0], np.float64)
    v = np.zeros_like(grads[0], np.float64)
    out = []
    for t, g in enumerate(grads[:steps], start=1):
        g = np.asarray(g, np.float64)
        m32 = b1 * m + (1 - b1) * g
        v32 = b2 * v + (1 - b2) * g * g
        out.append((m32 / (1 - b1**t)) / (np.sqrt(v32 / (1 - b2**t)) + eps))
        m = np.asarray(m32.astype(round_to), np.float64)
        v = np.asarray(v32.astype(round_to), np.float64)
    return out, m, v


@pytest.mark.parametrize("moment_dtype", ["bfloat16", "float32"])
def test_adam_moments_stored_in_moment_dtype(moment_dtype):
    import ml_dtypes

    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(5, 7)).astype(np.float32) * s for s in (1.0, 3.0, 0.1, 2.0)]
    tx = ts.scale_by_adam_in(jnp.dtype(moment_dtype), b1=0.9, b2=0.95)
    state = tx.init({"w": jnp.zeros((5, 7))})
    round_to = ml_dtypes.bfloat16 if moment_dtype == "bfloat16" else np.float32
    ref, m_ref, v_ref = _adam_reference(grads, 4, 0.9, 0.95, 1e-8, round_to)
    update = jax.jit(tx.update)
    for g, want in zip(grads, ref, strict=True):
        u, state = update({"w": jnp.asarray(g)}, state)
        np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=2e-6, atol=1e-7)
    assert state.mu["w"].dtype == jnp.dtype(moment_dtype) == state.nu["w"].dtype
    np.testing.assert_allclose(np.asarray(state.mu["w"], np.float64), m_ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.nu["w"], np.float64), v_ref, rtol=1e-6)
    if moment_dtype == "float32":  # the same numbers as optax's own Adam
        ox = optax.scale_by_adam(b1=0.9, b2=0.95)
        os_, ms = ox.init({"w": jnp.zeros((5, 7))}), tx.init({"w": jnp.zeros((5, 7))})
        for g in grads:
            a, os_ = ox.update({"w": jnp.asarray(g)}, os_)
            b, ms = tx.update({"w": jnp.asarray(g)}, ms)
            np.testing.assert_allclose(np.asarray(b["w"]), np.asarray(a["w"]), rtol=1e-6)


def test_chunked_cross_entropy_equals_whole_loss_and_gradients():
    """ce_chunk=5 over T=12 (3 chunks, the last padded; MTP depth 1 over T-1=11) gives the
    unchunked loss and gradients to <= 1e-6 relative, in float32."""

    from dsjax.testing import rel_err
    from dsjax.testing import tiny_config as model_cfg

    cfg = model_cfg(num_hidden_layers=2)
    variables = init_variables(cfg, jax.random.key(0), 2, 12)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 2, 12).items()}
    model = Transformer(cfg)

    def loss_and_grads(chunk):
        tc = TrainOptions(ce_chunk=chunk, mtp_weight=0.3, balance_loss_weight=1e-4)

        def f(p):
            return ts.loss_fn(p, variables["moe_bias"], batch, model=model, train_cfg=tc)

        (loss, aux), g = jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])
        return loss, aux["main_ce"], aux["mtp_ce"], g

    whole, chunked = loss_and_grads(0), loss_and_grads(5)
    for a, b in zip(chunked[:3], whole[:3], strict=True):
        assert rel_err(a, b) <= 1e-6
    for path, a in jax.tree_util.tree_leaves_with_path(chunked[3]):
        b = functools.reduce(lambda t, k: t[k.key], path, whole[3])
        assert rel_err(a, b) <= 1e-6, path


def test_sample_python_lines_leaves_out_a_cut_off_last_line():
    from dsjax.train.loop import sample_python_lines

    assert sample_python_lines("def f(x):\n    return x\ny = (x") == (2, 2)  # last line cut off
    assert sample_python_lines("def f(x):\n    return x\ny = (x\n") == (2, 3)  # a whole line
    assert sample_python_lines("def f(") == (0, 1)  # the only line is kept


def test_linear_cross_entropy_equals_autodiff_of_the_plain_form():
    """The fused head + cross-entropy (written-out backward) against autodiff of
    cross_entropy_sums(h @ kernel): value and gradients of h, kernel and the weights, whole and
    chunked (a chunk that needs padding)."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((16, 50)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, (2, 7)))
    w = jnp.asarray(rng.uniform(0, 1, (2, 7)), jnp.float32)

    def plain(h, k, w):
        s, n = ts.cross_entropy_sums(jnp.einsum("btd,dv->btv", h, k), t, w)
        return s / n + 0.1 * n

    def fused(chunk):
        def f(h, k, w):
            s, n = ts.chunked_cross_entropy_sums(h, k, t, w, chunk)
            return s / n + 0.1 * n

        return f

    a = jax.value_and_grad(plain, argnums=(0, 1, 2))(h, k, w)
    for chunk in (7, 3):
        b = jax.value_and_grad(fused(chunk), argnums=(0, 1, 2))(h, k, w)
        np.testing.assert_allclose(b[0], a[0], rtol=1e-6)
        for ga, gb in zip(a[1], b[1], strict=True):
            np.testing.assert_allclose(gb, ga, rtol=1e-5, atol=1e-7)
