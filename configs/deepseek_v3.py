"""DeepSeek-V3 / R1 671B exactly (docs/spec.md §1), with the V3 pre-training recipe (§9)."""

from configs.base import get_base_config


def get_config():
    c = get_base_config()
    c.name = "deepseek_v3"
    c.model.update(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        rope_theta=10000.0,
        rope_factor=40.0,
        rope_original_max_position=4096,
        rope_beta_fast=32.0,
        rope_beta_slow=1.0,
        rope_mscale=1.0,
        rope_mscale_all_dim=1.0,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        num_mtp_layers=1,
        tie_word_embeddings=False,
        dtype="bfloat16",
        param_dtype="float32",
        init_std=0.006,
    )
    c.data.seq_len = 4096
    c.train.batch_size = 1920  # sequences (V3 ramps 3072 -> 15360; 1920 x 4K = 7.9M tokens)
    c.train.steps = 500_000
    c.train.mtp_weight = 0.3
    c.train.balance_loss_weight = 1e-4
    c.train.bias_update_rate = 1e-3
    c.train.remat = "full"
    c.optim.lr = 2.2e-4
    c.optim.min_lr_ratio = 0.1
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 64
    c.checkpoint.every = 1000
    return c
