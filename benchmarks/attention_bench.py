"""Attention kernels on the backend present: reference / chunked (every chunk pair) / chunked with
causal chunk skipping / cuDNN (NVIDIA GPU only) / splash (Pallas TPU; elsewhere only with
--splash-interpret, Pallas' interpreter: a correctness check, its times mean nothing), forward and
forward+backward.

Shapes follow V3's expanded MLA path: q/k head dim 192, v head dim 128, G = heads key/value heads,
one query head each, causal. Prints one row per (T, impl, pass): median seconds, useful TFLOP/s
(causal FLOPs: T(T+1)/2 query-key pairs; forward+backward counted as 3.5x forward), computed
chunk pairs, and the max abs error of the forward output against the reference where the
reference's [B, H, T, T] float32 logits fit in --ref-max-gib.

  python benchmarks/attention_bench.py                                   # CPU defaults
  python benchmarks/attention_bench.py --lengths 1024,2048,4096,8192,16384,32768 --heads 128 \\
      --ref-max-gib 16                                                   # H100
  python benchmarks/attention_bench.py --impls chunked_skip,splash --heads 128 \
      --lengths 4096,8192,16384,32768,65536                              # TPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsjax.model.kernels import splash  # noqa: E402
from dsjax.model.layers.attention import (  # noqa: E402
    chunk_schedule,
    chunked_attention,
    cudnn_attention,
    cudnn_unusable_reason,
    reference_attention,
)


def _impl_fn(name, chunk, scale):
    def idx_kw(q, k):
        B, T, S = q.shape[0], q.shape[1], k.shape[1]
        return dict(
            q_idx_BT=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
            k_idx_BS=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
            scale=scale,
        )

    if name == "reference":
        return lambda q, k, v: reference_attention(q, k, v, **idx_kw(q, k))
    if name == "chunked":
        return lambda q, k, v: chunked_attention(q, k, v, chunk=chunk, skip=False, **idx_kw(q, k))
    if name == "chunked_skip":
        return lambda q, k, v: chunked_attention(q, k, v, chunk=chunk, skip=True, **idx_kw(q, k))
    if name == "cudnn":
        return lambda q, k, v: cudnn_attention(q, k, v, scale=scale)
    if name == "splash":
        return lambda q, k, v: splash.splash_attention(q, k, v, scale=scale)
    raise ValueError(f"unknown impl {name!r}")


def _time(fn, args, iters):
    out = fn(*args)
    jax.block_until_ready(out)  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--impls", default="reference,chunked,chunked_skip,cudnn,splash")
    ap.add_argument(
        "--splash-interpret",
        action="store_true",
        help="run splash off TPU in Pallas' interpreter (slow; checks values only)",
    )
    ap.add_argument("--passes", default="fwd,fwdbwd")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--qk-dim", type=int, default=192)
    ap.add_argument("--v-dim", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--ref-max-gib", type=float, default=2.0)
    args = ap.parse_args()

    dtype = jnp.dtype(args.dtype)
    B, H, K, V = args.batch, args.heads, args.qk_dim, args.v_dim
    scale = K**-0.5
    dev = jax.devices()[0]
    print(
        f"backend={jax.default_backend()} device={dev.device_kind} B={B} heads={H} "
        f"qk={K} v={V} dtype={dtype.name} chunk={args.chunk}"
    )
    header = (
        f"{'T':>6} {'impl':>13} {'pass':>6} {'seconds':>10} {'TFLOP/s':>8} "
        f"{'pairs':>9} {'max|err|':>9}"
    )
    print(header)
    print("-" * len(header))
    for T in [int(t) for t in args.lengths.split(",")]:
        rng = np.random.default_rng(T)
        q = jnp.asarray(rng.standard_normal((B, T, H, 1, K)), dtype)
        k = jnp.asarray(rng.standard_normal((B, T, H, K)), dtype)
        v = jnp.asarray(rng.standard_normal((B, T, H, V)), dtype)
        dout = jnp.asarray(rng.standard_normal((B, T, H, 1, V)), dtype)
        causal_flops = 2.0 * B * H * (T * (T + 1) / 2) * (K + V)
        ref_fits = B * H * T * T * 4 * 3 / 2**30 <= args.ref_max_gib
        idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, T))
        n_chunks = -(-T // min(args.chunk, T))
        ref_out = None
        for name in args.impls.split(","):
            if name == "reference" and not ref_fits:
                print(f"{T:>6} {name:>13}   (skipped: logits exceed --ref-max-gib)")
                continue
            if name == "cudnn":
                why = cudnn_unusable_reason(q, k, v, causal=True)
                if why:
                    print(f"{T:>6} {name:>13}   (skipped: {why})")
                    continue
            if name == "splash" and splash.target_platform() != "tpu" and not args.splash_interpret:
                print(
                    f"{T:>6} {name:>13}   (skipped: not a TPU; --splash-interpret to check values)"
                )
                continue
            pairs = {
                "chunked": n_chunks**2,
                "chunked_skip": int(chunk_schedule(idx, idx, chunk=args.chunk).sum()),
            }.get(name, "-")
            f = _impl_fn(name, args.chunk, scale)
            for p in args.passes.split(","):
                if p == "fwd":
                    fn, flops = jax.jit(f), causal_flops
                else:

                    def loss(q, k, v, f=f, dout=dout):
                        return jnp.vdot(f(q, k, v).astype(jnp.float32), dout.astype(jnp.float32))

                    fn, flops = jax.jit(jax.grad(loss, argnums=(0, 1, 2))), 3.5 * causal_flops
                try:
                    sec, out = _time(fn, (q, k, v), args.iters)
                except Exception as e:  # noqa: BLE001  (report, keep benchmarking)
                    print(f"{T:>6} {name:>13} {p:>6}   failed: {type(e).__name__}: {e}"[:200])
                    continue
                err = "-"
                if p == "fwd":
                    out = np.asarray(out.astype(jnp.float32))
                    if name == "reference":
                        ref_out = out
                    elif ref_out is not None:
                        err = f"{np.abs(out - ref_out).max():.2e}"
                print(
                    f"{T:>6} {name:>13} {p:>6} {sec:>10.4f} {flops / sec / 1e12:>8.3f} "
                    f"{pairs!s:>9} {err:>9}"
                )
                del out


if __name__ == "__main__":
    main()
