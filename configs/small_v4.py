"""A small DeepSeek-V4-style model for CPU (docs/spec.md §12): window, CSA and HCA layers, hash and routed
MoE with clamped SwiGLU, 4 mHC streams, YaRN on the compressed layers, MTP depth 1; trained on
the Python standard library's own source like configs/small.py."""

from configs.base import get_base_config
from configs.deepseek_v4_flash import CSA, HCA, SWA, v4_model


def get_config():
    c = get_base_config()
    c.name = "small_v4"
    c.model.update(
        v4_model(
            vocab_size=2048,
            hidden_size=128,
            moe_intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            head_dim=64,
            qk_rope_head_dim=16,
            q_lora_rank=64,
            o_groups=2,
            o_lora_rank=64,
            sliding_window=32,
            layer_types=[SWA, CSA, HCA, CSA],
            compress_rate_csa=4,
            compress_rate_hca=32,
            n_routed_experts=16,
            num_experts_per_tok=2,
            num_hash_layers=1,
            routed_scaling_factor=1.5,
            index_n_heads=4,
            index_head_dim=32,
            index_topk=16,
            rope_factor=4.0,
            rope_original_max_position=64,
            max_position_embeddings=1024,
            dtype="float32",
            param_dtype="float32",
            init_std=0.02,
        )
    )
    c.data.seq_len = 256
    c.data.shuffle_rows = 1024
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.remat = "none"
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.checkpoint.every = 100
    return c
