"""The typed config seam (dsjax/run_config.py): a ConfigDict validated once into frozen options.

Each config mistake a user can make (issue 26 item 3, found by probing every field) is one
ValueError line that names the field: unknown keys with the nearest valid ones, wrong types,
out-of-range values, remat set in two places, a mesh that does not fit the devices.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from configs import grpo_arith, tiny
from dsjax import run_config
from dsjax.checkpoints.orbax_io import model_config_from_run
from dsjax.run_config import RunConfig, TrainOptions, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(config, section: str, key: str, value) -> None:
    """`config.<section>.<key> = value`, past ml_collections' type lock (a config file can also
    replace a whole group, and saved runs and plain dicts have no lock)."""
    config[section] = ml_collections.ConfigDict({**config[section].to_dict(), key: value})


def _error(config) -> str:
    with pytest.raises(ValueError) as err:
        parse(config)
    text = str(err.value)
    assert "\n" not in text and text.startswith("config."), text
    return text


@pytest.mark.parametrize(
    "name", ["tiny", "small", "moe_1b", "deepseek_v3", "deepseek_v2_lite", "grpo_arith"]
)
def test_every_shipped_config_parses(name):
    run = parse(importlib.import_module(f"configs.{name}").get_config())
    assert run.model.remat == run.train.remat and run.model.dsa_stage == run.train.dsa_stage
    assert (run.grpo is not None) == (name == "grpo_arith")
    hash(run)  # frozen and hashable: a static argument of jax.jit


# ----------------------------------------------------------------------------- unknown keys
def test_unknown_key_in_a_config_file_names_section_key_and_nearest():
    # Before the seam a config file's typo added a key nobody read: the run went on without it.
    c = tiny.get_config()
    c.train.log_evry = 5
    assert _error(c) == (
        "config.train.log_evry: no such key in config.train "
        "(did you mean 'log_every' or 'eval_every'?)"
    )
    c = tiny.get_config()
    c.train.foo = 1
    text = _error(c)
    assert text.startswith("config.train.foo: no such key in config.train (valid keys: ")
    assert "batch_size" in text and "steps" in text
    c = tiny.get_config()
    c.model.hiden_size = 3
    assert "did you mean 'hidden_size'?" in _error(c)
    c = tiny.get_config()
    c.chekpoint = {"every": 5}
    assert _error(c).startswith("config.chekpoint: no such key at the top level (did you mean")


def test_unknown_override_on_the_command_line_is_one_line():
    # Before: `error: 'foo'` (ml_collections' bare KeyError), the section and the options unnamed.
    for override, want in (
        ("--config.train.foo=1", "config.train.foo: no such key in config.train (valid keys:"),
        ("--config.optim.weight_decy=1", "config.optim.weight_decy: no such key in config.optim"
         " (did you mean 'weight_decay'?)"),  # fmt: skip
        ("--config.model.remat=none", "config.model.remat: set config.train.remat instead"),
    ):
        proc = subprocess.run(
            [sys.executable, "train.py", "--config=configs/tiny.py", "--workdir=/nonexistent",
             override],  # fmt: skip
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error: " + want), lines
        assert "Traceback" not in proc.stderr


def test_override_error_passes_known_overrides():
    assert run_config.override_error(["x", "--config.train.steps=3", "--workdir=w"]) is None
    assert run_config.override_error(["--config.mesh.fsdp=2", "--config.seed=1"]) is None
    assert "config.mesh.fdsp" in run_config.override_error(["--config.mesh.fdsp=2"])


# ----------------------------------------------------------------------------- one source
def test_remat_in_the_model_group_is_an_error_not_silently_overwritten():
    # Before: config.model.remat = "none" in a file was replaced by config.train.remat ("full").
    c = tiny.get_config()
    c.model.remat = "none"
    assert _error(c).startswith(
        "config.model.remat='none' conflicts with config.train.remat='full': set it under "
        "config.train only"
    )
    c = tiny.get_config()
    c.model.dsa_stage = "warmup"
    assert _error(c).startswith("config.model.dsa_stage='warmup' conflicts with config.train")
    c = tiny.get_config()
    c.train.remat = "none"
    assert parse(c).model.remat == "none"
    c.model.remat = "none"  # e.g. config.model = asdict(cfg): the same value is no conflict
    assert parse(c).model.remat == "none"


def test_from_train_fields_are_named_where_they_are_set():
    c = tiny.get_config()
    c.train.dsa_stage = "warmup"  # tiny has no indexer (index_topk 0)
    assert _error(c).startswith("config.train.dsa_stage='warmup': trains the DSA lightning")


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    "section,key,value,want",
    [
        ("train", "steps", "10", "config.train.steps='10' must be an integer"),
        ("train", "steps", 0, "config.train.steps=0 must be >= 1"),
        ("train", "batch_size", -8, "config.train.batch_size=-8 must be >= 1"),
        ("train", "remat", "fulll", "config.train.remat='fulll' must be one of ('none', 'full'"),
        ("optim", "host_offload", "yes", "config.optim.host_offload='yes' must be true or false"),
        ("optim", "lr", float("inf"), "config.optim.lr=inf must be finite"),
        ("optim", "moment_dtype", "fp8", "config.optim.moment_dtype='fp8' must be one of"),
        ("data", "source", 3, "config.data.source=3 must be a string"),
        ("mesh", "expert", 0, "config.mesh.expert=0 must be a positive size or -1"),
        ("model", "hidden_size", 64.0, "config.model.hidden_size=64.0 must be an integer"),
        ("model", "num_attention_heads", 0, "config.model.num_attention_heads=0: must be a"),
        ("model", "norm_topk_prob", "yes", "config.model.norm_topk_prob='yes' must be true or"),
        ("model", "attention_impl", "flash", "config.model.attention_impl='flash': must be one"),
        ("model", "rope_theta", "1e4", "config.model.rope_theta='1e4' must be a number"),
    ],
)
def test_wrong_type_or_range_names_the_field(section, key, value, want):
    c = tiny.get_config()
    _set(c, section, key, value)
    assert _error(c).startswith(want)


def test_every_option_refuses_a_wrong_type_naming_it():
    """Each field of each section (and of the GRPO sections) set to a value of the wrong type."""
    checked = 0
    for name, cls in {**run_config.SECTIONS, **run_config.GRPO_SECTIONS}.items():
        for field in dataclasses.fields(cls):
            c = grpo_arith.get_config()
            wrong = 3 if isinstance(field.default, str) else "x"
            _set(c, name, field.name, wrong)
            assert _error(c).startswith(f"config.{name}.{field.name}={wrong!r} must be"), field
            checked += 1
    assert checked > 50


def test_trainer_name_is_checked():
    # Before: any trainer but "grpo" (a typo, "GRPO") silently ran pre-training.
    c = tiny.get_config()
    c.trainer = "GRPO"
    assert _error(c) == "config.trainer='GRPO' must be one of ('pretrain', 'grpo')"


def test_mesh_that_does_not_fit_the_devices_names_config_mesh():
    c = tiny.get_config()
    c.mesh.data = 3
    run = parse(c)
    with pytest.raises(ValueError) as err:
        run_config.make_mesh(run)
    assert str(err.value).startswith("config.mesh {'stage': 1, 'data': 3,")
    assert f"!= {jax.device_count()} devices" in str(err.value)
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = -1, 1, 16  # tiny has 8 experts, 8 devices
    with pytest.raises(ValueError, match="config.mesh"):
        run_config.make_mesh(parse(c))
    c.mesh.data, c.mesh.expert = -1, 2
    c.train.batch_size = 6  # 4 data shards x 2 expert shards = 8
    with pytest.raises(ValueError, match=r"config.train.batch_size=6 must divide into"):
        run_config.make_mesh(parse(c))


def test_missing_keys_take_the_declared_defaults():
    run = parse({"model": {"vocab_size": 64, "num_hidden_layers": 2, "first_k_dense_replace": 1}})
    assert run.train == TrainOptions() and run.model.vocab_size == 64
    assert run.model.remat == TrainOptions().remat
    assert isinstance(run, RunConfig) and parse(run) is run


def test_saved_run_config_goes_through_the_seam():
    model = dict(tiny.get_config().model)
    assert model_config_from_run({"model": model}).hidden_size == model["hidden_size"]
    with pytest.raises(ValueError, match=r"config.model.hiden: no such key in config.model"):
        model_config_from_run({"model": {**model, "hiden": 1}})


def test_base_config_is_built_from_the_declared_options():
    from configs.base import get_base_config

    base = get_base_config()
    for name, cls in run_config.SECTIONS.items():
        assert dict(base[name]) == dataclasses.asdict(cls()), name


def test_pipeline_sizes_are_checked_before_building_a_schedule():
    # A huge stage or micro-batch count once built a tick table of that size (out of memory).
    c = tiny.get_config()
    c.mesh.stage, c.mesh.data = 10**30, 1
    assert _error(c).startswith("config.mesh.stage=1000000000000000000000000000000 exceeds the")
    c = tiny.get_config()
    c.mesh.stage, c.train.microbatches = 2, 10**30
    assert _error(c).startswith("config.train.microbatches=1000000000000000000000000000000 exceeds")
    c.train.microbatches, c.train.pipeline_schedule = 4, "zigzag"
    assert _error(c).startswith("config.train.pipeline_schedule='zigzag' must be one of")


def test_context_parallelism_with_stages_is_refused_in_one_line():
    c = tiny.get_config()
    c.mesh.stage, c.mesh.context, c.mesh.data = 2, 2, 1
    assert _error(c).startswith("config.mesh.context=2 with config.mesh.stage=2: context ")
