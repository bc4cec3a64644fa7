"""Generation: prefill, a jitted decode loop over the latent cache, sampling, MTP speculation.

`generate(cfg, variables, prompts, max_new_tokens, ...)` runs in three stages, all inside one
jitted function per (cfg, batch bucket, prompt bucket, cache bucket, speculative):

1. Prefill: prompts are right-padded to a bucketed length (a power of two up to 64, then a
   multiple of 64) and run once with `mode="prefill"` (expanded MLA), which writes every token's
   latent and rotated key into the cache at slot = position. The next-token logits of a row are
   those at index `length - 1`; padding writes slots beyond a row's length, which no query of
   that row sees before they are overwritten (slot s is visible at position p iff s <= p, and a
   decode step writes its token before attending).
2. Decode: a `lax.while_loop` of `mode="decode"` steps (absorbed MLA over the latent cache), one
   token per row per step, rows advancing independently; a row stops on `eos_id` or after
   `max_new_tokens`.
3. Speculative (optional, `speculative=True`): the model's first MTP module drafts token n+2 from
   the main hidden state h_n and Emb(t_{n+1}); one main decode forward over [t_{n+1}, draft] at
   positions [n+1, n+2] verifies it. The draft is accepted with probability min(1, p(d)/q(d))
   (greedy rows: iff it equals the argmax), else a token is drawn from norm(max(0, p - q)); after
   an acceptance a bonus token is drawn from the second verification position. Greedy output
   therefore equals plain greedy decoding and sampled output keeps the target distribution.
   Rejected tokens are rolled back by not advancing the row's position: their cache slots are
   overwritten before any query can see them. The MTP cache slot of an accepted draft is written
   at the start of the next step (the "catch-up" entry; otherwise that entry goes to a scratch
   slot no real position reaches).

Sampling (`filter_logits`, `sample_tokens`) is per row, in float32: temperature, then top-k, then
top-p (nucleus) over the renormalised top-k; temperature 0 means greedy (argmax). Per-token
randomness is `fold_in(row_key, token_index)`, so a row's samples do not depend on the batch.

Compilation: jax.jit caches the compiled program per static cfg and argument shapes; batch size,
prompt length and total length are bucketed so similar calls reuse it. `max_new_tokens`, the
sampling parameters and eos are traced values.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsjax.config import ModelConfig
from dsjax.model import MTPModule, Transformer, init_cache

__all__ = [
    "GenerateResult",
    "RowSampling",
    "bucket_length",
    "decode_step",
    "filter_logits",
    "generate",
    "main_cache",
    "prefill",
    "sample_tokens",
    "verify_draft",
    "zeros_cache",
]

# Purposes of the per-token random streams (fold_in(token_key, purpose)).
_SAMPLE, _DRAFT, _ACCEPT, _RESIDUAL, _BONUS = range(5)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """Output of `generate`.

    Attributes:
      tokens: generated token ids per prompt (prompt excluded; a final eos is included).
      lengths: number of generated tokens per prompt (= len(tokens[i])).
      finish_reasons: "stop" (eos generated) or "length" (max_new_tokens reached) per prompt.
      acceptance_rate: speculative only: accepted drafts / drafted tokens (None otherwise).
      tokens_per_forward: speculative only: tokens produced per main-model decode forward
        (1 + acceptance rate up to truncation at the end; None otherwise).
    """

    tokens: list[list[int]]
    lengths: list[int]
    finish_reasons: list[str]
    acceptance_rate: float | None = None
    tokens_per_forward: float | None = None


# ====================================================================== shapes and buckets
def bucket_length(n: int, minimum: int = 8) -> int:
    """`n` rounded up to a power of two (at least `minimum`) up to 64, then to a multiple of 64."""
    n = max(int(n), minimum)
    if n <= 64:
        return 1 << (n - 1).bit_length()
    return -(-n // 64) * 64


def _bucket_batch(b: int) -> int:
    return 1 << (max(b, 1) - 1).bit_length()


def main_cache(cache: dict[str, Any]) -> dict[str, Any]:
    """The main model's part of a cache pytree (MTP module caches removed)."""
    return {k: v for k, v in cache.items() if not k.startswith("mtp_")}


@functools.lru_cache(maxsize=64)
def _cache_shapes(cfg: ModelConfig, batch: int, length: int):
    return jax.eval_shape(lambda: init_cache(cfg, batch, length))


def zeros_cache(cfg: ModelConfig, batch: int, length: int, mtp: bool = True):
    """A zero cache like `init_cache(cfg, batch, length)` (shapes traced once per size);
    `mtp=False` leaves out the MTP modules' caches."""
    shapes = _cache_shapes(cfg, batch, length)
    if not mtp:
        shapes = main_cache(shapes)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _model_vars(variables: dict[str, Any]) -> dict[str, Any]:
    return {k: variables[k] for k in ("params", "moe_bias") if k in variables}


def _mtp_vars(variables: dict[str, Any], cache: Any) -> dict[str, Any]:
    out = {"params": variables["params"]["mtp_0"], "cache": cache}
    bias = variables.get("moe_bias", {})
    if "mtp_0" in bias:
        out["moe_bias"] = bias["mtp_0"]
    return out


# ====================================================================== model calls
def prefill(
    cfg: ModelConfig, variables, tokens_BP, lengths_B, cache_len: int, run_mtp: bool = False
):
    """Runs the prompts (right-padded, starting at position 0) and fills a fresh cache.

    Args:
      cfg: the model config.
      variables: {"params", "moe_bias"}.
      tokens_BP: int32 [B, P] right-padded prompts.
      lengths_B: int32 [B] prompt lengths (>= 1).
      cache_len: S >= P, slots of the returned cache.
      run_mtp: also run the MTP modules over positions 0..P-2 (fills their caches).

    Returns:
      (logits_BV at index length-1 (float32), hidden_BD there (pre final norm), cache pytree).
    """
    B, P = tokens_BP.shape
    cache = zeros_cache(cfg, B, cache_len, mtp=run_mtp)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    segment_ids_BP = (positions_BP < lengths_B[:, None]).astype(jnp.int32)
    out, upd = Transformer(cfg).apply(
        {**_model_vars(variables), "cache": cache},
        tokens_BP,
        positions_BP,
        segment_ids_BP,
        mode="prefill",
        run_mtp=run_mtp and cfg.num_mtp_layers > 0,
        mutable=["cache"],
    )
    rows = jnp.arange(B)
    last_B = lengths_B - 1
    return out.logits[rows, last_B], out.hidden[rows, last_B], upd["cache"]


def decode_step(cfg: ModelConfig, variables, cache, tokens_BT, positions_BT):
    """One absorbed-attention decode forward: writes the T new tokens at their positions.

    Returns (logits_BTV float32, hidden_BTD pre final norm, updated main cache). `cache` must be
    the main model's cache (see `main_cache`).
    """
    out, upd = Transformer(cfg).apply(
        {**_model_vars(variables), "cache": cache},
        tokens_BT,
        positions_BT,
        jnp.ones(tokens_BT.shape, jnp.int32),
        mode="decode",
        run_mtp=False,
        mutable=["cache"],
    )
    return out.logits, out.hidden, upd["cache"]


def _embed(cfg, variables, tokens_BT):
    return Transformer(cfg).apply(
        {"params": variables["params"]}, tokens_BT, method=lambda m, t: m.embed(t)
    )


def _head(cfg, variables, normed_BTD):
    return Transformer(cfg).apply(
        {"params": variables["params"]}, normed_BTD, method=Transformer.head
    )


# ====================================================================== sampling
def filter_logits(logits_BV, temperature_B, top_k_B, top_p_B):
    """Sampling logits: softmax of the result is the distribution a row samples from (float32).

    Temperature scales the logits; top-k (0 = off) keeps the k largest; top-p (1 = off) keeps
    the smallest prefix of the top-k, by probability, whose mass reaches p (at least one token).
    Excluded tokens get -inf. Rows with temperature <= 0 become one-hot at the argmax (greedy).
    """
    logits = logits_BV.astype(jnp.float32)
    V = logits.shape[-1]
    greedy_B = temperature_B <= 0
    scaled = logits / jnp.where(greedy_B, 1.0, temperature_B)[:, None].astype(jnp.float32)
    k_B = jnp.where((top_k_B > 0) & (top_k_B < V), top_k_B, V).astype(jnp.int32)
    top_p_B = top_p_B.astype(jnp.float32)
    needs = jnp.any(~greedy_B & ((k_B < V) | (top_p_B < 1.0)))

    def truncate(x_BV):
        sorted_BV = jnp.flip(jnp.sort(x_BV, axis=-1), axis=-1)
        in_k = jnp.arange(V)[None] < k_B[:, None]
        probs = jax.nn.softmax(jnp.where(in_k, sorted_BV, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = in_k & (mass_before < top_p_B[:, None])
        n_keep_B = jnp.maximum(keep.sum(-1), 1)
        threshold_B1 = jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1)
        return jnp.where(x_BV >= threshold_B1, x_BV, -jnp.inf)

    scaled = jax.lax.cond(needs, truncate, lambda x: x, scaled)
    onehot = jnp.arange(V)[None] == jnp.argmax(logits, axis=-1)[:, None]
    return jnp.where(greedy_B[:, None], jnp.where(onehot, 0.0, -jnp.inf), scaled)


def sample_tokens(keys_B, filtered_BV, greedy_B):
    """One token per row: argmax for greedy rows, else a draw from softmax(filtered)."""
    drawn = jax.vmap(jax.random.categorical)(keys_B, filtered_BV)
    return jnp.where(greedy_B, jnp.argmax(filtered_BV, axis=-1), drawn).astype(jnp.int32)


def verify_draft(accept_keys_B, residual_keys_B, target_BV, draft_BV, draft_B, greedy_B):
    """The speculative-sampling rule for one drafted token per row.

    `target_BV` / `draft_BV` are filtered logits (see `filter_logits`) of the target p and the
    draft distribution q that `draft_B` was drawn from. The draft is accepted with probability
    min(1, p(d) / q(d)); otherwise the replacement is drawn from norm(max(0, p - q)), so the
    token kept, `where(accepted, draft, replacement)`, is distributed as p. Greedy rows accept iff
    the draft is the argmax of p, and their replacement is that argmax.

    Returns (accepted_B bool, replacement_B int32).
    """
    rows = jnp.arange(draft_B.shape[0])
    p = jax.nn.softmax(target_BV, axis=-1)
    q = jax.nn.softmax(draft_BV, axis=-1)
    u = jax.vmap(jax.random.uniform)(accept_keys_B)
    best = jnp.argmax(target_BV, axis=-1).astype(jnp.int32)
    accepted = jnp.where(greedy_B, draft_B == best, u * q[rows, draft_B] < p[rows, draft_B])
    residual = jnp.maximum(p - q, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)
    replacement = sample_tokens(residual_keys_B, jnp.log(residual), greedy_B)
    return accepted, jnp.where(greedy_B, best, replacement)


def _purpose_keys(keys_B, counts_B, purpose: int):
    """Per-row key for token index `counts_B` and a purpose (independent of the batch)."""
    fold = jax.vmap(jax.random.fold_in)
    return fold(fold(keys_B, counts_B), jnp.full_like(counts_B, purpose))


# ====================================================================== decode loops
@struct.dataclass
class RowSampling:
    """Per-row sampling parameters (a pytree: traced, so changing them never recompiles).

    `keys_B` are typed PRNG keys; token i of a row is drawn with fold_in(fold_in(key, i), purpose).
    """

    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    keys_B: jax.Array

    @property
    def greedy_B(self):
        return self.temperature_B <= 0

    def filter(self, logits_BV):
        return filter_logits(logits_BV, self.temperature_B, self.top_k_B, self.top_p_B)

    def keys(self, counts_B, purpose):
        return _purpose_keys(self.keys_B, counts_B, purpose)

    def sample(self, logits_BV, counts_B):
        """Token number `counts_B` of each row, drawn from `logits_BV` (greedy rows: argmax)."""
        return sample_tokens(self.keys(counts_B, _SAMPLE), self.filter(logits_BV), self.greedy_B)


def _write(out_BN, idx_B, value_B, mask_B):
    rows = jnp.arange(out_BN.shape[0])
    idx_B = jnp.clip(idx_B, 0, out_BN.shape[1] - 1)
    return out_BN.at[rows, idx_B].set(jnp.where(mask_B, value_B, out_BN[rows, idx_B]))


def _plain_loop(cfg, variables, cache, state, sampling: RowSampling, max_new, eos_id):
    """One token per row per step until every row is done."""

    def cond(s):
        return jnp.any(~s["done"])

    def body(s):
        active = ~s["done"]
        logits, _, new_cache = decode_step(
            cfg, variables, s["cache"], s["tok"][:, None], s["pos"][:, None]
        )
        nxt = sampling.sample(logits[:, 0], s["count"])
        out = _write(s["out"], s["count"], nxt, active)
        count = s["count"] + active
        eos = active & (nxt == eos_id)
        done = s["done"] | eos | (count >= max_new)
        return dict(
            s,
            cache=new_cache,
            out=out,
            count=count,
            done=done,
            eos=s["eos"] | eos,
            tok=jnp.where(active, nxt, s["tok"]),
            pos=jnp.where(done, s["pos"], s["pos"] + 1),
        )

    return jax.lax.while_loop(cond, body, dict(state, cache=cache))


def _speculative_loop(
    cfg, variables, cache, mtp_cache, state, sampling: RowSampling, max_new, eos_id
):
    """Draft with MTP depth 1, verify two tokens per main forward (see the module docstring).

    Per row: `pos` = position of the last sampled token t_{n+1} (not yet in the main cache),
    `tok2` = (t_n, t_{n+1}), `h2` = (h_{n-1}, h_n), `catch` = the MTP slot n-1 still has to be
    written (the previous step accepted its draft).
    """
    B = state["tok"].shape[0]
    scratch = jax.tree.leaves(mtp_cache)[0].shape[1] - 1
    mtp = MTPModule(cfg, "decode")

    def cond(s):
        return jnp.any(~s["done"])

    def body(s):
        active = ~s["done"]
        pos, count = s["pos"], s["count"]
        # Draft t_{n+2} at MTP position n (plus the catch-up entry at n-1 or the scratch slot).
        mtp_pos = jnp.stack([jnp.where(s["catch"], pos - 2, scratch), pos - 1], axis=1)
        emb = _embed(cfg, variables, s["tok2"])
        (_, normed, _), upd = mtp.apply(
            _mtp_vars(variables, s["mtp_cache"]),
            s["h2"],
            emb,
            mtp_pos,
            jnp.ones((B, 2), jnp.int32),
            mutable=["cache"],
        )
        q_filtered = sampling.filter(_head(cfg, variables, normed[:, 1:2])[:, 0])
        draft = sample_tokens(sampling.keys(count, _DRAFT), q_filtered, sampling.greedy_B)

        # Verify [t_{n+1}, draft] at [n+1, n+2].
        logits, hidden, new_cache = decode_step(
            cfg,
            variables,
            s["cache"],
            jnp.stack([s["tok2"][:, 1], draft], 1),
            jnp.stack([pos, pos + 1], 1),
        )
        accept, resampled = verify_draft(
            sampling.keys(count, _ACCEPT),
            sampling.keys(count, _RESIDUAL),
            sampling.filter(logits[:, 0]),
            q_filtered,
            draft,
            sampling.greedy_B,
        )
        bonus = sample_tokens(
            sampling.keys(count + 1, _BONUS), sampling.filter(logits[:, 1]), sampling.greedy_B
        )
        first = jnp.where(accept, draft, resampled)

        # Emit one or two tokens.
        out = _write(s["out"], count, first, active)
        count1 = count + active
        stop1 = (first == eos_id) | (count1 >= max_new)
        second = active & ~stop1 & accept
        out = _write(out, count1, bonus, second)
        count2 = count1 + second
        eos = active & ((first == eos_id) | (second & (bonus == eos_id)))
        done = s["done"] | (active & stop1) | (second & ((bonus == eos_id) | (count2 >= max_new)))

        # Next state: accepted -> last token bonus at n+3; rejected -> resampled at n+2.
        keep = ~active | done
        acc = accept[:, None]
        tok2 = jnp.where(
            acc, jnp.stack([draft, bonus], 1), jnp.stack([s["tok2"][:, 1], resampled], 1)
        )
        h2 = jnp.where(acc[..., None], hidden, jnp.stack([s["h2"][:, 1], hidden[:, 0]], 1))
        return dict(
            s,
            cache=new_cache,
            mtp_cache=upd["cache"],
            out=out,
            count=count2,
            done=done,
            eos=s["eos"] | eos,
            pos=jnp.where(keep, pos, pos + 1 + accept),
            tok2=jnp.where(keep[:, None], s["tok2"], tok2),
            h2=jnp.where(keep[:, None, None], s["h2"], h2.astype(s["h2"].dtype)),
            catch=jnp.where(keep, s["catch"], accept),
            drafted=s["drafted"] + active,
            accepted=s["accepted"] + (active & accept),
            steps=s["steps"] + active,
            emitted=s["emitted"] + (count2 - count),
        )

    zeros = jnp.zeros((B,), jnp.int32)
    init = dict(
        state,
        cache=cache,
        mtp_cache=mtp_cache,
        drafted=zeros,
        accepted=zeros,
        steps=zeros,
        emitted=zeros,
    )
    return jax.lax.while_loop(cond, body, init)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "speculative"))
def _generate_jit(
    cfg: ModelConfig,
    variables,
    tokens_BP,
    lengths_B,
    valid_B,
    max_new,
    eos_id,
    sampling: RowSampling,
    *,
    cache_len: int,
    speculative: bool,
):
    """Prefill + first token + decode loop; returns (out_BN, count_B, eos_B, stats)."""
    B = tokens_BP.shape[0]
    logits_BV, hidden_BD, cache = prefill(
        cfg, variables, tokens_BP, lengths_B, cache_len, run_mtp=speculative
    )
    zeros = jnp.zeros((B,), jnp.int32)
    first = sampling.sample(logits_BV, zeros)
    out = jnp.zeros((B, cache_len), jnp.int32).at[:, 0].set(first)
    eos = valid_B & (first == eos_id)
    state = dict(
        out=out,
        count=valid_B.astype(jnp.int32),
        eos=eos,
        done=~valid_B | eos | (max_new <= 1),
        tok=first,
        pos=lengths_B,
    )
    stats = {}
    if speculative:
        last_prompt = tokens_BP[jnp.arange(B), lengths_B - 1]
        state["tok2"] = jnp.stack([last_prompt, first], 1)
        state["h2"] = jnp.stack([jnp.zeros_like(hidden_BD), hidden_BD], 1)
        state["catch"] = jnp.zeros((B,), bool)
        final = _speculative_loop(
            cfg, variables, main_cache(cache), cache["mtp_0"], state, sampling, max_new, eos_id
        )
        stats = {k: final[k] for k in ("drafted", "accepted", "steps", "emitted")}
    else:
        final = _plain_loop(cfg, variables, main_cache(cache), state, sampling, max_new, eos_id)
    return final["out"], final["count"], final["eos"], stats


# ====================================================================== public entry
def _normalise_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, tuple) and len(prompts) == 2 and hasattr(prompts[0], "shape"):
        array, lengths = np.asarray(prompts[0]), np.asarray(prompts[1])
        if array.ndim != 2 or lengths.shape != (array.shape[0],):
            raise ValueError(
                f"padded prompts must be [B, P] with lengths [B]; got "
                f"{array.shape} and {lengths.shape}"
            )
        if np.any(lengths > array.shape[1]):
            raise ValueError(
                f"prompt lengths {lengths.tolist()} exceed the padded length {array.shape[1]}"
            )
        rows = [array[i, : int(n)].tolist() for i, n in enumerate(lengths)]
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        rows = [[int(t) for t in p] for p in prompts]
    else:
        raise ValueError("prompts must be a list of token lists or (padded [B, P] array, lengths)")
    if not rows:
        raise ValueError("prompts is empty")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
        if min(row) < 0 or max(row) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size})")
    return rows


def _to_key(rng) -> jax.Array:
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, int):
        return jax.random.key(rng)
    rng = jnp.asarray(rng)
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    return rng


def generate(
    cfg: ModelConfig,
    variables,
    prompts,
    max_new_tokens: int,
    *,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    rng=None,
    eos_id: int | None = None,
    speculative: bool = False,
) -> GenerateResult:
    """Generates up to `max_new_tokens` tokens after each prompt.

    Args:
      cfg: model config (its `dtype` is the compute dtype).
      variables: {"params", "moe_bias"} as from `init_variables` or `load_hf_checkpoint`.
      prompts: a list of token-id lists, or (padded int array [B, P], lengths [B]).
      max_new_tokens: generated tokens per prompt at most (>= 1).
      temperature: 0 = greedy; otherwise logits / temperature.
      top_k: keep the k most likely tokens (0 = all).
      top_p: nucleus sampling mass (1 = off).
        Each of the three is one value for all rows or one per prompt.
      rng: a jax PRNG key (or an int seed) for sampling; row i uses fold_in(rng, i).
      eos_id: a row stops after generating this token (None: only max_new_tokens stops).
      speculative: MTP speculative decoding (needs cfg.num_mtp_layers >= 1).

    Returns:
      GenerateResult (speculative runs also report acceptance rate and tokens per forward).

    Raises:
      ValueError: bad prompts or arguments, prompt + max_new_tokens beyond
        cfg.max_position_embeddings, or speculative without an MTP module.
    """
    rows = _normalise_prompts(prompts, cfg.vocab_size)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    if speculative and cfg.num_mtp_layers == 0:
        raise ValueError("speculative=True needs an MTP module but cfg.num_mtp_layers=0")
    B = len(rows)
    try:
        temps, ks, ps = (np.broadcast_to(np.asarray(x), (B,)) for x in (temperature, top_k, top_p))
    except ValueError:
        raise ValueError(
            f"temperature, top_k and top_p must be scalars or have one value per prompt ({B})"
        ) from None
    if np.any(temps < 0) or np.any(ps <= 0) or np.any(ps > 1) or np.any(ks < 0):
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
            f"temperature={temperature}, top_p={top_p}, top_k={top_k}"
        )
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} = "
            f"{longest + max_new_tokens} exceeds max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )

    B_pad, P = _bucket_batch(B), bucket_length(longest)
    # Slots for prompt + new tokens, the speculative look-ahead and the MTP scratch slot.
    S = bucket_length(longest + max_new_tokens + 2)
    tokens = np.zeros((B_pad, P), np.int32)
    lengths = np.ones((B_pad,), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        lengths[i] = len(r)
    valid = np.arange(B_pad) < B
    key = _to_key(rng)

    def per_row(x, dtype, fill):
        return jnp.asarray(np.concatenate([x, np.full(B_pad - B, fill)]).astype(dtype))

    sampling = RowSampling(
        temperature_B=per_row(temps, np.float32, 0.0),
        top_k_B=per_row(ks, np.int32, 0),
        top_p_B=per_row(ps, np.float32, 1.0),
        keys_B=jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(B_pad)),
    )
    out, count, eos, stats = _generate_jit(
        cfg,
        variables,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jnp.asarray(valid),
        jnp.int32(max_new_tokens),
        jnp.int32(-1 if eos_id is None else eos_id),
        sampling,
        cache_len=S,
        speculative=speculative,
    )
    out, count, eos = np.asarray(out), np.asarray(count), np.asarray(eos)
    tokens_out = [out[i, : count[i]].tolist() for i in range(B)]
    result = GenerateResult(
        tokens=tokens_out,
        lengths=[int(c) for c in count[:B]],
        finish_reasons=["stop" if eos[i] else "length" for i in range(B)],
    )
    if speculative:
        drafted = int(np.asarray(stats["drafted"])[:B].sum())
        accepted = int(np.asarray(stats["accepted"])[:B].sum())
        steps = int(np.asarray(stats["steps"])[:B].sum())
        emitted = int(np.asarray(stats["emitted"])[:B].sum())
        result = dataclasses.replace(
            result,
            acceptance_rate=accepted / drafted if drafted else 0.0,
            tokens_per_forward=emitted / steps if steps else 0.0,
        )
    return result
