"""A tiny DeepSeek-V4-style model for tests: every V4 path on, seconds per step on one core."""

from configs.deepseek_v4_flash import CSA, HCA, SWA
from configs.small_v4 import get_config as small_v4


def get_config():
    c = small_v4()
    c.name = "tiny_v4"
    c.model.update(
        vocab_size=512,
        hidden_size=64,
        moe_intermediate_size=32,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_lora_rank=16,
        sliding_window=8,
        layer_types=[SWA, CSA, HCA, CSA],
        compress_rate_hca=8,
        n_routed_experts=8,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=4,
        rope_original_max_position=16,
    )
    c.data.seq_len = 32
    c.data.max_documents = 300
    c.data.tokenizer_train_bytes = 1_000_000
    c.train.steps = 40
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.eval_batches = 2
    c.train.sample_tokens = 0
    c.optim.warmup_steps = 5
    c.checkpoint.every = 20
    return c
