"""The routed experts' grouped SwiGLU (forward + backward) on the present backend, per impl.

    python benchmarks/grouped_matmul_bench.py [--tokens=16384 --experts=24 --topk=4 \
        --hidden=2048 --ffn=1408 --dtype=bfloat16] [--impls=ragged_dot,tiled:128,tiled:512]

For each implementation of `dsjax.model.layers.moe.grouped_swiglu` (`ragged_dot`: `jax.lax.ragged_dot`;
`tiled:T`: groups padded to tiles of T rows and batched matmuls) prints the compiler's temporary
bytes (`memory_analysis`), the median time of a jitted forward+backward over 10 runs, and the
achieved TFLOP/s of the 3 GEMMs x 3 (forward, input and weight gradients). Rows are routed by a
random top-k, so groups are uneven as in training.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax.model.layers.moe import grouped_swiglu  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=24)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impls", default="ragged_dot,tiled:128,tiled:512")
    p.add_argument(
        "--extra", default="", help="extra keyword=value for grouped_swiglu (e.g. fp8=1)"
    )
    a = p.parse_args()
    dt = jnp.dtype(a.dtype)
    M, E, D, F = a.tokens * a.topk, a.experts, a.hidden, a.ffn
    rng = np.random.default_rng(0)
    expert_ids = np.stack([rng.choice(E, a.topk, replace=False) for _ in range(a.tokens)]).ravel()
    sizes = jnp.asarray(np.bincount(expert_ids, minlength=E), jnp.int32)
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (M, D), dt)
    wg = jax.random.normal(k[1], (E, D, F), jnp.float32) * 0.02
    wu = jax.random.normal(k[2], (E, D, F), jnp.float32) * 0.02
    wd = jax.random.normal(k[3], (E, F, D), jnp.float32) * 0.02
    extra = dict(kv.split("=") for kv in a.extra.split(",") if kv)
    extra = {key: int(v) if v.isdigit() else v for key, v in extra.items()}
    flops = 3 * 2 * M * D * F * 3
    print(
        f"jax {jax.__version__} {jax.devices()[0].device_kind}: M={M} rows, E={E}, D={D}, F={F}, {a.dtype}"
    )
    print(f"{'impl':14s} {'temp GiB':>9s} {'ms fwd+bwd':>11s} {'TFLOP/s':>8s}")
    for spec in a.impls.split(","):
        impl, _, tile = spec.partition(":")
        tile = int(tile or 128)

        def loss(x, wg, wu, wd, impl=impl, tile=tile):
            y = grouped_swiglu(
                x, sizes, wg.astype(dt), wu.astype(dt), wd.astype(dt), impl=impl, tile=tile, **extra
            )
            return jnp.sum(y.astype(jnp.float32) ** 2)

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        try:
            compiled = fn.lower(x, wg, wu, wd).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
            jax.block_until_ready(compiled(x, wg, wu, wd))
            times = []
            for _ in range(10):
                t = time.perf_counter()
                jax.block_until_ready(compiled(x, wg, wu, wd))
                times.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - report every impl
            print(f"{spec:14s} error: {str(e).splitlines()[0][:100]}")
            continue
        t = float(np.median(times))
        print(f"{spec:14s} {temp:9.2f} {t * 1e3:11.2f} {flops / t / 1e12:8.1f}")


if __name__ == "__main__":
    main()
