"""FP8 GEMM probe: which FP8 dot patterns XLA lowers to native FP8 GEMMs, and how fast they run.

    python benchmarks/fp8_gemm_bench.py [--m=8192 --k=7168 --n=2048] [--only=bf16,pallas_block,...]
        [--bm=128 --bn=64 --bk=128 --warps=4 --stages=4 --group_m=16 --b_kn]
        [--sweep='bm:bn:bk:warps:stages:t;...' --sweep_per_column=...]  (t=1: w read K-major)

For each variant: the GEMM custom calls in the optimized HLO (cuBLASLt FP8 shows as
`__cublas$lt$matmul$f8`), the median time over 20 runs after warm-up, TFLOP/s, and the relative
error against a float32 dot of the unquantized inputs and against the recipe's exact result
(`block_scaled_matmul_reference` on the quantised operands). `pallas_block` is dsjax's Pallas
kernel (quantisation included, like the other block variants); `pallas_block_gemm` and
`reference_gemm` time the GEMM alone on pre-quantised operands. Run on a GPU (H100/H200); on CPU
it runs (the kernel in the Pallas interpreter; use tiny --m/--k/--n) but timings mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _load_kernel_module():
    """dsjax/model/kernels/fp8_gemm.py by path: it needs only jax, so the probe runs where flax is absent."""
    path = Path(__file__).resolve().parents[1] / "dsjax" / "kernels" / "fp8_gemm.py"
    spec = importlib.util.spec_from_file_location("dsjax_fp8_gemm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fp8_gemm = _load_kernel_module()

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0


def quant_rows(x_MK, tile=128):
    """1 x tile scaling along K: q [M,K] e4m3, s [M, K/tile] f32."""
    M, K = x_MK.shape
    xt = x_MK.astype(jnp.float32).reshape(M, K // tile, tile)
    s = jnp.maximum(jnp.abs(xt).max(-1), 1e-12) / E4M3_MAX
    return (xt / s[..., None]).astype(E4M3).reshape(M, K), s


def quant_blocks(w_KN, tile=128):
    """tile x tile scaling: q [K,N] e4m3, s [K/tile, N/tile] f32."""
    K, N = w_KN.shape
    wt = w_KN.astype(jnp.float32).reshape(K // tile, tile, N // tile, tile)
    s = jnp.maximum(jnp.abs(wt).max((1, 3)), 1e-12) / E4M3_MAX
    return (wt / s[:, None, :, None]).astype(E4M3).reshape(K, N), s


def v_bf16(a, w):
    return jnp.dot(
        a.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )


def v_fp8_unscaled(a, w):
    return jnp.dot(a.astype(E4M3), w.astype(E4M3), preferred_element_type=jnp.float32)


def v_fp8_tensor_scaled(a, w):
    sa = jnp.abs(a).max() / E4M3_MAX
    sw = jnp.abs(w).max() / E4M3_MAX
    a8 = (a / sa).astype(E4M3)
    w8 = (w / sw).astype(E4M3)
    y = jnp.dot(
        a8.astype(jnp.bfloat16) * sa.astype(jnp.bfloat16),
        w8.astype(jnp.bfloat16) * sw.astype(jnp.bfloat16),
        preferred_element_type=jnp.float32,
    )
    return y


def v_block_dequant_bf16(a, w):
    a8, sa = quant_rows(a)
    w8, sw = quant_blocks(w)
    M, K = a.shape
    N = w.shape[1]
    ad = (a8.astype(jnp.float32).reshape(M, K // 128, 128) * sa[..., None]).reshape(M, K)
    wd = (
        w8.astype(jnp.float32).reshape(K // 128, 128, N // 128, 128) * sw[:, None, :, None]
    ).reshape(K, N)
    return jnp.dot(
        ad.astype(jnp.bfloat16), wd.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )


def v_block_kbatched(a, w):
    """Native FP8 per K block: [Kb, M, N] partial products, scaled and summed (memory heavy)."""
    a8, sa = quant_rows(a)
    w8, sw = quant_blocks(w)
    M, K = a.shape
    N = w.shape[1]
    Kb = K // 128
    a3 = a8.reshape(M, Kb, 128).transpose(1, 0, 2)
    w3 = w8.reshape(Kb, 128, N)
    part = jax.lax.dot_general(
        a3, w3, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32
    )
    scale = sa.T[:, :, None] * jnp.repeat(sw, 128, axis=1)[:, None, :]
    return (part * scale).sum(0)


def v_block_kscan(a, w):
    """Native FP8 per K block, accumulated in a scan (DeepGEMM's promotion, as separate GEMMs)."""
    a8, sa = quant_rows(a)
    w8, sw = quant_blocks(w)
    M, K = a.shape
    N = w.shape[1]
    Kb = K // 128
    a3 = a8.reshape(M, Kb, 128).transpose(1, 0, 2)
    w3 = w8.reshape(Kb, 128, N)
    swn = jnp.repeat(sw, 128, axis=1)

    def body(acc, xs):
        ak, wk, sak, swk = xs
        p = jnp.dot(ak, wk, preferred_element_type=jnp.float32)
        return acc + p * sak[:, None] * swk[None, :], None

    acc, _ = jax.lax.scan(body, jnp.zeros((M, N), jnp.float32), (a3, w3, sa.T, swn))
    return acc


# Block sizes etc. of the Pallas kernel, set from the command line in main().
PALLAS_KW: dict = {}


def v_pallas_block(a, w):
    """Quantise (1x128 / 128x128) + the Pallas block-scaled FP8 kernel (interpreted off-GPU)."""
    a8, sa = quant_rows(a)
    w8, sw = quant_blocks(w)
    return fp8_gemm.block_scaled_matmul(
        a8, sa, w8, sw, interpret=not fp8_gemm.supported(), **PALLAS_KW
    )


# Variants timed on pre-quantised operands (a8, sa, w8, sw): the GEMM alone.
GEMM_ONLY = {
    "pallas_block_gemm": lambda a8, sa, w8, sw: fp8_gemm.block_scaled_matmul(
        a8, sa, w8, sw, interpret=not fp8_gemm.supported(), **PALLAS_KW
    ),
    "reference_gemm": fp8_gemm.block_scaled_matmul_reference,
}

VARIANTS = {
    "bf16": v_bf16,
    "fp8_unscaled": v_fp8_unscaled,
    "fp8_tensor_scaled": v_fp8_tensor_scaled,
    "block_dequant_bf16": v_block_dequant_bf16,
    "block_kscan": v_block_kscan,
    "block_kbatched": v_block_kbatched,
    "pallas_block": v_pallas_block,
}


def gemm_calls(compiled_text: str) -> str:
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled_text)))
    keep = ("matmul", "gemm", "dot", "triton")
    return ",".join(c for c in calls if any(k in c for k in keep)) or "(fused/none)"


def bench(fn, args, reps=20):
    out = fn(*args)
    out.block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--k", type=int, default=7168)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--only", default="", help="comma list of variants (see VARIANTS, GEMM_ONLY)")
    p.add_argument("--bm", type=int, default=128)
    p.add_argument("--bn", type=int, default=64)
    p.add_argument("--bk", type=int, default=128)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--group_m", type=int, default=16)
    p.add_argument(
        "--b_kn", action="store_true", help="kernel reads w as [K,N] (default: K-major [N,K])"
    )
    p.add_argument(
        "--sweep", default="", help="kernel configs 'bm:bn:bk:warps:stages:t;...' to time"
    )
    p.add_argument("--sweep_per_column", default="", help="as --sweep, with s_b given per column")
    a = p.parse_args()
    PALLAS_KW.update(
        block_m=a.bm,
        block_n=a.bn,
        block_k=a.bk,
        num_warps=a.warps,
        num_stages=a.stages,
        b_k_major=not a.b_kn,
        group_m=a.group_m,
    )
    print(f"pallas kernel: {PALLAS_KW} native={fp8_gemm.supported()}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; M={a.m} K={a.k} N={a.n}")
    ka, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(ka, (a.m, a.k), jnp.float32)
    w = jax.random.normal(kw, (a.k, a.n), jnp.float32) * 0.02
    ref = np.asarray(jnp.dot(x, w, precision="highest"), np.float64)
    flops = 2 * a.m * a.k * a.n
    q = jax.jit(lambda x, w: (*quant_rows(x), *quant_blocks(w)))(x, w)
    qargs = (q[0], q[1], q[2], q[3])  # a8, sa, w8, sw
    # The recipe's exact result on the quantised operands: what a correct kernel must reproduce.
    qref = np.asarray(jax.jit(fp8_gemm.block_scaled_matmul_reference)(*qargs), np.float64)
    rows = []
    table = [(n, f, (x, w)) for n, f in VARIANTS.items()] + [
        (n, f, qargs) for n, f in GEMM_ONLY.items()
    ]
    for name, fn, args in table:
        if a.only and name not in a.only.split(","):
            continue
        jf = jax.jit(fn)
        try:
            text = jf.lower(*args).compile().as_text()
            t, out = bench(jf, args, reps=20 if fp8_gemm.supported() or "pallas" not in name else 2)
        except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
            rows.append((name, "error", str(e).splitlines()[0][:80], 0, 0, 0))
            continue
        out = np.asarray(out, np.float64)
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        qerr = np.linalg.norm(out - qref) / np.linalg.norm(qref)
        rows.append((name, gemm_calls(text), f"{t * 1e3:.3f} ms", flops / t / 1e12, err, qerr))
    print(
        f"{'variant':22s} {'gemm calls':44s} {'time':>12s} {'TFLOP/s':>8s} {'rel err':>9s} {'vs recipe':>9s}"
    )
    print(
        "(rel err: vs f32 dot of unquantised inputs; vs recipe: vs block_scaled_matmul_reference"
        " on the 1x128/128x128-quantised operands)"
    )
    for r in rows:
        print(f"{r[0]:22s} {r[1]:44s} {r[2]:>12s} {r[3]:8.1f} {r[4]:9.2e} {r[5]:9.2e}")
    if a.sweep:
        sweep(a.sweep, qargs, qref, flops)
    if a.sweep_per_column:  # s_b as 128x1 tiles [K/128, N] (the weight-gradient GEMM's layout)
        print("s_b per column [K/128, N]:")
        sweep(a.sweep_per_column, (*qargs[:3], jnp.repeat(qargs[3], 128, axis=1)), qref, flops)


def sweep(spec: str, qargs, qref, flops):
    """Time the kernel over block configs 'bm:bn:bk:warps:stages:t[:group_m]' (t=1: b read as
    [N,K]; group_m default 16), ';'-separated."""
    print(
        f"{'bm':>4s} {'bn':>4s} {'bk':>4s} {'warps':>5s} {'stages':>6s} {'b_nk':>4s} {'group':>5s} {'time':>10s} "
        f"{'TFLOP/s':>8s} {'vs recipe':>9s}"
    )
    for item in spec.split(";"):
        bm, bn, bk, warps, stages, t, g = ([int(v) for v in item.split(":")] + [16])[:7]
        kw = dict(
            block_m=bm,
            block_n=bn,
            block_k=bk,
            num_warps=warps,
            num_stages=stages,
            b_k_major=bool(t),
            group_m=g,
        )
        try:
            jf = jax.jit(
                lambda a8, sa, w8, sw, kw=kw: fp8_gemm.block_scaled_matmul(
                    a8, sa, w8, sw, interpret=not fp8_gemm.supported(), **kw
                )
            )
            tm, out = bench(jf, qargs, reps=20 if fp8_gemm.supported() else 2)
        except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
            print(f"{item}: error {str(e).splitlines()[0][:100]}")
            continue
        qerr = np.linalg.norm(np.asarray(out, np.float64) - qref) / np.linalg.norm(qref)
        print(
            f"{bm:4d} {bn:4d} {bk:4d} {warps:5d} {stages:6d} {t:4d} {g:5d} {tm * 1e3:8.3f}ms {flops / tm / 1e12:8.1f} {qerr:9.2e}"
        )


if __name__ == "__main__":
    main()
