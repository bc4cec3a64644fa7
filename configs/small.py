"""The CPU default: a small DeepSeek-V3-style MoE with every feature on (q LoRA, YaRN, a dense
layer then MoE layers with grouped routing and a shared expert, MTP depth 1), trained on the Python
standard library's own source. About 12 minutes on 2 CPU cores (measured: benchmarks/RESULTS.md)."""

from configs.base import get_base_config


def get_config():
    c = get_base_config()
    c.name = "small"
    c.model.update(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        rope_theta=10000.0,
        rope_factor=4.0,
        rope_original_max_position=64,
        rope_mscale=1.0,
        rope_mscale_all_dim=1.0,
        max_position_embeddings=1024,
        num_mtp_layers=1,
        dtype="float32",
        param_dtype="float32",
        init_std=0.02,
        scan_unroll=4,  # straight-line layers: no [L, ...] activation stacks (faster on CPU)
    )
    c.data.seq_len = 256
    c.data.shuffle_rows = 1024  # ~262K tokens: a long stdlib file no longer fills many batches
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.remat = "none"
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.checkpoint.every = 100
    return c
