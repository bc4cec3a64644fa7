"""The JSON grammar (dsjax.text.json_grammar), its token masks (dsjax.inference.constrained) and
DeepSeek's tool-call format (dsjax.text.tool_calls), without a model.

Documents are checked independently: `json.loads` and `jsonschema`. Random walks draw uniformly
from each step's mask over a trained byte-level BPE vocabulary (the hardest "model": every
allowed token equally likely) and must end complete inside their token budget.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from dsjax.inference.constrained import GrammarConstraint, TokenMasks, VocabIndex
from dsjax.inference.sampling import unpack_allowed
from dsjax.testing import ADD, CHOICE, LIST, PERSON, WEATHER, tool_tokenizer
from dsjax.text.chat_template import ChatTemplate
from dsjax.text.json_grammar import DEAD, STRING_SUBSTATES, Grammar, SchemaError, string_step
from dsjax.text.token_bytes import token_bytes
from dsjax.text.tool_calls import MARKERS, ToolCall, ToolCallParser, render_calls

NESTED = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"id": {"type": "integer"}},
                        "required": ["id"],
                    },
                    {"type": "null"},
                ]
            },
        },
        "note": {"type": ["string", "null"], "description": "free text"},
        "free": {"type": "object"},
    },
    "required": ["items", "free"],
}
SCHEMAS = [None, PERSON, CHOICE, LIST, NESTED, {"type": "number"}, {"const": "yes"}]


def _accepts(grammar: Grammar, text: str | bytes) -> bool:
    data = text.encode() if isinstance(text, str) else text
    state = grammar.feed_bytes(grammar.initial, data)
    return state is not None and grammar.can_end(state)


def test_grammar_accepts_valid_documents_and_rejects_invalid_ones():
    person = Grammar(PERSON)
    doc = {"name": 'Zoë "Z" \\ 😀', "age": -3, "tags": ["a", ""], "member": False}
    for text in (json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, ensure_ascii=False)):
        assert _accepts(person, text), text
    assert _accepts(person, '{"member":true,"age":0,"name":"\\u00e9\\n"}')  # any key order
    for bad in (
        '{"name": "a", "age": 1}',  # a required key missing
        '{"name": "a", "age": 1.5, "member": true}',  # not an integer
        '{"name": "a", "age": 01, "member": true}',  # a leading zero
        '{"name": "a", "age": 1, "member": true,}',  # a trailing comma
        '{"name": "a", "age": 1, "member": true, "x": 1}',  # not a declared key
        '{"name": "a", "name": "b", "age": 1, "member": true}',  # a key twice
        '{"name": "a\x01", "age": 1, "member": true}',  # a control character
        '{"name": "\\ud800", "age": 1, "member": true}',  # a surrogate escape
        '{"name": "\\x", "age": 1, "member": true}',  # a bad escape
        ' {"name": "a", "age": 1, "member": true}',  # whitespace before the document
    ):
        assert not _accepts(person, bad), bad
    assert not _accepts(person, b'{"name": "\xc3", "age": 1, "member": true}')  # broken UTF-8
    assert not _accepts(person, b'{"name": "\xed\xa0\x80", "age": 1, "member": true}')
    anything = Grammar()  # json_object: any object
    assert _accepts(anything, '{"a": [1, 2.5e-3, {"b": null}], "c": {"d": [true, "x"]}}')
    assert not _accepts(anything, "[1]") and not _accepts(anything, '"x"')
    choice = Grammar(CHOICE)
    good = '{"color": 10, "score": null, "where": {"x": 1e3, "y": -0.5}}'
    assert _accepts(choice, good) and _accepts(choice, good.replace("10", "1"))
    assert not _accepts(choice, good.replace("10", "11"))
    assert _accepts(Grammar({"type": "number"}), "12.5") and _accepts(Grammar(LIST), "[]")


def test_refs_to_defs_as_pydantic_writes_them():
    from openai.lib._pydantic import to_strict_json_schema
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        label: str | None

    class Shape(BaseModel):
        name: str
        points: list[Point]
        center: Point

    schema = to_strict_json_schema(Shape)
    assert "$defs" in schema
    grammar = Grammar(schema)
    point = {"x": 1, "label": None}
    assert _accepts(grammar, json.dumps({"name": "a", "points": [point, point], "center": point}))
    assert not _accepts(grammar, json.dumps({"name": "a", "points": [{"x": 1}], "center": point}))


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "string", "pattern": "a+"}, "'pattern'"),
        (
            {"type": "object", "properties": {"a": {"minimum": 3}}},
            "properties.a: the keyword 'minimum'",
        ),
        ({"type": "date"}, "type"),
        ({"anyOf": [{"type": "integer"}, {"type": "number"}]}, "same character"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required"),
        ({"enum": []}, "enum"),
        (
            {
                "$ref": "#/$defs/A",
                "$defs": {"A": {"type": "array", "items": {"$ref": "#/$defs/A"}}},
            },
            "recursive",
        ),
        ({"$ref": "#/$defs/B"}, "not a name"),
    ],
)
def test_unsupported_schemas_name_the_keyword(schema, words):
    with pytest.raises(SchemaError, match=words):
        Grammar(schema)


@pytest.fixture(scope="module")
def index():
    tok = tool_tokenizer()
    return tok, VocabIndex(token_bytes(tok, keep=MARKERS), tok.vocab_size + 5, tok.eos_id)


def test_string_tables_match_the_lexer(index):
    _, idx = index
    for sub in range(STRING_SUBSTATES):
        ends, closed_at = idx.string_table(sub)
        for t, piece in enumerate(idx.pieces):
            state, close = (sub if piece else DEAD), 0
            for j, b in enumerate(piece):
                state = string_step(state, b)
                if state < 0:
                    close = j + 1 if state != DEAD else 0
                    break
            assert (ends[t], closed_at[t]) == (state, close), (sub, piece)


def _walk(masks: TokenMasks, budget: int, rng) -> tuple[list[int], GrammarConstraint]:
    constraint = GrammarConstraint(masks)
    out: list[int] = []
    while not constraint.finished and len(out) < budget:
        words = constraint.allowed_words(budget - len(out))
        allowed = np.flatnonzero(np.asarray(unpack_allowed(words[None], masks.index.mask_size))[0])
        assert allowed.size and allowed.max() < len(masks.index.pieces)
        token = int(rng.choice(allowed))
        out.append(token)
        if token == masks.index.eos_id:
            break
        constraint.advance([token])
    return out, constraint


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:20])
def test_random_walks_end_valid_inside_the_budget(index, schema):
    tok, idx = index
    grammar = Grammar(schema)
    masks = TokenMasks(grammar, idx)
    rng = np.random.default_rng(0)
    shortest = grammar.dist(grammar.initial)
    for budget in rng.integers(shortest + 1, shortest + 40, size=25):
        out, constraint = _walk(masks, int(budget), rng)
        text = tok.decode([t for t in out if t != tok.eos_id])
        value = json.loads(text)
        if schema is None:
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, schema)
        # Complete; a top-level number may also go on (it ends by eos or the budget).
        assert constraint.finished or grammar.can_end(constraint.state)
        assert len(out) <= budget


def test_forced_tool_call_grammar(index):
    tok, idx = index
    heads = []
    for fn in (WEATHER, ADD):
        name = fn["function"]["name"]
        heads.append(
            (
                f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n".encode(),
                fn["function"]["parameters"],
                "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>".encode(),
            )
        )
    grammar = Grammar(choices=heads)
    rng = np.random.default_rng(1)
    names = set()
    for _ in range(20):
        out, constraint = _walk(TokenMasks(grammar, idx), 250, rng)
        assert constraint.finished
        text = tok.decode(out, skip_special_tokens=False)
        content, (call,) = ToolCallParser().parse(text)
        assert content == ""
        names.add(call.name)
        schema = (WEATHER if call.name == "get_weather" else ADD)["function"]["parameters"]
        jsonschema.validate(json.loads(call.arguments), schema)
    assert names == {"get_weather", "add"}
    with pytest.raises(ValueError, match="prefix"):
        Grammar(choices=[(b"a", None, b""), (b"ab", None, b"")])


def test_tool_call_parser_whole_and_streamed():
    calls = [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("add", '{"a": 1, "b": 2}')]
    text = "Let me check." + render_calls(calls)
    assert ToolCallParser().parse(text) == ("Let me check.", calls)
    assert ToolCallParser().parse("no calls <｜tool") == ("no calls <｜tool", [])
    parser, content, got = ToolCallParser(), "", []
    for end in range(1, len(text) + 1):
        delta, new = parser.feed(text[:end], final=end == len(text))
        assert "<" not in delta  # a marker's start is held back, never sent as content
        content += delta
        got += new
    assert (content, got) == ("Let me check.", calls)


def test_chat_template_renders_tools_and_calls(index):
    tok, _ = index
    template = ChatTemplate(tok)  # the default template renders neither tools nor calls
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]  # fmt: skip
    text = template.render(messages, [WEATHER])
    assert text.startswith("system: ## Tools") and '"city"' in text
    assert render_calls([ToolCall("get_weather", "{}")]) in text and "tool: sunny" in text


def test_templates_that_render_calls_get_them_as_deepseek_writes_them(index):
    """An assistant turn of only calls reaches the template with content None (DeepSeek's
    template renders calls under `content is none`)."""
    from dsjax.serve.requests import Limits, parse_chat
    from dsjax.text.tokenizer import Tokenizer

    tok, _ = index
    source = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and m['content'] is none %}"
        "{% for t in m['tool_calls'] %}CALL {{ t['function']['name'] }} "
        "{{ t['function']['arguments'] }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    templated = Tokenizer(
        tok.backend, bos_token="<|bos|>", eos_token="<|eos|>", chat_template=source
    )
    call = {"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    body = {
        "messages": [
            {"role": "user", "content": "hi "},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
    }
    req = parse_chat(body, Limits(vocab_size=tok.vocab_size, max_len=64, max_sequences=4))
    assert req.messages[1]["content"] is None
    assert ChatTemplate(templated).render(req.messages) == 'hi CALL add {"a": 1}'
