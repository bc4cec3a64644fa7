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


# ---------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def hf_model():
    try:
        import v4_fixtures as fx
    except ImportError:  # pragma: no cover
        from tests import v4_fixtures as fx
    return fx.tie_free_model(fx.token_ids())[0]


@pytest.fixture(scope="module")
def hf_loaded(hf_model, tmp_path_factory):
    from dsjax.checkpoints.hf import load_hf_checkpoint

    path = tmp_path_factory.mktemp("v4gen") / "hf"
    hf_model.save_pretrained(path)
    return load_hf_checkpoint(path, jnp.float32)


PROMPTS = [
    [5, 17, 99, 3, 64, 2, 71, 8, 45, 11, 90],
    [7, 1, 120, 33, 6, 84, 19, 27, 50, 3, 3, 9, 101],
]


def test_generate_greedy_equals_transformers(hf_model, hf_loaded):
    """Greedy tokens of HF's DeepseekV4ForCausalLM.generate (one row at a time: HF does not
    support padding) equal dsjax's batched generate, one-shot and chunked prefill; 24 new
    tokens run past the window (8), several HCA windows (8) and CSA top-k (2)."""
    import torch

    from dsjax.inference.generate import generate

    cfg, variables = hf_loaded
    want = []
    for p in PROMPTS:
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )  # fmt: skip
        want.append(out[0, len(p) :].tolist())
    with jax.default_matmul_precision("highest"):
        got = generate(cfg, variables, PROMPTS, 24).tokens
        chunked = generate(cfg, variables, PROMPTS, 24, prefill_chunk=4).tokens
    assert got == want
    assert chunked == want


def _drafter(cfg, variables, residual=0.01):
    """A V4 model whose MTP module nearly copies the main model's next prediction: the main
    blocks' outputs (wo_b, down) scaled by `residual` (streams ~ copies of the embedding: an
    almost-bigram model), the MTP block's zeroed, e_proj = I, h_proj = 0, the MTP norm = the
    final norm; so MTP's logits at i ~ the main logits at i+1."""

    def scale(path, x):
        return x * residual if any(k in jax.tree_util.keystr(path) for k in ("wo_b", "down")) else x

    params = jax.tree_util.tree_map_with_path(scale, variables["params"])
    mtp = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if any(k in jax.tree_util.keystr(p) for k in ("wo_b", "down")) else x,
        params["mtp_0"],
    )  # fmt: skip
    D = cfg.hidden_size
    mtp["e_proj"]["kernel"] = jnp.eye(D)
    mtp["h_proj"]["kernel"] = jnp.zeros((D, D))
    mtp["enorm"]["scale"] = jnp.ones((D,))
    mtp["norm"]["scale"] = params["final_norm"]["scale"]
    return {**variables, "params": {**params, "mtp_0": mtp}}


@pytest.fixture(scope="module")
def mtp_model(cfg):
    mcfg = cfg.replace(num_mtp_layers=1)
    v = init_variables(mcfg, jax.random.key(3))
    keys = iter(jax.random.split(jax.random.key(4), len(jax.tree.leaves(v))))
    v = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype)
        if x.dtype == jnp.float32 else x, v,
    )  # fmt: skip
    return mcfg, v


def test_mtp_speculative_greedy_equals_plain_greedy(mtp_model):
    from dsjax.inference.generate import generate

    mcfg, v = mtp_model
    with jax.default_matmul_precision("highest"):
        plain = generate(mcfg, v, PROMPTS, 30)
        spec = generate(mcfg, v, PROMPTS, 30, speculative=True)
        sampled = generate(mcfg, v, PROMPTS, 30, temperature=1.0, rng=7)
        sampled_again = generate(mcfg, v, PROMPTS, 30, temperature=1.0, rng=7)
    assert spec.tokens == plain.tokens
    assert sampled.tokens == sampled_again.tokens and sampled.tokens != plain.tokens

    good = _drafter(mcfg, v)
    with jax.default_matmul_precision("highest"):
        plain = generate(mcfg, good, PROMPTS, 30)
        spec = generate(mcfg, good, PROMPTS, 30, speculative=True)
    assert spec.tokens == plain.tokens
    assert spec.acceptance_rate > 0.5 and spec.tokens_per_forward > 1.4, (
        spec.acceptance_rate, spec.tokens_per_forward,
    )  # fmt: skip
