"""benchmarks/accelerator_suite.py --toy: runs on CPU and writes JSON that matches its documented
schema (so the GPU/TPU suite cannot rot between the sessions that have an accelerator)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_suite():
    spec = importlib.util.spec_from_file_location(
        "accelerator_suite", ROOT / "benchmarks/accelerator_suite.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite = _load_suite()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    suite.main(["--toy", "--out", str(out)])
    return json.loads(out.read_text())


def test_toy_json_matches_schema_and_has_figures(toy_run, capsys):
    jsonschema.validate(toy_run, suite.SCHEMA)
    assert toy_run["toy"] is True and toy_run["device"]["platform"] == "cpu"
    assert [r["recipe"] for r in toy_run["train"]] == ["bf16", "fp8"]
    assert [r["batch"] for r in toy_run["decode"]] == [1, 2]
    rows = toy_run["train"] + toy_run["decode"]
    rows += toy_run["kernels"]["attention"] + toy_run["kernels"]["grouped_gemm"]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    assert all(0 < r["mfu"] < 1 for r in toy_run["train"])
    assert all(
        r["decode_tokens_per_s"] > 0 and r["roofline_fraction"] > 0 for r in toy_run["decode"]
    )
    assert all(r["ms"] > 0 for r in toy_run["kernels"]["grouped_gemm"])


def test_markdown_names_the_device(toy_run):
    text = suite.markdown(toy_run, "python benchmarks/accelerator_suite.py --toy")
    assert text.startswith("## Accelerator suite — cpu")
    assert "| bf16 | configs/tiny.py" in text and "| fp8 |" in text


def test_schema_rejects_broken_documents(toy_run):
    bad = copy.deepcopy(toy_run)
    del bad["train"][0]["mfu"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, suite.SCHEMA)
    bad = copy.deepcopy(toy_run)
    bad["decode"][0]["batch"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, suite.SCHEMA)


def test_every_schema_field_is_documented():
    doc = suite.__doc__

    def names(schema):
        for key, sub in schema.get("properties", {}).items():
            yield key
            yield from names(sub)
        if "items" in schema:
            yield from names(schema["items"])

    missing = sorted({n for n in names(suite.SCHEMA) if f'"{n}"' not in doc})
    assert not missing, f"schema fields missing from the docstring: {missing}"


def test_decode_roofline_bytes_count_touched_experts_and_cache():
    model = suite.load_config("configs/tiny.py", 1, 8).model
    cfg = suite.ModelConfig(**dict(model))
    E, K, D, F = (
        cfg.n_routed_experts,
        cfg.num_experts_per_tok,
        cfg.hidden_size,
        cfg.moe_intermediate_size,
    )
    experts = cfg.num_moe_layers * E * 3 * D * F * 4  # float32 bytes of the main model's experts
    b1, b512 = (suite.decode_bytes_per_step(cfg, b, 0.0) for b in (1, 512))
    touched = 1 - (1 - K / E) ** 512
    assert b512 - b1 == pytest.approx(experts * (touched - K / E) + 511 * D * 4, rel=1e-6)
    cache = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    with_ctx = suite.decode_bytes_per_step(cfg, 1, 10.0)
    assert with_ctx - b1 >= 10 * cache  # the latent cache (plus any indexer keys) per position
