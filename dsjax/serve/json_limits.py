"""JSON request bodies parsed with limits: UTF-8, nesting depth, integer digits, finite numbers.

Python's `json` recurses per nesting level (100,000 levels: RecursionError) and parses integer
literals of any length (5,000 digits: ValueError from int(), quadratic before that). Here the
depth and the longest digit run are measured first in linear time over the text with strings
blanked out, and the parse hooks refuse NaN, Infinity and floats out of range. Every failure is an
`APIError` 400 saying which limit the body breaks.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from dsjax.serve.errors import APIError

__all__ = ["MAX_INT_DIGITS", "MAX_JSON_DEPTH", "json_depth", "may_hold_surrogates", "parse_json"]

MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 100  # uint64 has 20; longer literals are refused before int() runs
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


_LONG_NUMBER = re.compile(rb"\d{%d,}" % (MAX_INT_DIGITS + 1))
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _JSONLimit(ValueError):
    pass


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONLimit(f"the number {text[:40]} is out of the float64 range")
    return value


def _parse_constant(name: str):
    raise _JSONLimit(f"{name} is not valid JSON")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { in a JSON text (string contents are skipped); linear time."""
    return _depth(_JSON_STRING.sub(b'""', raw))


def may_hold_surrogates(raw: bytes) -> bool:
    """False when no string in the JSON text can hold a UTF-16 surrogate (UTF-8 cannot encode
    one, so only a \\uD800-\\uDFFF escape can); True means: look (pairs are fine)."""
    return _SURROGATE_ESCAPE.search(raw) is not None


def _depth(skeleton_bytes: bytes) -> int:
    skeleton = np.frombuffer(skeleton_bytes, np.uint8)
    opens = (skeleton == ord("[")) | (skeleton == ord("{"))
    closes = (skeleton == ord("]")) | (skeleton == ord("}"))
    if not skeleton.size:
        return 0
    return int(np.cumsum(opens.astype(np.int32) - closes.astype(np.int32)).max(initial=0))


def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body. Raises APIError 400 naming the limit it breaks."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not UTF-8: {err}") from None
    skeleton = _JSON_STRING.sub(b'""', raw)
    depth = _depth(skeleton)
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"the JSON body nests {depth} deep (at most {MAX_JSON_DEPTH})")
    long = _LONG_NUMBER.search(skeleton)
    if long is not None:
        raise APIError(
            400,
            f"malformed JSON body: a number literal has {len(long.group())} digits "
            f"(at most {MAX_INT_DIGITS})",
        )
    try:
        return json.loads(
            raw,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except _JSONLimit as err:
        raise APIError(400, f"malformed JSON body: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise APIError(400, f"malformed JSON body: {err}") from None
