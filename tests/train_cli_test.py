"""Hardening of the training run and its CLI: every user-caused failure is one `error:` line
(exit 2), a damaged checkpoint never costs the run, a finished run reruns as a no-op, and the
data pipeline neither hangs nor hides where a bad input is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from configs import tiny
from dsjax.checkpoints.orbax_io import (
    Checkpointer,
    CheckpointError,
    load_for_inference,
    verify_step,
)
from dsjax.text.tokenizer import Tokenizer
from dsjax.train import data
from dsjax.train import step as ts
from dsjax.train.loop import prepare_workdir, train_and_evaluate
from tests.conftest import ROOT


def small_config(tokenizer_dir: str, **fields):
    """tiny.py with 3 steps, a checkpoint after each, and the given `group__name` overrides."""
    c = tiny.get_config()
    c.data.tokenizer = tokenizer_dir
    c.train.sample_tokens = 0
    c.train.steps, c.train.log_every, c.train.eval_every = 3, 1, 3
    c.checkpoint.every, c.checkpoint.keep = 1, 3
    for key, value in fields.items():
        group, name = key.split("__")
        c[group][name] = value
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """(workdir, summary) of one finished 3-step run with checkpoints 1, 2, 3."""
    workdir = str(tmp_path_factory.mktemp("run"))
    summary = train_and_evaluate(small_config(tokenizer_dir), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]
    return workdir, summary


def _copy(trained, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(trained[0], dst)
    return dst


def _largest_array_file(workdir: str, step: int, item: str = "model") -> str:
    root = os.path.join(workdir, "checkpoints", str(step), item)
    files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if "/d/" in r + "/"]
    return max(files, key=os.path.getsize)


def _flip_bytes(path: str, count: int = 64) -> None:
    with open(path, "r+b") as f:
        raw = bytearray(f.read())
        middle = len(raw) // 2
        for i in range(middle, middle + count):
            raw[i] ^= 0xFF
        f.seek(0)
        f.write(raw)


# ----------------------------------------------------------------------------- checkpoints
def test_damaged_newest_checkpoints_resume_from_the_newest_good_one(
    trained, tmp_path, caplog, tokenizer_dir
):
    """Step 3 has flipped bytes (caught by its checksums); step 2 has a truncated array file
    and no checksums (caught when Orbax cannot restore it): the run resumes from step 1 and
    ends with exactly the loss of the undamaged run."""
    workdir = _copy(trained, tmp_path)
    _flip_bytes(_largest_array_file(workdir, 3))
    truncated = _largest_array_file(workdir, 2)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    os.remove(os.path.join(workdir, "checkpoint_sums", "2.json"))
    with caplog.at_level("WARNING", logger="dsjax"):
        summary = train_and_evaluate(small_config(tokenizer_dir), workdir)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint at step 3 is damaged" in messages and "checksum" in messages
    assert "checkpoint at step 2 is damaged: it cannot be restored" in messages
    assert "resuming from step 1" in messages
    assert summary["step"] == 3
    assert summary["loss"] == pytest.approx(trained[1]["loss"], rel=1e-6)
    assert sorted(os.listdir(os.path.join(workdir, "damaged_checkpoints"))) == ["2", "3"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]
    assert all(verify_step(workdir, s) is None for s in (1, 2, 3))  # re-saved and re-sealed


DAMAGE = {
    "flipped": lambda w: _flip_bytes(_largest_array_file(w, 3)),
    "truncated": lambda w: open(_largest_array_file(w, 3), "r+b").truncate(10),
    "optimizer_deleted": lambda w: shutil.rmtree(os.path.join(w, "checkpoints/3/optimizer")),
    "emptied": lambda w: [
        shutil.rmtree(os.path.join(w, "checkpoints/3")),
        os.mkdir(os.path.join(w, "checkpoints/3")),
    ],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_checksums_catch_every_kind_of_damage(trained, tmp_path, damage):
    workdir = _copy(trained, tmp_path)
    assert verify_step(workdir, 3) is None
    DAMAGE[damage](workdir)
    reason = verify_step(workdir, 3)
    assert reason is not None, damage
    assert verify_step(workdir, 2) is None
    with pytest.raises(CheckpointError, match="step 3 .* is damaged"):
        load_for_inference(workdir)


def test_every_checkpoint_damaged_is_one_error(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for step in (1, 2, 3):
        _flip_bytes(_largest_array_file(workdir, step))
    ckpt = Checkpointer(workdir, every=1, keep=3)
    try:
        with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged \(step 3: "):
            ckpt.restore_latest(None, None)  # checksums fail before anything is restored
    finally:
        ckpt.close()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]


def test_rerunning_a_finished_run_is_a_no_op(trained, tmp_path, tokenizer_dir):
    workdir = _copy(trained, tmp_path)
    t0 = time.perf_counter()
    summary = train_and_evaluate(small_config(tokenizer_dir), workdir)
    assert summary["complete"] and summary["step"] == 3
    assert time.perf_counter() - t0 < 60  # no compile, no training
    proc = _train(workdir, tokenizer_dir, "--config.train.steps=3")
    assert proc.returncode == 0, proc.stderr
    assert "is complete (step 3" in proc.stdout
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- config
CONFIG_RULES = [
    ("checkpoint__every", 0, "config.checkpoint.every=0 must be >= 1"),
    ("checkpoint__keep", 0, "config.checkpoint.keep=0 must be >= 1"),
    ("optim__lr", -1.0, "config.optim.lr=-1.0 must be >= 0"),
    ("optim__lr", float("nan"), "config.optim.lr=nan must be finite"),
    ("optim__warmup_steps", -1, "config.optim.warmup_steps=-1 must be >= 0"),
    ("optim__clip_norm", 0.0, "config.optim.clip_norm=0.0 must be > 0"),
    ("optim__b2", 1.0, "config.optim.b2=1.0 must be in [0, 1)"),
    ("optim__min_lr_ratio", 2.0, "config.optim.min_lr_ratio=2.0 must be in [0, 1]"),
    ("train__eval_batches", 0, "config.train.eval_batches=0 must be >= 1"),
    ("train__mtp_weight", -0.5, "config.train.mtp_weight=-0.5 must be >= 0"),
    ("train__sample_tokens", -1, "config.train.sample_tokens=-1 must be >= 0"),
    ("train__remat", "some", "config.train.remat='some' must be one of"),
    ("data__eval_fraction", 1.0, "config.data.eval_fraction=1.0 must be in [0, 1)"),
    ("data__seq_len", 0, "config.data.seq_len=0 must be >= 1"),
    ("data__max_documents", -2, "config.data.max_documents=-2 must be >= 0"),
    ("mesh__tensor", 0, "config.mesh.tensor=0 must be a positive size or -1"),
]


@pytest.mark.parametrize("field,value,message", CONFIG_RULES)
def test_config_rules_name_field_and_rule(tokenizer_dir, field, value, message):
    config = small_config(tokenizer_dir)
    group, name = field.split("__")
    config[group][name] = value
    with pytest.raises(ValueError) as err:
        ts.validate_config(config, None)
    assert message in str(err.value)


def test_bad_config_fails_before_any_setup(tmp_path, tokenizer_dir):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="config.checkpoint.every=0"):
        train_and_evaluate(small_config(tokenizer_dir, checkpoint__every=0), str(tmp_path))
    assert time.perf_counter() - t0 < 5
    assert os.listdir(tmp_path) == []  # no config.json, no tokenizer, no checkpoints


# ----------------------------------------------------------------------------- workdir
def test_workdir_that_is_a_file_or_unwritable(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"--workdir .*file is a file, not a directory"):
        prepare_workdir(str(afile))
    with pytest.raises(ValueError, match=r"is not writable"):
        prepare_workdir("/proc/self/dsjax-run")  # a read-only file system for root too
    assert prepare_workdir(str(tmp_path / "new")) == str(tmp_path / "new")


# ----------------------------------------------------------------------------- data
def test_corpus_of_empty_files_fails_instead_of_hanging(tmp_path, tokenizer_dir):
    for i in range(30):
        (tmp_path / f"{i:02d}.txt").write_text("")
    config = small_config(tokenizer_dir, data__source=str(tmp_path / "*.txt"))
    tok = Tokenizer.load(tokenizer_dir)
    t0 = time.perf_counter()
    for split in ("eval", "train"):  # repeated for ever: the reader used to loop
        it = data.make_iterator(config, tok, split, num_epochs=None, prefetch=0)
        with pytest.raises(ValueError, match="hold no text"):
            next(it)
    with pytest.raises(StopIteration):  # one epoch: simply nothing
        next(data.make_iterator(config, tok, "eval", num_epochs=1, prefetch=0))
    assert time.perf_counter() - t0 < 20
    config.data.tokenizer = ""  # training a tokenizer on it says so too
    with pytest.raises(ValueError, match="no text"):
        data.get_tokenizer(config, str(tmp_path / "wd"))


def test_eval_split_message_states_the_real_eval_fraction(tmp_path, tokenizer_dir):
    (tmp_path / "only.txt").write_text("def f():\n    return 1\n")
    config = small_config(tokenizer_dir, data__source=str(tmp_path / "only.txt"))
    tok = Tokenizer.load(tokenizer_dir)
    with pytest.raises(ValueError, match=r"eval_fraction=0\.02: the corpus has only 1 document"):
        data.make_iterator(config, tok, "eval")


def test_bad_jsonl_line_names_file_and_line(tmp_path, tokenizer_dir):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:3: not a valid JSON line"):
        data.load_documents(str(path))
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: not UTF-8"):
        data.load_documents(str(path))


def test_tokenizer_that_is_a_binary_file(tmp_path):
    binary = tmp_path / "tokenizer.json"
    binary.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a tokenizer\.json file"):
        Tokenizer.load(binary)


# ----------------------------------------------------------------------------- the CLI
def _train(workdir, tokenizer_dir, *flags, config="configs/tiny.py"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            f"--config={config}",
            f"--workdir={workdir}",
            f"--config.data.tokenizer={tokenizer_dir}",
            "--config.train.sample_tokens=0",
            "--config.checkpoint.every=1",
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_cli_user_errors_are_one_line(tmp_path, tokenizer_dir):
    """A config file with a syntax error, a --workdir that is a file, and a tokenizer that is
    not one: each one `error:` line, exit code 2, in one subprocess apiece."""
    bad = tmp_path / "bad_config.py"
    bad.write_text("def get_config(:\n    pass\n")
    line = _one_error_line(_train(tmp_path / "w1", tokenizer_dir, config=str(bad)))
    assert "bad_config.py:1" in line and "cannot load --config" in line
    afile = tmp_path / "afile"
    afile.write_text("")
    line = _one_error_line(_train(afile, tokenizer_dir))
    assert "is a file, not a directory" in line
    binary = tmp_path / "tok.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    line = _one_error_line(_train(tmp_path / "w3", binary))
    assert "is not a tokenizer.json file" in line


HOSTILE = (-(10**30), -1, 0, 10**30, -1.5, 0.0, float("nan"), float("inf"), True, "", "x", None)


def test_any_config_override_is_accepted_or_one_value_error(tokenizer_dir):
    """Every scalar field of the run config set to each hostile value (those ml_collections'
    type lock lets through, as `--config.a.b=v` would): validation passes or raises
    ValueError, never another exception."""
    base = small_config(tokenizer_dir)
    fields = [
        (group, name)
        for group in ("train", "optim", "data", "checkpoint", "mesh")
        for name in base[group]
    ]
    checked = 0
    for group, name in fields:
        for value in HOSTILE:
            config = small_config(tokenizer_dir)
            try:
                config[group][name] = value
            except (TypeError, ValueError):
                continue  # refused by ml_collections: train.py's flag parser makes it one line
            checked += 1
            try:
                ts.validate_config(config, None)
            except ValueError as e:
                assert "\n" not in str(e) and "config." in str(e), (group, name, value, e)
    assert checked > 100


def test_cli_drops_orbax_background_echoes_of_the_reported_error():
    """A full disk: Orbax's save threads log the error with tracebacks and TensorStore prints
    `Event loop is closed` ones before train.py reports it once; the CLI drops exactly those."""
    import logging

    import train

    keep = train._DropOrbaxErrors()

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "failed", None, None)

    assert not keep.filter(record("/site-packages/orbax/checkpoint/future.py", logging.ERROR))
    assert keep.filter(record("/site-packages/orbax/checkpoint/future.py", logging.WARNING))
    assert keep.filter(record("/work/dsjax/train/loop.py", logging.ERROR))
    assert train._is_closed_loop_echo(RuntimeError("Event loop is closed"))
    assert not train._is_closed_loop_echo(RuntimeError("something else"))


def test_intact_checkpoint_that_does_not_fit_the_config_is_not_called_damaged(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    ckpt = Checkpointer(workdir, every=1, keep=3)
    try:
        with pytest.raises(CheckpointError, match=r"step 3 .* is intact but does not restore"):
            ckpt.restore_latest(object(), None)  # no .params: as a changed model would fail
    finally:
        ckpt.close()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]
    assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))
