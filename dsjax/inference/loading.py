"""Loading a model for inference: (cfg, variables, tokenizer, add_bos) from a directory.

Kept apart from the HTTP server so `serve.py --prompt`, notebooks and benchmarks load a model
without importing FastAPI.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsjax.checkpoints.hub import resolve_checkpoint
from dsjax.checkpoints.safetensors_io import read_json_object

__all__ = ["load_model"]


def load_model(path: str | os.PathLike, dtype: str | None = None, keep_fp8: bool = False):
    """Loads (cfg, variables, tokenizer, add_bos) from a train.py workdir, a Hugging Face dir or
    a Hugging Face Hub id (`org/name[@revision]`, `dsjax.checkpoints.hub.resolve_checkpoint`:
    from the local cache when HF_HUB_OFFLINE=1).

    A workdir has `checkpoints/` (Orbax, read by `dsjax.checkpoints.orbax_io.load_for_inference`) and
    `tokenizer/`; a Hugging Face directory has config.json, safetensors and tokenizer.json.
    `dtype` (e.g. "bfloat16") overrides the parameter/compute dtype; None keeps the checkpoint's.
    `add_bos` is tokenizer_config.json's `add_bos_token` (False when absent). `keep_fp8` keeps
    the FP8 weights of an FP8 Hugging Face checkpoint as float8 + `*_scale_inv` blocks (see
    `dsjax.checkpoints.hf.load_hf_checkpoint`); a workdir or a float checkpoint has nothing to keep.

    Raises:
      ValueError: `path` is neither kind of directory nor a Hub id that can be had, or
        tokenizer_config.json is not a JSON object.
    """
    import jax.numpy as jnp

    from dsjax.text.tokenizer import Tokenizer

    path = resolve_checkpoint(path)
    if (path / "checkpoints").is_dir():
        from dsjax.checkpoints.orbax_io import load_for_inference

        cfg, variables = load_for_inference(str(path), dtype=dtype)
        tok_dir = path / "tokenizer"
    elif (path / "metrics.jsonl").is_file() or (path / "tokenizer" / "tokenizer.json").is_file():
        raise ValueError(
            f"{path} is a train.py workdir with no checkpoints/ (its run stopped before the "
            "first checkpoint was written)"
        )
    elif (path / "config.json").is_file():
        from dsjax.checkpoints.hf import load_hf_checkpoint

        cfg, variables = load_hf_checkpoint(
            path, dtype=None if dtype is None else jnp.dtype(dtype), keep_fp8=keep_fp8
        )
        tok_dir = path
    else:
        raise ValueError(
            f"{path} is neither a train.py workdir (checkpoints/) nor a Hugging Face "
            "directory (config.json)"
        )
    tokenizer = Tokenizer.load(tok_dir)
    return cfg, variables, tokenizer, _add_bos(tok_dir / "tokenizer_config.json")


def _add_bos(config_file: Path) -> bool:
    """tokenizer_config.json's `add_bos_token` (False when the file or the field is absent)."""
    if not config_file.is_file():
        return False
    config = read_json_object(config_file, "tokenizer config")
    return bool(config.get("add_bos_token", False))
