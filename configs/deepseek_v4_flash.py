"""DeepSeek-V4-Flash (284B total, 13B activated) exactly as released (its config.json; docs/spec.md §12).
Training settings follow the V3 recipe (V4's own optimizer, Muon, is not implemented)."""

from configs.base import get_base_config

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def v4_model(**fields):
    """The fields every released V4 model shares, updated with `fields`."""
    base = dict(
        arch="v4",
        vocab_size=129280,
        first_k_dense_replace=0,
        intermediate_size=0,
        head_dim=512,
        qk_rope_head_dim=64,
        sliding_window=128,
        o_lora_rank=1024,
        n_shared_experts=1,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        scoring_func="sqrtsoftplus",
        topk_method="noaux_tc",
        num_hash_layers=3,
        swiglu_limit=10.0,
        index_n_heads=64,
        index_head_dim=128,
        hc_mult=4,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_factor=16.0,
        rope_original_max_position=65536,
        rope_beta_fast=32.0,
        rope_beta_slow=1.0,
        rope_mscale=None,
        rope_mscale_all_dim=None,
        compress_rate_csa=4,
        compress_rate_hca=128,
        max_position_embeddings=1048576,
        rms_norm_eps=1e-6,
        num_mtp_layers=1,
        tie_word_embeddings=False,
        dtype="bfloat16",
        param_dtype="float32",
        init_std=0.006,
    )
    base.update(fields)
    return base


def v4_training(c, name: str):
    c.name = name
    c.data.seq_len = 4096
    c.train.batch_size = 1920
    c.train.steps = 500_000
    c.train.mtp_weight = 0.3
    c.train.balance_loss_weight = 1e-4
    c.train.bias_update_rate = 1e-3
    c.train.remat = "full"
    c.optim.lr = 2.2e-4
    c.optim.warmup_steps = 2000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 64
    c.checkpoint.every = 1000
    return c


def get_config():
    c = get_base_config()
    c.model.update(
        v4_model(
            hidden_size=4096,
            moe_intermediate_size=2048,
            num_hidden_layers=43,
            num_attention_heads=64,
            q_lora_rank=1024,
            o_groups=8,
            n_routed_experts=256,
            routed_scaling_factor=1.5,
            index_topk=512,
            # 2 window-only layers, then CSA (even) / HCA (odd); the MTP layer is window-only.
            layer_types=[SWA, SWA] + [CSA if i % 2 == 0 else HCA for i in range(2, 43)],
        )
    )
    return v4_training(c, "deepseek_v4_flash")
