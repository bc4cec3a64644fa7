"""Attention kernels behind one function: a reference einsum, a blocked flash-style scan that
skips fully masked chunk pairs, cuDNN's fused attention on NVIDIA GPUs and Pallas splash
attention on TPUs.

Shapes: queries `q_BTGHK` (G key/value heads, H query heads per key/value head), keys `k_BSGK`,
values `v_BSGV`. The expanded MLA path uses G = heads, H = 1 (q/k head dim 192 != v head dim 128;
the cuDNN path pads v to 192 and slices the output); the absorbed decode path is multi-query
attention with G = 1, H = heads, one 576-dim key and a 512-dim value per token.

Masking: query t may see key s iff `k_idx[s] <= q_idx[t]` (causal by absolute index: the token
index in training, the cache slot = position in decoding) and, when segment ids are given, both
belong to the same segment (packed documents never attend across each other).

Implementations (`attention(impl=...)`):
  "reference"  materialises the [B, G, H, T, S] logits.
  "chunked"    query chunks x key chunks with an online softmax; a (query chunk, key chunk) pair
               whose keys are all masked for every query of the chunk (causal: the key chunk
               starts after the query chunk ends; segments: disjoint segment-id ranges) is
               skipped by `lax.cond`, so causal attention costs about half the FLOPs. Decided
               from the traced indices, so decoding skips the cache slots after the position.
               A custom VJP (flash-attention backward, same skipping) keeps O(T) memory.
  "cudnn"      `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPU only: needs
               `causal=True` (the caller promises q_idx == k_idx == arange(T)), no segment ids,
               bf16/fp16 and head dims cuDNN accepts.
  "splash"     Pallas TPU splash attention (`dsjax.model.kernels.splash`): needs `causal=True` (the
               caller's promise, as for cuDNN), segment ids supported, q/k and v head dims may
               differ, T is padded to a multiple of 128. Compiled by Mosaic when the program is
               built for TPU (the mesh's devices, see `splash.target_platform`), else run in
               Pallas' interpreter (slow: tests). Where it cannot run (causal=False: decoding;
               q length != key length; dtypes) it falls back to "auto"'s other choices with a
               warning naming the reason.
  "auto"       cudnn where usable; splash when built for TPU, usable and T >= 128; else
               reference for small T*S, else chunked.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from dsjax.model.fp8 import match_varying
from dsjax.model.kernels import splash

IMPLS = ("auto", "reference", "chunked", "cudnn", "splash")
_MASKED = -1e30
# Below this many query x key pairs per row the reference path is used by "auto".
_AUTO_REFERENCE_LIMIT = 2048 * 2048
_INT_MIN, _INT_MAX = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max
_CUDNN_MAX_HEAD_DIM = 256
# "auto" on TPU uses splash from this query length on (shorter: padding to 128 would dominate).
_AUTO_SPLASH_MIN_LEN = 128


def _mask_BTS(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS):
    mask = k_idx_BS[:, None, :] <= q_idx_BT[:, :, None]
    if q_seg_BT is not None:
        mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    return mask


def reference_attention(
    q_BTGHK, k_BSGK, v_BSGV, *, q_idx_BT, k_idx_BS, q_seg_BT=None, k_seg_BS=None, scale: float
):
    """Materialises the [B, G, H, T, S] logits; softmax in float32.

    The operands are moved head-major first, so both products are plain batched matmuls over
    (B, G, H): XLA:CPU runs the fused forward and backward about 40 % faster than when the
    einsums transpose inside the dot (issue 26's train shape; same values to rounding)."""
    q_BGHTK = jnp.transpose(q_BTGHK, (0, 2, 3, 1, 4))
    k_BGSK = jnp.transpose(k_BSGK, (0, 2, 1, 3))
    v_BGSV = jnp.transpose(v_BSGV, (0, 2, 1, 3))
    logits = (
        jnp.einsum("bghtk,bgsk->bghts", q_BGHTK, k_BGSK, preferred_element_type=jnp.float32) * scale
    )
    mask = _mask_BTS(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS)[:, None, None]
    logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    out_BGHTV = jnp.einsum(
        "bghts,bgsv->bghtv", probs.astype(v_BSGV.dtype), v_BGSV, preferred_element_type=jnp.float32
    )
    return jnp.transpose(out_BGHTV, (0, 3, 1, 2, 4)).astype(v_BSGV.dtype)


# ====================================================================== chunk schedule
def _pad_axis1(x, n, value):
    if n == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, n)
    return jnp.pad(x, widths, constant_values=value)


def _chunks(x, c):
    """[B, n*c, ...] -> [n, B, c, ...]."""
    B, L = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, L // c, c, *x.shape[2:]), 1, 0)


def _ranges(idx_nBc, seg_nBc, valid_nc):
    """Per chunk and row: (min idx, max idx, min seg, max seg) over the chunk's real entries."""
    v = valid_nc[:, None, :]
    lo = jnp.where(v, idx_nBc, _INT_MAX).min(-1)
    hi = jnp.where(v, idx_nBc, _INT_MIN).max(-1)
    if seg_nBc is None:
        return lo, hi, None, None
    return lo, hi, jnp.where(v, seg_nBc, _INT_MAX).min(-1), jnp.where(v, seg_nBc, _INT_MIN).max(-1)


def _schedule(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS, cq, ck):
    """bool [nq, nk]: True where some row has a visible (query, key) pair in the chunk pair.

    Conservative (a True pair may still be fully masked), never wrong: a False pair has, for
    every row, all keys after all queries, or disjoint segment-id ranges.
    """
    T, S = q_idx_BT.shape[1], k_idx_BS.shape[1]
    nq, nk = -(-T // cq), -(-S // ck)

    def prep(idx, seg, L, c, n):
        pad = n * c - L
        valid = (jnp.arange(n * c) < L).reshape(n, c)
        idx = _chunks(_pad_axis1(idx, pad, 0), c)
        seg = None if seg is None else _chunks(_pad_axis1(seg, pad, 0), c)
        return _ranges(idx, seg, valid)

    _, q_hi, qs_lo, qs_hi = prep(q_idx_BT, q_seg_BT, T, cq, nq)
    k_lo, _, ks_lo, ks_hi = prep(k_idx_BS, k_seg_BS, S, ck, nk)
    need_qkB = k_lo[None, :, :] <= q_hi[:, None, :]
    if q_seg_BT is not None:
        need_qkB &= (ks_lo[None] <= qs_hi[:, None]) & (qs_lo[:, None] <= ks_hi[None])
    return need_qkB.any(-1)


def chunk_schedule(q_idx_BT, k_idx_BS, q_seg_BT=None, k_seg_BS=None, *, chunk: int = 512):
    """The (query chunk, key chunk) pairs "chunked" computes: bool [ceil(T/c), ceil(S/c)]."""
    cq, ck = min(chunk, q_idx_BT.shape[1]), min(chunk, k_idx_BS.shape[1])
    return _schedule(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS, cq, ck)


def tie_to(x, *ints):
    """`ints` (None passes through) plus an exact integer zero computed from `x`.

    Inside the model's layer scan the token indices and segment ids are the same for every
    layer, and JAX's scan partial evaluation hoists whatever depends only on them out of the
    loop: the masks of every (query chunk, key chunk) pair, which it then stores all at once
    (O(T S) memory: 256 GiB per chip for V3 at 131K). Depending on `x` (the queries) keeps them
    inside the loop, built one chunk pair at a time.
    """
    flat = x.reshape(-1)[:1]
    zero = jnp.where(flat == flat, 0, 0).sum().astype(jnp.int32)  # 0 even for a NaN
    return tuple(None if i is None else i + zero.astype(i.dtype) for i in ints)


# ====================================================================== chunked (flash) kernel
# Chunked layouts: q_nBcGHK [nq, B, cq, G, H, K], k_nBcGK / v_nBcGV [nk, B, ck, G, .], indices
# and segments [n, B, c], the schedule need_QK bool [nq, nk].
def _pair_logits(q_c, k_c, qidx_c, qseg_c, kidx_c, kseg_c, scale):
    """Masked float32 logits [B, G, H, cq, ck] of a query chunk against a key chunk, and the mask."""
    s = jnp.einsum("btghk,bsgk->bghts", q_c, k_c, preferred_element_type=jnp.float32) * scale
    mask = _mask_BTS(qidx_c, kidx_c, qseg_c, kseg_c)[:, None, None]
    return jnp.where(mask, s, _MASKED), mask


def _maybe(need, compute, carry, skip):
    """`compute(carry)` where `need` (really skipped by lax.cond), else `carry` unchanged."""
    if not skip:
        return compute(carry)
    return jax.lax.cond(need, compute, lambda c: c, carry)


def _flash_forward(q_n, k_n, v_n, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, skip):
    """Online softmax per query chunk: (out_nBcGHV in v's dtype, lse_nBGHc float32, pairs)."""
    B, cq, G, H = q_n.shape[1:5]
    V = v_n.shape[-1]

    def q_body(pairs, x):
        q_c, qidx_c, qseg_c, need_K = x

        def k_body(carry, kx):
            need, k_c, v_c, kidx_c, kseg_c = kx

            def compute(carry):
                m, denom, acc, n = carry
                s, mask = _pair_logits(q_c, k_c, qidx_c, qseg_c, kidx_c, kseg_c, scale)
                m_new = jnp.maximum(m, s.max(-1))
                corr = jnp.exp(m - m_new)
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                pv = jnp.einsum(
                    "bghts,bsgv->btghv",
                    p.astype(v_c.dtype),
                    v_c,
                    preferred_element_type=jnp.float32,
                )
                acc = acc * jnp.transpose(corr, (0, 3, 1, 2))[..., None] + pv
                return m_new, denom * corr + p.sum(-1), acc, n + 1

            return _maybe(need, compute, carry, skip), None

        init = (
            jnp.full((B, G, H, cq), _MASKED, jnp.float32),
            jnp.zeros((B, G, H, cq), jnp.float32),
            jnp.zeros((B, cq, G, H, V), jnp.float32),
            jnp.zeros((), jnp.int32),
        )
        (m, denom, acc, n), _ = jax.lax.scan(k_body, init, (need_K, k_n, v_n, kidx_n, kseg_n))
        denom = jnp.maximum(denom, 1e-30)  # rows that see no key: output 0
        out = acc / jnp.transpose(denom, (0, 3, 1, 2))[..., None]
        return pairs + n, (out.astype(v_n.dtype), m + jnp.log(denom))

    pairs, (out_n, lse_n) = jax.lax.scan(
        q_body, jnp.zeros((), jnp.int32), (q_n, qidx_n, qseg_n, need_QK)
    )
    return out_n, lse_n, pairs


def _key_chunk_grads(dq_n, k_c, v_c, kidx_c, kseg_c, need_Q, q_n, qidx_n, qseg_n, dout_n,
                     lse_n, D_n, scale, skip):  # fmt: skip
    """One key chunk's part of the flash backward: loops over the query chunks, recomputing each
    needed pair's probabilities from the saved log-sum-exp. Returns (dq_n with this chunk's
    contribution added, dk_c, dv_c), gradients float32. Layouts as `_flash_backward`; also
    used by `dsjax.model.layers.latent_flash` (G = its heads, H = 1)."""
    dt = q_n.dtype

    def q_body(carry, x):
        i, need, q_c, qidx_c, qseg_c, do_c, lse_c, D_c = x

        def compute(carry):
            dk, dv, dq_n = carry
            s, mask = _pair_logits(q_c, k_c, qidx_c, qseg_c, kidx_c, kseg_c, scale)
            p = jnp.where(mask, jnp.exp(s - lse_c[..., None]), 0.0)
            dv = dv + jnp.einsum(
                "bghts,btghv->bsgv", p.astype(dt), do_c, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("btghv,bsgv->bghts", do_c, v_c, preferred_element_type=jnp.float32)
            ds = (p * (dp - D_c[..., None]) * scale).astype(dt)
            dk = dk + jnp.einsum("bghts,btghk->bsgk", ds, q_c, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bghts,bsgk->btghk", ds, k_c, preferred_element_type=jnp.float32)
            return dk, dv, dq_n.at[i].add(dq_i)

        return _maybe(need, compute, carry, skip), None

    zeros = (jnp.zeros(k_c.shape, jnp.float32), jnp.zeros(v_c.shape, jnp.float32))
    init = (*match_varying(k_c, *zeros)[1:], dq_n)  # inside shard_map: k_c's varying axes
    xs = (jnp.arange(q_n.shape[0]), need_Q, q_n, qidx_n, qseg_n, dout_n, lse_n, D_n)
    (dk, dv, dq_n), _ = jax.lax.scan(q_body, init, xs)
    return dq_n, dk, dv


def _flash_backward(res, dout_n, scale, skip):
    """Recomputes each needed pair's probabilities from the saved log-sum-exp: (dq, dk, dv)."""
    q_n, k_n, v_n, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, out_n, lse_n = res
    # D = rowsum(dout * out) [nq, B, G, H, cq]
    D_n = jnp.einsum("nbtghv,nbtghv->nbght", dout_n.astype(jnp.float32), out_n.astype(jnp.float32))

    def k_body(dq_n, kx):
        need_Q, k_c, v_c, kidx_c, kseg_c = kx
        dq_n, dk, dv = _key_chunk_grads(
            dq_n, k_c, v_c, kidx_c, kseg_c, need_Q, q_n, qidx_n, qseg_n, dout_n, lse_n, D_n,
            scale, skip,
        )  # fmt: skip
        return dq_n, (dk.astype(k_c.dtype), dv.astype(v_c.dtype))

    dq_n, (dk_n, dv_n) = jax.lax.scan(
        k_body,
        jnp.zeros(q_n.shape, jnp.float32),
        (need_QK.T, k_n, v_n, kidx_n, kseg_n),
    )
    return dq_n.astype(q_n.dtype), dk_n, dv_n


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _flash(q_n, k_n, v_n, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, skip):
    return _flash_forward(q_n, k_n, v_n, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, skip)


def _flash_fwd(q_n, k_n, v_n, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, skip):
    out_n, lse_n, pairs = _flash_forward(
        q_n, k_n, v_n, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, scale, skip
    )
    res = (q_n, k_n, v_n, qidx_n, qseg_n, kidx_n, kseg_n, need_QK, out_n, lse_n)
    return (out_n, lse_n, pairs), res


def _flash_bwd(scale, skip, res, cts):
    dout_n = cts[0]  # the log-sum-exp and pair count are not differentiated
    dq, dk, dv = _flash_backward(res, dout_n, scale, skip)
    return (dq, dk, dv, None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(
    q_BTGHK,
    k_BSGK,
    v_BSGV,
    *,
    q_idx_BT,
    k_idx_BS,
    q_seg_BT=None,
    k_seg_BS=None,
    scale: float,
    chunk: int = 512,
    skip: bool = True,
    return_pairs: bool = False,
):
    """Blocked online softmax (flash attention in `lax.scan`s, custom VJP).

    Live logits are one [chunk x chunk] block per head; the backward saves only the inputs, the
    output and the per-row log-sum-exp (O(T) memory) and recomputes each needed block.
    `skip=False` computes every chunk pair (for comparison). `return_pairs=True` also returns
    the number of chunk pairs the forward computed (int32, counted inside the loop).
    """
    B, T, G, H, K = q_BTGHK.shape
    S, V = k_BSGK.shape[1], v_BSGV.shape[-1]
    cq, ck = min(chunk, T), min(chunk, S)
    nq, nk = -(-T // cq), -(-S // ck)
    q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS = tie_to(q_BTGHK, q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS)
    if skip:
        need_QK = _schedule(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS, cq, ck)
    else:
        need_QK = jnp.ones((nq, nk), bool)
    # Padded queries see nothing; padded keys are seen by no query.
    qp, kp = nq * cq - T, nk * ck - S
    out_n, _, pairs = _flash(
        _chunks(_pad_axis1(q_BTGHK, qp, 0), cq),
        _chunks(_pad_axis1(k_BSGK, kp, 0), ck),
        _chunks(_pad_axis1(v_BSGV, kp, 0), ck),
        _chunks(_pad_axis1(q_idx_BT, qp, _INT_MIN), cq),
        None if q_seg_BT is None else _chunks(_pad_axis1(q_seg_BT, qp, -2), cq),
        _chunks(_pad_axis1(k_idx_BS, kp, _INT_MAX), ck),
        None if k_seg_BS is None else _chunks(_pad_axis1(k_seg_BS, kp, -1), ck),
        need_QK,
        float(scale),
        bool(skip),
    )
    out = jnp.moveaxis(out_n, 0, 1).reshape(B, nq * cq, G, H, V)[:, :T]
    return (out, pairs) if return_pairs else out


# ====================================================================== cuDNN (NVIDIA GPU)
def _on_cuda() -> bool:
    if jax.default_backend() != "gpu":
        return False
    version = str(getattr(jax.devices()[0].client, "platform_version", "cuda")).lower()
    return "rocm" not in version and "hip" not in version


def cudnn_unusable_reason(q_BTGHK, k_BSGK, v_BSGV, *, q_seg_BT=None, causal: bool = False):
    """None when `cudnn_attention` can run these inputs here, else why not (a sentence)."""
    if not _on_cuda():
        return f"backend is {jax.default_backend()!r}, cuDNN needs an NVIDIA GPU"
    if not causal:
        return "cuDNN path needs causal=True (q_idx == k_idx == arange(T))"
    if q_seg_BT is not None:
        return "segment ids are not supported by jax.nn.dot_product_attention's cuDNN path"
    if q_BTGHK.shape[1] != k_BSGK.shape[1]:
        return f"query length {q_BTGHK.shape[1]} != key length {k_BSGK.shape[1]}"
    dtypes = {q_BTGHK.dtype, k_BSGK.dtype, v_BSGV.dtype}
    if not dtypes <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)} or len(dtypes) != 1:
        return f"dtypes {sorted(map(str, dtypes))}: cuDNN needs one of bfloat16/float16"
    d = max(q_BTGHK.shape[-1], v_BSGV.shape[-1])
    if d > _CUDNN_MAX_HEAD_DIM or d % 8:
        return f"head dim {d}: cuDNN needs a multiple of 8 up to {_CUDNN_MAX_HEAD_DIM}"
    return None


def cudnn_attention(q_BTGHK, k_BSGK, v_BSGV, *, scale: float):
    """Causal fused attention via cuDNN; q/k and v head dims are zero-padded to a common size
    (zeros add nothing to q.k and the padded output columns are sliced off)."""
    B, T, G, H, K = q_BTGHK.shape
    V = v_BSGV.shape[-1]
    D = max(K, V)
    q_BTNK = q_BTGHK.reshape(B, T, G * H, K)  # query head g*H + h uses key/value head g
    q_BTNK = jnp.pad(q_BTNK, ((0, 0), (0, 0), (0, 0), (0, D - K)))
    k_BSGK = jnp.pad(k_BSGK, ((0, 0), (0, 0), (0, 0), (0, D - K)))
    v_BSGD = jnp.pad(v_BSGV, ((0, 0), (0, 0), (0, 0), (0, D - V)))
    out = jax.nn.dot_product_attention(
        q_BTNK, k_BSGK, v_BSGD, scale=scale, is_causal=True, implementation="cudnn"
    )
    return out[..., :V].reshape(B, T, G, H, V).astype(v_BSGV.dtype)


# ====================================================================== dispatch
def attention(
    q_BTGHK,
    k_BSGK,
    v_BSGV,
    *,
    q_idx_BT,
    k_idx_BS,
    q_seg_BT=None,
    k_seg_BS=None,
    scale: float,
    impl: str = "auto",
    chunk: int = 512,
    causal: bool = False,
):
    """Dispatches to an implementation; all return [B, T, G, H, V] in the value dtype.

    `causal=True` is the caller's promise that q_idx_BT and k_idx_BS are both arange(T) per row
    (the expanded training/prefill path); only the cuDNN and splash kernels rely on it (they
    ignore q_idx_BT / k_idx_BS).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}: expected one of {IMPLS}")
    if (q_seg_BT is None) != (k_seg_BS is None):
        raise ValueError("attention: q_seg_BT and k_seg_BS must be given together")
    if impl in ("auto", "splash"):
        why = splash.unusable_reason(q_BTGHK, k_BSGK, v_BSGV, causal=causal)
        on_tpu = splash.target_platform() == "tpu"
        if impl == "splash" and why is None:
            return splash.splash_attention(
                q_BTGHK, k_BSGK, v_BSGV, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS, scale=scale
            )
        if impl == "auto" and why is None and on_tpu and q_BTGHK.shape[1] >= _AUTO_SPLASH_MIN_LEN:
            return splash.splash_attention(
                q_BTGHK, k_BSGK, v_BSGV, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS, scale=scale
            )
        if impl == "splash":
            warnings.warn(f"attention impl='splash' falls back to 'auto': {why}", stacklevel=2)
            impl = "auto"
    if impl in ("auto", "cudnn"):
        why = cudnn_unusable_reason(q_BTGHK, k_BSGK, v_BSGV, q_seg_BT=q_seg_BT, causal=causal)
        if why is None:
            return cudnn_attention(q_BTGHK, k_BSGK, v_BSGV, scale=scale)
        if impl == "cudnn":
            raise ValueError(f"attention impl='cudnn' cannot run: {why}")
        big = q_BTGHK.shape[1] * k_BSGK.shape[1] > _AUTO_REFERENCE_LIMIT
        impl = "chunked" if big else "reference"
    kw = dict(
        q_idx_BT=q_idx_BT, k_idx_BS=k_idx_BS, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS, scale=scale
    )
    if impl == "reference":
        return reference_attention(q_BTGHK, k_BSGK, v_BSGV, **kw)
    return chunked_attention(q_BTGHK, k_BSGK, v_BSGV, chunk=chunk, **kw)
