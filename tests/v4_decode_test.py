"""DeepSeek-V4 decode: the typed caches (`dsjax/model/v4_cache.py`), prefill + chunked / token
by token decode equal to the full forward at every position (fp32), cache bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_v4
from dsjax.inference.decode import zeros_cache
from dsjax.model import v4_cache
from dsjax.model.config import CSA, HCA, SLIDING
from dsjax.model.transformer import Transformer, init_variables
from dsjax.train import step as ts


@pytest.fixture(scope="module")
def cfg():
    return ts.model_config(tiny_v4.get_config()).replace(
        dtype="float32", param_dtype="float32", num_mtp_layers=0
    )


@pytest.fixture(scope="module")
def variables(cfg):
    v = init_variables(cfg, jax.random.key(0))
    # Every constant-initialised float leaf (sinks, ape, biases, norms) made live.
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(v))))
    return jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype)
        if x.dtype == jnp.float32 else x, v,
    )  # fmt: skip


def _forward(cfg, mode):
    def run(v, cache, tokens, positions, segments):
        out, upd = Transformer(cfg).apply(
            {**v, "cache": cache}, tokens, positions, segments, mode=mode, run_mtp=False,
            mutable=["cache"],
        )  # fmt: skip
        return out.logits, upd["cache"]

    return jax.jit(run)


def test_cache_struct_shapes_and_bytes(cfg):
    cache = zeros_cache(cfg, 2, 64, mtp=False)
    layers = [cache[f"layers_{i}"]["attn"]["v4"] for i in range(len(cfg.layer_types))]
    assert [lc.compressor is None for lc in layers] == [t == SLIDING for t in cfg.layer_types]
    assert [lc.indexer is None for lc in layers] == [t != CSA for t in cfg.layer_types]
    W, d, m, mh = cfg.sliding_window, cfg.head_dim, cfg.compress_rate_csa, cfg.compress_rate_hca
    csa = layers[cfg.layer_types.index(CSA)]
    hca = layers[cfg.layer_types.index(HCA)]
    assert csa.window.shape == (2, W, d) and csa.window_pos.shape == (2, W)
    assert csa.compressor.entries.shape == (2, 64 // m, d)
    assert csa.compressor.kv.shape == (2, 2 * m, 2 * d) and csa.compressor.gate.dtype == jnp.float32
    assert csa.indexer.entries.shape == (2, 64 // m, cfg.index_head_dim)
    assert hca.compressor.kv.shape == (2, mh, d)
    nbytes = v4_cache.cache_bytes(cfg, 2, 64, mtp=False)
    assert nbytes["total"] == sum(x.nbytes for x in jax.tree.leaves(cache))
    per_tok = 4 * (2 * (d + cfg.index_head_dim) / m + d / mh)
    assert nbytes["per_token"] == pytest.approx(per_tok)
    assert nbytes["entries"] == 2 * 64 * per_tok
    axes = v4_cache.cache_axes(csa)
    assert axes.window == ("cache_batch", None, None) and axes.indexer.pos == ("cache_batch", None)


def test_decode_logits_equal_full_forward_at_every_position(cfg, variables):
    """Prefill 13 tokens, then token by token and in chunks of 3 and 7 up to T=45 (> window 8,
    > top-k 4 CSA entries, a multiple of neither rate 4 nor 8), two rows at different offsets."""
    B, T, S = 2, 45, 64
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.vocab_size)
    with jax.default_matmul_precision("highest"):
        full = np.asarray(Transformer(cfg).apply(variables, tokens, run_mtp=False).logits)
        prefill, decode = _forward(cfg, "prefill"), _forward(cfg, "decode")
        cache = zeros_cache(cfg, B, S, mtp=False)
        P = 13
        pos = jnp.broadcast_to(jnp.arange(P), (B, P))
        logits, cache = prefill(variables, cache, tokens[:, :P], pos, jnp.ones((B, P), jnp.int32))
        got = [np.asarray(logits)]
        t = P
        for n in [1] * 14 + [3, 3, 7, 1, 3, 1]:
            pos = jnp.broadcast_to(t + jnp.arange(n), (B, n))
            logits, cache = decode(
                variables, cache, tokens[:, t : t + n], pos, jnp.ones((B, n), jnp.int32)
            )
            got.append(np.asarray(logits))
            t += n
    assert t == T
    got = np.concatenate(got, 1)
    assert np.abs(got - full).max() <= 1e-5 * np.abs(full).max()
