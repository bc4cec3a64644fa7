"""Old module paths (dsjax <= 0.2, one flat package) kept for one release.

`import dsjax.hf` or `from dsjax.layers.moe import route` still work: a finder on `sys.meta_path`
answers each old name with the module at its new home (the same module object, so state and
monkeypatching are shared) and emits a DeprecationWarning naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module (under dsjax.) -> its home since 0.3
MOVED = {
    "config": "model.config",
    "layers": "model.layers",
    "kernels": "model.kernels",
    "fp8": "model.fp8",
    "sharding": "model.sharding",
    "hf": "checkpoints.hf",
    "hf_fp8": "checkpoints.hf_fp8",
    "safetensors_io": "checkpoints.safetensors_io",
    "checkpoint": "checkpoints.orbax_io",
    "loading": "inference.loading",
    "tokenizer": "text.tokenizer",
    "chat_template": "text.chat_template",
    "data": "train.data",
    "train_step": "train.step",
    "train_lib": "train.loop",
    "metrics": "train.metrics",
    "grpo": "rl.grpo",
    "rewards": "rl.rewards",
    "grpo_lib": "rl.loop",
    "sampling": "inference.sampling",
    "decode": "inference.decode",
    "generate": "inference.generate",
    "engine": "inference.engine",
    "engine_programs": "inference.engine_programs",
    "server": "serve.app",
    "api_requests": "serve.requests",
    "api_responses": "serve.responses",
    "api_runner": "serve.runner",
    "api_errors": "serve.errors",
    "json_limits": "serve.json_limits",
    "tpu_specs": "plan.tpu_specs",
    "hlo_stats": "plan.hlo_stats",
}


def new_name(fullname: str) -> str | None:
    """`dsjax.layers.moe` -> `dsjax.model.layers.moe`; None for names that did not move."""
    parts = fullname.split(".")
    if len(parts) < 2 or parts[0] != "dsjax" or parts[1] not in MOVED:
        return None
    return ".".join(["dsjax", MOVED[parts[1]], *parts[2:]])


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if new_name(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        new = new_name(spec.name)
        assert new is not None
        warnings.warn(
            f"{spec.name} moved to {new}; the old path will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._real_spec = module.__spec__  # the import system overwrites __spec__; restored below
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._real_spec


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
