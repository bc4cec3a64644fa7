"""The raw bytes each token id stands for (byte-level BPE pieces read back to bytes).

A byte-level vocabulary piece (GPT-2 / DeepSeek style) is a string of byte-alphabet characters,
one per byte; decoding a piece alone would not do, since a piece that holds part of a multi-byte
character decodes to U+FFFD. Other decoders fall back to `decode([id])`. Added tokens stand for
their content; special tokens (bos, eos, ...) for nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tokenizers import decoders

__all__ = ["byte_decoder", "piece_bytes", "token_bytes"]


@functools.cache
def byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (each byte is shown as one printable char)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def piece_bytes(tokenizer, token_id: int, byte_level: bool) -> bytes:
    """The bytes of one (non-special) token id."""
    piece = tokenizer.backend.id_to_token(token_id) or ""
    table = byte_decoder()
    if byte_level and piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode()


def token_bytes(tokenizer, keep: Sequence[str] = ()) -> list[bytes | None]:
    """[tokenizer.vocab_size] list: each id's bytes; None for special tokens, except those
    whose text is in `keep` (e.g. tool-call markers a grammar spells out)."""
    backend = tokenizer.backend
    added = backend.get_added_tokens_decoder()
    byte_level = isinstance(backend.decoder, decoders.ByteLevel)
    out: list[bytes | None] = []
    for i in range(tokenizer.vocab_size):
        if i in added:
            token = added[i]
            written = not token.special or token.content in keep
            out.append(token.content.encode() if written else None)
        else:
            out.append(piece_bytes(tokenizer, i, byte_level))
    return out
