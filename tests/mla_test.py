"""Absorbed (latent-cache) decoding equals the expanded path; the cache holds only the latent."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model.transformer import Transformer, init_cache, init_variables
from dsjax.testing import rel_err, scale_params, tiny_config


@pytest.mark.parametrize("q_lora_rank", [16, 0])
def test_absorbed_decode_token_by_token_equals_expanded(q_lora_rank):
    cfg = tiny_config(q_lora_rank=q_lora_rank, num_mtp_layers=0)
    model = Transformer(cfg)
    v = scale_params(init_variables(cfg, jax.random.key(0)), 8.0)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24)))
    full = jax.jit(model.apply)(v, tokens).logits  # expanded, no cache

    cache = init_cache(cfg, 2, 32)
    P = 10
    prefill = jax.jit(functools.partial(model.apply, mode="prefill", mutable=["cache"]))
    decode = jax.jit(functools.partial(model.apply, mode="decode", mutable=["cache"]))
    out, upd = prefill({**v, "cache": cache}, tokens[:, :P])
    assert rel_err(out.logits, full[:, :P]) < 1e-5
    cache = upd["cache"]
    for t in range(P, 24):
        pos = jnp.full((2, 1), t, jnp.int32)
        out, upd = decode({**v, "cache": cache}, tokens[:, t : t + 1], pos)
        cache = upd["cache"]
        assert rel_err(out.logits[:, 0], full[:, t]) < 1e-5, t


def test_absorbed_over_empty_cache_equals_expanded_for_a_whole_sequence():
    cfg = tiny_config(num_mtp_layers=0)
    model = Transformer(cfg)
    v = scale_params(init_variables(cfg, jax.random.key(1)), 8.0)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 20)))
    pos = jnp.arange(20)[None]
    full = jax.jit(model.apply)(v, tokens).logits
    decode = jax.jit(functools.partial(model.apply, mode="decode", mutable=["cache"]))
    out, _ = decode({**v, "cache": init_cache(cfg, 1, 20)}, tokens, pos)
    assert rel_err(out.logits, full) < 1e-5


def test_cache_stores_latent_plus_rope_key_per_layer():
    cfg = tiny_config()
    cache = init_cache(cfg, 3, 16)
    leaves = jax.tree_util.tree_leaves_with_path(cache)
    per_token = sum(int(np.prod(x.shape)) for _, x in leaves) / (3 * 16)
    layers = cfg.num_hidden_layers + cfg.num_mtp_layers
    assert per_token == layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    names = {getattr(p[-1], "key", "") for p, _ in leaves}
    assert names == {"latent", "k_pe"}
