"""DeepSeek Sparse Attention: analytic FLOPs at V3.2's dimensions, and measured time on this host.

1. Analytic (dsjax.model.layers.indexer.dsa_flops): the attention-core FLOPs of one layer over a causal
   sequence, DSA (top-2048 keys per query, absorbed MLA over the gathered latents) vs dense MLA
   (expanded, as training/prefill runs it; and absorbed, as decode runs it), with the indexer's
   share, at 4K..128K.
2. Measured: one MLA layer's forward (train mode, jitted) with DSA vs dense attention, tiny
   dimensions, batch 1, 8K..64K tokens on the default backend (CPU here). Lengths stop once a
   forward takes longer than --max_seconds.

    nice -n 10 python benchmarks/dsa_bench.py [--lengths 8192,16384,32768,65536] [--topk 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsjax.model.config import ModelConfig  # noqa: E402
from dsjax.model.layers.indexer import dsa_flops  # noqa: E402
from dsjax.model.layers.mla import MLA  # noqa: E402


def analytic_table(lengths: list[int]) -> None:
    cfg = ModelConfig(index_topk=2048, index_n_heads=64, index_head_dim=128)
    print("V3.2 dims (H=128, C=512, dr=64, dn=dv=128; indexer 64x128, top-2048), one layer, fwd")
    print(
        f"{'T':>7} {'dense exp TF':>12} {'dense abs TF':>12} {'DSA core TF':>11} "
        f"{'indexer TF':>10} {'core/dense_exp':>14} {'core/dense_abs':>14} "
        f"{'total/dense_exp':>15} {'indexer share':>13}"
    )
    for T in lengths:
        f = dsa_flops(cfg, T)
        print(
            f"{T:>7} {f['dense_expanded'] / 1e12:>12.2f} {f['dense_absorbed'] / 1e12:>12.2f} "
            f"{f['dsa_core'] / 1e12:>11.2f} {f['indexer'] / 1e12:>10.2f} "
            f"{f['core_vs_dense_expanded']:>14.4f} {f['core_vs_dense_absorbed']:>14.4f} "
            f"{f['total_vs_dense_expanded']:>15.4f} {f['indexer_share_of_total']:>13.3f}"
        )


def tiny_config(topk: int) -> ModelConfig:
    """Tiny MLA with V3.2's proportions: the indexer (2 x 32 per pair) is ~1/10 of dense
    attention's per-pair work (8 heads x (32+16+32))."""
    return ModelConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=1,
        first_k_dense_replace=1,
        n_routed_experts=0,
        intermediate_size=64,
        num_attention_heads=8,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        rope_factor=None,
        max_position_embeddings=1 << 17,
        num_mtp_layers=0,
        dtype="float32",
        param_dtype="float32",
        remat="none",
        attention_impl="chunked",
        attention_chunk=512,
        index_topk=topk,
        index_n_heads=2,
        index_head_dim=32,
    )


def time_layer(cfg: ModelConfig, T: int, repeats: int = 2) -> tuple[float, float]:
    """(compile seconds, best forward seconds) of one MLA layer over [1, T] tokens."""
    mla = MLA(cfg, "train")
    x = jax.random.normal(jax.random.key(0), (1, T, cfg.hidden_size), jnp.float32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    seg = jnp.ones((1, T), jnp.int32)
    params = jax.jit(mla.init)(jax.random.key(1), x[:, :8], pos[:, :8], seg[:, :8])
    fwd = jax.jit(mla.apply)
    t0 = time.perf_counter()
    compiled = fwd.lower(params, x, pos, seg).compile()
    compile_s = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled(params, x, pos, seg).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return compile_s, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384,32768,65536")
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--max_seconds", type=float, default=15.0)
    args = ap.parse_args()
    analytic_table([4096, 8192, 16384, 32768, 65536, 131072])
    print()
    print(f"Measured on {jax.devices()[0].platform}: one MLA layer forward, batch 1, tiny dims, "
          f"DSA top-{args.topk} vs dense (chunked flash, causal chunk skipping)")  # fmt: skip
    print(f"{'T':>7} {'dense s':>9} {'DSA s':>9} {'DSA/dense':>9} {'compile d/s':>12}")
    for T in (int(s) for s in args.lengths.split(",")):
        cd, dense = time_layer(tiny_config(0), T)
        cs, sparse = time_layer(tiny_config(args.topk), T)
        print(f"{T:>7} {dense:>9.3f} {sparse:>9.3f} {sparse / dense:>9.3f} {cd:>5.1f}/{cs:<5.1f}")
        if max(dense, sparse) > args.max_seconds:
            print(f"(stopping: a forward took over {args.max_seconds} s)")
            break


if __name__ == "__main__":
    main()
