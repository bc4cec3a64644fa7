"""DeepSeek-V2-Lite 16B exactly (docs/spec.md §1): plain q projection, softmax greedy routing."""

from configs.base import get_base_config


def get_config():
    c = get_base_config()
    c.name = "deepseek_v2_lite"
    c.model.update(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        scoring_func="softmax",
        topk_method="greedy",
        rope_theta=10000.0,
        rope_factor=40.0,
        rope_original_max_position=4096,
        rope_beta_fast=32.0,
        rope_beta_slow=1.0,
        rope_mscale=0.707,
        rope_mscale_all_dim=0.707,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        num_mtp_layers=0,
        tie_word_embeddings=False,
        dtype="bfloat16",
        param_dtype="float32",
        init_std=0.006,
    )
    c.data.seq_len = 4096
    c.train.batch_size = 256
    c.optim.lr = 4.2e-4
    c.optim.warmup_steps = 2000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 8
    return c
