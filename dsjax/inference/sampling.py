"""Sampling: request parameters, logit filtering, draws, speculative verification, log-probs, keys.

One module serves `generate` and the engine, so the same seed gives the same samples through both:

- `SamplingParams`: per-request parameters and their validation.
- `row_key_data(seed, row)` / `seed_words(seed)`: the ONE seed -> per-row key rule. A 64-bit seed
  is split into two 32-bit words (no overflow); inside the jitted programs the row key is
  `fold_in(fold_in(key(lo), hi), row)` (`keys_from_seeds`). `generate(rng=seed)` gives prompt i
  row i; an engine request with `seed` is row 0 unless submitted with another row.
- `RowSampling`: per-row temperature / top-k / top-p / keys as a traced pytree; token number i of
  a row is drawn with `fold_in(fold_in(row_key, i), purpose)`, so a row's samples never depend on
  the batch it runs in.
- `filter_logits`, `sample_tokens`, `verify_draft` (speculative sampling: greedy-exact, and
  distribution-preserving accept / residual when sampling), `token_logprobs`.
- Allowed-token masks (constrained decoding, `dsjax.inference.constrained`): the host packs each
  row's allowed tokens into 32-bit words (`pack_allowed`, [B, ceil(V/32)] uint32: 1 bit per
  token, 1 = allowed); the decode programs unpack them (`unpack_allowed`) and `mask_logits`
  sends every other token to -inf before filtering and sampling, so draws, speculative drafts,
  their verification and residual draws all stay inside the mask.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "MAX_LOGPROBS",
    "MAX_TEMPERATURE",
    "RowSampling",
    "SamplingParams",
    "filter_logits",
    "keys_from_seeds",
    "mask_logits",
    "pack_allowed",
    "sample_tokens",
    "seed_words",
    "token_logprobs",
    "unpack_allowed",
    "verify_draft",
]

MAX_LOGPROBS = 20  # top-n alternatives reported at most (OpenAI's limit)
MAX_TEMPERATURE = 100.0
_INT32_MAX = 2**31 - 1
_UINT64_MAX = 2**64 - 1

# Purposes of the per-token random streams (fold_in(token_key, purpose)).
SAMPLE, DRAFT, ACCEPT, RESIDUAL, BONUS = range(5)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_)
    )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters.

    Attributes:
      max_tokens: tokens to generate at most, 1..2**31-1.
      temperature: 0 = greedy; finite, 0..MAX_TEMPERATURE.
      top_k: keep the k most likely tokens (0 = all), 0..2**31-1.
      top_p: nucleus mass in (0, 1] (1 = off).
      seed: PRNG seed 0..2**64-1 (None: derived from the engine seed and the request id).
      stop_token_ids: tokens that end the request (in addition to the engine's eos_id); ids are
        checked against the vocabulary at submit.
      ignore_eos: do not stop on the engine's eos_id.
      logprobs: None = no log-probs; n in 0..20 = the chosen token's log-prob plus the top-n
        alternatives (log-softmax of the raw logits, temperature 1).
      speculative: MTP speculative decoding (None = the engine's default).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    speculative: bool | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises ValueError naming the bad field and its bound (stop ids checked against
        `vocab_size` when given)."""
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= _INT32_MAX:
            raise ValueError(
                f"max_tokens={self.max_tokens!r}: must be an integer in [1, {_INT32_MAX}]"
            )
        if (
            not _is_real(self.temperature)
            or not math.isfinite(self.temperature)
            or not 0 <= self.temperature <= MAX_TEMPERATURE
        ):
            raise ValueError(
                f"temperature={self.temperature!r}: must be a finite number in "
                f"[0, {MAX_TEMPERATURE}]"
            )
        if not _is_int(self.top_k) or not 0 <= self.top_k <= _INT32_MAX:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer in [0, {_INT32_MAX}]")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be a number in (0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _UINT64_MAX):
            raise ValueError(f"seed={self.seed!r}: must be None or an integer in [0, 2**64-1]")
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(
            _is_int(t) for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids={self.stop_token_ids!r}: must be a tuple of integer token ids"
            )
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids={tuple(self.stop_token_ids)!r}: ids must be in "
                f"[0, vocab_size={vocab_size})"
            )
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos={self.ignore_eos!r}: must be a bool")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"logprobs={self.logprobs!r}: must be None or an integer in [0, {MAX_LOGPROBS}]"
            )
        if self.speculative is not None and not isinstance(self.speculative, (bool, np.bool_)):
            raise ValueError(f"speculative={self.speculative!r}: must be None, True or False")


# ====================================================================== keys
def seed_words(seed: int) -> tuple[int, int]:
    """A seed in [0, 2**64) as (low, high) 32-bit words (the host half of the key rule)."""
    if not _is_int(seed) or not 0 <= seed <= _UINT64_MAX:
        raise ValueError(f"seed={seed!r}: must be an integer in [0, 2**64-1]")
    seed = int(seed)
    return seed & 0xFFFFFFFF, seed >> 32


def keys_from_seeds(seeds_B2, rows_B):
    """Typed per-row PRNG keys from uint32 seed words [B, 2] and row indices [B] (traceable):
    key_b = fold_in(fold_in(key(lo_b), hi_b), row_b)."""
    fold = jax.vmap(jax.random.fold_in)
    base = jax.vmap(jax.random.key)(seeds_B2[:, 0].astype(jnp.uint32))
    return fold(fold(base, seeds_B2[:, 1].astype(jnp.uint32)), rows_B.astype(jnp.uint32))


def purpose_keys(keys_B, counts_B, purpose: int):
    """Per-row key for token index `counts_B` and a purpose (independent of the batch)."""
    fold = jax.vmap(jax.random.fold_in)
    return fold(fold(keys_B, counts_B), jnp.full_like(counts_B, purpose))


# ====================================================================== allowed-token masks
def pack_allowed(allowed_BV) -> np.ndarray:
    """Host side: bool [B, V] (or [V]) -> uint32 words [B, ceil(V/32)] (bit v % 32 of word
    v // 32 is token v; little-endian bit order)."""
    allowed = np.atleast_2d(np.asarray(allowed_BV, bool))
    B, V = allowed.shape
    W = -(-V // 32)
    padded = np.zeros((B, W * 32), bool)
    padded[:, :V] = allowed
    bits = np.packbits(padded.reshape(B, W, 4, 8), axis=-1, bitorder="little")
    return bits.reshape(B, W * 4).view("<u4").astype(np.uint32)


def unpack_allowed(words_BW, vocab_size: int):
    """Device side: uint32 words [B, W] (`pack_allowed`) -> bool [B, vocab_size] (traceable)."""
    v = jnp.arange(vocab_size)
    words = jnp.take(words_BW.astype(jnp.uint32), v // 32, axis=1)
    return ((words >> (v % 32).astype(jnp.uint32)) & 1).astype(bool)


def mask_logits(logits_BV, allowed_BV):
    """-inf outside each row's allowed tokens (float32). A row that allows no token is left as
    it is (the host never sends one; this keeps a bad mask from yielding NaN draws)."""
    logits = logits_BV.astype(jnp.float32)
    if allowed_BV is None:
        return logits
    keep = allowed_BV | ~jnp.any(allowed_BV, axis=-1, keepdims=True)
    return jnp.where(keep, logits, -jnp.inf)


# ====================================================================== filter, draw, verify
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
    best = jnp.argmax(filtered_BV, axis=-1)
    drawn = jax.lax.cond(
        jnp.all(greedy_B),
        lambda: best,
        lambda: jax.vmap(jax.random.categorical)(keys_B, filtered_BV),
    )
    return jnp.where(greedy_B, best, drawn).astype(jnp.int32)


def verify_draft(accept_keys_B, residual_keys_B, target_BV, draft_BV, draft_B, greedy_B):
    """The speculative-sampling rule for one drafted token per row.

    `target_BV` / `draft_BV` are filtered logits (see `filter_logits`) of the target p and the
    draft distribution q that `draft_B` was drawn from. The draft is accepted with probability
    min(1, p(d) / q(d)); otherwise the replacement is drawn from norm(max(0, p - q)), so the
    token kept, `where(accepted, draft, replacement)`, is distributed as p. Greedy rows accept iff
    the draft is the argmax of p, and their replacement is that argmax.

    Returns (accepted_B bool, replacement_B int32).
    """
    best = jnp.argmax(target_BV, axis=-1).astype(jnp.int32)

    def sampled():
        rows = jnp.arange(draft_B.shape[0])
        p = jax.nn.softmax(target_BV, axis=-1)
        q = jax.nn.softmax(draft_BV, axis=-1)
        u = jax.vmap(jax.random.uniform)(accept_keys_B)
        accepted = u * q[rows, draft_B] < p[rows, draft_B]
        residual = jnp.maximum(p - q, 0.0)
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)
        replacement = sample_tokens(residual_keys_B, jnp.log(residual), greedy_B)
        return accepted, replacement

    accepted, replacement = jax.lax.cond(
        jnp.all(greedy_B), lambda: (draft_B == best, best), sampled
    )
    return (
        jnp.where(greedy_B, draft_B == best, accepted),
        jnp.where(greedy_B, best, replacement),
    )


def token_logprobs(logits_BV, tokens_B, top_n: int):
    """Log-probabilities under log_softmax(raw logits) (temperature 1, no filtering).

    Returns (logprob_B of `tokens_B`, top_ids_Bn int32, top_logprobs_Bn sorted descending);
    with top_n = 0 the last two are [B, 0].
    """
    lp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    chosen_B = jnp.take_along_axis(lp_BV, tokens_B[:, None], axis=-1)[:, 0]
    if top_n == 0:
        B = tokens_B.shape[0]
        return chosen_B, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)
    top_lp, top_ids = jax.lax.top_k(lp_BV, top_n)
    return chosen_B, top_ids.astype(jnp.int32), top_lp


# ====================================================================== per-row parameters
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
        return purpose_keys(self.keys_B, counts_B, purpose)

    def sample(self, logits_BV, counts_B):
        """Token number `counts_B` of each row, drawn from `logits_BV` (greedy rows: argmax).

        When every row is greedy (a runtime test, no recompile) only the argmax runs: the
        filter's [B, V] one-hot, the second argmax and the key derivation are skipped. Same
        tokens: the filtered logits of a greedy row are one-hot at this argmax.
        """
        greedy_B = self.greedy_B

        def sampled():
            keys = self.keys(counts_B, SAMPLE)
            return sample_tokens(keys, self.filter(logits_BV), greedy_B)

        def argmax():
            return jnp.argmax(logits_BV.astype(jnp.float32), axis=-1).astype(jnp.int32)

        return jax.lax.cond(jnp.all(greedy_B), argmax, sampled)
