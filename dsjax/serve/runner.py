"""Runs one parsed API request on the `Engine`: n choices per prompt, events -> JSON or SSE.

Each choice is one engine request (choice index = prompt index * n + k; choice k of a prompt
uses seed `choice_seed(seed, k)`). Events arrive on the engine thread and are handed to the
asyncio loop through a queue. A finish is reported truthfully: "stop" (eos, a stop token or a
stop string), "length" (max_tokens or the context); an engine error or a cancellation the
client did not ask for is an error (500 / 503, or an error event in a stream), never "stop".
A client that disconnects, streaming or not, cancels its requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from dsjax.inference.engine import Engine, QueueFull, SamplingParams, TokenConstraint, TokenEvent
from dsjax.serve.errors import APIError
from dsjax.serve.requests import Sampling, choice_seed
from dsjax.serve.responses import (
    SSE_DONE,
    ChoiceText,
    LogprobEntry,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    sse,
    usage,
)
from dsjax.text.tool_calls import ToolCall, ToolCallParser

__all__ = ["Generation"]

_DISCONNECTED = object()


def engine_params(
    sampling: Sampling, max_tokens: int, seed: int | None, logprobs: int | None
) -> SamplingParams:
    """The engine's SamplingParams for one choice."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        seed=seed,
        stop_token_ids=sampling.stop_token_ids,
        ignore_eos=sampling.ignore_eos,
        logprobs=logprobs,
        speculative=sampling.speculative,
    )


def _entries(ev: TokenEvent) -> list[LogprobEntry] | None:
    if ev.logprobs is None:
        return None
    tops = ev.top_logprobs or ((),) * len(ev.tokens)
    return [
        LogprobEntry(int(t), float(lp), tuple((int(i), float(v)) for i, v in top))
        for t, lp, top in zip(ev.tokens, ev.logprobs, tops, strict=True)
    ]


@dataclasses.dataclass
class _Choice:
    text: ChoiceText
    prefix: str = ""  # echoed prompt text
    tokens: int = 0
    finish: str | None = None
    sent_entries: int = 0
    sent_chars: int = 0  # text offset after the streamed entries (completions logprobs)
    tools: ToolCallParser | None = None  # reads tool calls out of the text (chat with tools)
    constraint: TokenConstraint | None = None
    streamed: str = ""  # the text streamed so far (read by `tools`)


def _tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call in the OpenAI shape (with `index`: as a streamed delta)."""
    out: dict[str, Any] = {} if index is None else {"index": index}
    return {
        **out,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


class Generation:
    """One completions or chat request: submits its choices, then builds the response.

    Args:
      engine: the running engine.
      tokenizer: its tokenizer; token_text: a `TokenText` over it (logprobs).
      model_name: the served name.
      prompts: token ids per prompt; max_tokens: per prompt (already fitted to the context).
      sampling: the parsed request fields; chat: chat shapes instead of completions.
      echo: per prompt, text to put before the completion (completions `echo`), or None.
      best_of: candidates per prompt (>= n; None = n); the n with the highest mean token
        log-probability are returned (not streamed).
      constraint: makes each choice's `TokenConstraint` (constrained decoding), or None.
      tool_calls: read DeepSeek-format tool calls out of chat answers (`tool_calls` in the
        message or as streamed deltas, finish_reason "tool_calls").
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        token_text: TokenText,
        model_name: str,
        prompts: list[list[int]],
        max_tokens: list[int],
        sampling: Sampling,
        *,
        chat: bool,
        echo: list[str] | None = None,
        best_of: int | None = None,
        constraint: Callable[[], TokenConstraint] | None = None,
        tool_calls: bool = False,
    ):
        self.engine, self.token_text, self.model_name = engine, token_text, model_name
        self.prompts, self.max_tokens = prompts, max_tokens
        self.sampling, self.chat = sampling, chat
        self.per_prompt = k = best_of or sampling.n
        if k < sampling.n or (k > sampling.n and sampling.stream):
            raise ValueError(f"best_of={best_of}: must be >= n={sampling.n}, and not streamed")
        self.constraint = constraint
        ends = frozenset((*sampling.stop_token_ids, tokenizer.eos_id)) if tool_calls else None
        self.choices = [
            _Choice(
                ChoiceText(tokenizer, sampling.stop, show_special_except=ends),
                echo[c // k] if echo else "",
                tools=ToolCallParser() if tool_calls else None,
            )
            for c in range(len(prompts) * k)
        ]
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.index_of: dict[int, int] = {}
        self.rids: list[int] = []

    # ------------------------------------------------------------------ engine side
    def submit(self) -> None:
        """Queues every choice; all or none (503 when the queue is full or the engine stopped,
        400 when the engine refuses the request)."""
        loop = asyncio.get_running_loop()

        def callback(ev: TokenEvent) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, ev)

        k = self.per_prompt
        logprobs = self.sampling.logprobs
        if logprobs is None and k > self.sampling.n:
            logprobs = 0  # ranking the candidates needs their log-probabilities
        try:
            for c in range(len(self.choices)):
                p = c // k
                seed = choice_seed(self.sampling.seed, c % k)
                params = engine_params(self.sampling, self.max_tokens[p], seed, logprobs)
                more: dict[str, Any] = {}
                if self.constraint is not None:
                    more["constraint"] = self.choices[c].constraint = self.constraint()
                rid = self.engine.submit(self.prompts[p], params, callback, **more)
                self.index_of[rid] = c
                self.rids.append(rid)
        except QueueFull as err:
            self.cancel()
            raise APIError(
                503,
                f"server busy: {err}",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except ValueError as err:
            self.cancel()
            raise APIError(400, str(err)) from None
        except RuntimeError as err:  # the engine is not running (shutting down)
            self.cancel()
            raise APIError(503, f"server unavailable: {err}", type="server_error") from None

    def cancel(self) -> None:
        for rid in self.rids:
            self.engine.cancel(rid)

    def done(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    async def _batches(self) -> AsyncIterator[list[Any]]:
        """Batches of events: one awaited, plus whatever else has already arrived."""
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            yield batch

    def _consume(self, batch: list[TokenEvent]) -> dict[int, str]:
        """Applies events; returns new text per choice index. Raises APIError on failure."""
        deltas: dict[int, str] = {}
        for ev in batch:
            c = self.index_of[ev.request_id]
            choice = self.choices[c]
            if choice.finish is not None:
                continue
            if ev.finish_reason == "error":
                raise APIError(500, f"generation failed: {ev.error}", type="server_error")
            if ev.finish_reason == "cancelled":
                raise APIError(
                    503,
                    "the server cancelled this request (it is shutting down or failed)",
                    type="server_error",
                    code="request_cancelled",
                )
            choice.tokens += len(ev.tokens)
            final = ev.finish_reason is not None
            delta = choice.text.add(ev.tokens, final, _entries(ev))
            if choice.text.stopped:
                self.engine.cancel(ev.request_id)
                choice.finish = "stop"
            elif final:
                complete = choice.constraint is not None and choice.constraint.finished
                choice.finish = "stop" if complete else ev.finish_reason  # done on the last token
            if delta:
                deltas[c] = deltas.get(c, "") + delta
        return deltas

    # ------------------------------------------------------------------ response shapes
    def _logprobs(self, choice: _Choice, start: int, end: int, offset: int) -> Any:
        if self.sampling.logprobs is None:
            return None
        entries = choice.text.entries[start:end]
        if self.chat:
            return chat_logprobs(entries, self.token_text)
        return completion_logprobs(entries, self.token_text, offset)

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if self.chat and chunk else kind,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }

    def _usage(self) -> dict[str, int]:
        return usage(sum(len(p) for p in self.prompts), sum(c.tokens for c in self.choices))

    def _best(self) -> list[int]:
        """Indices of the returned choices: per prompt, the n candidates with the highest mean
        token log-probability (all of them, in order, when best_of = n)."""
        k, n = self.per_prompt, self.sampling.n
        if k == n:
            return list(range(len(self.choices)))

        def score(c: int) -> float:
            entries = self.choices[c].text.entries
            return sum(e.logprob for e in entries) / max(len(entries), 1)

        out = []
        for p in range(len(self.prompts)):
            ranked = sorted(range(p * k, (p + 1) * k), key=score, reverse=True)
            out.extend(ranked[:n])
        return out

    def _full_choice(self, index: int, c: int, text: str) -> dict[str, Any]:
        choice = self.choices[c]
        lp = self._logprobs(choice, 0, len(choice.text.entries), len(choice.prefix))
        out: dict[str, Any] = {"index": index}
        finish = choice.finish
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if choice.tools is not None:
                content, calls = choice.tools.parse(text)
                if calls:
                    message = {
                        "role": "assistant",
                        "content": content or None,
                        "tool_calls": [_tool_call(call) for call in calls],
                    }
                    finish = "tool_calls" if finish == "stop" else finish
            out["message"] = message
        else:
            out["text"] = choice.prefix + text
        return {**out, "logprobs": lp, "finish_reason": finish}

    def _delta_choice(self, c: int, text: str, ended: bool) -> dict[str, Any]:
        choice = self.choices[c]
        start, end = choice.sent_entries, len(choice.text.entries)
        choice.sent_entries = end
        offset = len(choice.prefix) + choice.sent_chars
        lp = self._logprobs(choice, start, end, offset) if end > start else None
        if lp is not None and not self.chat:
            choice.sent_chars += sum(len(t) for t in lp["tokens"])
        reason = choice.finish if ended else None
        out: dict[str, Any] = {"index": c}
        if self.chat and choice.tools is not None:
            delta: dict[str, Any] = {}
            choice.streamed += text
            content, calls = choice.tools.feed(choice.streamed, final=ended)
            if content:
                delta["content"] = content
            if calls:
                first = len(choice.tools.calls) - len(calls)
                delta["tool_calls"] = [_tool_call(x, first + i) for i, x in enumerate(calls)]
            if reason == "stop" and choice.tools.calls:
                reason = "tool_calls"
            out["delta"] = delta
        elif self.chat:
            out["delta"] = {"content": text} if text or reason is None else {}
        else:
            out["text"] = text
        return {**out, "logprobs": lp, "finish_reason": reason}

    # ------------------------------------------------------------------ HTTP
    async def respond(self, disconnected: Callable[[], Awaitable[None]]):
        """The JSONResponse or StreamingResponse; `disconnected` returns when the client
        leaves (non-streaming requests are then cancelled too)."""
        self.submit()
        if self.sampling.stream:
            return StreamingResponse(
                self._sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        async def watch() -> None:
            await disconnected()
            self.queue.put_nowait(_DISCONNECTED)

        watcher = asyncio.ensure_future(watch())
        texts = [""] * len(self.choices)
        try:
            async for batch in self._batches():
                if any(ev is _DISCONNECTED for ev in batch):
                    return JSONResponse({}, status_code=499)  # nobody is listening
                for c, d in self._consume(batch).items():
                    texts[c] += d
                if self.done():
                    break
        finally:
            watcher.cancel()
            self.cancel()
        best = self._best()
        out = self._envelope([self._full_choice(i, c, texts[c]) for i, c in enumerate(best)], False)
        return JSONResponse({**out, "usage": self._usage()})

    async def _sse(self) -> AsyncIterator[str]:
        include_usage = self.sampling.include_usage
        try:
            first = []
            for c, choice in enumerate(self.choices):
                if self.chat:
                    first.append(
                        {
                            "index": c,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    )
                elif choice.prefix:
                    first.append(
                        {"index": c, "text": choice.prefix, "logprobs": None, "finish_reason": None}
                    )
            if first:
                chunk = self._envelope(first, True)
                yield sse({**chunk, "usage": None} if include_usage else chunk)
            async for batch in self._batches():
                before = [c.finish for c in self.choices]
                try:
                    deltas = self._consume(batch)
                except APIError as err:
                    yield sse(err.body())
                    return
                ended = {c for c, ch in enumerate(self.choices) if ch.finish and not before[c]}
                fresh = {
                    c for c, ch in enumerate(self.choices) if len(ch.text.entries) > ch.sent_entries
                }
                choices = [
                    self._delta_choice(c, deltas.get(c, ""), c in ended)
                    for c in sorted(set(deltas) | ended | fresh)
                ]
                # Nothing to say (text held back by a tool-call parser): no chunk for it.
                choices = [
                    x
                    for x in choices
                    if x.get("delta") != {} or x["finish_reason"] or x["logprobs"] is not None
                ]
                if choices:
                    chunk = self._envelope(choices, True)
                    yield sse({**chunk, "usage": None} if include_usage else chunk)
                if self.done():
                    break
            if include_usage:
                yield sse({**self._envelope([], True), "usage": self._usage()})
            yield SSE_DONE
        finally:
            self.cancel()
