"""Hugging Face Hub ids (`org/name`, optionally `org/name@revision`) as checkpoint directories.

`resolve_checkpoint` returns a local directory: the path itself when it exists, else the Hub
snapshot of the id through `huggingface_hub` (the model files only: configs, safetensors,
tokenizer). With `HF_HUB_OFFLINE=1` nothing is fetched: the id must be in the local cache
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub). Failures are one-line
`ValueError`s saying what was looked for and where.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["HUB_PATTERNS", "is_hub_id", "resolve_checkpoint"]

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}(@[\w./-]{1,128})?")
_TRUE = ("1", "true", "yes", "on")


def is_hub_id(spec: str) -> bool:
    """Whether `spec` has the shape of a Hub model id (`org/name[@revision]`)."""
    return _HUB_ID.fullmatch(spec) is not None and ".." not in spec


def _cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A local checkpoint directory for `spec`: an existing path, or a Hub id's snapshot.

    Raises:
      ValueError: `spec` is neither an existing path nor a Hub id, or the id cannot be had
        (offline and not cached, unknown repository or revision, no network).
    """
    path = Path(spec)
    if path.exists() or not is_hub_id(str(spec)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = str(spec).partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
    cache = _cache_dir()
    try:
        local = snapshot_download(
            repo,
            revision=revision or None,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=HUB_PATTERNS,
        )
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ValueError(
            f"checkpoint '{spec}' is not a local path, and the Hugging Face cache ({cache}) "
            f"does not hold it ({why})"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint '{spec}' is not on the Hugging Face Hub: {first}") from None
    except OSError as err:  # network failures (httpx / requests errors are OSErrors here too)
        raise ValueError(f"checkpoint '{spec}': the Hub download failed: {err}") from None
    return Path(str(local))
