"""The public API as another project uses it.

- `pip install .` metadata: pyproject's dependencies and extras are the requirements files.
- Every name in `dsjax.__all__` / `dsjax.model.layers.__all__` imports and is documented; `import dsjax`
  does not load the server, torch or matplotlib.
- A user's own Flax module built from `dsjax.MLA` and `dsjax.MoE` (plus its own embedding and
  head), under the user's own 2-axis mesh (data=2 x fsdp=4, no expert/tensor axes) with
  `dsjax.LOGICAL_RULES` narrowed to it by `dsjax.rules_for_mesh`: sharded init, jit + grad; the
  loss and every gradient equal the same program run without a mesh, and gradients reach both
  dsjax layers.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import dsjax
import dsjax.model.layers
from dsjax.testing import rel_err, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 8, 4  # 32 tokens: 4 per batch shard on the 8-device mesh


# ----------------------------------------------------------------------------- packaging
def test_pyproject_takes_dependencies_from_the_requirements_files():
    """`pip install .` metadata: name, version, Python, and the requirements files as the one
    list of dependencies and extras (setuptools reads them at build time)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    project = pyproject["project"]
    assert project["name"] == "dsjax" and project["version"] == dsjax.__version__
    assert project["requires-python"] == ">=3.11"
    assert set(project["dynamic"]) == {"dependencies", "optional-dependencies"}
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]
    files = {
        "": dynamic["dependencies"]["file"],
        **{k: v["file"] for k, v in dynamic["optional-dependencies"].items()},
    }
    assert files == {
        "": ["requirements.txt"],
        "test": ["requirements-test.txt"],
        "tpu": ["requirements-tpu.txt"],
    }
    for name in ("requirements.txt", "requirements-test.txt", "requirements-tpu.txt"):
        with open(os.path.join(ROOT, name)) as f:  # setuptools' subset: no -r / -e / options
            lines = [ln.split("#", 1)[0].strip() for ln in f]
        assert all(ln and not ln.startswith("-") for ln in lines if ln), name
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert packages == ["dsjax", "dsjax.*"]


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("module", [dsjax, dsjax.model.layers], ids=lambda m: m.__name__)
def test_public_names_import_and_are_documented(module):
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        obj = getattr(module, name)  # AttributeError names the missing export
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
            assert (inspect.getdoc(obj) or "").strip(), f"{module.__name__}.{name} has no docstring"


def test_import_dsjax_is_light():
    heavy = ("torch", "transformers", "fastapi", "uvicorn", "matplotlib", "tensorboardX")
    code = f"import sys, dsjax\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.stdout.strip() == "", f"import dsjax loaded {out.stdout.strip()}"


# ----------------------------------------------------------------------------- user module
class UserLM(nn.Module):
    """A user's own model: their embedding and head around dsjax's MLA and MoE layers."""

    cfg: dsjax.ModelConfig

    @nn.compact
    def __call__(self, tokens_BT):
        cfg = self.cfg
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.5), ("vocab", "embed")
            ),
        )
        x_BTD = embed(tokens_BT)
        Bt, Tt = tokens_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(Tt, dtype=jnp.int32), (Bt, Tt))
        segment_ids_BT = jnp.ones((Bt, Tt), jnp.int32)
        h_BTD = dsjax.RMSNorm(cfg.rms_norm_eps, axis_name="embed")(x_BTD)
        x_BTD = x_BTD + dsjax.MLA(cfg, name="attn")(h_BTD, positions_BT, segment_ids_BT)
        h_BTD = dsjax.RMSNorm(cfg.rms_norm_eps, axis_name="embed")(x_BTD)
        y_BTD, stats = dsjax.MoE(cfg, name="moe")(h_BTD, segment_ids_BT > 0)
        x_BTD = x_BTD + y_BTD
        return embed.attend(x_BTD), stats["balance"]


def _loss(module, params, bias, tokens_BT):
    logits_BTV, balance = module.apply({"params": params, "moe_bias": bias}, tokens_BT)
    logp = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32))
    ce = -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1).mean()
    return ce + 0.01 * balance


@pytest.fixture(scope="module")
def user_setup():
    cfg = tiny_config()
    module = UserLM(cfg)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)), jnp.int32)
    boxed = jax.jit(module.init)(jax.random.key(0), tokens)
    variables = nn.unbox(boxed)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b, t: _loss(module, p, b, t)))
    reference = grad_fn(variables["params"], variables["moe_bias"], tokens)  # no mesh
    return dict(module=module, boxed=boxed, variables=variables, tokens=tokens, ref=reference)


def test_user_module_with_mla_and_moe_under_user_mesh(user_setup):
    s = user_setup
    module = s["module"]
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    rules = dsjax.rules_for_mesh(mesh)  # LOGICAL_RULES without the expert/tensor axes
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = dsjax.logical_to_sharding(nn.get_partition_spec(s["boxed"]), mesh, rules)
        variables = jax.device_put(s["variables"], shardings)  # placed per the logical axes
        kernel = variables["params"]["moe"]["experts"]["gate"]
        assert kernel.sharding.spec == P(None, "fsdp", None)  # embed dim over fsdp
        tokens = jax.device_put(s["tokens"], NamedSharding(mesh, P(("data", "fsdp"))))
        grad_fn = jax.jit(jax.value_and_grad(lambda p, b, t: _loss(module, p, b, t)))
        loss, grads = grad_fn(variables["params"], variables["moe_bias"], tokens)

    ref_loss, ref_grads = s["ref"]
    assert np.isfinite(float(loss)) and rel_err(loss, ref_loss) < 1e-5
    flat = jax.tree_util.tree_leaves_with_path(grads)
    for (path, got), want in zip(flat, jax.tree.leaves(ref_grads), strict=True):
        name = jax.tree_util.keystr(path)
        assert np.isfinite(np.asarray(got)).all(), name
        assert rel_err(got, want) < 1e-4, (name, rel_err(got, want))
    # Gradients reach every parameter of both dsjax layers (attention, router, experts, shared).
    for layer in ("attn", "moe"):
        for path, g in jax.tree_util.tree_leaves_with_path(grads[layer]):
            assert float(jnp.abs(g).max()) > 0, f"{layer}{jax.tree_util.keystr(path)}: zero grad"
