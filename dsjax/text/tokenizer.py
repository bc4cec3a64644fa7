"""A small typed wrapper over Hugging Face `tokenizers`.

The wrapper adds what the training code needs on top of a raw
`tokenizers.Tokenizer`: resolved ids of the BOS/EOS/PAD tokens, the chat
template of a Hugging Face checkpoint, loading from a `tokenizer.json` file or
a checkpoint directory (with its optional `tokenizer_config.json`), saving in
the same layout, and training a byte-level BPE from scratch.

By default special-token strings that occur inside raw text (for example a
Python file that contains the literal ``"<|eos|>"``) are tokenized as ordinary
text, so ``decode(encode(x)) == x`` holds for every string ``x``. Pass
``parse_special=True`` to `Tokenizer.encode` to have them recognised instead
(what a rendered chat template needs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsjax.checkpoints.safetensors_io import read_json_object

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "train_bpe",
]

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
# Order matters: the trainer assigns ids 0, 1, 2 in this order.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# Well-known special-token spellings, used only when no tokenizer_config.json
# says which tokens are special. The first one present in the vocabulary wins.
_KNOWN_TOKENS: dict[str, tuple[str, ...]] = {
    "bos_token": (
        BOS_TOKEN,
        "<｜begin▁of▁sentence｜>",
        "<|begin_of_text|>",
        "<s>",
        "<|startoftext|>",
    ),
    "eos_token": (
        EOS_TOKEN,
        "<｜end▁of▁sentence｜>",
        "<|end_of_text|>",
        "</s>",
        "<|endoftext|>",
    ),
    "pad_token": (PAD_TOKEN, "<｜▁pad▁｜>", "<pad>", "<|padding|>"),
}

# Byte-level BPE needs the 256 byte symbols plus our special tokens.
MIN_BPE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _token_content(value: Any, field: str, source: Path) -> str | None:
    """Returns the token string of a `tokenizer_config.json` entry.

    Hugging Face stores special tokens either as plain strings or as
    ``{"content": "...", "lstrip": ..., ...}`` dicts (an `AddedToken`).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(
        f"{source}: field {field!r} must be a string, null or a dict with a 'content' "
        f"string; got {value!r}"
    )


def _chat_template(value: Any, source: Path) -> str | None:
    """Normalises the `chat_template` entry (a string, or a list of named templates)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        by_name = {t.get("name"): t.get("template") for t in value}
        chosen = by_name.get("default", value[0].get("template"))
        if isinstance(chosen, str):
            return chosen
    raise ValueError(
        f"{source}: field 'chat_template' must be a string or a list of "
        f"{{name, template}} dicts; got {type(value).__name__}"
    )


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens and chat template."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        """Wraps `tokenizer`; special tokens are given as strings that must be in its vocabulary."""
        self._special = tokenizer
        # A second backend that treats special-token strings in text as text.
        self._plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self._ids: dict[str, int | None] = {}
        for field, token in self._tokens.items():
            if token is None:
                self._ids[field] = None
                continue
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{field} {token!r} is not in the tokenizer vocabulary")
            self._ids[field] = token_id
        self._chat_template = chat_template

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._special

    @property
    def vocab_size(self) -> int:
        """Number of token ids, including added/special tokens."""
        return self._special.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, if the tokenizer has one."""
        return self._ids["bos_token"]

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, if the tokenizer has one."""
        return self._ids["eos_token"]

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, if the tokenizer has one."""
        return self._ids["pad_token"]

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template shipped with the tokenizer, if any."""
        return self._chat_template

    # ------------------------------------------------------------------ encoding
    def _backend(self, parse_special: bool) -> tokenizers.Tokenizer:
        return self._special if parse_special else self._plain

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no bos_token")
        return [self.bos_id, *ids]

    def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
        """Tokenizes one string; no special tokens are added unless `add_bos`."""
        ids = self._backend(parse_special).encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, *, parse_special: bool = False
    ) -> list[list[int]]:
        """Tokenizes many strings at once with the parallel Rust batch encoder."""
        encodings = self._backend(parse_special).encode_batch_fast(
            list(texts), add_special_tokens=False
        )
        return [self._with_bos(e.ids, add_bos) for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Turns token ids back into text."""
        return self._special.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes `tokenizer.json` and `tokenizer_config.json` into `directory`; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._special.save(str(directory / TOKENIZER_FILE))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self._tokens}
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        (directory / CONFIG_FILE).write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads a `tokenizer.json` file, or a directory holding one.

        A `tokenizer_config.json` next to the tokenizer file (the Hugging Face
        checkpoint layout) supplies the special tokens and the chat template;
        without it, well-known special-token spellings are looked up.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001  the Rust loader raises a bare Exception
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{file} is not a tokenizer.json file ({first[:200]})") from None
        config_file = file.parent / CONFIG_FILE
        config: dict[str, Any] = {}
        if config_file.is_file():
            config = read_json_object(config_file, "tokenizer config")
        vocab = backend.get_vocab(with_added_tokens=True)
        tokens: dict[str, str | None] = {}
        for field, known in _KNOWN_TOKENS.items():
            if field in config:
                tokens[field] = _token_content(config[field], field, config_file)
            else:
                tokens[field] = next((t for t in known if t in vocab), None)
        return cls(
            backend,
            chat_template=_chat_template(config.get("chat_template"), config_file),
            **tokens,
        )

    def __repr__(self) -> str:
        ids = f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}"
        return f"Tokenizer(vocab_size={self.vocab_size}, {ids})"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE tokenizer with at most `vocab_size` tokens.

    Special tokens are ``<|pad|>`` (id 0), ``<|bos|>`` (id 1) and ``<|eos|>``
    (id 2). The ByteLevel pre-tokenizer and decoder make every string
    representable, so decoding an encoding reproduces the text exactly
    (whitespace, tabs and non-ASCII included). On small corpora the trainer may
    run out of merges before reaching `vocab_size`; `Tokenizer.vocab_size`
    reports the real size.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_BPE_VOCAB_SIZE} for a byte-level BPE "
            f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    actual = backend.get_vocab_size(with_added_tokens=True)
    if actual > vocab_size:
        raise RuntimeError(
            f"BPE trainer produced {actual} tokens, more than the requested vocab_size {vocab_size}"
        )
    return Tokenizer(backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
