"""The model: `ModelConfig`, the Flax layers, the `Transformer` (blocks, stacks, MTP), FP8 and
kernels, and the one logical-axis rule table (`sharding`). Nothing here knows about training,
checkpoints or serving."""

from dsjax.model.config import ModelConfig
from dsjax.model.transformer import (
    Block,
    ModelOutput,
    MTPModule,
    Transformer,
    abstract_variables,
    count_params,
    init_cache,
    init_variables,
)

__all__ = [
    "Block",
    "MTPModule",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "abstract_variables",
    "count_params",
    "init_cache",
    "init_variables",
]
