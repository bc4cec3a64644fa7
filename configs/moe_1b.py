"""A ~1B-activated DeepSeek-V3-style MoE for one GPU (H100/H200) or a small TPU slice: MLA with q
LoRA, 1 dense + 15 MoE layers (24 routed experts top-4, 2 shared, grouped routing), MTP depth 1.
3.7 B parameters (1.06 B activated, 0.24 B MTP); with fp32 master weights, bf16 AdamW moments and
full remat the state is ~48 GB. Used for the GPU step-time and FP8-vs-BF16 figures
(benchmarks/train_step_bench.py --config=configs/moe_1b.py)."""

from configs.base import get_base_config


def get_config():
    c = get_base_config()
    c.name = "moe_1b"
    c.model.update(
        vocab_size=32768,
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=1408,
        num_hidden_layers=16,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=768,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=24,
        n_shared_experts=2,
        num_experts_per_tok=4,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        rope_factor=None,
        max_position_embeddings=8192,
        num_mtp_layers=1,
        dtype="bfloat16",
        param_dtype="float32",
    )
    c.data.seq_len = 2048
    c.train.batch_size = 8
    c.train.remat = "full"
    c.optim.moment_dtype = "bfloat16"
    c.optim.lr = 3e-4
    return c
