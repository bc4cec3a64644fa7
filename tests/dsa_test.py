"""DeepSeek Sparse Attention (V3.2) against HF `DeepseekV32ForCausalLM` and float64 NumPy.

A tiny random V3.2 checkpoint is built and saved by transformers itself; dsjax loads it and must
reproduce HF's logits for sequences longer than `index_topk` (the selection matters) and shorter
(every key kept), decode over the latent + indexer caches, and save it back. The indexer's scores
and top-k, and the gather-based sparse attention kernel, are checked against NumPy references.

Indexer training (`dsa_stage`): the KL loss against HF's own attention probabilities and float64
NumPy scores (dense warm-up and sparse forms); a warm-up step changes only the indexers; in the
sparse stage the LM loss trains everything but the indexers and the KL only the indexers.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

import dsjax.model.layers.indexer as indexer_lib
from configs import tiny
from dsjax.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint
from dsjax.model.config import ModelConfig
from dsjax.model.layers.indexer import Indexer, dsa_flops, select_topk
from dsjax.model.layers.mla import sparse_latent_attention
from dsjax.model.transformer import Transformer, init_cache
from dsjax.testing import random_variables, tiny_config
from dsjax.train import step as ts
from tests import hf_fixtures as fx

TOPK = 6
T_LONG, T_SHORT, BATCH = 23, 5, 2
# A chunk budget small enough that T_LONG splits into several (padded) query chunks.
SMALL_BUDGET = 2700
V32 = dict(index_topk=TOPK, index_n_heads=8, index_head_dim=16)


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def hf_v32(tmp_path_factory):
    """(HF model, checkpoint dir): 2 layers (dense, MoE), YaRN, top-6 of 8x16 indexer heads."""
    config = DeepseekV32Config(**{**fx.BASE, **V32})
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    model = DeepseekV32ForCausalLM(config).float().eval()
    fx.randomize_(model, 3)
    path = tmp_path_factory.mktemp("v32") / "ckpt"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def loaded(hf_v32):
    return load_hf_checkpoint(hf_v32[1], dtype=jnp.float32)


@functools.cache
def _forward(cfg: ModelConfig):
    model = Transformer(cfg.replace(remat="none"))
    return jax.jit(lambda v, t: model.apply(v, t).logits)


@pytest.fixture(scope="module")
def small_chunks():
    old = indexer_lib.CHUNK_BUDGET
    indexer_lib.CHUNK_BUDGET = SMALL_BUDGET
    yield
    indexer_lib.CHUNK_BUDGET = old


# ====================================================================== config
def test_config_fields_and_validation(loaded):
    cfg, _ = loaded
    assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (TOPK, 8, 16)
    hf = cfg.to_hf()
    assert hf["model_type"] == "deepseek_v32"
    assert hf["architectures"] == ["DeepseekV32ForCausalLM"]
    assert ModelConfig.from_hf(hf, dtype="float32", param_dtype="float32") == cfg
    assert cfg.replace(index_topk=0).to_hf()["model_type"] == "deepseek_v3"
    with pytest.raises(ValueError, match="index_topk"):
        cfg.replace(index_topk=-1)
    with pytest.raises(ValueError, match="q_lora_rank.*q LoRA"):
        cfg.replace(q_lora_rank=0)
    with pytest.raises(ValueError, match="index_head_dim.*qk_rope_head_dim"):
        cfg.replace(index_head_dim=4)
    with pytest.raises(ValueError, match="index_n_heads"):
        cfg.replace(index_n_heads=0)


def test_dsa_flops_at_v32_dims():
    cfg = ModelConfig(index_topk=2048)
    f = dsa_flops(cfg, 65536)
    T, k = 65536, 2048
    pairs = k * (k + 1) / 2 + (T - k) * k
    assert f["dsa_core"] == 2 * pairs * 128 * (512 + 64 + 512)
    assert f["dense_absorbed"] == 2 * T * (T + 1) / 2 * 128 * (512 + 64 + 512)
    assert f["core_vs_dense_absorbed"] <= 1 / 8
    assert dsa_flops(cfg, 1024)["core_vs_dense_absorbed"] == 1.0  # every key kept


# ====================================================================== indexer vs NumPy
def _np_indexer_scores(ind, x, q_resid, cos, sin):
    """float64 I(t, s) [B, T, S] (causal, -inf above the diagonal) from HF's indexer weights."""
    w = {n: p.detach().double().numpy() for n, p in ind.named_parameters()}
    x, q_resid = x.double().numpy(), q_resid.double().numpy()
    cos, sin = cos.double().numpy()[:, :, None], sin.double().numpy()[:, :, None]
    B, T, _ = x.shape
    N, Di, R = ind.n_heads, ind.head_dim, ind.qk_rope_head_dim

    def rope(a):  # half-split rotation of the first R dims
        r, rest = a[..., :R], a[..., R:]
        r1, r2 = r[..., : R // 2], r[..., R // 2 :]
        rot = np.concatenate([-r2, r1], -1)
        return np.concatenate([r * cos + rot * sin, rest], -1)

    q = rope((q_resid @ w["wq_b.weight"].T).reshape(B, T, N, Di))
    k = x @ w["wk.weight"].T
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6)
    k = rope((k * w["k_norm.weight"] + w["k_norm.bias"])[:, :, None])[:, :, 0]
    logits = np.maximum(np.einsum("btni,bsi->btns", q, k) * Di**-0.5, 0)
    weights = x @ w["weights_proj.weight"].T * N**-0.5
    scores = np.einsum("btn,btns->bts", weights, logits)
    return np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)


def test_indexer_scores_and_topk_match_numpy(hf_v32, loaded, small_chunks):
    model, _ = hf_v32
    cfg, variables = loaded
    toks = fx.tokens(BATCH, T_LONG, cfg.vocab_size, seed=5)
    captured = []
    hooks = [
        layer.self_attn.indexer.register_forward_hook(
            lambda _m, args, _out: captured.append(args), with_kwargs=False
        )
        for layer in model.model.layers
    ]
    try:
        fx.hf_logits(model, toks)
    finally:
        for h in hooks:
            h.remove()
    stacks = [("dense_layers", 0), ("moe_layers", 0)]
    positions = jnp.broadcast_to(jnp.arange(T_LONG, dtype=jnp.int32), (BATCH, T_LONG))
    for layer, (args, (stack, i)) in enumerate(zip(captured, stacks, strict=True)):
        x, q_resid, (cos, sin) = args[0], args[1], args[2]
        ref = _np_indexer_scores(model.model.layers[layer].self_attn.indexer, x, q_resid, cos, sin)
        params = jax.tree.map(
            functools.partial(lambda i, a: a[i], i), variables["params"][stack]["attn"]["indexer"]
        )
        q, w, k, _ = Indexer(cfg).apply({"params": params}, x.numpy(), q_resid.numpy(), positions)
        ours = indexer_lib.index_scores(q, w, k, indexer_lib.visible_mask(positions, positions))
        finite = np.isfinite(ref)
        assert np.array_equal(np.isfinite(np.asarray(ours)), finite)
        assert _rel(np.asarray(ours)[finite], ref[finite]) < 1e-5
        idx, valid = select_topk(q, w, k, TOPK, q_idx_BT=positions, k_idx_BS=positions)
        idx, valid = np.asarray(idx), np.asarray(valid)
        for b in range(BATCH):
            for t in range(T_LONG):
                row = ref[b, t, : t + 1]
                expected = set(np.argsort(-row)[:TOPK].tolist())
                if t + 1 > TOPK:  # the selection is decided by a clear margin, not rounding
                    s = np.sort(row)[::-1]
                    assert s[TOPK - 1] - s[TOPK] > 1e-4 * np.abs(row).max(), (layer, b, t)
                assert set(idx[b, t][valid[b, t]].tolist()) == expected, (layer, b, t)
                assert valid[b, t].sum() == min(TOPK, t + 1)


# ====================================================================== sparse kernel
def _np_sparse(q, kv, idx, valid, C, scale):
    """float64 softmax over each query's valid picks: [B, T, H, C]."""
    q, kv = q.astype(np.float64), kv.astype(np.float64)
    B, T, H, _ = q.shape
    out = np.zeros((B, T, H, C))
    for b in range(B):
        for t in range(T):
            sel = kv[b, idx[b, t][valid[b, t]]]
            logits = q[b, t] @ sel.T * scale
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, t] = (p / p.sum(-1, keepdims=True)) @ sel[:, :C]
    return out


def test_sparse_latent_attention_values_and_grads(small_chunks):
    rng = np.random.default_rng(0)
    B, T, H, C, R, K = 2, 23, 3, 8, 4, 5
    q = rng.standard_normal((B, T, H, C + R)).astype(np.float32)
    kv = rng.standard_normal((B, T, C + R)).astype(np.float32)
    # Random distinct picks among the visible keys; queries seeing < K keys get invalid extras.
    idx = np.zeros((B, T, K), np.int32)
    valid = np.zeros((B, T, K), bool)
    for b in range(B):
        for t in range(T):
            n = min(K, t + 1)
            idx[b, t, :n] = rng.choice(t + 1, n, replace=False)
            idx[b, t, n:] = rng.integers(t + 1, T + 1, K - n) % T
            valid[b, t, :n] = True
    scale = 0.3
    f = jax.jit(
        functools.partial(sparse_latent_attention, value_dim=C, scale=scale),
    )
    out = f(q, kv, idx, valid)
    assert _rel(out, _np_sparse(q, kv, idx, valid, C, scale)) < 1e-5

    # Gradients equal those of the same attention written densely with a selection mask.
    sel_mask = np.zeros((B, T, T), bool)
    for b in range(B):
        for t in range(T):
            sel_mask[b, t, idx[b, t][valid[b, t]]] = True

    def dense(q, kv):
        logits = jnp.einsum("bthl,bsl->bths", q, kv) * scale
        p = jax.nn.softmax(jnp.where(sel_mask[:, :, None], logits, -jnp.inf), -1)
        return jnp.einsum("bths,bsc->bthc", p, kv[..., :C])

    cot = rng.standard_normal((B, T, H, C)).astype(np.float32)
    g_ours = jax.grad(lambda q, kv: jnp.sum(f(q, kv, idx, valid) * cot), (0, 1))(q, kv)
    g_ref = jax.grad(lambda q, kv: jnp.sum(dense(q, kv) * cot), (0, 1))(q, kv)
    for a, r in zip(g_ours, g_ref, strict=True):
        assert _rel(a, r) < 1e-5


# ====================================================================== model vs HF
@pytest.mark.parametrize("length", [T_LONG, T_SHORT])
def test_logits_match_hf(hf_v32, loaded, small_chunks, length):
    model, _ = hf_v32
    cfg, variables = loaded
    toks = fx.tokens(BATCH, length, cfg.vocab_size, seed=5)
    ref = fx.hf_logits(model, toks)
    ours = np.asarray(_forward(cfg)(variables, toks))
    assert _rel(ours, ref) < 1e-4
    if length > TOPK:  # the selection matters: dense attention gives other logits
        dense = {"params": _drop_indexer(variables["params"]), "moe_bias": variables["moe_bias"]}
        other = np.asarray(_forward(cfg.replace(index_topk=0))(dense, toks))
        assert _rel(other, ref) > 1e-2


def _drop_indexer(tree):
    if isinstance(tree, dict):
        return {k: _drop_indexer(v) for k, v in tree.items() if k != "indexer"}
    return tree


def test_packed_documents_select_within_their_own_segment(loaded, small_chunks):
    """Two documents (12 and 11 tokens, both > top-k) packed in either order: each document's
    logits do not depend on its neighbour, so no pick crosses a segment boundary."""
    cfg, variables = loaded
    a, b = (
        fx.tokens(1, 12, cfg.vocab_size, seed=10)[0],
        fx.tokens(1, 11, cfg.vocab_size, seed=11)[0],
    )
    toks = np.stack([np.concatenate([a, b]), np.concatenate([b, a])])
    seg = np.array([[1] * 12 + [2] * 11, [1] * 11 + [2] * 12], np.int32)
    model = Transformer(cfg.replace(remat="none"))
    logits = np.asarray(jax.jit(lambda v, t, s: model.apply(v, t, segment_ids_BT=s).logits)(
        variables, toks, seg
    ))  # fmt: skip
    assert _rel(logits[0, :12], logits[1, 11:]) < 1e-5
    assert _rel(logits[0, 12:], logits[1, :11]) < 1e-5


def test_topk_at_least_length_is_dense_mla(loaded):
    cfg, variables = loaded
    toks = fx.tokens(BATCH, T_SHORT, cfg.vocab_size, seed=6)
    dense = {"params": _drop_indexer(variables["params"]), "moe_bias": variables["moe_bias"]}
    a = np.asarray(_forward(cfg.replace(index_topk=T_SHORT))(variables, toks))
    b = np.asarray(_forward(cfg.replace(index_topk=0))(dense, toks))
    assert np.array_equal(a, b)


def test_prefill_and_decode_over_the_caches_match_hf(hf_v32, loaded, small_chunks):
    """Prefill 9 tokens (> top-k: sparse prefill), then decode 7 one by one over a 16-slot
    cache (sparse decode over the latent and indexer caches); logits equal HF's full forward,
    and greedy tokens (argmax) agree."""
    model, _ = hf_v32
    cfg, variables = loaded
    P, S = 9, 16
    toks = fx.tokens(BATCH, S, cfg.vocab_size, seed=8)
    ref = fx.hf_logits(model, toks)
    transformer = Transformer(cfg)

    @jax.jit
    def run(variables, cache, toks, positions, mode):
        out, upd = transformer.apply(
            {**variables, "cache": cache}, toks, positions, mode=mode, mutable=["cache"]
        )
        return out.logits, upd["cache"]

    run = jax.jit(run.__wrapped__, static_argnames="mode")
    cache = init_cache(cfg, BATCH, S)
    assert cache["dense_layers"]["attn"]["indexer"]["k"].shape == (1, BATCH, S, 16)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (BATCH, S))
    logits, cache = run(variables, cache, toks[:, :P], positions[:, :P], mode="prefill")
    outs = [np.asarray(logits)]
    for t in range(P, S):
        logits, cache = run(variables, cache, toks[:, t : t + 1], positions[:, t : t + 1], "decode")
        outs.append(np.asarray(logits))
    ours = np.concatenate(outs, axis=1)
    assert _rel(ours, ref) < 1e-4
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


# ====================================================================== save / load
def test_save_load_round_trip_and_hf_reads_it(hf_v32, loaded, tmp_path):
    model, src = hf_v32
    cfg, variables = loaded
    out = tmp_path / "export"
    save_hf_checkpoint(out, cfg, variables)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["index_topk"] == TOPK
    cfg2, variables2 = load_hf_checkpoint(out, dtype=jnp.float32)
    assert cfg2 == cfg
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, variables2))
    reloaded = DeepseekV32ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    toks = fx.tokens(BATCH, T_LONG, cfg.vocab_size, seed=9)
    np.testing.assert_array_equal(fx.hf_logits(reloaded, toks), fx.hf_logits(model, toks))


# ====================================================================== indexer training (KL)
def _hf_attention_and_scores(model, toks, topk):
    """Per layer (HF attention probabilities [B, H, T, T], float64 index scores [B, T, T]) with the
    indexers' top-k set to `topk` (T: every key, so HF's attention is dense)."""
    captured, saved = [], []
    hooks = []
    for layer in model.model.layers:
        attn = layer.self_attn
        saved.append(attn.indexer.index_topk)
        attn.indexer.index_topk = topk
        hooks.append(attn.indexer.register_forward_hook(
            lambda m, args, _out: captured.append(("scores", m, args))
        ))  # fmt: skip
        hooks.append(attn.register_forward_hook(
            lambda _m, _args, out: captured.append(("probs", out[1].detach().double().numpy()))
        ))  # fmt: skip
    try:
        fx.hf_logits(model, toks)
    finally:
        for h in hooks:
            h.remove()
        for layer, k in zip(model.model.layers, saved, strict=True):
            layer.self_attn.indexer.index_topk = k
    out = []
    for (_, m, args), (_, probs) in zip(captured[0::2], captured[1::2], strict=True):
        out.append((probs, _np_indexer_scores(m, args[0], args[1], *args[2])))
    return out


def _np_indexer_kl(layers, topk):
    """float64 Σ_layers mean_t KL(p_t,S || softmax(I_t,S)), S = the t-th query's top-k visible
    keys by index score; p = HF's attention probabilities summed over heads, L1-normalised."""
    total = 0.0
    for probs, scores in layers:
        B, _, T, _ = probs.shape
        p_all = probs.sum(1)
        kls = []
        for b in range(B):
            for t in range(T):
                row = scores[b, t, : t + 1]
                sel = np.argsort(-row)[: min(topk, t + 1)]
                p = p_all[b, t, sel] / p_all[b, t, sel].sum()
                q = np.exp(row[sel] - row[sel].max())
                q /= q.sum()
                kls.append(float((p * np.log(p / q)).sum()))
        total += float(np.mean(kls))
    return total


@functools.cache
def _indexer_kl_fn(cfg: ModelConfig):
    model = Transformer(cfg.replace(remat="none"))
    return jax.jit(lambda v, t: model.apply(v, t).indexer_kl)


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_indexer_kl_matches_hf_attention_and_numpy(hf_v32, loaded, small_chunks, stage):
    """The indexer loss summed over the 2 layers equals a float64 reference built from HF's own
    attention probabilities (dense for the warm-up, over the top-k picks for the sparse stage)
    and NumPy index scores; several padded query chunks (SMALL_BUDGET)."""
    model, _ = hf_v32
    cfg, variables = loaded
    toks = fx.tokens(BATCH, T_LONG, cfg.vocab_size, seed=12)
    topk = T_LONG if stage == "warmup" else TOPK
    ref = _np_indexer_kl(_hf_attention_and_scores(model, toks, topk), topk)
    ours = float(_indexer_kl_fn(cfg.replace(dsa_stage=stage))(variables, toks))
    assert ref > 1e-3  # a non-trivial target
    assert abs(ours - ref) / ref < 1e-4, (ours, ref)
    assert Transformer(cfg).apply(variables, toks[:, :4]).indexer_kl is None  # stage "off"


def test_kl_to_index_scores_hand_values():
    p = np.array([[[0.5, 0.5, 0.0]]], np.float32)
    s = np.array([[[0.0, np.log(3.0), 7.0]]], np.float32)
    mask = np.array([[[True, True, False]]])
    # q = (1/4, 3/4) over the two visible keys: KL = 0.5 ln 2 + 0.5 ln(2/3).
    got = float(indexer_lib.kl_to_index_scores(p, s, mask)[0, 0])
    assert got == pytest.approx(0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0), rel=1e-6)
    none = np.zeros_like(mask)
    g = jax.grad(lambda s: indexer_lib.kl_to_index_scores(p * np.nan, s, none).sum())(s)
    assert np.all(np.asarray(g) == 0)  # no visible key: zero loss, finite zero gradient


# A one-layer dense DSA model: cheap to compile for the training-step tests.
SEQ = 16


def _dsa_run_config(stage: str):
    cfg = tiny_config(
        n_routed_experts=0, num_hidden_layers=1, num_mtp_layers=0,
        index_topk=4, index_n_heads=2, index_head_dim=8,
    )  # fmt: skip
    c = tiny.get_config()
    skip = ("remat", "dsa_stage")
    c.model = ml_collections.ConfigDict(
        {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}
    )
    c.train.remat, c.train.dsa_stage, c.data.seq_len = "none", stage, SEQ
    c.train.steps, c.optim.warmup_steps, c.optim.lr = 10, 0, 1e-2
    return c


def _dsa_batch(vocab: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    B, T = 2, SEQ
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2 :] = 2
    seg[0, -3:] = 0  # padding
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0)
    return {
        "inputs": rng.randint(0, vocab, (B, T)).astype(np.int32),
        "targets": rng.randint(0, vocab, (B, T)).astype(np.int32),
        "segment_ids": seg,
        "positions": pos.astype(np.int32),
        "weights": (seg > 0).astype(np.float32),
    }


def _dsa_setup(stage: str):
    c = _dsa_run_config(stage)
    cfg = ts.model_config(c)
    assert cfg.dsa_stage == stage
    model = Transformer(cfg)
    tx, schedule = ts.make_optimizer(c)
    params = random_variables(cfg, seed=4)["params"]  # peaked attention: a KL worth learning
    state = ts.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, moe_bias={}, opt_state=tx.init(params)
    )
    return c, model, tx, schedule, state, _dsa_batch(cfg.vocab_size)


def _is_indexer(path) -> bool:
    return any(getattr(p, "key", None) == "indexer" for p in path)


def test_warmup_trains_only_the_indexer_and_lowers_its_kl():
    c, model, tx, schedule, state, batch = _dsa_setup("warmup")
    step = ts.jit_train_step(model, tx, schedule, c, donate=False)
    first, m0 = step(state, batch)
    assert float(m0["grad_norm"]) > 0 and np.isfinite(float(m0["indexer_kl"]))
    n_indexer = 0
    for path, a in jax.tree_util.tree_leaves_with_path(state.params):
        b = np.asarray(_get(first.params, path))
        if _is_indexer(path):
            n_indexer += 1
            assert not np.array_equal(np.asarray(a), b), jax.tree_util.keystr(path)
        else:  # frozen: bitwise unchanged (no update, no weight decay)
            assert np.array_equal(np.asarray(a), b), jax.tree_util.keystr(path)
    assert n_indexer == 5  # wq_b, wk, k_norm (scale, bias), weights_proj
    s, kls = first, [float(m0["indexer_kl"])]
    for _ in range(9):
        s, m = step(s, batch)
        kls.append(float(m["indexer_kl"]))
    assert kls[-1] < 0.5 * kls[0], kls


def _get(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


def test_sparse_stage_lm_loss_trains_main_model_and_kl_only_the_indexer():
    """Sparse stage (T=16 > top-k=4): the LM loss gives the indexer exactly zero gradient, the
    indexer KL gives it a nonzero one and every other parameter exactly zero."""
    c, model, _, _, state, batch = _dsa_setup("sparse")
    c.train.indexer_loss_weight = 0.0

    def loss_and_kl(params):
        loss, aux = ts.loss_fn(params, {}, batch, model=model, train_cfg=ts.train_options(c))
        return loss, aux["indexer_kl"]

    @jax.jit
    def grads(params):
        g_lm = jax.grad(lambda p: loss_and_kl(p)[0])(params)
        g_kl = jax.grad(lambda p: loss_and_kl(p)[1])(params)
        return g_lm, g_kl

    g_lm, g_kl = grads(state.params)
    for (path, lm), kl in zip(
        jax.tree_util.tree_leaves_with_path(g_lm), jax.tree.leaves(g_kl), strict=True
    ):
        name = jax.tree_util.keystr(path)
        if _is_indexer(path):
            assert not np.any(np.asarray(lm)), name
            assert np.all(np.isfinite(np.asarray(kl))) and np.any(np.asarray(kl)), name
        else:
            assert not np.any(np.asarray(kl)), name
    assert any(np.any(np.asarray(g)) for p, g in jax.tree_util.tree_leaves_with_path(g_lm)
               if not _is_indexer(p))  # fmt: skip


def test_dsa_stage_config_errors():
    c = _dsa_run_config("dense")
    with pytest.raises(ValueError, match="config.train.dsa_stage='dense'"):
        ts.validate_config(c, None)
    c = _dsa_run_config("warmup")
    c.model.index_topk = 0
    with pytest.raises(ValueError, match="dsa_stage.*needs index_topk > 0"):
        ts.model_config(c)
    c = _dsa_run_config("warmup")
    c.train.indexer_loss_weight = -1.0
    with pytest.raises(ValueError, match="indexer_loss_weight"):
        ts.validate_config(c, None)
