"""DeepSeek's tool-call format: rendering calls and tool descriptions, parsing generated calls.

DeepSeek-V3's chat template writes an assistant turn that calls tools as

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>            (more calls each after a "\\n")
    <｜tool▁calls▁end｜>

(without the line breaks around the markers) and tool results as
`<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>`.
`ToolCallParser` reads generated text back into OpenAI `tool_calls`, also incrementally for
streams (content before the calls is released as it comes; each call once it is complete).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CALLS_BEGIN",
    "CALLS_END",
    "CALL_BEGIN",
    "CALL_END",
    "MARKERS",
    "SEP",
    "ToolCall",
    "ToolCallParser",
    "call_head",
    "call_tail",
    "render_calls",
    "tools_prompt",
]

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
OUTPUTS_END = "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

_CALL = re.compile(
    re.escape(CALL_BEGIN) + r"(?P<type>[^<\n]*?)" + re.escape(SEP) + r"(?P<name>[^\n]*)\n"
    r"```(?:json)?\n(?P<args>.*?)\n?```" + re.escape(CALL_END),
    re.DOTALL,
)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments (JSON text)."""

    name: str
    arguments: str


def call_head(name: str, first: bool = True) -> str:
    """The text before a call's arguments (`first`: the calls block opens here)."""
    return (CALLS_BEGIN if first else "\n") + f"{CALL_BEGIN}function{SEP}{name}\n```json\n"


def call_tail(last: bool = True) -> str:
    """The text after a call's arguments (`last`: the calls block closes here)."""
    return "\n```" + CALL_END + (CALLS_END if last else "")


def render_calls(calls: Sequence[ToolCall]) -> str:
    """An assistant turn's calls in DeepSeek's format."""
    return "".join(
        call_head(c.name, i == 0) + c.arguments + call_tail(i == len(calls) - 1)
        for i, c in enumerate(calls)
    )


def render_outputs(results: Sequence[str]) -> str:
    """Consecutive tool results in DeepSeek's format."""
    body = "\n".join(OUTPUT_BEGIN + r + OUTPUT_END for r in results)
    return OUTPUTS_BEGIN + body + OUTPUTS_END


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """System-prompt text describing `tools` (OpenAI function tools) and the call format, for
    chat templates that do not render tools themselves."""
    lines = ["## Tools", "You have access to the following tools:", ""]
    for tool in tools:
        fn = tool["function"]
        lines += [f"### {fn['name']}"]
        if fn.get("description"):
            lines += [f"Description: {fn['description']}"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        lines += [f"Parameters: {json.dumps(params, ensure_ascii=False)}", ""]
    example = render_calls([ToolCall("NAME", '{"ARGUMENT": "VALUE"}')])
    lines += ["To call tools, answer with exactly this format (one or more calls):", example]
    return "\n".join(lines)


class ToolCallParser:
    """Splits generated text into content and tool calls, all at once or as it streams.

    `feed(text_so_far)` returns (new content, new complete calls) since the previous call; the
    content stops where the calls block begins (text that may still become its marker is held
    back). `finish(text)` releases what is held and returns any call completed last.
    """

    def __init__(self) -> None:
        self.sent_content = 0
        self.calls: list[ToolCall] = []

    def _split(self, text: str) -> tuple[int, str]:
        """(where the content ends, the calls text after it)."""
        at = text.find(CALLS_BEGIN)
        if at < 0:
            at = text.find(CALL_BEGIN)  # a block whose opening marker the model skipped
        return (len(text), "") if at < 0 else (at, text[at:])

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        end, calls_text = self._split(text)
        if not calls_text and not final:
            end = min(end, _safe_end(text))
        content = text[self.sent_content : end] if end > self.sent_content else ""
        self.sent_content = max(self.sent_content, end)
        found = [ToolCall(m["name"].strip(), m["args"].strip()) for m in _CALL.finditer(calls_text)]
        new = found[len(self.calls) :]
        self.calls.extend(new)
        return content, new

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """All of `text`: (content before the calls, the calls)."""
        content, _ = self.feed(text, final=True)
        return content, list(self.calls)


def _safe_end(text: str) -> int:
    """Where text may be released: before a tail that could still grow into a marker."""
    for start in range(max(len(text) - len(CALLS_BEGIN) + 1, 0), len(text)):
        tail = text[start:]
        if CALLS_BEGIN.startswith(tail) or CALL_BEGIN.startswith(tail):
            return start
    return len(text)
