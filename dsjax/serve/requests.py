"""OpenAI request parsing: a JSON body -> a typed request, with ONE validation layer.

`parse_json` (dsjax.serve.json_limits, re-exported) reads the raw body with limits, so hostile JSON is
a 400 rather than a RecursionError or a slow big-int parse. `parse_completion` / `parse_chat` turn the object into `CompletionRequest` / `ChatRequest`.
Every field an OpenAI client may send is either implemented or, when its value asks for
something this server does not do, rejected with a 400 naming the field as the client spelled
it; unknown fields are rejected too (as OpenAI does). Numbers are bounded by what the engine
can represent (int32 counts, uint64 seeds). Strings holding lone UTF-16 surrogates (not valid
Unicode, e.g. "\\ud800") are rejected wherever they occur, naming the path.

No server is needed: these functions take the body and `Limits` (vocabulary, context length,
how many sequences the engine can hold) and raise `APIError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable
from typing import Any

from dsjax.serve.errors import APIError, bad_field
from dsjax.serve.json_limits import may_hold_surrogates, parse_json
from dsjax.text.json_grammar import Grammar, SchemaError
from dsjax.text.tool_calls import call_head, call_tail

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "Limits",
    "Sampling",
    "choice_seed",
    "fit_max_tokens",
    "parse_chat",
    "parse_completion",
    "parse_json",
]

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 15  # the engine holds 16 stop ids per request (max_stop_ids), eos included
MAX_ID_CHARS = 512  # `user` and other identifier strings
MAX_STRING_CHARS = 2**20  # tool descriptions and call arguments
MAX_TEMPERATURE = 100.0
DEFAULT_COMPLETION_TOKENS = 16
DEFAULT_CHAT_TOKENS = 512
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the serving engine can take: token ids < vocab_size, prompt + generated <= max_len,
    at most max_sequences (slots + queue) sequences at once."""

    vocab_size: int
    max_len: int
    max_sequences: int


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Generation fields shared by completions and chat.

    max_tokens: the client's limit, or None (then the endpoint default, cut to fit the context).
    max_tokens_param: the field that set it ("max_tokens" or "max_completion_tokens").
    top_k: 0 = off. seed: None or in [0, 2**64). n: choices per prompt.
    logprobs: None (no logprobs) or how many alternatives per token (0..20).
    """

    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    default_max_tokens: int = DEFAULT_COMPLETION_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    speculative: bool | None = None
    stream: bool = False
    include_usage: bool = False


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """/v1/completions: prompts are strings or token-id tuples; one or more per request.

    best_of (>= n): candidates per prompt; the n with the highest mean token log-probability
    are returned (best_of = n: all of them, in order).
    """

    prompts: tuple[str | tuple[int, ...], ...]
    sampling: Sampling
    echo: bool = False
    best_of: int = 1  # candidates generated per prompt; the n most likely are returned


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """/v1/chat/completions: messages as {"role", "content"[, "name", "tool_calls",
    "tool_call_id"]} dicts (text only).

    tools: the function tools ({"type": "function", "function": {name, description?,
    parameters?}}); tool_choice: "none", "auto", "required" or a function's name (the last two
    force a call, by constrained decoding); parse_tools: read generated calls back.
    grammar: what constrains the answer (a forced tool call or `response_format` JSON), or None.
    """

    messages: tuple[dict[str, Any], ...]
    sampling: Sampling
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str = "auto"
    grammar: Grammar | None = None

    @property
    def parse_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


def choice_seed(seed: int | None, k: int) -> int | None:
    """Seed of choice k of a prompt: the request seed for k = 0, then seed + k (mod 2**64)."""
    return None if seed is None else (seed + k) % (UINT64_MAX + 1)


# ====================================================================== field helpers
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(name: str, x: Any, lo: int, hi: int) -> int:
    if not _is_int(x) or not lo <= x <= hi:
        raise bad_field(name, f"must be an integer in [{lo}, {hi}]; got {_show(x)}")
    return x


def _number(name: str, x: Any, lo: float, hi: float, open_lo: bool = False) -> float:
    ok = _is_number(x) and (lo < x if open_lo else lo <= x) and x <= hi
    if not ok:
        bounds = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise bad_field(name, f"must be a number in {bounds}; got {_show(x)}")
    return float(x)


def _bool(name: str, x: Any) -> bool:
    if not isinstance(x, bool):
        raise bad_field(name, f"must be a boolean; got {_show(x)}")
    return x


def _string(name: str, x: Any, max_chars: int = MAX_ID_CHARS) -> str:
    if not isinstance(x, str) or len(x) > max_chars:
        raise bad_field(name, f"must be a string of at most {max_chars} characters")
    return x


def _show(x: Any) -> str:
    text = json.dumps(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_unicode(x: Any, path: str) -> None:
    """Rejects strings with lone surrogates anywhere in a parsed body (keys included)."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError as err:
            raise bad_field(
                path or "body",
                f"contains a lone UTF-16 surrogate (U+{ord(x[err.start]):04X} at character "
                f"{err.start}), which is not valid Unicode",
            ) from None
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _check_unicode(v, f"{path}[{i}]")
    elif isinstance(x, dict):
        for k, v in x.items():
            sub = f"{path}.{k}" if path else k
            _check_unicode(k, sub)
            _check_unicode(v, sub)


def _only(*allowed: Any, rule: str) -> Callable[[str, Any], None]:
    """A check for a field this server does not implement: only the no-op values pass."""

    def check(name: str, x: Any) -> None:
        if not any(x == a and type(x) is type(a) for a in allowed) and not (
            _is_number(x) and any(_is_number(a) and x == a for a in allowed)
        ):
            raise bad_field(name, f"{rule}; got {_show(x)}", code="unsupported_parameter")

    return check


def _penalty(name: str, x: Any) -> None:
    _number(name, x, -2.0, 2.0)
    if x != 0:
        raise bad_field(name, "is not supported (only 0)", code="unsupported_parameter")


def _metadata(name: str, x: Any) -> None:
    if not isinstance(x, dict) or len(x) > 16:
        raise bad_field(name, "must be an object of at most 16 string values")
    for k, v in x.items():
        _string(f"{name}.{k}", v)


# Fields accepted for their no-op value only (None always passes).
_NO_OP = {
    "frequency_penalty": _penalty,
    "presence_penalty": _penalty,
    "logit_bias": _only({}, rule="is not supported (only {})"),
    "suffix": _only("", rule="is not supported"),
    "user": lambda n, x: _string(n, x),
    "safety_identifier": lambda n, x: _string(n, x),
    "prompt_cache_key": lambda n, x: _string(n, x),
    "metadata": _metadata,
    "store": _only(False, rule="is not supported (completions are not stored)"),
    "service_tier": _only("auto", "default", rule="must be 'auto' or 'default'"),
    "audio": _only(rule="audio output is not supported"),
    "modalities": _only(["text"], rule="only ['text'] is supported"),
    "prediction": _only(rule="predicted outputs are not supported"),
    "reasoning_effort": _only(rule="is not supported (not a reasoning model)"),
    "verbosity": _only(rule="is not supported"),
    "web_search_options": _only(rule="web search is not supported"),
    "functions": _only([], rule="functions are not supported"),
    "function_call": _only("none", rule="functions are not supported (only 'none')"),
    "parallel_tool_calls": lambda n, x: _bool(n, x),
}
_COMPLETION_NO_OP = ("frequency_penalty", "presence_penalty", "logit_bias", "suffix", "user")
_SAMPLING_FIELDS = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "speculative",
    "stream",
    "stream_options",
)
COMPLETION_FIELDS = frozenset(
    (*_SAMPLING_FIELDS, "prompt", "echo", "logprobs", "best_of", *_COMPLETION_NO_OP)
)
CHAT_FIELDS = frozenset(
    (
        *_SAMPLING_FIELDS,
        "messages",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        *_NO_OP,
    )
)


def _check_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    for name in body:
        if name not in known:
            raise bad_field(name, "unrecognized request field", code="unknown_parameter")
    for name, check in _NO_OP.items():
        if name in known and body.get(name) is not None:
            check(name, body[name])


# ====================================================================== shared fields
def _sampling(body: dict[str, Any], limits: Limits, chat: bool, **extra) -> Sampling:
    """The generation fields of either endpoint (body already checked for unknown fields)."""
    get = body.get
    limits_given = {
        name: _int(name, get(name), 1, INT32_MAX)
        for name in ("max_tokens", "max_completion_tokens")
        if get(name) is not None
    }
    if len(set(limits_given.values())) > 1:
        raise bad_field("max_completion_tokens", "differs from 'max_tokens'; send one of them")
    max_param = "max_completion_tokens" if "max_completion_tokens" in limits_given else "max_tokens"
    max_tokens = limits_given.get(max_param)
    if get("model") is not None:
        _string("model", get("model"))
    temperature = 1.0 if get("temperature") is None else get("temperature")
    top_p = 1.0 if get("top_p") is None else get("top_p")
    top_k = 0 if get("top_k") is None else _int("top_k", get("top_k"), -1, INT32_MAX)
    top_k = 0 if top_k < 0 or top_k >= limits.vocab_size else top_k  # -1 / >= vocab: off
    seed = get("seed")
    if seed is not None:
        seed = _int("seed", seed, -(2**63), UINT64_MAX) % (UINT64_MAX + 1)
    n = 1 if get("n") is None else _int("n", get("n"), 1, limits.max_sequences)
    stream = False if get("stream") is None else _bool("stream", get("stream"))
    options = get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_field("stream_options", "is only allowed when 'stream' is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_field("stream_options", "must be an object with only 'include_usage'")
        if options.get("include_usage") is not None:
            include_usage = _bool("stream_options.include_usage", options["include_usage"])
    ignore_eos = get("ignore_eos")
    speculative = get("speculative")
    return Sampling(
        max_tokens=max_tokens,
        max_tokens_param=max_param,
        default_max_tokens=DEFAULT_CHAT_TOKENS if chat else DEFAULT_COMPLETION_TOKENS,
        temperature=_number("temperature", temperature, 0.0, MAX_TEMPERATURE),
        top_p=_number("top_p", top_p, 0.0, 1.0, open_lo=True),
        top_k=top_k,
        seed=seed,
        n=n,
        stop=_stop(get("stop")),
        stop_token_ids=_stop_token_ids(get("stop_token_ids"), limits),
        ignore_eos=False if ignore_eos is None else _bool("ignore_eos", ignore_eos),
        speculative=None if speculative is None else _bool("speculative", speculative),
        stream=stream,
        include_usage=include_usage,
        **extra,
    )


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise bad_field(
            "stop",
            f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty "
            f"strings of at most {MAX_STOP_CHARS} characters",
        )
    return tuple(stops)


def _stop_token_ids(ids: Any, limits: Limits) -> tuple[int, ...]:
    if ids is None:
        return ()
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_STOP_TOKEN_IDS
        or not all(_is_int(t) and 0 <= t < limits.vocab_size for t in ids)
    ):
        raise bad_field(
            "stop_token_ids",
            f"must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in [0, {limits.vocab_size})",
        )
    return tuple(ids)


def _check_sequences(prompts: int, n: int, limits: Limits, field: str = "n") -> None:
    if prompts * n > limits.max_sequences:
        raise APIError(
            400,
            f"this request asks for {prompts * n} sequences ({prompts} prompt(s) x {field}={n}); "
            f"this server runs at most {limits.max_sequences} at once (slots + queue)",
            param=field if n > 1 else "prompt",
            code="too_many_sequences",
        )


def _object(body: Any, raw: bytes | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if raw is None or may_hold_surrogates(raw):
        _check_unicode(body, "")
    return body


# ====================================================================== completions
def _token_ids(name: str, x: Any, limits: Limits) -> tuple[int, ...] | None:
    """x as a non-empty token-id tuple, or None when x is not a list of integers."""
    if not isinstance(x, list) or not x or not _is_int(x[0]):
        return None
    if len(x) >= limits.max_len:  # before looking at each id
        raise APIError(
            400,
            f"'{name}': {len(x)} tokens do not fit the context length {limits.max_len} "
            "(room is needed for at least one generated token)",
            param=name,
            code="context_length_exceeded",
        )
    if not all(_is_int(t) for t in x):
        return None
    if not all(0 <= t < limits.vocab_size for t in x):
        raise bad_field(name, f"token ids must be in [0, {limits.vocab_size})")
    return tuple(x)


def _prompts(prompt: Any, limits: Limits) -> tuple[str | tuple[int, ...], ...]:
    if isinstance(prompt, str):
        return (prompt,)
    ids = _token_ids("prompt", prompt, limits)
    if ids is not None:
        return (ids,)
    if isinstance(prompt, list) and prompt and len(prompt) <= limits.max_sequences:
        if all(isinstance(p, str) for p in prompt):
            return tuple(prompt)
        many = [_token_ids(f"prompt[{i}]", p, limits) for i, p in enumerate(prompt)]
        rows = [m for m in many if m is not None]
        if len(rows) == len(many):
            return tuple(rows)
    if isinstance(prompt, list) and len(prompt) > limits.max_sequences:
        _check_sequences(len(prompt), 1, limits)
    raise bad_field(
        "prompt",
        "must be a string, a list of strings, a list of token ids or a list of token-id lists "
        "(non-empty)",
    )


def parse_completion(body: Any, limits: Limits, raw: bytes | None = None) -> CompletionRequest:
    """Validates a /v1/completions body. Raises APIError (400) naming the field.

    `raw` (the JSON text of `body`) lets the lone-surrogate scan skip bodies without escapes."""
    body = _object(body, raw)
    _check_fields(body, COMPLETION_FIELDS)
    if body.get("prompt") is None:
        raise bad_field("prompt", "is required")
    prompts = _prompts(body["prompt"], limits)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _int("logprobs", logprobs, 0, MAX_LOGPROBS)
    echo = False if body.get("echo") is None else _bool("echo", body["echo"])
    if echo and logprobs is not None:
        raise bad_field(
            "echo",
            "echo with logprobs needs prompt logprobs, which this server does not compute",
            code="unsupported_parameter",
        )
    sampling = _sampling(body, limits, chat=False, logprobs=logprobs)
    best_of = body.get("best_of")
    if best_of is not None:
        best_of = _int("best_of", best_of, 1, limits.max_sequences)
        if best_of < sampling.n:
            raise bad_field("best_of", f"must be >= n ({sampling.n}); got {best_of}")
        if best_of > sampling.n and sampling.stream:
            raise bad_field("best_of", "> n cannot be streamed (the best are known at the end)")
    if best_of is None or best_of == sampling.n:
        _check_sequences(len(prompts), sampling.n, limits)
        best_of = sampling.n
    else:
        _check_sequences(len(prompts), best_of, limits, "best_of")
    return CompletionRequest(prompts=prompts, sampling=sampling, echo=echo, best_of=best_of)


# ====================================================================== chat
_MESSAGE_NO_OP = ("refusal", "audio", "function_call")
_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", *_MESSAGE_NO_OP)
MAX_TOOLS = 128
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _message(i: int, m: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_field(where, "must be an object with 'role' and 'content'")
    for key, value in m.items():
        if key in _MESSAGE_NO_OP and value is not None:
            raise bad_field(f"{where}.{key}", "is not supported", code="unsupported_parameter")
        if key not in _MESSAGE_FIELDS:
            raise bad_field(f"{where}.{key}", "unrecognized message field")
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise bad_field(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
                or set(part) - {"type", "text"}
            ):
                raise bad_field(
                    f"{where}.content[{j}]",
                    "only {'type': 'text', 'text': str} parts are supported",
                )
            parts.append(part["text"])
        content = "".join(parts)
    calls_only = content is None and role == "assistant" and m.get("tool_calls") is not None
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise bad_field(f"{where}.content", "must be a string or a list of text parts")
    # An assistant turn of only tool calls keeps content None: DeepSeek's template tests
    # `content is none` to render the calls.
    out: dict[str, Any] = {"role": role, "content": None if calls_only else content}
    if m.get("name") is not None:
        out["name"] = _string(f"{where}.name", m["name"])
    if m.get("tool_calls") is not None:
        if role != "assistant":
            raise bad_field(f"{where}.tool_calls", "only assistant messages have tool calls")
        out["tool_calls"] = _history_calls(f"{where}.tool_calls", m["tool_calls"])
    if m.get("tool_call_id") is not None:
        if role != "tool":
            raise bad_field(f"{where}.tool_call_id", "only tool messages have a tool_call_id")
        out["tool_call_id"] = _string(f"{where}.tool_call_id", m["tool_call_id"])
    return out


def _history_calls(where: str, calls: Any) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls, as the chat template gets them."""
    if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
        raise bad_field(where, f"must be a list of at most {MAX_TOOLS} tool calls")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(fn, dict)
            or call.get("type", "function") != "function"
            or set(call) - {"id", "type", "function"}
            or set(fn) - {"name", "arguments"}
        ):
            raise bad_field(
                at, "must be {'id', 'type': 'function', 'function': {'name', 'arguments'}}"
            )
        name = _function_name(f"{at}.function.name", fn.get("name"))
        arguments = _string(f"{at}.function.arguments", fn.get("arguments"), MAX_STRING_CHARS)
        call_id = _string(f"{at}.id", call.get("id", f"call_{j}"))
        out.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        )
    return out


def _function_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise bad_field(where, "must be 1-64 characters of a-z, A-Z, 0-9, '_', '.' or '-'")
    return name


def _tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """The `tools` list (function tools only), their parameter schemas checked."""
    if tools is None:
        return ()
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_field("tools", f"must be a list of at most {MAX_TOOLS} function tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(fn, dict)
            or tool.get("type") != "function"
            or set(tool)
            - {
                "type",
                "function",
            }
        ):
            raise bad_field(at, "must be {'type': 'function', 'function': {'name', ...}}")
        for key in fn:
            if key not in ("name", "description", "parameters", "strict"):
                raise bad_field(f"{at}.function.{key}", "unrecognized function field")
        name = _function_name(f"{at}.function.name", fn.get("name"))
        if name in names:
            raise bad_field(f"{at}.function.name", f"'{name}' is defined twice")
        names.add(name)
        function: dict[str, Any] = {"name": name}
        if fn.get("description") is not None:
            function["description"] = _string(
                f"{at}.function.description", fn["description"], MAX_STRING_CHARS
            )
        if fn.get("strict") is not None:
            _bool(f"{at}.function.strict", fn["strict"])
        if fn.get("parameters") is not None:
            params = fn["parameters"]
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise bad_field(
                    f"{at}.function.parameters", "must be a JSON Schema of type 'object'"
                )
            function["parameters"] = params
            _grammar(f"{at}.function.parameters", fn["parameters"])
        out.append({"type": "function", "function": function})
    return tuple(out)


def _tool_choice(choice: Any, tools: tuple[dict[str, Any], ...]) -> str:
    """'none', 'auto', 'required' or the name of the function to call."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str) and choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise bad_field("tool_choice", f"'{choice}' needs 'tools'")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    if (
        not isinstance(fn, dict)
        or choice.get("type") != "function"
        or set(choice) - {"type", "function"}
        or set(fn) - {"name"}
    ):
        raise bad_field(
            "tool_choice",
            "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}",
        )
    name = fn.get("name")
    if name not in [t["function"]["name"] for t in tools]:
        raise bad_field("tool_choice", f"names the function {_show(name)}, which is not in 'tools'")
    return str(name)


def _grammar(where: str, schema: Any = None, **kwargs) -> Grammar:
    """The grammar of a schema (None: any object); a 400 naming what is not supported."""
    try:
        return _cached_grammar(json.dumps(schema, sort_keys=True), json.dumps(kwargs, default=list))
    except SchemaError as err:
        raise bad_field(where, str(err), code="unsupported_schema") from None


@functools.lru_cache(maxsize=64)
def _cached_grammar(schema_json: str, kwargs_json: str) -> Grammar:
    kwargs = json.loads(kwargs_json)
    if "choices" in kwargs:
        kwargs["choices"] = [(h.encode(), sch, t.encode()) for h, sch, t in kwargs["choices"]]
    return Grammar(json.loads(schema_json), **kwargs)


def _response_format(value: Any) -> Grammar | None:
    """`response_format`: None for text, else the grammar of the JSON it asks for."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text" and set(value) == {"type"}:
        return None
    if kind == "json_object" and set(value) == {"type"}:
        return _grammar("response_format")
    if kind == "json_schema" and set(value) == {"type", "json_schema"}:
        spec = value["json_schema"]
        where = "response_format.json_schema"
        if not isinstance(spec, dict) or set(spec) - {"name", "description", "schema", "strict"}:
            raise bad_field(where, "must be an object with 'name' and optionally 'schema', "
                            "'description', 'strict'")  # fmt: skip
        _function_name(f"{where}.name", spec.get("name"))
        if spec.get("strict") is not None:
            _bool(f"{where}.strict", spec["strict"])
        return _grammar(f"{where}.schema", spec.get("schema"))
    raise bad_field(
        "response_format",
        "must be {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {'name', 'schema'}}",
    )


def _tool_grammar(tools: tuple[dict[str, Any], ...], choice: str) -> Grammar | None:
    """The grammar of one forced call (tool_choice 'required': any tool; a name: that one)."""
    if choice in ("none", "auto"):
        return None
    chosen = [
        t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice
    ]
    choices = [(call_head(f["name"]), f.get("parameters"), call_tail()) for f in chosen]
    return _grammar("tools", choices=choices)


def parse_chat(body: Any, limits: Limits, raw: bytes | None = None) -> ChatRequest:
    """Validates a /v1/chat/completions body. Raises APIError (400) naming the field (`raw`:
    as for `parse_completion`)."""
    body = _object(body, raw)
    _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "must be a non-empty list of {role, content} objects")
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    want = False if body.get("logprobs") is None else _bool("logprobs", body["logprobs"])
    top = body.get("top_logprobs")
    if top is not None:
        top = _int("top_logprobs", top, 0, MAX_LOGPROBS)
        if not want:
            raise bad_field("top_logprobs", "needs 'logprobs': true")
    sampling = _sampling(body, limits, chat=True, logprobs=(top or 0) if want else None)
    _check_sequences(1, sampling.n, limits)
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    json_format = _response_format(body.get("response_format"))
    tool_format = _tool_grammar(tools, choice)
    if json_format is not None and tool_format is not None:
        raise bad_field(
            "response_format", f"cannot be combined with tool_choice '{choice}' (a forced call)"
        )
    return ChatRequest(parsed, sampling, tools, choice, tool_format or json_format)


# ====================================================================== context fit
def fit_max_tokens(prompt_lengths: list[int], sampling: Sampling, max_len: int) -> list[int]:
    """max_tokens per prompt: the client's (which must fit the context), or the endpoint default
    cut to what is left of the context. Raises APIError 400 naming the field and the limit."""
    out = []
    for i, n in enumerate(prompt_lengths):
        if n == 0:
            where = "prompt" if len(prompt_lengths) == 1 else f"prompt[{i}]"
            raise bad_field(where, "encodes to no tokens")
        if sampling.max_tokens is None and n < max_len:
            out.append(min(sampling.default_max_tokens, max_len - n))
            continue
        want = sampling.max_tokens or sampling.default_max_tokens
        if n + want > max_len:
            raise APIError(
                400,
                f"prompt ({n} tokens) + {sampling.max_tokens_param} ({want}) = {n + want} "
                f"exceeds the context length {max_len}",
                param=sampling.max_tokens_param,
                code="context_length_exceeded",
            )
        out.append(want)
    return out
