"""Chat prompts: a tokenizer's Jinja chat template rendered in a sandbox.

The template (tokenizer_config.json's `chat_template`, else `DEFAULT_CHAT_TEMPLATE`) gets
`messages` (a list of {"role", "content"[, "name"]} dicts), `add_generation_prompt=True`,
`bos_token`, `eos_token` and `raise_exception(message)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
        self.template = env.from_string(tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.backend.id_to_token(token_id)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text. Raises ValueError with the template's message when it fails."""
        try:
            return self.template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=True,
                bos_token=self._token(self.tokenizer.bos_id),
                eos_token=self._token(self.tokenizer.eos_id),
            )
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from None

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the rendered prompt (special tokens in the template are parsed)."""
        return encode_text(self.tokenizer, self.render(messages), self.add_bos, special=True)


def encode_text(tokenizer, text: str, add_bos: bool, special: bool = False) -> list[int]:
    """Token ids of `text`, with the BOS id in front when `add_bos` and not already there."""
    ids = tokenizer.encode(text, parse_special=special)
    bos = tokenizer.bos_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids
