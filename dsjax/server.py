"""OpenAI-compatible HTTP API over an `Engine` (FastAPI): completions, chat, SSE streaming.

Endpoints: `GET /health` (no auth; slot and queue counts), `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions`.

Request fields: `model` (optional; anything but the served name is a 404), `prompt` (a string, a
list of strings, a list of token ids, or a list of such lists: one choice per prompt) or
`messages` (chat), `max_tokens` (chat also `max_completion_tokens`), `temperature`, `top_p`,
`top_k`, `stop` (a string or a list of up to 4; the text is cut before the first occurrence),
`seed`, `n` (only 1), `stream`, `stream_options.include_usage`, and (as in vLLM) `ignore_eos`.
Unknown fields are ignored.

Chat prompts are rendered with the tokenizer's Jinja chat template (tokenizer_config.json) in a
sandbox, with `messages`, `add_generation_prompt=True`, `bos_token` and `eos_token`. Without a
template, `DEFAULT_CHAT_TEMPLATE` is used: one "<role>: <content>" line per message, then
"assistant:".

Errors have the OpenAI shape `{"error": {"message", "type", "param", "code"}}`: 400 for malformed
JSON, bad fields and prompts that do not fit the context, 401 for a missing or wrong API key
(when one is configured), 404 for an unknown model or route, 503 with Retry-After when the
engine's queue is full, 500 for an engine failure. Streams are server-sent events, one chunk per
batch of new tokens, ending with `data: [DONE]`; a client that disconnects cancels its requests,
which frees their slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2.sandbox import ImmutableSandboxedEnvironment
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsjax.engine import Engine, QueueFull, SamplingParams, TokenEvent

__all__ = ["APIError", "DEFAULT_CHAT_TEMPLATE", "create_app", "load_model"]

log = logging.getLogger(__name__)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
MAX_STOP_STRINGS = 4
DEFAULT_COMPLETION_TOKENS = 16
DEFAULT_CHAT_TOKENS = 512


class APIError(Exception):
    """An error response in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ====================================================================== loading
def load_model(path: str | os.PathLike, dtype: str | None = None):
    """Loads (cfg, variables, tokenizer, add_bos) from a train.py workdir or a Hugging Face dir.

    A workdir has `checkpoints/` (Orbax, read by `dsjax.checkpoint.load_for_inference`) and
    `tokenizer/`; a Hugging Face directory has config.json, safetensors and tokenizer.json.
    `dtype` (e.g. "bfloat16") overrides the parameter/compute dtype; None keeps the checkpoint's.
    `add_bos` is tokenizer_config.json's `add_bos_token` (False when absent).
    """
    import jax.numpy as jnp

    from dsjax.tokenizer import Tokenizer

    path = Path(path)
    if (path / "checkpoints").is_dir():
        from dsjax.checkpoint import load_for_inference

        cfg, variables = load_for_inference(str(path), dtype=dtype)
        tok_dir = path / "tokenizer"
    elif (path / "config.json").is_file():
        from dsjax.hf import load_hf_checkpoint

        cfg, variables = load_hf_checkpoint(path, dtype=None if dtype is None else jnp.dtype(dtype))
        tok_dir = path
    else:
        raise ValueError(
            f"{path} is neither a train.py workdir (checkpoints/) nor a Hugging Face "
            "directory (config.json)"
        )
    tokenizer = Tokenizer.load(tok_dir)
    add_bos = False
    config_file = tok_dir / "tokenizer_config.json"
    if config_file.is_file():
        add_bos = bool(json.loads(config_file.read_text()).get("add_bos_token", False))
    return cfg, variables, tokenizer, add_bos


# ====================================================================== field parsing
def _bad(param: str, rule: str) -> APIError:
    return APIError(400, f"'{param}': {rule}", param=param)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _sampling(body: dict[str, Any], default_max_tokens: int, chat: bool):
    """(SamplingParams without the final max_tokens check, stop strings, stream, usage flag)."""
    max_tokens = body.get("max_tokens")
    if chat and max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise _bad("max_tokens", f"must be a positive integer; got {max_tokens!r}")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature  # the OpenAI default
    if not _is_number(temperature) or not 0 <= temperature <= 100:
        raise _bad("temperature", f"must be a number in [0, 100]; got {temperature!r}")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad("top_p", f"must be a number in (0, 1]; got {top_p!r}")
    top_k = body.get("top_k")
    top_k = 0 if top_k is None or top_k == -1 else top_k
    if not _is_int(top_k) or top_k < 0:
        raise _bad("top_k", f"must be an integer >= 0 (or -1 for off); got {top_k!r}")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad("seed", f"must be an integer; got {seed!r}")
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n", f"only n=1 is supported; got {n!r}")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or (len(stop) > MAX_STOP_STRINGS)
    ):
        raise _bad(
            "stop",
            f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be a boolean; got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", f"must be a boolean; got {ignore_eos!r}")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=float(top_p),
        seed=seed,
        ignore_eos=ignore_eos,
    )
    return params, stop, stream, bool(options.get("include_usage", False))


def _token_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(_is_int(t) for t in x)


# ====================================================================== detokenisation
class _TextTracker:
    """Turns one choice's token stream into text deltas, honouring stop strings.

    Text is re-decoded from all ids each time (byte-level BPE pieces merge across tokens); a
    trailing U+FFFD (an incomplete UTF-8 sequence) and the last len(longest stop) - 1
    characters are held back until they can no longer start a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def add(self, tokens: tuple[int, ...], final: bool) -> str:
        """New text to send after `tokens` (all of it when `final` or a stop string hit)."""
        if self.stopped:
            return ""
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids)
        cut = min(
            (i for i in (text.find(s, self.emitted) for s in self.stop) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            end = cut
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


# ====================================================================== app
def create_app(
    engine: Engine, tokenizer, model_name: str, *, api_key: str | None = None, add_bos: bool = False
) -> FastAPI:
    """The FastAPI app serving `engine` (already started) with `tokenizer` (dsjax Tokenizer)."""
    app = FastAPI(title="dsjax", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    template_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    template_env.globals["raise_exception"] = raise_exception
    chat_template = template_env.from_string(tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, err: Exception):
        log.exception("unhandled error")
        return APIError(
            500, f"internal error: {type(err).__name__}", type="server_error"
        ).response()

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != api_key:
            raise APIError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer KEY')",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def read_body(request: Request) -> dict[str, Any]:
        check_auth(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"malformed JSON body: {err}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(
                404,
                f"model '{model}' does not exist; this server serves '{model_name}'",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return body

    def encode(text: str, special: bool) -> list[int]:
        ids = tokenizer.encode(text, parse_special=special)
        if add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
            ids = [tokenizer.bos_id, *ids]
        return ids

    def completion_prompts(body: dict[str, Any]) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif _token_list(prompt):
            return [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(_token_list(p) for p in prompt):
            return [list(p) for p in prompt]
        else:
            raise _bad(
                "prompt",
                "must be a string, a list of strings, a list of token ids or a "
                "list of token-id lists (non-empty)",
            )
        return [encode(p, special=False) for p in prompts]

    def chat_prompt(body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "must be a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}]", "must be an object with a string 'role'")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                parts = [p.get("text") for p in content if isinstance(p, dict)]
                if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                    raise _bad(f"messages[{i}].content", "only text parts are supported")
                content = "".join(parts)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")
            clean.append({**m, "content": content})
        bos = tokenizer.bos_id
        eos = tokenizer.eos_id
        try:
            text = chat_template.render(
                messages=clean,
                add_generation_prompt=True,
                bos_token=tokenizer.backend.id_to_token(bos) if bos is not None else "",
                eos_token=tokenizer.backend.id_to_token(eos) if eos is not None else "",
            )
        except jinja2.TemplateError as err:
            raise _bad("messages", f"chat template failed: {err}") from None
        return encode(text, special=True)

    def check_fits(prompts: list[list[int]], params: SamplingParams, explicit: bool):
        for ids in prompts:
            if not ids:
                raise _bad("prompt", "encodes to no tokens")
            if len(ids) + params.max_tokens > engine.max_len:
                if not explicit and len(ids) < engine.max_len:
                    continue
                raise APIError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                    f"{len(ids) + params.max_tokens} exceeds the context length "
                    f"{engine.max_len}",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            if max(ids) >= engine.cfg.vocab_size or min(ids) < 0:
                raise _bad("prompt", f"token ids must be in [0, {engine.cfg.vocab_size})")

    def submit_all(prompts, params, queue: asyncio.Queue, index_of: dict[int, int]) -> list[int]:
        loop = asyncio.get_running_loop()

        def callback(ev: TokenEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        ids: list[int] = []
        try:
            for i, prompt in enumerate(prompts):
                p = params
                if len(prompt) + p.max_tokens > engine.max_len:  # defaulted max_tokens
                    p = dataclasses.replace(p, max_tokens=engine.max_len - len(prompt))
                rid = engine.submit(prompt, p, callback)
                index_of[rid] = i
                ids.append(rid)
        except QueueFull as err:
            for rid in ids:
                engine.cancel(rid)
            raise APIError(
                503,
                f"server busy: {err}",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except ValueError as err:
            for rid in ids:
                engine.cancel(rid)
            raise APIError(400, str(err)) from None
        return ids

    async def events(queue: asyncio.Queue) -> AsyncIterator[list[TokenEvent]]:
        """Batches of events: one awaited, plus whatever else has already arrived."""
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            yield batch

    async def run(body: dict[str, Any], prompts: list[list[int]], chat: bool):
        default = DEFAULT_CHAT_TOKENS if chat else DEFAULT_COMPLETION_TOKENS
        params, stop, stream, include_usage = _sampling(body, default, chat)
        explicit = body.get("max_tokens") is not None or (
            chat and body.get("max_completion_tokens") is not None
        )
        check_fits(prompts, params, explicit)
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        index_of: dict[int, int] = {}
        rids = submit_all(prompts, params, queue, index_of)
        trackers = [_TextTracker(tokenizer, stop) for _ in prompts]
        counts = [0] * len(prompts)
        finish: list[str | None] = [None] * len(prompts)
        prefix = "chatcmpl" if chat else "cmpl"
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        usage_prompt = sum(len(p) for p in prompts)

        def consume(batch: list[TokenEvent]) -> dict[int, str]:
            """Applies events; returns new text per choice index."""
            deltas: dict[int, str] = {}
            for ev in batch:
                i = index_of[ev.request_id]
                if finish[i] is not None:
                    continue
                if ev.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.error}", type="server_error")
                counts[i] += len(ev.tokens)
                final = ev.finish_reason is not None
                delta = trackers[i].add(ev.tokens, final)
                if trackers[i].stopped:
                    engine.cancel(ev.request_id)
                    finish[i] = "stop"
                elif final:
                    finish[i] = "stop" if ev.finish_reason in ("stop", "cancelled") else "length"
                if delta:
                    deltas[i] = deltas.get(i, "") + delta
            return deltas

        def usage() -> dict[str, int]:
            done = sum(counts)
            return {
                "prompt_tokens": usage_prompt,
                "completion_tokens": done,
                "total_tokens": usage_prompt + done,
            }

        def choice(i: int, text: str, reason: str | None, delta: bool) -> dict[str, Any]:
            if chat:
                key = "delta" if delta else "message"
                msg = {"content": text} if delta else {"role": "assistant", "content": text}
                if delta and not text and reason is not None:
                    msg = {}
                return {"index": i, key: msg, "logprobs": None, "finish_reason": reason}
            return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

        def envelope(choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
            kind = ("chat.completion" if chat else "text_completion") + (
                ".chunk" if chat and chunk else ""
            )
            return {
                "id": response_id,
                "object": kind,
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
            }

        if not stream:
            texts = [""] * len(prompts)
            try:
                async for batch in events(queue):
                    for i, d in consume(batch).items():
                        texts[i] += d
                    if all(f is not None for f in finish):
                        break
            finally:
                for rid in rids:
                    engine.cancel(rid)
            out = envelope(
                [choice(i, texts[i], finish[i], False) for i in range(len(prompts))], False
            )
            out["usage"] = usage()
            return JSONResponse(out)

        async def sse() -> AsyncIterator[str]:
            try:
                if chat:
                    first = [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for i in range(len(prompts))
                    ]
                    yield f"data: {json.dumps(envelope(first, True))}\n\n"
                async for batch in events(queue):
                    before = list(finish)
                    try:
                        deltas = consume(batch)
                    except APIError as err:
                        error = {
                            "message": err.message,
                            "type": err.type,
                            "param": err.param,
                            "code": err.code,
                        }
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        return
                    ended = {i for i in range(len(prompts)) if finish[i] and not before[i]}
                    choices = [
                        choice(i, deltas.get(i, ""), finish[i] if i in ended else None, True)
                        for i in sorted(set(deltas) | ended)
                    ]
                    if choices:
                        chunk = envelope(choices, True)
                        if include_usage:
                            chunk["usage"] = None
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if all(f is not None for f in finish):
                        break
                if include_usage:
                    chunk = envelope([], True)
                    chunk["usage"] = usage()
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for rid in rids:
                    engine.cancel(rid)

        return StreamingResponse(
            sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "dsjax",
                    "max_model_len": engine.max_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        return await run(body, completion_prompts(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        return await run(body, [chat_prompt(body)], chat=True)

    return app
