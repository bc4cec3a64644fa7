"""DeepSeek-V4-Pro (1.6T total, 49B activated) exactly as released (its config.json; docs/spec.md §12)."""

from configs.base import get_base_config
from configs.deepseek_v4_flash import CSA, HCA, v4_model, v4_training


def get_config():
    c = get_base_config()
    c.model.update(
        v4_model(
            hidden_size=7168,
            moe_intermediate_size=3072,
            num_hidden_layers=61,
            num_attention_heads=128,
            q_lora_rank=1536,
            o_groups=16,
            n_routed_experts=384,
            routed_scaling_factor=2.5,
            index_topk=1024,
            # 2 HCA layers, then CSA (even) / HCA (odd); the MTP layer is window-only.
            layer_types=[HCA, HCA] + [CSA if i % 2 == 0 else HCA for i in range(2, 61)],
        )
    )
    return v4_training(c, "deepseek_v4_pro")
