"""Chat prompts: a tokenizer's Jinja chat template rendered in a sandbox.

The template (tokenizer_config.json's `chat_template`, else `DEFAULT_CHAT_TEMPLATE`) gets
`messages` (a list of {"role", "content"[, "name", "tool_calls", "tool_call_id"]} dicts),
`tools` (when the request has any), `add_generation_prompt=True`, `bos_token`, `eos_token`
and `raise_exception(message)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsjax.text.tool_calls import ToolCall, render_calls, tools_prompt

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatTemplate"]

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _raise_exception(message):
    raise jinja2.TemplateError(message)


class ChatTemplate:
    """Renders chat messages to prompt token ids with one tokenizer's template.

    Args:
      tokenizer: a dsjax `Tokenizer` (its `chat_template`, bos/eos tokens and encoder are used).
      add_bos: prepend the BOS id when the rendered text does not already start with it.
    """

    def __init__(self, tokenizer, add_bos: bool = False):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        self.tokenizer, self.add_bos = tokenizer, add_bos
        source = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        self.template = env.from_string(source)
        variables = jinja2.meta.find_undeclared_variables(env.parse(source))
        self.renders_tools = "tools" in variables
        self.renders_calls = "tool_calls" in source

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.backend.id_to_token(token_id)

    def render(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()
    ) -> str:
        """The prompt text. Raises ValueError with the template's message when it fails.

        `tools` (OpenAI function tools) reach the template as `tools`; a template that does not
        use them gets their description (`tool_calls.tools_prompt`) in the system message, and
        one that does not render assistant `tool_calls` gets them in DeepSeek's format after
        the message's content."""
        messages = [dict(m) for m in messages]
        if not self.renders_calls:
            for m in messages:
                calls = m.pop("tool_calls", None)
                if calls:
                    text = render_calls(
                        [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in calls]
                    )
                    m["content"] = (m.get("content") or "") + text
        if tools and not self.renders_tools:
            prompt = tools_prompt(tools)
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] = messages[0]["content"] + "\n\n" + prompt
            else:
                messages.insert(0, {"role": "system", "content": prompt})
        extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self._token(self.tokenizer.bos_id),
                eos_token=self._token(self.tokenizer.eos_id),
                **extra,
            )
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from None

    def encode(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()
    ) -> list[int]:
        """Token ids of the rendered prompt (special tokens in the template are parsed)."""
        return encode_text(self.tokenizer, self.render(messages, tools), self.add_bos, special=True)


def encode_text(tokenizer, text: str, add_bos: bool, special: bool = False) -> list[int]:
    """Token ids of `text`, with the BOS id in front when `add_bos` and not already there."""
    ids = tokenizer.encode(text, parse_special=special)
    bos = tokenizer.bos_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids
