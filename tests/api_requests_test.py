"""Tests for dsjax.serve.requests (request parsing, no server) and dsjax.serve.responses."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsjax.serve.errors import APIError
from dsjax.serve.requests import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    Limits,
    Sampling,
    choice_seed,
    fit_max_tokens,
    parse_chat,
    parse_completion,
    parse_json,
)
from dsjax.serve.responses import ChoiceText, LogprobEntry, completion_logprobs, prometheus_text

LIMITS = Limits(vocab_size=300, max_len=128, max_sequences=36)
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _error(fn, *args, status=400) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    assert info.value.status == status, info.value.message
    return info.value


def _completion_error(**fields) -> APIError:
    return _error(parse_completion, {"prompt": "x", **fields}, LIMITS)


def _chat_error(**fields) -> APIError:
    return _error(parse_chat, {**CHAT, **fields}, LIMITS)


# ====================================================================== JSON limits
def test_json_limits_give_400_fast():
    t0 = time.perf_counter()
    for raw, words in [
        (b"[" * 100_000 + b"]" * 100_000, "nests 100000 deep"),
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "5000 digits"),
        (b'{"prompt": "x", "temperature": NaN}', "NaN"),
        (b'{"prompt": "x", "temperature": 1e999}', "out of the float64 range"),
        (b'{"prompt": "\xff"}', "not UTF-8"),
        (b"{not json", "malformed"),
    ]:
        assert words in _error(parse_json, raw).message
    assert time.perf_counter() - t0 < 5  # linear-time checks, no big-int parse
    # Brackets inside strings do not count; 64 levels pass.
    assert parse_json(b'{"prompt": "[[[[{{{{\\"[[["}') == {"prompt": '[[[[{{{{"[[['}
    nested: list = []
    for _ in range(63):
        nested = [nested]
    assert parse_json(b"[" * 64 + b"]" * 64) == nested


# ====================================================================== field rules
@pytest.mark.parametrize(
    "field,value,words",
    [
        ("top_k", 2**31, "[-1, 2147483647]"),
        ("seed", 10**30, "18446744073709551615"),
        ("seed", 2**64, "18446744073709551615"),
        ("max_tokens", 0, "[1, 2147483647]"),
        ("max_tokens", 2**31, "[1, 2147483647]"),
        ("max_tokens", True, "integer"),
        ("temperature", "hot", "number"),
        ("temperature", -0.5, "[0.0, 100.0]"),
        ("top_p", 0, "(0.0, 1.0]"),
        ("n", 0, "[1, 36]"),
        ("n", 37, "[1, 36]"),
        ("logprobs", 21, "[0, 20]"),
        ("logprobs", True, "integer"),
        ("stop", ["a", "b", "c", "d", "e"], "at most 4"),
        ("stop", "", "non-empty"),
        ("stop_token_ids", [300], "[0, 300)"),
        ("ignore_eos", 1, "boolean"),
        ("echo", "yes", "boolean"),
        ("stream", 0, "boolean"),
        ("best_of", 0, "[1, 36]"),
        ("best_of", 37, "[1, 36]"),
        ("frequency_penalty", 0.5, "only 0"),
        ("presence_penalty", 3, "[-2.0, 2.0]"),
        ("logit_bias", {"5": 10}, "not supported"),
        ("suffix", "end", "not supported"),
        ("user", 5, "string"),
        ("bogus_field", 1, "unrecognized"),
        ("prompt", [], "must be a string"),
        ("prompt", [[1, 2], "x"], "must be a string"),
        ("prompt", [1, 300], "[0, 300)"),
        ("prompt", "a\ud800b", "lone UTF-16 surrogate (U+D800 at character 1)"),
        ("stream_options", {"include_usage": True}, "only allowed when 'stream' is true"),
    ],
)
def test_completion_field_errors_name_the_field(field, value, words):
    err = _completion_error(**{field: value})
    assert err.param == field and words in err.message, err.message
    assert err.message.startswith(f"'{field}'")


@pytest.mark.parametrize(
    "fields,param,words",
    [
        ({"max_completion_tokens": "x"}, "max_completion_tokens", "integer"),
        ({"max_tokens": -1, "max_completion_tokens": 5}, "max_tokens", "integer"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "differs"),
        ({"top_logprobs": 3}, "top_logprobs", "needs 'logprobs': true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
        ({"logprobs": 2}, "logprobs", "boolean"),
        ({"messages": []}, "messages", "non-empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "one of"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
            "text",
        ),
        ({"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content", "U+DFFF"),
        ({"messages": [{"role": "user", "tool_calls": [{}]}]}, "messages[0].tool_calls", "only"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{}]}]},
            "messages[0].tool_calls[0]",
            "must be",
        ),
        ({"messages": [{"role": "user", "tool_call_id": "x"}]}, "messages[0].tool_call_id", "only"),
        ({"tools": [{"type": "function"}]}, "tools[0]", "must be"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
            "a-z",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
            "tools[0].function.parameters",
            "'not' is not supported",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools[0].function.parameters",
            "type 'object'",
        ),
        ({"tool_choice": "auto"}, "tool_choice", "needs 'tools'"),
        ({"tool_choice": "sometimes"}, "tool_choice", "must be"),
        ({"response_format": {"type": "json"}}, "response_format", "must be"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
            "a-z",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "maxProperties": 3}},
                }
            },
            "response_format.json_schema.schema",
            "'maxProperties' is not supported",
        ),
        ({"store": True}, "store", "not supported"),
        ({"n": 37}, "n", "[1, 36]"),
        ({"echo": True}, "echo", "unrecognized"),
    ],
)
def test_chat_field_errors_name_the_field(fields, param, words):
    err = _chat_error(**fields)
    assert err.param == param and words in err.message, err.message


def test_valid_requests_parse_to_dataclasses():
    req = parse_completion(
        {
            "model": "m",
            "prompt": ["a", "b"],
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": -1,
            "seed": -1,  # int64 -1 is the uint64 2**64 - 1
            "n": 3,
            "best_of": 3,
            "stop": "\n",
            "stop_token_ids": [2],
            "ignore_eos": True,
            "logprobs": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "frequency_penalty": 0,
            "logit_bias": {},
            "user": "u1",
            "echo": False,
        },
        LIMITS,
    )
    assert req.prompts == ("a", "b") and req.echo is False
    assert req.sampling == Sampling(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=0,
        seed=2**64 - 1,
        n=3,
        stop=("\n",),
        stop_token_ids=(2,),
        ignore_eos=True,
        logprobs=2,
        stream=True,
        include_usage=True,
    )
    assert parse_completion({"prompt": [[1, 2], [3]]}, LIMITS).prompts == ((1, 2), (3,))
    assert parse_completion({"prompt": "x", "top_k": 5000}, LIMITS).sampling.top_k == 0  # >= V
    chat = parse_chat(
        {
            "messages": [
                {"role": "system", "content": None},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    "name": "bob",
                },
                {"role": "assistant", "content": "c", "tool_calls": None},
            ],
            "max_completion_tokens": 9,
            "logprobs": True,
            "top_logprobs": 4,
            "tools": [],
            "tool_choice": "none",
            "response_format": {"type": "text"},
        },
        LIMITS,
    )
    assert chat.messages == (
        {"role": "system", "content": ""},
        {"role": "user", "content": "ab", "name": "bob"},
        {"role": "assistant", "content": "c"},
    )
    s = chat.sampling
    assert (s.max_tokens, s.max_tokens_param, s.logprobs, s.default_max_tokens) == (
        9,
        "max_completion_tokens",
        4,
        512,
    )
    assert parse_chat({**CHAT, "logprobs": True}, LIMITS).sampling.logprobs == 0
    assert parse_chat(CHAT, LIMITS).sampling.logprobs is None


def test_best_of():
    assert parse_completion({"prompt": "x", "best_of": 3}, LIMITS).best_of == 3
    assert parse_completion({"prompt": "x", "n": 2}, LIMITS).best_of == 2
    assert "must be >= n (3)" in _completion_error(n=3, best_of=2).message
    assert "streamed" in _completion_error(best_of=2, stream=True).message
    err = _completion_error(prompt=["a", "b"], best_of=20)
    assert err.param == "best_of" and "40 sequences" in err.message


def test_requests_that_can_never_fit_say_the_limit():
    err = _error(parse_completion, {"prompt": ["x"] * 10, "n": 4}, LIMITS)
    assert err.code == "too_many_sequences" and err.param == "n" and "at most 36" in err.message
    err = _error(parse_completion, {"prompt": [[1]] * 100}, LIMITS)
    assert err.code == "too_many_sequences" and "100 sequences" in err.message
    err = _error(parse_completion, {"prompt": [[1], [2] * 128]}, LIMITS)
    assert err.code == "context_length_exceeded" and err.param == "prompt[1]"
    assert "128 tokens do not fit the context length 128" in err.message
    # Context: an explicit max_tokens must fit; a defaulted one is cut to what is left.
    chat_default = Sampling(default_max_tokens=512)
    assert fit_max_tokens([100, 127], chat_default, 128) == [28, 1]
    err = _error(fit_max_tokens, [128], chat_default, 128)
    assert err.code == "context_length_exceeded"
    explicit = Sampling(max_tokens=29, max_tokens_param="max_completion_tokens")
    err = _error(fit_max_tokens, [100], explicit, 128)
    assert err.param == "max_completion_tokens"
    assert "129 exceeds the context length 128" in err.message
    assert _error(fit_max_tokens, [0], Sampling(), 128).param == "prompt"


def test_choice_seeds_are_distinct_and_keep_choice_zero():
    assert choice_seed(None, 3) is None
    assert [choice_seed(5, k) for k in range(3)] == [5, 6, 7]
    assert choice_seed(2**64 - 1, 1) == 0


# ====================================================================== property
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from(sorted(COMPLETION_FIELDS | CHAT_FIELDS | {"echo", "zzz"})),
    value=_json,
    chat=st.booleans(),
)
def test_any_json_value_in_any_field_parses_or_is_a_4xx(field, value, chat):
    body = {**CHAT, "max_tokens": 4} if chat else {"prompt": "x", "max_tokens": 4}
    body[field] = value
    raw = json.dumps(body).encode()
    try:
        parsed = parse_json(raw)
        (parse_chat if chat else parse_completion)(parsed, LIMITS)
    except APIError as err:
        assert 400 <= err.status < 500 and err.message


# ====================================================================== responses
class _CharTokenizer:
    """Token id i is chr(i) (enough for ChoiceText)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_choice_text_stop_strings_and_logprob_entries():
    text = ChoiceText(_CharTokenizer(), ("cd",))
    got = text.add((97, 98), False, [LogprobEntry(97, -0.5), LogprobEntry(98, -1.0)])
    assert got == "a"  # len("cd") - 1 = 1 trailing character is held back
    assert text.add((99,), False, [LogprobEntry(99, -0.1)]) == "b"
    assert text.add((100, 101), False, [LogprobEntry(100, -0.2), LogprobEntry(101, -0.3)]) == ""
    assert text.stopped and len(text.entries) == 4
    assert text.add((102,), True) == "" and len(text.entries) == 4


def test_completion_logprobs_shape_and_prometheus_text():
    class TT:
        def __call__(self, t):
            return chr(t), chr(t).encode()

    out = completion_logprobs(
        [LogprobEntry(97, -0.5, ((97, -0.5), (98, -1.5))), LogprobEntry(98, float("-inf"))],
        TT(),
        3,
    )
    assert out["tokens"] == ["a", "b"] and out["text_offset"] == [3, 4]
    assert out["top_logprobs"] == [{"a": -0.5, "b": -1.5}, None]
    assert out["token_logprobs"][0] == -0.5 and out["token_logprobs"][1] < -1e38
    text = prometheus_text(
        {
            "slots": 4,
            "active": 1,
            "queued": 2,
            "generated_tokens": 30,
            "forwards": 20,
            "draft_tokens": 10,
            "accepted_tokens": 8,
            "finished_stop": 3,
        }
    )
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines["dsjax_queue_depth"] == "2" and lines["dsjax_active_slots"] == "1"
    assert lines["dsjax_generated_tokens_total"] == "30"
    assert lines["dsjax_speculative_acceptance_ratio"] == "0.8"
    assert lines['dsjax_requests_finished_total{reason="stop"}'] == "3"
    assert "# TYPE dsjax_generated_tokens_total counter" in text
