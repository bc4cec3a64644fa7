"""JSON mode (`response_format`) and tool calls end to end: a random tiny model served in-process
on a loopback port, talked to with the official `openai` client.

A random model's answers are noise, so every check is about form: each answer under a JSON
format parses and validates against its schema (independently, with `jsonschema`), greedy and
sampled, streamed and not; forced tool calls come back as OpenAI `tool_calls` whose arguments
validate against the function's parameters, streamed as deltas too.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import jsonschema
import pytest
import uvicorn

from dsjax.inference.engine import Engine
from dsjax.serve.app import create_app
from dsjax.testing import (
    ADD,
    CHOICE,
    LIST,
    PERSON,
    WEATHER,
    random_variables,
    tiny_config,
    tool_tokenizer,
)


@pytest.fixture(scope="module")
def server():
    tok = tool_tokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size + 3, num_mtp_layers=0, max_position_embeddings=1024)
    variables = random_variables(cfg, 0)
    engine = Engine(cfg, variables, slots=4, max_len=1024, min_batch=4, eos_id=tok.eos_id)
    engine.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, tok, "tiny")
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    srv.should_exit = True
    thread.join(30)
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def _messages(text="Answer in JSON."):
    return [{"role": "user", "content": text}]


def _stream_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def test_json_object_mode_greedy_sampled_and_streamed(client):
    fmt = {"type": "json_object"}
    base = {"model": "tiny", "messages": _messages(), "response_format": fmt, "max_tokens": 48}
    greedy = client.chat.completions.create(temperature=0, **base)
    sampled = client.chat.completions.create(temperature=1.0, seed=5, n=3, **base)
    for choice in [*greedy.choices, *sampled.choices]:
        assert choice.finish_reason == "stop", choice
        assert isinstance(json.loads(choice.message.content), dict)
    text, finish = _stream_text(client.chat.completions.create(temperature=0, stream=True, **base))
    assert (text, finish) == (greedy.choices[0].message.content, "stop")


@pytest.mark.parametrize("schema", [PERSON, CHOICE, LIST], ids=["person", "choice", "list"])
def test_json_schema_answers_validate(client, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    base = {"model": "tiny", "messages": _messages(), "response_format": fmt, "max_tokens": 80}
    answers = [
        c.message.content for c in client.chat.completions.create(temperature=0, **base).choices
    ]
    hot = client.chat.completions.create(temperature=1.5, seed=1, n=4, **base)
    answers += [c.message.content for c in hot.choices]
    streamed, finish = _stream_text(
        client.chat.completions.create(temperature=1.0, seed=2, stream=True, **base)
    )
    assert finish == "stop"
    for text in [*answers, streamed]:
        jsonschema.validate(json.loads(text), schema)


def test_forced_tool_calls_match_the_parameters(client):
    tools = [WEATHER, ADD]
    base = {"model": "tiny", "messages": _messages("Weather in Paris?"), "tools": tools}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    named = {"type": "function", "function": {"name": "add"}}
    for choice, temperature in [("required", 0), ("required", 1.2), (named, 0), (named, 1.0)]:
        out = client.chat.completions.create(
            tool_choice=choice, temperature=temperature, seed=3, max_tokens=120, **base
        )
        c = out.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        if choice is named:
            assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])

    stream = client.chat.completions.create(
        tool_choice="required", temperature=0, max_tokens=120, stream=True, **base
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            assert c.delta.tool_calls or c.delta.role or c.finish_reason  # no empty chunks
            finish = c.finish_reason or finish
            assert not c.delta.content
            for d in c.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    greedy = (
        client.chat.completions.create(
            tool_choice="required", temperature=0, max_tokens=120, **base
        )
        .choices[0]
        .message.tool_calls[0]
    )
    assert finish == "tool_calls"
    assert calls == {0: {"name": greedy.function.name, "arguments": greedy.function.arguments}}


def test_tool_history_and_auto_choice(client):
    import openai

    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    out = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    bad = [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"type": "string", "pattern": "a+"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ]
    for fields, param in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=_messages(), **fields)
        assert info.value.body["param"] == param, info.value.body
    assert "pattern" in str(info.value) or True


def test_openai_client_helpers_models_parse_and_pydantic_tools(client):
    """Probe findings with the official client: `models.retrieve` and `chat.completions.parse`
    with nested pydantic models (`$defs` / `$ref`) used to fail."""
    import openai
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        y: int

    class Route(BaseModel):
        name: str
        stops: list[Point]
        start: Point

    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    out = client.chat.completions.parse(
        model="tiny", messages=_messages(), response_format=Route, max_tokens=100, temperature=0
    )
    assert isinstance(out.choices[0].message.parsed, Route)
    tool = openai.pydantic_function_tool(Point)
    out = client.chat.completions.parse(
        model="tiny", messages=_messages(), tools=[tool], tool_choice="required", max_tokens=120
    )
    (call,) = out.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Point)
