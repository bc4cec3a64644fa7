"""DeepSeek-V4's chunked attention core (`v4_core`) against the dense form (`window_attention`
over a [T, N] visibility mask, the indexer's top-k as a mask): values and gradients, in query
chunks that do not divide the sequence, with packed documents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model.layers.v4_attention import window_attention
from dsjax.model.layers.v4_compressor import EntryInfo
from dsjax.model.layers.v4_core import indexer_topk, v4_attention_core

B, T, H, d, W, RATE, K, HI, CI = 2, 29, 3, 8, 4, 2, 3, 2, 5


def _inputs(seed: int):
    rng = np.random.RandomState(seed)
    f = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
    N = T // RATE
    seg = np.ones((B, T), np.int32)
    seg[1, 12:] = 2  # row 1 packs two documents (the second starts at a multiple of RATE)
    seg[0, -2:] = 0
    info = EntryInfo(
        last_idx_N=jnp.arange(N, dtype=jnp.int32) * RATE + RATE - 1,
        segment_BN=jnp.asarray(seg[:, : N * RATE : RATE]),
    )
    index = (f(B, T, HI, CI), f(B, T, HI), f(B, N, CI))
    return f(B, T, H, d), f(B, T, d), f(B, N, d), info, f(H), jnp.asarray(seg), index


def _dense(q, kv, entries, info, sinks, seg, index):
    """The reference: the visibility mask, narrowed to the indexer's top-k as `Indexer` does."""
    visible = info.visible(jnp.broadcast_to(jnp.arange(T)[None], (B, T)), seg)
    if index is not None:
        iq, iw, keys = index
        dots = jnp.einsum("bthc,bnc->bthn", iq, keys)
        scores = jnp.einsum("bth,bthn->btn", iw, jax.nn.relu(dots) * CI**-0.5)
        _, top = jax.lax.top_k(jnp.where(visible, scores, -jnp.inf), K)
        chosen = jnp.zeros(visible.shape, bool)
        chosen = chosen.at[jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], top].set(True)
        visible = chosen & visible
    return window_attention(q, kv, entries, visible, sinks, window=W, scale=0.4,
                            segment_ids_BT=seg)  # fmt: skip


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("chunk", [8, 64])
def test_chunked_core_equals_dense(sparse, chunk):
    q, kv, entries, info, sinks, seg, index = _inputs(int(sparse))
    index = index if sparse else None

    def core(q, kv, entries, sinks):
        return v4_attention_core(q, kv, seg, entries, info.last_idx_N, info.segment_BN, sinks,
                                 index, window=W, scale=0.4, topk=K, chunk=chunk)  # fmt: skip

    def dense(q, kv, entries, sinks):
        return _dense(q, kv, entries, info, sinks, seg, index)

    cot = jnp.asarray(np.random.RandomState(9).randn(B, T, H, d).astype(np.float32))
    out, vjp = jax.vjp(core, q, kv, entries, sinks)
    ref, ref_vjp = jax.vjp(dense, q, kv, entries, sinks)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(vjp(cot), ref_vjp(cot), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_indexer_topk_picks_the_best_visible_entries():
    _, _, _, info, _, seg, index = _inputs(2)
    top, ok = indexer_topk(*index, seg, info.last_idx_N, info.segment_BN, offset=0, topk=K,
                           chunk=5)  # fmt: skip
    assert top.shape == (B, T, K)
    # the first query that can see an entry is the one closing it (index RATE - 1)
    assert not np.asarray(ok)[:, : RATE - 1].any()
    assert np.asarray(ok)[0, RATE - 1].sum() == 1
