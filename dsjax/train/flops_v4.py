"""DeepSeek-V4's model FLOPs per token (docs/spec.md §12), by component, for
`metrics.flops_breakdown` (which dispatches here when `cfg.arch == "v4"`).

2 FLOPs per multiply-add of every matmul a token does with the activated parameters, plus the
attention core over the keys it actually sees, averaged exactly over the T positions of a
sequence from position 0 (t = 0..T-1):

- window: min(t + 1, W) keys; HCA: floor((t + 1) / m') entries; CSA: min(K_I, floor((t + 1) / m))
  entries, each costing QK^T and PV at the shared key = value width d (4 H d per key);
- the CSA lightning indexer scores every visible entry: 2 H_I (c_I + 1) per entry;
- mHC: per block two HyperConnections ([nD] x [(2+n)n] each) and their stream mixes (pre n D,
  post n D, comb n^2 D multiply-adds); the HyperHead [nD] x [n] once.

Softmax, norms, Sinkhorn, the compressors' pooling and routing top-k are not counted.
"""

from __future__ import annotations

import numpy as np

from dsjax.model.config import CSA, HCA, SLIDING, ModelConfig


def _projection_params(cfg: ModelConfig, layer_type: str) -> int:
    """Weights one token multiplies with in a V4 attention layer of `layer_type`: wq_a, wq_b, wkv,
    the grouped wo_a (H d d_g per token), wo_b; CSA / HCA add their compressor (wkv, wgate), CSA
    its indexer (wq_b, weights_proj, its own compressor)."""
    D, H, d, q = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    dg, g = cfg.o_lora_rank, cfg.o_groups
    p = D * q + q * H * d + D * d + H * d * dg + g * dg * D
    if layer_type == CSA:
        HI, cI = cfg.index_n_heads, cfg.index_head_dim
        p += 2 * D * 2 * d + q * HI * cI + D * HI + 2 * D * 2 * cI
    elif layer_type == HCA:
        p += 2 * D * d
    return p


def _mean_keys(cfg: ModelConfig, layer_type: str, seq_len: int) -> tuple[float, float]:
    """(mean keys a query attends to, mean CSA entries the indexer scores) over t = 0..T-1."""
    t1 = np.arange(1, seq_len + 1, dtype=np.float64)  # t + 1
    keys = np.minimum(t1, cfg.sliding_window)
    scored = np.zeros_like(t1)
    if layer_type == HCA:
        keys = keys + np.floor(t1 / cfg.compress_rate_hca)
    elif layer_type == CSA:
        scored = np.floor(t1 / cfg.compress_rate_csa)
        keys = keys + np.minimum(scored, cfg.index_topk)
    return float(keys.mean()), float(scored.mean())


def _core(cfg: ModelConfig, layer_type: str, seq_len: int) -> float:
    keys, scored = _mean_keys(cfg, layer_type, seq_len)
    core = 4.0 * cfg.num_attention_heads * cfg.head_dim * keys
    return core + 2.0 * cfg.index_n_heads * (cfg.index_head_dim + 1) * scored


def _mhc_block(cfg: ModelConfig) -> float:
    n, D = cfg.hc_mult, cfg.hidden_size
    return 2 * (2.0 * n * D * (2 + n) * n + 2.0 * (2 * n * D + n * n * D))


def v4_flops_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of a length-`seq_len` V4 sequence: `attention_proj`,
    `attention_core` (window, compressed entries, indexer), `mhc`, `moe` (router, shared and k
    routed experts, every layer), `dense_mlp` (0), `head` (HyperHead + output projection) and
    `mtp` (each depth: e/h projections, one window-only block, HyperHead, head; weighted by
    (T-k)/T)."""
    D, V, n = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    F, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    moe = 2.0 * (D * E + 3 * D * F * (cfg.n_shared_experts + cfg.num_experts_per_tok))
    head = 2.0 * D * V + 2.0 * n * D * n
    proj = sum(2.0 * _projection_params(cfg, t) for t in cfg.layer_types)
    core = sum(_core(cfg, t, seq_len) for t in cfg.layer_types)
    mtp = 0.0
    for k in range(1, cfg.num_mtp_layers + 1):
        if seq_len - k <= 0:
            break
        block = 2.0 * _projection_params(cfg, SLIDING) + _core(cfg, SLIDING, seq_len - k)
        mtp += (2.0 * D * D * (1 + n) + block + _mhc_block(cfg) + moe + head) * (seq_len - k)
    return {
        "attention_proj": proj,
        "attention_core": core,
        "mhc": len(cfg.layer_types) * _mhc_block(cfg),
        "dense_mlp": 0.0,
        "moe": cfg.num_hidden_layers * moe,
        "head": head,
        "mtp": mtp / seq_len,
    }
