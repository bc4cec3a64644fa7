"""Generation: `generate(cfg, variables, prompts, max_new_tokens, ...)` over the decode core.

One jitted function per (cfg, batch bucket, prompt bucket, cache bucket, speculative,
stop-id width, prefill chunk): `decode.prefill` (expanded MLA over right-padded prompts, chunk by
chunk beyond `prefill_chunk` tokens, token 0 sampled) and a
`lax.while_loop` of `decode.step` (absorbed MLA over the latent cache, sampling, MTP draft and
verification when `speculative=True`, stop rules) until every row is done. Sampling,
speculative verification and the seed -> per-row key rule live in `dsjax.inference.sampling` and are the
engine's too: `generate(..., rng=seed)` row i draws what an engine request with that seed and row
i draws. Batch size, prompt length and total length are bucketed so similar calls reuse the
compiled program; `max_new_tokens`, the sampling parameters, eos and stop ids are traced values.

Greedy speculative output equals plain greedy output; sampled speculative output keeps the
target distribution (see `dsjax.decode`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.inference import decode
from dsjax.inference.decode import bucket_length, decode_forward, zeros_cache
from dsjax.inference.meshes import DecodeMesh
from dsjax.inference.sampling import (
    RowSampling,
    SamplingParams,
    filter_logits,
    sample_tokens,
    verify_draft,
)
from dsjax.model.config import ModelConfig

__all__ = [
    "GenerateResult",
    "RowSampling",
    "bucket_length",
    "decode_step",
    "filter_logits",
    "generate",
    "main_cache",
    "sample_tokens",
    "verify_draft",
    "zeros_cache",
]

decode_step = decode_forward  # the absorbed decode forward (kept under its old name)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """Output of `generate`.

    Attributes:
      tokens: generated token ids per prompt (prompt excluded; a final stop token is included).
      lengths: number of generated tokens per prompt (= len(tokens[i])).
      finish_reasons: "stop" (eos / stop token generated) or "length" per prompt.
      acceptance_rate: speculative only: accepted drafts / drafted tokens (None otherwise).
      tokens_per_forward: speculative only: tokens produced per main-model decode forward
        (None otherwise).
    """

    tokens: list[list[int]]
    lengths: list[int]
    finish_reasons: list[str]
    acceptance_rate: float | None = None
    tokens_per_forward: float | None = None


def _bucket_batch(b: int) -> int:
    return 1 << (max(b, 1) - 1).bit_length()


def main_cache(cache: dict[str, Any]) -> dict[str, Any]:
    """The main model's part of a cache pytree (MTP module caches removed)."""
    return {k: v for k, v in cache.items() if not k.startswith("mtp_")}


def _write(out_BN, idx_B, value_B, mask_B):
    rows = jnp.arange(out_BN.shape[0])
    idx_B = jnp.clip(idx_B, 0, out_BN.shape[1] - 1)
    return out_BN.at[rows, idx_B].set(jnp.where(mask_B, value_B, out_BN[rows, idx_B]))


@functools.partial(
    jax.jit, static_argnames=("cfg", "cache_len", "speculative", "prefill_chunk", "mesh")
)
def _generate_jit(
    cfg: ModelConfig,
    variables,
    tokens_BP,
    lengths_B,
    req: decode.RowRequest,
    *,
    cache_len: int,
    speculative: bool,
    prefill_chunk: int | None,
    mesh: DecodeMesh | None,
):
    """Prefill + decode loop; returns (out_BN, count_B, stopped_B, drafted, accepted, forwards).
    `mesh` only keys the compiled program: the caller traces it under `mesh.context()`."""
    B = tokens_BP.shape[0]
    state, first = decode.prefill(
        cfg,
        variables,
        tokens_BP,
        lengths_B,
        req,
        cache_len=cache_len,
        speculative=speculative,
        prefill_chunk=prefill_chunk,
    )
    out = jnp.zeros((B, cache_len), jnp.int32).at[:, 0].set(first.tokens_B2[:, 0])

    def cond(carry):
        return jnp.any(~carry[0].done_B)

    def body(carry):
        s, out = carry
        count = s.counts_B
        s, emitted = decode.step(cfg, variables, s, speculative=speculative)
        out = _write(out, count, emitted.tokens_B2[:, 0], emitted.n_B >= 1)
        out = _write(out, count + 1, emitted.tokens_B2[:, 1], emitted.n_B >= 2)
        return s, out

    s, out = jax.lax.while_loop(cond, body, (state, out))
    return out, s.counts_B, s.stopped_B, s.drafted_B, s.accepted_B, s.forwards_B


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


def _seed(rng) -> int:
    """The 64-bit seed of `rng`: None -> 0, an int, or a PRNG key (its two key-data words, so
    `jax.random.key(s)` and `s` give the same samples)."""
    if rng is None:
        return 0
    if isinstance(rng, (int, np.integer)):
        return int(rng)
    rng = jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    words = np.asarray(rng).astype(np.uint64).reshape(-1)
    if words.size < 2:
        return int(words[0]) if words.size else 0
    return int((int(words[0]) << 32) | int(words[1]))


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
    stop_token_ids: Sequence[int] = (),
    speculative: bool = False,
    prefill_chunk: int | None = decode.PREFILL_CHUNK,
    mesh: DecodeMesh | None = None,
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
      rng: an int seed in [0, 2**64) or a jax PRNG key (seed = its key data); row i samples
        with the key `dsjax.inference.sampling` derives from (seed, i), as an engine request would.
      eos_id: a row stops after generating this token (None: no eos).
      stop_token_ids: further tokens that stop a row (included in its output).
      speculative: MTP speculative decoding (needs cfg.num_mtp_layers >= 1).
      prefill_chunk: prompts longer than this many tokens are prefilled chunk by chunk into the
        latent cache (activation memory bounded by the chunk); None: one forward per prompt.
      mesh: decode on this mesh with its layout's rules (`DecodeMesh`; `variables` placed by
        `mesh.place`); the batch is padded to a multiple of its `row_shards`.

    Returns:
      GenerateResult (speculative runs also report acceptance rate and tokens per forward).

    Raises:
      ValueError: bad prompts or arguments, prompt + max_new_tokens beyond
        cfg.max_position_embeddings, or speculative without an MTP module.
    """
    rows = _normalise_prompts(prompts, cfg.vocab_size)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    if prefill_chunk is not None and (
        not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1
    ):
        raise ValueError(f"prefill_chunk={prefill_chunk!r}: must be a positive integer or None")
    if speculative and cfg.num_mtp_layers == 0:
        raise ValueError("speculative=True needs an MTP module but cfg.num_mtp_layers=0")
    B = len(rows)
    try:
        temps, ks, ps = (np.broadcast_to(np.asarray(x), (B,)) for x in (temperature, top_k, top_p))
    except ValueError:
        raise ValueError(
            f"temperature, top_k and top_p must be scalars or have one value per prompt ({B})"
        ) from None
    seed = _seed(rng)
    stops = tuple(int(t) for t in stop_token_ids)
    params = [
        SamplingParams(
            max_tokens=int(max_new_tokens),
            temperature=float(t),
            top_k=int(k),
            top_p=float(p),
            seed=seed,
            stop_token_ids=stops,
        )
        for t, k, p in zip(temps, ks, ps, strict=True)
    ]
    for p in params:
        p.validate(cfg.vocab_size)
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id={eos_id}: must be in [0, vocab_size={cfg.vocab_size})")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} = "
            f"{longest + max_new_tokens} exceeds max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )

    B_pad, P = _bucket_batch(B), bucket_length(longest)
    if mesh is not None:
        B_pad = -(-B_pad // mesh.row_shards) * mesh.row_shards
    # Slots for prompt + new tokens and the speculative look-ahead.
    S = bucket_length(longest + max_new_tokens + 1)
    tokens = np.zeros((B_pad, P), np.int32)
    lengths = np.ones((B_pad,), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        lengths[i] = len(r)
    n_stops = len(set(stops) | ({eos_id} if eos_id is not None else set()))
    req = decode.row_requests(
        params,
        range(B),
        eos_id,
        stop_width=_bucket_batch(max(n_stops, 1)),
        speculative_default=speculative,
        pad_to=B_pad,
    )
    with contextlib.nullcontext() if mesh is None else mesh.context():
        out, count, stopped, drafted, accepted, forwards = jax.device_get(
            _generate_jit(
                cfg,
                variables,
                tokens,
                lengths,
                req,
                cache_len=S,
                speculative=bool(speculative),
                prefill_chunk=None if prefill_chunk is None else int(prefill_chunk),
                mesh=mesh,
            )
        )
    result = GenerateResult(
        tokens=[out[i, : count[i]].tolist() for i in range(B)],
        lengths=[int(c) for c in count[:B]],
        finish_reasons=["stop" if stopped[i] else "length" for i in range(B)],
    )
    if speculative:
        n_draft, n_acc = int(drafted[:B].sum()), int(accepted[:B].sum())
        n_fwd = int(forwards[:B].sum())
        decoded = int(count[:B].sum()) - B  # token 0 of each row comes from the prefill
        result = dataclasses.replace(
            result,
            acceptance_rate=n_acc / n_draft if n_draft else 0.0,
            tokens_per_forward=decoded / n_fwd if n_fwd else 0.0,
        )
    return result
