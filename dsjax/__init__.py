"""dsjax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax.

Public API (re-exports only; importing dsjax loads jax and flax, not the server, torch or plots):

    import dsjax
    cfg, variables = dsjax.load_hf_checkpoint("path/to/hf_dir", dtype=jnp.float32)
    out = dsjax.Transformer(cfg).apply(variables, tokens_BT)   # out.logits [B,T,V], out.mtp_logits
    result = dsjax.generate(cfg, variables, prompts, max_new_tokens=32)

- Whole model: `ModelConfig`, `Transformer`, `ModelOutput`, `MTPModule`, `Block`,
  `init_variables`, `abstract_variables`, `count_params`, `init_cache`.
- Layers (usable inside your own Flax modules; see `dsjax.model.layers`): `MLA`, `MoE`, `route`,
  `grouped_swiglu`, `dispatch_combine`, `balance_stats`, `SwiGLU`, `Linear`, `RMSNorm`,
  `apply_rope`, `rope_frequencies`, `yarn_correction_range`, `attention`.
- Sharding: `LOGICAL_RULES` (logical axis name -> mesh axes), `make_mesh`,
  `logical_to_sharding`, `rules_for_mesh` (the rules for a mesh with only some of the axes).
- Checkpoints and generation: `load_hf_checkpoint`, `save_hf_checkpoint`, `generate`,
  `GenerateResult`, `SamplingParams`; the decode core (`prefill`, `step`, `DecodeState`) is the
  `dsjax.decode` module.
"""

from dsjax import _aliases

_aliases.install()  # old flat module paths (dsjax.hf, dsjax.layers, ...) for one release

from dsjax.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from dsjax.inference import decode  # noqa: E402
from dsjax.inference.generate import GenerateResult, generate  # noqa: E402
from dsjax.inference.sampling import SamplingParams  # noqa: E402
from dsjax.model.config import ModelConfig  # noqa: E402
from dsjax.model.layers import (  # noqa: E402
    MLA,
    Linear,
    MoE,
    RMSNorm,
    SwiGLU,
    apply_rope,
    attention,
    balance_stats,
    dispatch_combine,
    grouped_swiglu,
    rope_frequencies,
    route,
    yarn_correction_range,
)
from dsjax.model.sharding import (  # noqa: E402
    LOGICAL_RULES,
    logical_to_sharding,
    make_mesh,
    rules_for_mesh,
)
from dsjax.model.transformer import (  # noqa: E402
    Block,
    ModelOutput,
    MTPModule,
    Transformer,
    abstract_variables,
    count_params,
    init_cache,
    init_variables,
)

__version__ = "0.3.0"

__all__ = [
    "LOGICAL_RULES",
    "MLA",
    "Block",
    "GenerateResult",
    "Linear",
    "MTPModule",
    "ModelConfig",
    "ModelOutput",
    "MoE",
    "RMSNorm",
    "SamplingParams",
    "SwiGLU",
    "Transformer",
    "abstract_variables",
    "apply_rope",
    "attention",
    "balance_stats",
    "count_params",
    "decode",
    "dispatch_combine",
    "generate",
    "grouped_swiglu",
    "init_cache",
    "init_variables",
    "load_hf_checkpoint",
    "logical_to_sharding",
    "make_mesh",
    "rope_frequencies",
    "route",
    "rules_for_mesh",
    "save_hf_checkpoint",
    "yarn_correction_range",
]
