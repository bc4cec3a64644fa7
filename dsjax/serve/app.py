"""OpenAI-compatible HTTP API over an `Engine` (FastAPI): the app and its routes.

Endpoints: `GET /health` and `GET /metrics` (no auth; engine counts, the latter in the
Prometheus text format), `GET /v1/models`, `GET /v1/models/{model}`, `POST /v1/completions`,
`POST /v1/chat/completions`.

The pieces live in their own modules: request parsing and validation (`dsjax.serve.requests`),
response bodies and SSE framing (`dsjax.serve.responses`), running a request on the engine
(`dsjax.serve.runner`), chat templates (`dsjax.text.chat_template`), model loading (`dsjax.inference.loading`).
Implemented request fields: `prompt` / `messages`, `max_tokens` (chat also
`max_completion_tokens`), `temperature`, `top_p`, `top_k`, `seed`, `n`, `stop`, `logprobs`
(completions: 0-20 alternatives; chat: true, with `top_logprobs`), `echo` (completions,
without logprobs), `best_of` (>= n; not streamed), `stream`, `stream_options.include_usage`,
and (as in vLLM) `ignore_eos`, `stop_token_ids`, `speculative`. Chat also takes `tools` /
`tool_choice` (DeepSeek's tool-call format, `dsjax.text.tool_calls`; "required" or a named
function forces one well-formed call whose arguments match the function's parameters) and
`response_format` (`json_object` / `json_schema`): forced calls and JSON answers are decoded
under the grammar's allowed-token masks (`dsjax.inference.constrained`), so no invalid JSON is
emitted and the answer ends when the document is complete. Fields with no effect here
(penalties, `logit_bias`, ...) pass only with their no-op value; anything else is a 400
naming it.

Errors have the OpenAI shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
body or field (including requests that could never fit: too long for the context, or more
sequences than slots + queue), 401 for a missing or wrong API key (when one is configured),
404 for an unknown model or route, 413 for a body over `max_body_bytes` (refused before it is
parsed), 503 with Retry-After when the engine's queue is full or the engine cancels a request,
500 for an engine failure. Streams are server-sent events ending with `data: [DONE]` (or an
error event). A client that disconnects cancels its requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dsjax.inference.constrained import GrammarConstraint, TokenMasks, VocabIndex
from dsjax.inference.engine import Engine
from dsjax.inference.loading import load_model
from dsjax.serve.errors import APIError
from dsjax.serve.requests import (
    Limits,
    Sampling,
    fit_max_tokens,
    parse_chat,
    parse_completion,
    parse_json,
)
from dsjax.serve.responses import TokenText, prometheus_text
from dsjax.serve.runner import Generation
from dsjax.text.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, encode_text
from dsjax.text.json_grammar import Grammar
from dsjax.text.token_bytes import token_bytes
from dsjax.text.tool_calls import MARKERS

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_MAX_BODY_BYTES",
    "APIError",
    "Service",
    "create_app",
    "load_model",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
_DRAIN_BYTES = 64 * 2**20  # an oversized body is read and dropped up to this, so the 413 arrives
MAX_GRAMMARS = 64  # token masks kept for this many distinct response formats / tool sets


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it (or its Content-Length) passes `limit`."""
    declared = request.headers.get("content-length")
    too_big = APIError(
        413,
        f"the request body is larger than {limit} bytes (serve.py --max-body-bytes)",
        code="request_too_large",
    )
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(declared) > _DRAIN_BYTES:
            raise too_big
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                chunks = []
                if size > _DRAIN_BYTES:
                    break
            else:
                chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body") from None
    if size > limit:
        raise too_big
    return b"".join(chunks)


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A validated request, tokenized and fitted to the context (built off the event loop)."""

    prompts: list[list[int]]
    max_tokens: list[int]
    sampling: Sampling
    echo: list[str] | None = None
    best_of: int | None = None
    constraint: Callable[[], GrammarConstraint] | None = None
    tool_calls: bool = False


class Service:
    """What the routes do: auth, body limits, parsing, tokenization, running on the engine.

    Args:
      engine: the running engine; tokenizer: its dsjax Tokenizer; model_name: the served name.
      api_key: required as 'Authorization: Bearer KEY' when set.
      add_bos: prepend BOS to prompts (tokenizer_config.json add_bos_token).
      max_body_bytes: larger request bodies get 413 before they are parsed.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        model_name: str,
        *,
        api_key: str | None = None,
        add_bos: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={max_body_bytes}: must be >= 1")
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.add_bos, self.max_body_bytes = api_key, add_bos, max_body_bytes
        self.created = int(time.time())
        self._vocab: VocabIndex | None = None
        self._masks: dict[Grammar, TokenMasks] = {}  # least recently used first
        self._masks_lock = threading.Lock()
        self.chat_template = ChatTemplate(tokenizer, add_bos)
        self.token_text = TokenText(tokenizer)
        stats = engine.stats()
        self.limits = Limits(
            vocab_size=engine.cfg.vocab_size,
            max_len=stats["max_len"],
            max_sequences=stats["slots"] + stats["max_queue"],
        )

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            raise APIError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer KEY')",
                type="authentication_error",
                code="invalid_api_key",
            )

    def _body(self, raw: bytes) -> Any:
        body = parse_json(raw)
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str):
            self.model(model)  # 404 unless it is the served model
        return body

    def prepare_completion(self, raw: bytes) -> _Prepared:
        """Parses, validates and tokenizes a completions body (runs in a worker thread)."""
        req = parse_completion(self._body(raw), self.limits, raw)
        prompts = [
            list(p) if isinstance(p, tuple) else encode_text(self.tokenizer, p, self.add_bos)
            for p in req.prompts
        ]
        max_tokens = fit_max_tokens([len(p) for p in prompts], req.sampling, self.limits.max_len)
        echo = None
        if req.echo:
            echo = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in req.prompts]
        return _Prepared(prompts, max_tokens, req.sampling, echo, req.best_of)

    def prepare_chat(self, raw: bytes) -> _Prepared:
        """Parses, validates and renders a chat body (runs in a worker thread)."""
        req = parse_chat(self._body(raw), self.limits, raw)
        try:
            prompt = self.chat_template.encode(req.messages, req.tools)
        except ValueError as err:
            raise APIError(400, f"'messages': {err}", param="messages") from None
        max_tokens = fit_max_tokens([len(prompt)], req.sampling, self.limits.max_len)
        constraint = None
        if req.grammar is not None:
            masks = self.masks(req.grammar)
            constraint = functools.partial(GrammarConstraint, masks)
        return _Prepared(
            [prompt], max_tokens, req.sampling, constraint=constraint, tool_calls=req.parse_tools
        )

    def masks(self, grammar: Grammar) -> TokenMasks:
        """The (cached) token masks of `grammar` over this model's vocabulary; the first mask
        is computed here, off the engine thread."""
        with self._masks_lock:
            if self._vocab is None:
                pieces = token_bytes(self.tokenizer, keep=MARKERS)
                self._vocab = VocabIndex(pieces, self.engine.cfg.vocab_size, self.tokenizer.eos_id)
            masks = self._masks.pop(grammar, None) or TokenMasks(grammar, self._vocab)
            self._masks[grammar] = masks
            while len(self._masks) > MAX_GRAMMARS:
                self._masks.pop(next(iter(self._masks)))
        masks.answer(grammar.initial)
        return masks

    async def generate(self, request: Request, chat: bool):
        """A completions (chat=False) or chat request, answered as JSON or SSE."""
        self.check_auth(request)
        raw = await read_body(request, self.max_body_bytes)
        prepare = self.prepare_chat if chat else self.prepare_completion
        prepared = await asyncio.to_thread(prepare, raw)
        run = Generation(
            self.engine,
            self.tokenizer,
            self.token_text,
            self.model_name,
            prepared.prompts,
            prepared.max_tokens,
            prepared.sampling,
            chat=chat,
            echo=prepared.echo,
            best_of=prepared.best_of,
            constraint=prepared.constraint,
            tool_calls=prepared.tool_calls,
        )
        return await run.respond(lambda: client_gone(request))

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model(self.model_name)]}

    def model(self, name: str) -> dict[str, Any]:
        """The served model's object (`GET /v1/models/{name}`); 404 for any other name."""
        if name != self.model_name:
            raise APIError(
                404,
                f"model '{name}' does not exist; this server serves '{self.model_name}'",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "dsjax",
            "max_model_len": self.limits.max_len,
        }


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(engine: Engine, tokenizer, model_name: str, **options) -> FastAPI:
    """The FastAPI app serving `engine` (already started) with `tokenizer` (dsjax Tokenizer);
    `options` are `Service`'s (api_key, add_bos, max_body_bytes)."""
    service = Service(engine, tokenizer, model_name, **options)
    # No trailing-slash redirects: '/v1/completions/' is a 404 in the OpenAI shape, not a 307.
    app = FastAPI(
        title="dsjax", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, err: Exception):
        log.exception("unhandled error")
        return _error_response(
            APIError(500, f"internal error: {type(err).__name__}", type="server_error")
        )

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/metrics")
    async def metrics():
        text = prometheus_text(engine.stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        service.check_auth(request)
        return service.models()

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str):
        service.check_auth(request)
        return service.model(model)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.generate(request, chat=True)

    return app
