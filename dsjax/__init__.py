"""dsjax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax.

Public API (re-exports only):

    import dsjax
    cfg, variables = dsjax.load_hf_checkpoint("path/to/hf_dir", dtype=jnp.float32)
    out = dsjax.Transformer(cfg).apply(variables, tokens_BT)   # out.logits, out.mtp_logits
"""

from dsjax.config import ModelConfig
from dsjax.generate import GenerateResult, generate
from dsjax.hf import load_hf_checkpoint, save_hf_checkpoint
from dsjax.model import (
    ModelOutput,
    Transformer,
    abstract_variables,
    count_params,
    init_cache,
    init_variables,
)
from dsjax.sharding import LOGICAL_RULES, make_mesh

__all__ = [
    "GenerateResult",
    "LOGICAL_RULES",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "abstract_variables",
    "count_params",
    "generate",
    "init_cache",
    "init_variables",
    "load_hf_checkpoint",
    "make_mesh",
    "save_hf_checkpoint",
]
