"""Tiny random DeepSeek-V4 models built with HF transformers (torch), for the V4 tests.

Every path is live: window / CSA / HCA layers, hash and top-k routed MoE, mHC, YaRN on the
compressed layers' rope, and the parameters HF initialises to constants (sinks, position biases,
hc base/scale, routing bias, norms) randomised; the hash tables hold real distinct expert ids
(HF initialises them to zeros). Nothing here imports dsjax.checkpoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
TINY: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=1, head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2,
    o_lora_rank=16, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
    swiglu_limit=10.0, layer_types=[SWA, CSA, HCA, CSA], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    compress_rates={CSA: 4, HCA: 8}, sliding_window=8, index_n_heads=8, index_head_dim=16,
    index_topk=2, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
    rope_theta=10000.0, compress_rope_theta=160000.0, max_position_embeddings=256,
    # YaRN on the compressed layers: rope dim 8, L0 16 -> 1 of 4 frequencies kept, 3 scaled.
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16,
                     "beta_fast": 32, "beta_slow": 1},
    num_nextn_predict_layers=0, tie_word_embeddings=False, attn_implementation="eager",
)  # fmt: skip
# > window, >= 2 HCA windows, > top-k CSA entries, a multiple of neither rate.
SEQ = 37


def tiny_hf_model(seed: int = 0, **overrides: Any) -> DeepseekV4ForCausalLM:
    """A float32 eval-mode HF V4 model with every constant-initialised tensor randomised."""
    cfg = DeepseekV4Config(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("tid2eid"):
                ids = [torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                       for _ in range(cfg.vocab_size)]  # fmt: skip
                p.copy_(torch.stack(ids))
            elif "inv_freq" in name:
                continue
            elif name.endswith(("sinks", "position_bias", ".base", "hc_base", "correction_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("scale", "hc_scale")) or "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def token_ids(batch: int = 2, seq: int = SEQ, vocab: int = 128, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits_checked(model: DeepseekV4ForCausalLM, ids: torch.Tensor) -> np.ndarray | None:
    """HF logits, or None when some CSA query's top-k choice is a tie (the indexer's ReLU makes
    exact zeros; a tie at the top-k boundary has no unique answer to compare)."""
    scores: list[torch.Tensor] = []
    original = hf_v4.DeepseekV4IndexerScorer.forward

    def record(self, q, kv, h):
        out = original(self, q, kv, h)
        scores.append(out.detach())
        return out

    hf_v4.DeepseekV4IndexerScorer.forward = record
    try:
        with torch.no_grad():
            logits = model(ids).logits.numpy()
    finally:
        hf_v4.DeepseekV4IndexerScorer.forward = original
    k, m = model.config.index_topk, model.config.compress_rates[CSA]
    for s in scores:  # [B, S, N]
        for t in range(s.shape[1]):
            visible = np.sort(s[:, t, : (t + 1) // m].numpy(), axis=-1)[:, ::-1]
            if visible.shape[1] > k:
                if not (visible[:, k - 1] - visible[:, k] > 1e-6).all():
                    return None
    return logits


def tie_free_model(ids: torch.Tensor, **overrides: Any):
    """(model, logits) for the first seed whose indexer choices have no ties on `ids`."""
    for seed in range(50):
        model = tiny_hf_model(seed, **overrides)
        logits = hf_logits_checked(model, ids)
        if logits is not None:
            return model, logits
    raise AssertionError("no tie-free seed among 50")
