"""GRPO: advantages and loss against float64 NumPy, rewards on crafted strings, a tiny sharded
rollout + update (ratio 1 and KL 0 at the first pass, the reference frozen), checkpoint round trip."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from dsjax import run_config
from dsjax.model import sharding
from dsjax.model.transformer import Transformer, init_variables
from dsjax.rl.grpo import (
    group_advantages,
    grpo_objective,
    grpo_state_from,
    grpo_state_shardings,
    jit_grpo_fns,
)
from dsjax.rl.loop import _restore, _save, grpo_step, rollout, score, sequence_batch
from dsjax.rl.rewards import (
    ArithTask,
    ArithTokenizer,
    Problem,
    TaskTokenizer,
    accuracy_reward,
    cold_start_completion,
    format_reward,
    parse_answer,
    scratchpad,
)
from dsjax.run_config import GRPOOptions, TrainOptions
from dsjax.testing import tiny_config


# ----------------------------------------------------------------------------- NumPy references
def np_advantages(r):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    for i, row in enumerate(r):
        s = row.std()
        out[i] = 0.0 if s <= 1e-6 else (row - row.mean()) / s
    return out


def np_objective(logp, old, ref, adv, mask, eps, beta):
    """−J by explicit loops over completions and tokens (float64)."""
    per_completion = []
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            rho = np.exp(logp[i, t] - old[i, t])
            surr = min(rho * adv[i], np.clip(rho, 1 - eps, 1 + eps) * adv[i])
            q = np.exp(ref[i, t]) / np.exp(logp[i, t])
            kl = q - np.log(q) - 1
            terms.append(surr - beta * kl)
        if terms:
            per_completion.append(np.mean(terms))
    return -np.mean(per_completion)


def test_advantages_match_numpy():
    r = np.array([[1.0, 0.0, 1.0, 0.0], [1.5, 1.5, 1.5, 1.5], [0.5, 1.5, 0.0, 1.0]], np.float32)
    got = np.asarray(group_advantages(r))
    np.testing.assert_allclose(got, np_advantages(r), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], 0.0)  # std 0 -> advantage 0
    np.testing.assert_allclose(got[0], [1.0, -1.0, 1.0, -1.0], atol=1e-6)  # hand-worked


def test_objective_matches_numpy():
    rng = np.random.default_rng(0)
    B, T = 6, 7
    logp = np.log(rng.uniform(0.05, 1.0, (B, T)))
    old = logp + rng.normal(0, 0.4, (B, T))  # ratios well inside and outside [1-ε, 1+ε]
    ref = logp + rng.normal(0, 0.3, (B, T))
    adv = rng.normal(0, 1, B)
    mask = np.zeros((B, T))
    for i, (a, n) in enumerate([(1, 4), (2, 5), (0, 7), (3, 1), (2, 3), (0, 0)]):
        mask[i, a : a + n] = 1.0  # different lengths; the last completion is empty
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, m = grpo_objective(
        f32(logp), f32(old), f32(ref), f32(adv), f32(mask), epsilon=0.2, beta=0.04
    )
    want = np_objective(logp, old, ref, adv, mask, 0.2, 0.04)
    assert abs(float(loss) - want) < 1e-5 * max(1.0, abs(want))
    rho = np.exp(logp - old)
    want_clip = ((np.abs(rho - 1) > 0.2) * mask).sum() / mask.sum()
    assert abs(float(m["clip_fraction"]) - want_clip) < 1e-6
    assert 0 < want_clip < 1


# ----------------------------------------------------------------------------- rewards
@pytest.mark.parametrize(
    "text, fmt, acc",
    [
        ("<think>3 + 4</think><answer>7</answer>", 1.0, 1.0),  # right
        ("  <think>x</think>\n<answer> 7 </answer> ", 1.0, 1.0),  # whitespace only around
        ("<think>3 + 4</think><answer>8</answer>", 1.0, 0.0),  # wrong answer
        ("<answer>7</answer>", 0.0, 1.0),  # missing think block
        ("<think>3 + 4<answer>7</answer>", 0.0, 1.0),  # missing </think>
        ("<think>3 + 4</think><answer>7</answer>7", 0.0, 1.0),  # extra text after
        ("7<think>a</think><answer>7</answer>", 0.0, 1.0),  # extra text before
        ("<think>a</think><answer>7</answer><answer>7</answer>", 0.0, 0.0),  # repeated answer
        ("<think>a</think><think>b</think><answer>7</answer>", 0.0, 1.0),  # repeated think
        ("<think>a</think><answer>7+</answer>", 1.0, 0.0),  # unparseable
        ("<think>a</think><answer></answer>", 0.0, 0.0),  # empty answer
        ("<think>a</think><answer>7", 0.0, 0.0),  # unclosed answer
        ("", 0.0, 0.0),
    ],
)
def test_rewards_on_crafted_completions(text, fmt, acc):
    assert format_reward(text) == fmt
    assert accuracy_reward(text, 7) == acc


def test_task_tokenizer_and_teacher():
    tok, task = ArithTokenizer(), ArithTask(99, "+-", seed=3)
    text = "<think>12 + 30</think><answer>-42</answer>"
    assert tok.decode(tok.encode(text) + [tok.eos_id, 5]) == text
    assert tok.encode("<answer>")[0] == 5 and len(tok.encode(text)) == 4 + 7 + 3
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("1x2")
    assert task.problem(5) == ArithTask(99, "+-", seed=3).problem(5)  # a function of (seed, n)
    held = {(p.a, p.b, p.op) for p in task.heldout(200)}
    assert not held & {(p.a, p.b, p.op) for p in task.problems(0, 2000)}
    assert Problem(3, 9, "-").answer == -6 and Problem(3, 9, "+").prompt == "3+9="
    assert scratchpad(Problem(47, 38, "+")) == "7+8=15 4+3+1=8"
    assert scratchpad(Problem(3, 4, "+")) == "3+4=7 0+0+0=0"
    rng = np.random.default_rng(0)
    texts = [
        cold_start_completion(Problem(20, 5, "+"), rng, p_correct=0.5, p_bad_format=0.2)
        for _ in range(400)
    ]
    acc = np.mean([parse_answer(t) == 25 for t in texts])
    fmt = np.mean([format_reward(t) for t in texts])
    assert 0.4 < acc < 0.6 and 0.74 < fmt < 0.86


# ----------------------------------------------------------------------------- model step
def _grpo_cfg():
    g = GRPOOptions(epsilon=0.2, beta=0.04)
    t = TrainOptions(balance_loss_weight=1e-4, bias_update_rate=1e-3)
    return g, t


@pytest.fixture(scope="module")
def run():
    """One sharded rollout (2 prompts x G=4 on 8 fake devices) and two update passes."""
    cfg = tiny_config(vocab_size=24, num_hidden_layers=2, max_position_embeddings=32)
    model, tok = Transformer(cfg), ArithTokenizer()
    mesh = sharding.make_mesh()
    tx = optax.adam(1e-2)
    schedule = optax.constant_schedule(1e-2)
    T = 24
    variables = init_variables(cfg, jax.random.key(0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        _, shardings = grpo_state_shardings(model, tx, mesh, T)
        init = jax.jit(functools.partial(grpo_state_from, tx=tx), out_shardings=shardings)
        state = init(variables["params"], variables["moe_bias"])
        ref_before = jax.device_get((state.ref_params, state.ref_moe_bias))
        policy_before = jax.device_get(state.params)
        problems = [Problem(3, 4, "+"), Problem(12, 9, "+")]
        v = {"params": state.params, "moe_bias": state.moe_bias}
        prompts, comps, texts, reps = rollout(
            cfg, v, tok, problems, group=4, max_new_tokens=8, seed=7
        )
        reward, _, _ = score(texts, reps, 0.5)
        reward = reward + np.arange(8) % 2  # make groups non-uniform: non-zero advantages
        batch = sequence_batch(prompts, comps, T, tok.pad_id)
        batch["advantages"] = np.asarray(group_advantages(reward.reshape(2, 4))).reshape(-1)
        g, t = _grpo_cfg()
        logp_fn, update_fn = jit_grpo_fns(model, tx, schedule, shardings, mesh, g, t)
        old, ref = logp_fn(state, batch)
        state, m1 = update_fn(state, batch, old, ref)
        state, m2 = update_fn(state, batch, old, ref)
    # Outside the mesh context: later tests (grpo_and_evaluate) must not run inside it.
    return dict(
        state=state,
        m1=jax.device_get(m1),
        m2=jax.device_get(m2),
        comps=comps,
        batch=batch,
        ref_before=ref_before,
        policy_before=policy_before,
        old=np.asarray(old),
        ref=np.asarray(ref),
        abstract_sh=shardings,
        mesh=mesh,
        model=model,
        tx=tx,
        fns=(logp_fn, update_fn),
        cfg=cfg,
        tok=tok,
    )


def test_first_pass_ratio_one_kl_zero(run):
    m1 = run["m1"]
    assert abs(m1["ratio_mean"] - 1.0) < 1e-5
    assert abs(m1["kl"]) < 1e-6 and m1["clip_fraction"] == 0.0
    np.testing.assert_allclose(run["old"], run["ref"], atol=1e-6)  # policy = reference
    assert all(np.isfinite(v) for v in m1.values())
    # The second pass sees the updated policy: the KL to the reference is now positive.
    assert run["m2"]["kl"] > 0 and abs(run["m2"]["ratio_mean"] - 1.0) > 1e-6


def test_updates_reach_policy_only(run):
    state = run["state"]
    ref_after = jax.device_get((state.ref_params, state.ref_moe_bias))
    jax.tree.map(np.testing.assert_array_equal, ref_after, run["ref_before"])
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - b).max()),
        jax.device_get(state.params),
        run["policy_before"],
    )
    assert max(jax.tree.leaves(moved)) > 0
    assert int(state.step) == 2


def test_batch_masks_completion_tokens(run):
    b, comps = run["batch"], run["comps"]
    for i, c in enumerate(comps):
        n_prompt = int(b["segment_ids"][i].sum()) - len(c)
        assert b["mask"][i].sum() == len(c)
        # masked targets are exactly the completion's tokens
        np.testing.assert_array_equal(b["targets"][i][b["mask"][i] > 0], c)
        assert b["mask"][i][: n_prompt - 1].sum() == 0


def _run_config():
    c = ml_collections.ConfigDict()
    c.trainer = "grpo"
    c.seed = 5
    c.model = {"vocab_size": 24}
    c.data = {"seq_len": 24}
    c.grpo = dict(
        prompts=2, group_size=4, max_new_tokens=8, temperature=1.0, inner_steps=2, format_weight=0.5
    )
    return c


def test_resume_is_exact(run, tmp_path):
    """Save -> restore through training's Checkpointer (checksums written) -> one GRPO step
    equals the same step taken without the round trip."""
    from dsjax.checkpoints.orbax_io import Checkpointer, verify_step

    state, mesh, config = run["state"], run["mesh"], _run_config()
    task = ArithTask(9, "+", seed=config.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        abstract, _ = grpo_state_shardings(run["model"], run["tx"], mesh, 24)
        ckpt = Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
        _save(ckpt, 1, state, {"prompt_index": 2}, config)
        ckpt.close()
        assert (tmp_path / "checkpoint_sums" / "1.json").is_file()
        assert verify_step(str(tmp_path), 1) is None
        ckpt = Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
        step, (restored, loop) = ckpt.restore_newest(lambda s: _restore(ckpt, s, abstract))
        ckpt.close()
        assert step == 1 and loop == {"prompt_index": 2}
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
        args = (run["fns"], run["cfg"], run["tok"], task, run_config.parse(config), 1)
        resumed, m_resumed = grpo_step(restored, *args, loop["prompt_index"])
        copy = jax.tree.map(jnp.copy, state)  # grpo_step donates its state; keep the fixture's
        straight, m_straight = grpo_step(copy, *args, 2)
    assert m_resumed == m_straight and np.isfinite(m_straight["loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))


def _cold_start_config(steps: int):
    import dataclasses

    from configs.grpo_arith import get_config

    c = get_config()
    cfg = tiny_config(vocab_size=24, num_hidden_layers=2, max_position_embeddings=32)
    c.model = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in run_config.FROM_TRAIN
    }
    c.task.max_operand = 9
    c.data.seq_len = 32  # the teacher's longest example is 28 tokens
    c.train.batch_size = 8
    c.sft.update(steps=2, warmup_steps=1)
    c.grpo.update(
        steps=steps, prompts=2, group_size=4, inner_steps=1, max_new_tokens=8, eval_every=1
    )
    c.grpo.eval_prompts = 8
    c.checkpoint.every = 1
    return c


def test_cold_start_is_checkpoint_zero_and_a_damaged_step_falls_back(tmp_path, monkeypatch):
    """The cold start's result is GRPO's checkpoint 0 inside WORKDIR/checkpoints (with sums, no
    directory of its own). A damaged newest checkpoint is moved aside and the run resumes from
    the one before, without a second cold start, and repeats the lost step exactly; when every
    checkpoint is damaged the run refuses in one line."""
    from dsjax.checkpoints.orbax_io import CheckpointError
    from dsjax.rl import loop as grpo_lib
    from dsjax.train.metrics import read_metrics

    cfg = tiny_config(vocab_size=24, num_hidden_layers=2, max_position_embeddings=32)
    workdir = tmp_path / "run"
    grpo_lib.grpo_and_evaluate(_cold_start_config(1), str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0", "1"]
    assert sorted(p.name for p in (workdir / "checkpoint_sums").iterdir()) == ["0.json", "1.json"]
    assert not (workdir / "cold_start").exists()
    step1 = _restore_item(workdir, "model", cfg)

    # Damage step 1 (one byte of its largest model file); a rerun must not cold-start again.
    files = [p for p in (workdir / "checkpoints" / "1" / "model").rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    def no_cold_start(*args, **kwargs):
        raise AssertionError("the cold start ran again")

    monkeypatch.setattr(grpo_lib, "cold_start", no_cold_start)
    summary = grpo_lib.grpo_and_evaluate(_cold_start_config(1), str(workdir))
    assert summary["step"] == 1
    assert (workdir / "damaged_checkpoints" / "1").is_dir()
    assert [r["step"] for r in read_metrics(str(workdir / "metrics.jsonl"))] == [0, 1]
    jax.tree.map(np.testing.assert_array_equal, _restore_item(workdir, "model", cfg), step1)

    # Every checkpoint damaged: one line naming them, nothing moved.
    for step in ("0", "1"):
        for p in (workdir / "checkpoints" / step).rglob("*"):
            if p.is_file() and p.stat().st_size:
                p.write_bytes(b"\0" * p.stat().st_size)
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged"):
        grpo_lib.grpo_and_evaluate(_cold_start_config(1), str(workdir))


def test_config_errors_name_the_field():
    from configs.grpo_arith import get_config
    from dsjax.rl.loop import _check

    _check(get_config())  # the demo config is valid
    bad = get_config()
    bad.data.seq_len = 30
    with pytest.raises(ValueError, match=r"seq_len=30 must hold a prompt .*max_new_tokens=28"):
        _check(bad)
    bad.grpo.max_new_tokens = 20
    with pytest.raises(ValueError, match=r"config.data.seq_len=30 .*cold start"):
        _check(bad)
    bad = get_config()
    bad.grpo.group_size = 1
    with pytest.raises(ValueError, match=r"config.grpo.group_size=1"):
        _check(bad)


# ----------------------------------------------------------------------------- start from HF
_HF_CHARS = tuple("0123456789+-*= ")
_HF_SPECIAL = ("<s>", "</s>", "<pad>", "<unk>")


def _char_tokenizer_json(path) -> dict[str, int]:
    """A WordLevel character tokenizer over the task's alphabet (specials, characters, then the
    tags as added tokens: ids unlike ArithTokenizer's) written to `path`/tokenizer.json. Returns
    its vocab."""
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    from dsjax.rl.rewards import TAGS

    vocab = {t: i for i, t in enumerate((*_HF_SPECIAL, *_HF_CHARS, *TAGS))}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    backend.add_special_tokens(list(_HF_SPECIAL))
    backend.save(str(path / "tokenizer.json"))
    return vocab


def _hf_run_config(hf_dir, steps: int):
    from configs.grpo_arith import get_config

    c = get_config()  # its config.model (vocab 32, 3 layers, hidden 96) must be ignored
    c.sft.init_from = str(hf_dir)
    c.task.max_operand = 9
    c.data.seq_len = 24
    c.grpo.update(
        steps=steps, prompts=2, group_size=4, inner_steps=1, max_new_tokens=8, eval_every=1
    )
    c.grpo.eval_prompts = 8  # the rollouts' batch: one generate program for both
    c.train.log_every = 1
    c.checkpoint.every = 1
    return c


def _restore_item(workdir, item: str, cfg):
    """The {"params", "moe_bias"} item `item` of the latest GRPO checkpoint (host arrays)."""
    import orbax.checkpoint as ocp

    from dsjax.model.transformer import abstract_variables

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(abstract_variables(cfg))
    )
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"))
    r = manager.restore(
        manager.latest_step(), args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
    )
    manager.close()
    return jax.device_get(r[item])


def test_grpo_from_hf_directory(tmp_path, monkeypatch):
    """GRPO straight from a Hugging Face directory: its model, tokenizer and weights (policy and
    reference), then a resume that no longer needs the directory."""
    import shutil

    from dsjax.checkpoints.orbax_io import load_for_inference
    from dsjax.rl import loop as grpo_lib
    from dsjax.testing import save_random_hf_checkpoint
    from dsjax.train.metrics import read_metrics

    hf_dir, workdir = tmp_path / "hf", tmp_path / "run"
    # The model of the `run` fixture (its generate program is reused): vocab 24 (the tokenizer
    # has 23), bos 0 and eos 1 in config.json; config.model says vocab 32, 3 layers, hidden 96.
    cfg = tiny_config(vocab_size=24, num_hidden_layers=2, max_position_embeddings=32)
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    variables = save_random_hf_checkpoint(hf_dir, cfg, 3, gain=1.0)
    assert grpo_lib.start_kind(str(hf_dir)) == "hf"

    # No tokenizer.json: a clear error naming the file, before any weight is read.
    with pytest.raises(FileNotFoundError, match=r"hf/tokenizer\.json is missing"):
        grpo_lib.grpo_and_evaluate(_hf_run_config(hf_dir, 1), str(workdir))

    vocab = _char_tokenizer_json(hf_dir)
    assert vocab["<s>"] == bos and vocab["</s>"] == eos
    tok = grpo_lib.load_task_tokenizer(str(hf_dir), {"bos_token_id": bos, "eos_token_id": eos})
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (bos, eos, vocab["<pad>"], 23)
    assert isinstance(tok, TaskTokenizer) and isinstance(ArithTokenizer(), TaskTokenizer)
    assert tok.encode("3+4=", add_bos=True) == [bos, vocab["3"], vocab["+"], vocab["4"], vocab["="]]
    text = "<think>3+4=7 0+0+0=0</think><answer>-7</answer>"
    assert tok.encode(text)[0] == vocab["<think>"] and tok.encode(text)[-1] == vocab["</answer>"]
    assert tok.decode([bos, *tok.encode(text), eos, vocab["1"]]) == text  # cut at eos
    assert tok.decode([vocab["1"], 23, vocab["2"]]) == "12"  # ids past the tokenizer: dropped

    # tokenizer_config.json's named tokens win over config.json's ids; no tokenizer eos and no
    # config.json eos_token_id is an error.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(hf_dir / "tokenizer.json", other / "tokenizer.json")
    (other / "tokenizer_config.json").write_text('{"eos_token": "</s>", "bos_token": null}')
    tok_other = grpo_lib.load_task_tokenizer(str(other), {"eos_token_id": 7})
    assert (tok_other.bos_id, tok_other.eos_id) == (None, eos)
    assert tok_other.encode("3+4=", add_bos=True)[0] == vocab["3"]  # no bos to add
    (other / "tokenizer_config.json").write_text('{"eos_token": null}')
    with pytest.raises(ValueError, match="no eos token"):
        grpo_lib.load_task_tokenizer(str(other), {})
    with pytest.raises(ValueError, match="neither a train.py work directory"):
        grpo_lib.start_kind(str(other))

    seen: list[list[int]] = []
    real_generate = grpo_lib.generate

    def spy(cfg_, variables_, prompts, *a, **kw):
        seen.extend(prompts)
        return real_generate(cfg_, variables_, prompts, *a, **kw)

    monkeypatch.setattr(grpo_lib, "generate", spy)
    summary = grpo_lib.grpo_and_evaluate(_hf_run_config(hf_dir, 1), str(workdir))
    assert summary["step"] == 1
    # Every prompt is bos + that tokenizer's character ids of "a+b=".
    for p in seen:
        assert p[0] == bos and tok.decode(p[1:]).endswith("=") and max(p) < tok.vocab_size
        assert p[1:] == tok.encode(tok.decode(p[1:]))
    (m1,) = [r for r in read_metrics(str(workdir / "metrics.jsonl")) if r["step"] == 1]
    # One inner pass at step 1: ratio 1 and KL 0 <=> the policy started as the reference.
    assert abs(m1["ratio_mean"] - 1.0) < 1e-5 and abs(m1["kl"]) < 1e-6
    run_cfg, policy = load_for_inference(str(workdir))
    assert run_cfg.replace(remat="none") == cfg  # the checkpoint's model, not config.model's
    reference = _restore_item(workdir, "reference", cfg)
    jax.tree.map(np.testing.assert_array_equal, reference, variables)
    assert (workdir / "tokenizer" / "tokenizer.json").is_file()

    # Resume to step 2 with the Hugging Face directory gone: checkpoint + WORKDIR/tokenizer only.
    shutil.rmtree(hf_dir)
    summary = grpo_lib.grpo_and_evaluate(_hf_run_config(hf_dir, 2), str(workdir))
    records = read_metrics(str(workdir / "metrics.jsonl"))
    assert summary["step"] == 2 and summary["loss"] == records[-1]["loss"]
    reference = _restore_item(workdir, "reference", cfg)
    jax.tree.map(np.testing.assert_array_equal, reference, variables)  # never changes
    moved = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), _restore_item(workdir, "model", cfg), variables
    )
    assert max(jax.tree.leaves(moved)) > 0
    assert [r["step"] for r in read_metrics(str(workdir / "metrics.jsonl"))] == [0, 1, 2]

    # The run's directory is a train.py work directory with its tokenizer: serve.py's loader
    # reads it, and a further GRPO run starting there keeps that tokenizer.
    from dsjax.inference.loading import load_model

    _, _, served_tok, add_bos = load_model(str(workdir))
    assert (served_tok.bos_id, served_tok.eos_id, add_bos) == (bos, eos, True)
    chained = _hf_run_config(workdir, 1)
    chained = grpo_lib._with_model(chained, run_cfg)  # a work directory: config.model must match
    config2, tok2, start2 = grpo_lib.resolve_start(chained, str(tmp_path / "run2"))
    assert config2 is chained and (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (bos, eos, 2)
    assert tok2.encode(text) == tok.encode(text)
    jax.tree.map(np.testing.assert_array_equal, start2, _restore_item(workdir, "model", cfg))
