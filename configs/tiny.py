"""A tiny model for tests: every feature on, seconds per step on one CPU core."""

from configs.base import get_base_config


def get_config():
    c = get_base_config()
    c.name = "tiny"
    c.model.update(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        rope_theta=10000.0,
        rope_factor=4.0,
        rope_original_max_position=32,
        rope_mscale=1.0,
        rope_mscale_all_dim=1.0,
        max_position_embeddings=512,
        num_mtp_layers=1,
        dtype="float32",
        param_dtype="float32",
        init_std=0.02,
    )
    c.data.seq_len = 64
    c.data.max_documents = 300
    c.data.tokenizer_train_bytes = 1_000_000
    c.train.steps = 40
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.eval_batches = 2
    c.train.sample_tokens = 16
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.checkpoint.every = 20
    return c
