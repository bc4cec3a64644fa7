"""The Colab notebooks (notebooks/*.ipynb) run top to bottom on CPU with DSJAX_NOTEBOOK_CI=1,
are committed without outputs, and the TPU configs they train with compile and fit on the chips
they name (the planner's real XLA:TPU compile for abstract one-chip v5e / v6e and the 8-core
v2-8, at reduced shapes; at the configs' own shapes with DSJAX_PLAN_FULL_SHAPES=1).

Needs nbclient, nbformat and ipykernel (skipped with the reason when absent); the planner tests
need libtpu.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted(Path(ROOT, "notebooks").glob("*.ipynb"))
NAMES = ["01_quickstart", "02_train_on_tpu", "03_finetune_hf", "04_serve"]
CELL_TIMEOUT_S = 300

_missing = [m for m in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]
needs_nbclient = pytest.mark.skipif(
    bool(_missing),
    reason=f"{', '.join(_missing)} not installed (pip install nbclient nbformat ipykernel)",
)
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu not installed (pip install -r requirements-tpu.txt)",
)


def test_the_four_notebooks_are_there_stripped_with_a_colab_badge():
    assert [p.stem for p in NOTEBOOKS] == NAMES
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        cells = nb["cells"]
        badge = f"colab.research.google.com/github/dsjax/dsjax/blob/main/notebooks/{path.name}"
        assert badge in "".join(cells[0]["source"]), f"{path.name}: no Colab badge in cell 0"
        code = [c for c in cells if c["cell_type"] == "code"]
        first = "".join(code[0]["source"])
        assert "pip install -q git+https://github.com/dsjax/dsjax" in first, path.name
        assert 'find_spec("dsjax") is None' in first and "DSJAX_NOTEBOOK_CI" in first, path.name
        for c in code:
            assert c["outputs"] == [] and c["execution_count"] is None, (
                f"{path.name}: outputs are committed; strip them (cell {c.get('id')})"
            )


# ----------------------------------------------------------------------------- execution
@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec running THIS interpreter (not whatever `python` is on PATH)."""
    spec_root = tmp_path_factory.mktemp("jupyter")
    kdir = spec_root / "kernels" / "dsjax-test"
    kdir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dsjax test",
        "language": "python",
    }
    (kdir / "kernel.json").write_text(json.dumps(spec))
    return str(spec_root)


def _run_notebook(path: Path, jupyter_path: str, monkeypatch) -> float:
    import nbclient
    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    monkeypatch.setenv("DSJAX_NOTEBOOK_CI", "1")
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    monkeypatch.setenv("MPLBACKEND", "agg")
    # One CPU device, as on a Colab CPU runtime (conftest.py gives the tests 8).
    flags = os.environ.get("XLA_FLAGS", "").split()
    monkeypatch.setenv("XLA_FLAGS", " ".join(f for f in flags if "device_count" not in f))
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="dsjax-test",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": ROOT}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as err:
        failing = next(
            (
                c
                for c in reversed(nb.cells)
                if c.cell_type == "code"
                and c.get("outputs")
                and any(o.get("output_type") == "error" for o in c.outputs)
            ),  # fmt: skip
            None,
        )
        source = failing.source if failing is not None else "(see the error)"
        pytest.fail(f"{path.name}: a cell failed\n--- cell ---\n{source}\n--- error ---\n{err}")
    finally:
        if os.environ.get("DSJAX_NOTEBOOK_OUT"):  # keep the executed notebook to read
            nbformat.write(nb, Path(os.environ["DSJAX_NOTEBOOK_OUT"], path.name))
    return time.perf_counter() - t0


@needs_nbclient
def test_a_failing_cell_is_reported_with_its_source(kernel_env, monkeypatch, tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell("import os\nx = 1"), new_code_cell("y = x / 0")])
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(pytest.fail.Exception) as err:
        _run_notebook(path, kernel_env, monkeypatch)
    assert "--- cell ---\ny = x / 0" in str(err.value)
    assert "ZeroDivisionError" in str(err.value)


@needs_nbclient
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, kernel_env, monkeypatch):
    seconds = _run_notebook(Path(ROOT, "notebooks", f"{name}.ipynb"), kernel_env, monkeypatch)
    print(f"{name}: {seconds:.1f} s")


# ----------------------------------------------------------------------------- TPU configs
# TPU v2 (Colab's "v2-8": 4 chips, 2 TensorCores each, one JAX device per core) is not among the
# planner's chips; its published figures per core (https://cloud.google.com/tpu/docs/v2: 16 GiB
# HBM and 45 TFLOP/s bf16 per chip).
_V2_PER_CORE = dict(peak_flops=45e12 / 2, hbm_bytes=8 * 1024**3)


def colab_target(chip: str):
    """The planner's Target for the Colab runtime of `chip` (v5e-1, v6e-1, v2-8). The v2 (not a
    planner generation) is described here: libtpu's 2x2 v2 host with this file's per-core figures."""
    from jax.experimental import topologies

    from dsjax.plan import planner as plan

    if chip != "v2":
        return plan.make_target(f"{chip}:1x1")
    devices = topologies.get_topology_desc(
        platform="tpu", topology_name="v2:2x2", chips_per_host_bounds=[2, 2, 1]
    ).devices
    return plan.Target("v2:2x2 (4 chips, 8 devices)", tuple(devices),
                       hbm_bytes_per_s=None, ici_bytes_per_s=None, **_V2_PER_CORE)  # fmt: skip


def test_colab_chip_for_device_kind():
    from configs import colab_tpu

    assert colab_tpu.chip_for("TPU v5 lite") == "v5e"
    assert colab_tpu.chip_for("TPU v6 lite") == "v6e"
    assert colab_tpu.chip_for("TPU v2") == "v2"
    with pytest.raises(ValueError, match="no Colab config"):
        colab_tpu.chip_for("TPU v4")
    with pytest.raises(ValueError, match="chip='v9'"):
        colab_tpu.get_config("v9")


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("chip", ["v5e", "v6e", "v2"])
def test_colab_tpu_config_compiles_and_fits(chip):
    """The real train step (model, optimizer, mesh, shardings) of the config 02_train_on_tpu
    picks for `chip`, compiled by XLA:TPU for that runtime's devices, fits in HBM.

    XLA:TPU compile time grows with the tokens per step (minutes of CPU for the configs' 16-32 x
    1024), so CI compiles 128-token sequences, one per batch shard (the v2-8's 8-device SPMD
    compile took 84 s wall, 43 s CPU, on a busy 2-core machine); DSJAX_PLAN_FULL_SHAPES=1
    compiles the configs' own batch and sequence length."""
    from configs import colab_tpu
    from dsjax.plan import planner as plan

    full = os.environ.get("DSJAX_PLAN_FULL_SHAPES") == "1"
    target = colab_target(chip)
    config = colab_tpu.get_config(chip)
    if not full:
        config.data.seq_len = 128
        config.train.batch_size = 8 if chip == "v2" else 1
    r = plan.plan_train(config, target)
    m = r["memory"]
    print(
        f"{chip}: {m['total_bytes'] / 2**30:.2f} GiB of {r['hbm_bytes'] / 2**30:.2f} GiB per "
        f"device, compile {r['compile_s']:.1f} s"
    )
    assert r["devices"] == len(target.devices) == (8 if chip == "v2" else 1)
    assert r["tokens_per_step"] == config.train.batch_size * config.data.seq_len
    assert r["fits"] is True, plan.format_report(r)
    assert 0 < m["params_bytes"] < m["args_bytes"] <= m["total_bytes"] <= r["hbm_bytes"]
    assert r["flops"]["xla_per_device"] > 0
