"""Building blocks of the DeepSeek-V3 model: norms, RoPE/YaRN, attention, MLA, MoE, SwiGLU.

Every module takes a `ModelConfig` (or plain sizes) and carries logical axis names on its
parameters, so it shards under any mesh whose rules map those names (`dsjax.LOGICAL_RULES`):

    class MyBlock(nn.Module):
        cfg: dsjax.ModelConfig

        @nn.compact
        def __call__(self, x_BTD, positions_BT, segment_ids_BT):
            x_BTD = x_BTD + dsjax.MLA(self.cfg)(x_BTD, positions_BT, segment_ids_BT)
            y_BTD, stats = dsjax.MoE(self.cfg)(x_BTD, segment_ids_BT > 0)
            return x_BTD + y_BTD

Shapes: B batch, T query length, S key length, D hidden, H heads, K/V head dims, R rotary dim,
C latent (kv_lora_rank), E routed experts, k experts per token, N = B*T tokens, M rows sorted by
expert, F expert width.
"""

from dsjax.model.layers.attention import attention, chunked_attention, reference_attention
from dsjax.model.layers.mla import MLA
from dsjax.model.layers.mlp import Linear, SwiGLU
from dsjax.model.layers.moe import MoE, balance_stats, dispatch_combine, grouped_swiglu, route
from dsjax.model.layers.norms import RMSNorm
from dsjax.model.layers.rope import apply_rope, rope_frequencies, yarn_correction_range

__all__ = [
    "MLA",
    "Linear",
    "MoE",
    "RMSNorm",
    "SwiGLU",
    "apply_rope",
    "attention",
    "balance_stats",
    "chunked_attention",
    "dispatch_combine",
    "grouped_swiglu",
    "reference_attention",
    "rope_frequencies",
    "route",
    "yarn_correction_range",
]
