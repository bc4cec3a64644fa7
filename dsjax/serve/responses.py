"""OpenAI response bodies: choices, logprobs, usage, SSE framing, and /metrics text.

`ChoiceText` turns one choice's token stream into text deltas (stop strings honoured) and
keeps the logprob entries of the tokens it used; `completion_logprobs` / `chat_logprobs` put
those entries in the completions shape ({tokens, token_logprobs, top_logprobs, text_offset})
and the chat shape ({content: [{token, logprob, bytes, top_logprobs}]}).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from tokenizers import decoders

from dsjax.text.token_bytes import piece_bytes

__all__ = [
    "SSE_DONE",
    "ChoiceText",
    "LogprobEntry",
    "TokenText",
    "chat_logprobs",
    "completion_logprobs",
    "prometheus_text",
    "sse",
    "usage",
]

SSE_DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ====================================================================== token text
class TokenText:
    """Text and raw bytes of single tokens (for logprobs), cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.backend.decoder, decoders.ByteLevel)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        """(text, bytes) of one token; a token that is not whole UTF-8 characters has the text
        "bytes:\\xNN..." (as OpenAI shows it)."""
        hit = self._cache.get(token_id)
        if hit is None:
            raw = piece_bytes(self.tokenizer, token_id, self.byte_level)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a character: OpenAI's "bytes:\\xNN" form
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token_id] = (text, raw)
        return hit


@dataclasses.dataclass(frozen=True)
class LogprobEntry:
    """One generated token: its id, log-probability and the top alternatives [(id, lp)]."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _finite(x: float) -> float:
    """JSON has no -inf: a zero probability is reported as the most negative float32."""
    return float(x) if math.isfinite(x) else -3.4028234663852886e38


def completion_logprobs(
    entries: list[LogprobEntry], token_text: TokenText, offset: int = 0
) -> dict[str, Any]:
    """The completions `logprobs` object; text offsets start at `offset` (echoed prompt)."""
    tokens, offsets = [], []
    for e in entries:
        text = token_text(e.token)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(e.logprob) for e in entries],
        "top_logprobs": [
            {token_text(t)[0]: _finite(lp) for t, lp in e.top} if e.top else None for e in entries
        ],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[LogprobEntry], token_text: TokenText) -> dict[str, Any]:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def item(t: int, lp: float) -> dict[str, Any]:
        text, raw = token_text(t)
        return {"token": text, "logprob": _finite(lp), "bytes": list(raw)}

    return {
        "content": [
            {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ],
        "refusal": None,
    }


# ====================================================================== text deltas
class ChoiceText:
    """One choice's token stream as text deltas, honouring stop strings.

    Text is re-decoded from all ids each time (byte-level BPE pieces merge across tokens;
    `show_special_except`: special tokens are written out, except those ids); a
    trailing U+FFFD (an incomplete UTF-8 sequence) and the last len(longest stop) - 1
    characters are held back until they can no longer start a stop string. `entries` keeps
    the logprob entries of the tokens taken (none after a stop string is hit).
    """

    def __init__(
        self,
        tokenizer,
        stop: tuple[str, ...] | list[str],
        show_special_except: frozenset[int] | None = None,
    ):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.show_special_except = show_special_except
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.entries: list[LogprobEntry] = []
        self.emitted = 0
        self.stopped = False

    def add(
        self, tokens: tuple[int, ...], final: bool, entries: list[LogprobEntry] | None = None
    ) -> str:
        """New text to send after `tokens` (all of it when `final` or a stop string hit)."""
        if self.stopped:
            return ""
        before = len(self.ids)
        self.ids.extend(tokens)
        self.entries.extend(entries or ())
        text = self.decode(self.ids)
        hits = [(i, len(s)) for i, s in ((text.find(s, self.emitted), s) for s in self.stop)]
        cut, length = min(((i, n) for i, n in hits if i >= 0), default=(-1, 0))
        if cut >= 0:
            self.stopped = True
            end = cut
            self._drop_after(before, cut + length)
        elif final:
            end = len(text)
        else:
            end = len(text) - self.hold
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted : end], end
        return delta

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`: special tokens skipped, or (`show_special_except`: the ids that end a
        request, dropped) written out, e.g. tool-call markers."""
        if self.show_special_except is None:
            return self.tokenizer.decode(ids)
        kept = [t for t in ids if t not in self.show_special_except]
        return self.tokenizer.decode(kept, skip_special_tokens=False)

    def _drop_after(self, before: int, need: int) -> None:
        """Keeps the ids (and entries) up to the first one whose text reaches `need` chars."""
        for k in range(before + 1, len(self.ids) + 1):
            if len(self.decode(self.ids[:k])) >= need:
                del self.ids[k:], self.entries[k:]
                return


# ====================================================================== /metrics
_METRICS = (
    # (name, type, help, stats key)
    ("dsjax_slots", "gauge", "Decode slots of the engine.", "slots"),
    ("dsjax_active_slots", "gauge", "Slots holding a running request.", "active"),
    ("dsjax_queue_depth", "gauge", "Requests waiting for a slot.", "queued"),
    ("dsjax_max_queue", "gauge", "Waiting requests allowed before 503.", "max_queue"),
    ("dsjax_context_length", "gauge", "Positions per slot (prompt + generated).", "max_len"),
    ("dsjax_generated_tokens_total", "counter", "Tokens generated.", "generated_tokens"),
    ("dsjax_forwards_total", "counter", "Decode forward passes.", "forwards"),
    (
        "dsjax_prefill_chunks_total",
        "counter",
        "Chunks of long prompts prefilled between decode steps.",
        "prefill_chunks",
    ),
    ("dsjax_prefilling_slots", "gauge", "Slots whose prompt is being prefilled.", "prefilling"),
    ("dsjax_draft_tokens_total", "counter", "Speculative (MTP) draft tokens.", "draft_tokens"),
    (
        "dsjax_accepted_tokens_total",
        "counter",
        "Speculative draft tokens accepted.",
        "accepted_tokens",
    ),
    ("dsjax_prefills_total", "counter", "Prompts prefilled.", "prefills"),
    (
        "dsjax_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens found in the prefix cache (not prefilled again).",
        "prefix_cache_hit_tokens",
    ),
    ("dsjax_prompt_tokens_total", "counter", "Prompt tokens admitted.", "prompt_tokens"),
    ("dsjax_cache_pages", "gauge", "Pages of the latent cache pool.", "cache_pages"),
    ("dsjax_cache_pages_used", "gauge", "Cache pages held by requests.", "cache_pages_used"),
    (
        "dsjax_cache_pages_cached",
        "gauge",
        "Unreferenced cache pages kept for the prefix cache (evictable).",
        "cache_pages_cached",
    ),
    (
        "dsjax_cache_usage_ratio",
        "gauge",
        "Cache pages held by requests / pages.",
        "cache_usage",
    ),
    (
        "dsjax_preemptions_total",
        "counter",
        "Requests sent back to the queue to free cache pages (recomputed later).",
        "preemptions",
    ),
    ("dsjax_requests_submitted_total", "counter", "Requests submitted.", "submitted"),
)


def prometheus_text(stats: dict[str, Any]) -> str:
    """Engine statistics in the Prometheus text exposition format (version 0.0.4)."""
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    for name, kind, help_, key in _METRICS:
        metric(name, kind, help_, [("", float(stats.get(key, 0)))])
    finished = sorted(
        (k.removeprefix("finished_"), v) for k, v in stats.items() if k.startswith("finished_")
    )
    metric(
        "dsjax_requests_finished_total",
        "counter",
        "Requests finished, by finish reason.",
        [(f'{{reason="{reason}"}}', float(v)) for reason, v in finished],
    )
    drafts = float(stats.get("draft_tokens", 0))
    metric(
        "dsjax_speculative_acceptance_ratio",
        "gauge",
        "Accepted / drafted speculative tokens since start (0 when none drafted).",
        [("", float(stats.get("accepted_tokens", 0)) / drafts if drafts else 0.0)],
    )
    forwards = float(stats.get("forwards", 0))
    decoded = float(stats.get("generated_tokens", 0)) - float(stats.get("prefills", 0))
    metric(
        "dsjax_tokens_per_forward",
        "gauge",
        "Decoded tokens (after each prompt's first) per row decode forward since start.",
        [("", decoded / forwards if forwards else 0.0)],
    )
    return "\n".join(lines) + "\n"
