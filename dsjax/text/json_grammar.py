"""JSON documents as a byte-level pushdown automaton, optionally shaped by a JSON Schema.

`Grammar(schema)` (None: any JSON object, as OpenAI's `json_object`) accepts exactly the byte
strings that are a JSON document of that schema: UTF-8, no control characters in strings, no
duplicate declared keys, every required key. A state is an immutable tuple of frames (hashable,
so masks can be cached per state); `feed(state, byte)` gives the next state or None (the byte is
not allowed), `done(state)` says the document is complete and `dist(state)` is an upper bound on
the bytes still needed to complete it (exact: the shortest completion's length), which
lets a caller keep a document inside a token budget.

The schema subset: `type` (one name or a list), `properties`, `required`, `additionalProperties`
(only whether it is false: declared properties are the only ones generated), `items`, `enum`,
`const`, `anyOf` / `oneOf` whose alternatives start with different characters, `$ref` to the
root's `$defs` / `definitions` (not recursive; e.g. pydantic's nested models), and the
annotations `title`, `description`, `default`, `examples`, `$schema`, `$id`, `$comment`,
`strict`. Any other keyword is a `SchemaError` naming it.

Whitespace is allowed between tokens (at most `MAX_WS` bytes in a row; none before the
document), numbers have at most
`MAX_NUMBER_BYTES` bytes; strings are unbounded (the budget ends them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CLOSE",
    "DEAD",
    "Grammar",
    "MAX_NUMBER_BYTES",
    "MAX_WS",
    "SchemaError",
    "STRING_SUBSTATES",
    "State",
    "string_step",
    "string_substate_cost",
]

MAX_WS = 10
MAX_NUMBER_BYTES = 24
WS = frozenset(b" \n\r\t")
_ANNOTATIONS = frozenset(
    ("title", "description", "default", "examples", "$schema", "$id", "$comment", "strict")
)
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

Choice = tuple[bytes, Any, bytes]  # (head, schema or None = any object, tail)
State = tuple  # a tuple of frames (tuples); the last frame is the innermost


class SchemaError(ValueError):
    """A schema this grammar cannot enforce (the message names the keyword and where)."""


# ====================================================================== string interior lexer
# Substates: 0 normal; 1-3 need 1-3 UTF-8 continuation bytes; 4 after E0 (A0-BF); 5 after ED
# (80-9F); 6 after F0 (90-BF); 7 after F4 (80-8F); 8 after a backslash; 9-12 \u hex digits left
# 4..1; 13 after \uD; 14-15 a high surrogate's last 2..1 hex digits; 16-19 its low half's
# '\', 'u', 'D', then 8-B (then 11: 2 hex digits left). A lone surrogate is not allowed.
STRING_SUBSTATES = 20
DEAD, CLOSE = -1, -2
_COST = (0, 1, 2, 3, 2, 2, 3, 3, 1, 4, 3, 2, 1, 3, 8, 7, 6, 5, 4, 3)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_CONT = range(0x80, 0xC0)


def string_substate_cost(sub: int) -> int:
    """Bytes needed from string substate `sub` to close the string (the quote included)."""
    return _COST[sub] + 1


def string_step(sub: int, b: int) -> int:
    """Next substate of a string's interior after byte `b`; CLOSE at the closing quote."""
    if sub == 0:
        if b == 0x22:
            return CLOSE
        if b == 0x5C:
            return 8
        if 0x20 <= b < 0x80:
            return 0
        if 0xC2 <= b <= 0xDF:
            return 1
        if 0xE1 <= b <= 0xEC or 0xEE <= b <= 0xEF:
            return 2
        if 0xF1 <= b <= 0xF3:
            return 3
        return {0xE0: 4, 0xED: 5, 0xF0: 6, 0xF4: 7}.get(b, DEAD)
    if 1 <= sub <= 3:
        return sub - 1 if b in _CONT else DEAD
    if sub in (4, 5, 6, 7):
        lo, hi, nxt = {
            4: (0xA0, 0xBF, 1),
            5: (0x80, 0x9F, 1),
            6: (0x90, 0xBF, 2),
            7: (0x80, 0x8F, 2),
        }[sub]
        return nxt if lo <= b <= hi else DEAD
    if sub == 8:
        if b in b'"\\/bfnrt':
            return 0
        return 9 if b == ord("u") else DEAD
    if sub == 9:
        return (13 if b in b"dD" else 10) if b in _HEX else DEAD
    if sub in (10, 11, 12):
        return (sub + 1 if sub < 12 else 0) if b in _HEX else DEAD
    if sub == 13:
        if b in b"01234567":
            return 11
        return 14 if b in b"89abAB" else DEAD
    if sub in (14, 15):
        return sub + 1 if b in _HEX else DEAD
    want = {16: b"\\", 17: b"u", 18: b"dD", 19: b"cdefCDEF"}[sub]
    return (sub + 1 if sub < 19 else 11) if b in want else DEAD


# ====================================================================== schema -> specs
class _Compiler:
    """Turns a schema into a table of specs (tuples) referenced by index from states."""

    def __init__(self, defs: Any = None) -> None:
        self.specs: list[tuple] = []
        self.index: dict[tuple, int] = {}
        self.defs = defs if isinstance(defs, dict) else {}
        self.refs: dict[str, int] = {}
        self.resolving: list[str] = []

    def add(self, spec: tuple) -> int:
        if spec not in self.index:
            self.index[spec] = len(self.specs)
            self.specs.append(spec)
        return self.index[spec]

    def any_value(self) -> int:
        # ("any",) dispatches to the generic object/array/string/number/literals by first byte.
        return self.add(("any",))

    def compile(self, schema: Any, where: str) -> int:
        if schema is True or schema == {}:
            return self.any_value()
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be an object; got {_short(schema)}")
        if "$ref" in schema:
            for key in schema:
                if key not in ("$ref", "$defs", "definitions") and key not in _ANNOTATIONS:
                    raise SchemaError(
                        f"{where}: the keyword '{key}' beside '$ref' is not supported"
                    )
            return self.ref(schema["$ref"], where)
        known = {"type", "properties", "required", "additionalProperties", "items", "enum"}
        known |= {"const", "anyOf", "oneOf", "$defs", "definitions"}
        for key in schema:
            if key not in known and key not in _ANNOTATIONS:
                raise SchemaError(f"{where}: the keyword '{key}' is not supported")
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}.enum: must be a non-empty list")
            return self.add(("literals", tuple(sorted({_encode(v) for v in values}))))
        alternatives = schema.get("anyOf", schema.get("oneOf"))
        if alternatives is not None:
            key = "anyOf" if "anyOf" in schema else "oneOf"
            if not isinstance(alternatives, list) or not alternatives:
                raise SchemaError(f"{where}.{key}: must be a non-empty list of schemas")
            members = [self.compile(s, f"{where}.{key}[{i}]") for i, s in enumerate(alternatives)]
            return self.union(members, f"{where}.{key}")
        types = schema.get("type")
        if types is None:
            if "properties" in schema:
                types = "object"
            elif "items" in schema:
                types = "array"
            else:
                return self.any_value()
        names = types if isinstance(types, list) else [types]
        if not names or any(t not in _TYPES for t in names):
            raise SchemaError(f"{where}.type: must be one of {', '.join(_TYPES)} or a list of them")
        if "number" in names and "integer" in names:
            names = [t for t in names if t != "integer"]
        members = [self.typed(t, schema, where) for t in dict.fromkeys(names)]
        return members[0] if len(members) == 1 else self.union(members, f"{where}.type")

    def ref(self, ref: Any, where: str) -> int:
        """A local reference into the root's `$defs` / `definitions` (not recursive)."""
        name = None
        for prefix in ("#/$defs/", "#/definitions/"):
            if isinstance(ref, str) and ref.startswith(prefix):
                name = ref[len(prefix) :]
        if name is None or name not in self.defs:
            raise SchemaError(f"{where}.$ref: {_short(ref)} is not a name in the root's '$defs'")
        if ref in self.refs:
            return self.refs[ref]
        if ref in self.resolving:
            raise SchemaError(f"{where}.$ref: the recursive reference {ref} is not supported")
        self.resolving.append(ref)
        spec = self.refs[ref] = self.compile(self.defs[name], f"{where}.$ref({name})")
        self.resolving.pop()
        return spec

    def typed(self, name: str, schema: dict[str, Any], where: str) -> int:
        if name == "object":
            return self.object(schema, where)
        if name == "array":
            items = schema.get("items", True)
            return self.add(("array", self.compile(items, f"{where}.items")))
        if name == "boolean":
            return self.add(("literals", (b"false", b"true")))
        if name == "null":
            return self.add(("literals", (b"null",)))
        return self.add((name,))

    def object(self, schema: dict[str, Any], where: str) -> int:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(props, dict):
            raise SchemaError(f"{where}.properties: must be an object")
        if not isinstance(required, list) or any(
            not isinstance(r, str) or r not in props for r in required
        ):
            raise SchemaError(f"{where}.required: must list names from 'properties'")
        if not props:
            values = (
                self.any_value()
                if extra in (True, False)
                else self.compile(extra, f"{where}.additionalProperties")
            )
            return self.add(("free_object", values))
        if not isinstance(extra, bool):
            self.compile(extra, f"{where}.additionalProperties")  # checked, never generated
        keys = tuple(_encode(str(k)) for k in props)
        specs = tuple(self.compile(v, f"{where}.properties.{k}") for k, v in props.items())
        need = frozenset(list(props).index(r) for r in required)
        return self.add(("object", keys, specs, need))

    def union(self, members: list[int], where: str) -> int:
        seen: dict[int, int] = {}
        flat: list[int] = []
        for m in members:
            flat.extend(self.specs[m][1] if self.specs[m][0] == "union" else [m])
        literal_members = [m for m in flat if self.specs[m][0] == "literals"]
        if len(literal_members) > 1:  # one literal set: ["boolean", "null"], enum + null, ...
            merged = tuple(sorted({o for m in literal_members for o in self.specs[m][1]}))
            flat = [m for m in flat if m not in literal_members] + [self.add(("literals", merged))]
        for m in flat:
            for b in first_bytes(self.specs, m):
                if b in seen and seen[b] != m:
                    raise SchemaError(
                        f"{where}: alternatives that can start with the same character "
                        f"({chr(b)!r}) are not supported"
                    )
                seen[b] = m
        return flat[0] if len(flat) == 1 else self.add(("union", tuple(flat)))


def _definitions(schema: Any, choices: Sequence[Choice] | None) -> dict[str, Any]:
    """The root's `$defs` (and older `definitions`) that `$ref`s may name."""
    out: dict[str, Any] = {}
    for root in [schema] if choices is None else [sch for _, sch, _ in choices]:
        if isinstance(root, dict):
            for key in ("definitions", "$defs"):
                if isinstance(root.get(key), dict):
                    out.update(root[key])
    return out


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _short(x: Any) -> str:
    text = json.dumps(x)
    return text if len(text) <= 40 else text[:37] + "..."


_NUMBER_START = frozenset(b"-0123456789")


def first_bytes(specs: list[tuple], spec: int) -> frozenset[int]:
    """The bytes a value of `spec` can start with."""
    kind = specs[spec][0]
    if kind == "any":
        return frozenset(b'{["tfn') | _NUMBER_START
    if kind in ("object", "free_object"):
        return frozenset(b"{")
    if kind == "array":
        return frozenset(b"[")
    if kind == "string":
        return frozenset(b'"')
    if kind in ("number", "integer"):
        return _NUMBER_START
    if kind == "literals":
        return frozenset(o[0] for o in specs[spec][1])
    return frozenset().union(*(first_bytes(specs, m) for m in specs[spec][1]))


# ====================================================================== the automaton
# Frames:
#   ("v", spec, ws)                  a value of `spec` is expected (ws: whitespace bytes read)
#   ("s", sub)                       inside a string (value or free key), lexer substate `sub`
#   ("l", options, prefix)           one of the byte strings `options` (prefix read so far)
#   ("k", spec, used, prefix)        a declared key of object `spec` not in `used` (bitmask)
#   ("n", integer, phase, length)    a number (phases below)
#   ("o", spec, phase, used, cur, ws)   an object; phases: 0 after '{', 1 after ',',
#                                    2 after a key (cur = its index, -1 for free keys),
#                                    3 its value pending, 4 after a value, 5 key pending
#   ("a", spec, phase, ws)           an array; phases 0 after '[', 3 item pending, 4 after an item
#   ("h", heads, specs, tails, read) one of `heads` (then the value of the matching spec and tail)
#   ("t", tail)                      `tail` follows the value above it
# Number phases: 1 after '-', 2 '0', 3 integer digits, 4 after '.', 5 fraction digits,
# 6 after 'e', 7 after the exponent sign, 8 exponent digits; 2, 3, 5, 8 are complete.
_NUMBER_DONE = frozenset((2, 3, 5, 8))
_DIGITS = frozenset(b"0123456789")


class Grammar:
    """The automaton of one response format (see the module docstring).

    Args:
      schema: a JSON Schema (dict) for the document, or None for any JSON object.
      choices: instead of one document, one of several `(head, schema, tail)`: the bytes
        `head`, a document of `schema` (None: any object), then `tail` (heads are prefix-free;
        e.g. a tool call: its name, its arguments, the closing markup).
    Raises:
      SchemaError: the schema uses something outside the supported subset.
    """

    def __init__(self, schema: Any = None, *, choices: Sequence[Choice] | None = None):
        c = _Compiler(_definitions(schema, choices))
        self.any_object = c.add(("free_object", c.any_value()))
        self.any_array = c.add(("array", c.any_value()))
        if choices is not None:
            heads = tuple(head for head, _, _ in choices)
            if (
                not heads
                or any(a != b and b.startswith(a) for a in heads for b in heads)
                or len(set(heads)) < len(heads)
            ):
                raise ValueError("choices: the heads must be distinct and none a prefix of another")
            specs = tuple(
                c.compile(sch, f"choices[{i}]") if sch is not None else self.any_object
                for i, (_, sch, _) in enumerate(choices)
            )
            tails = tuple(tail for _, _, tail in choices)
            self.initial: State = (("h", heads, specs, tails, b""),)
        else:
            root = self.any_object if schema is None else c.compile(schema, "schema")
            self.initial = (("v", root, MAX_WS),)  # no whitespace before the document
        self.specs = c.specs
        self._min: dict[int, int] = {}
        for spec in range(len(self.specs)):
            self.min_len(spec)

    # -------------------------------------------------------------- sizes
    def min_len(self, spec: int) -> int:
        """Bytes of the shortest value of `spec`."""
        if spec in self._min:
            return self._min[spec]
        self._min[spec] = 1 << 30  # recursion guard (a self-referencing spec never terminates)
        s = self.specs[spec]
        kind = s[0]
        if kind == "literals":
            n = min(len(o) for o in s[1])
        elif kind == "union":
            n = min(self.min_len(m) for m in s[1])
        elif kind in ("object",):
            n = 1 + self._pairs_cost(spec, 0, first=True)
        elif kind in ("free_object", "array", "string"):
            n = 2
        else:  # any, number, integer
            n = 1
        self._min[spec] = n
        return n

    def _pair(self, spec: int, i: int) -> int:
        keys, values = self.specs[spec][1], self.specs[spec][2]
        return len(keys[i]) + 1 + self.min_len(values[i])

    def _pairs_cost(self, spec: int, used: int, first: bool) -> int:
        """Bytes to write the missing required pairs of object `spec` and its '}' (a comma
        before each pair, except the first when `first`)."""
        need = [i for i in self.specs[spec][3] if not used >> i & 1]
        cost = sum(self._pair(spec, i) + 1 for i in need) + 1
        return cost - 1 if first and need else cost

    def dist(self, state: State) -> int:
        """The fewest bytes that complete the document (0 when done)."""
        total = 0
        frames = list(reversed(state))
        if frames and frames[0][0] == "k":  # a declared key and its object, priced together
            _, spec, used, prefix = frames[0]
            total = min(
                len(key) - len(prefix) + 1 + self.min_len(self.specs[spec][2][i])
                + self._pairs_cost(spec, used | 1 << i, first=False)
                for i, key in self._keys(spec, used, prefix)
            )  # fmt: skip
            frames = frames[2:]
        for f in frames:
            kind = f[0]
            if kind == "v":
                total += self.min_len(f[1])
            elif kind == "s":
                total += string_substate_cost(f[1])
            elif kind == "l":
                total += min(len(o) - len(f[2]) for o in f[1] if o.startswith(f[2]))
            elif kind == "n":
                total += 0 if f[2] in _NUMBER_DONE else 1
            elif kind == "h":
                total += min(
                    len(h) - len(f[4]) + self.min_len(spec) + len(tail)
                    for h, spec, tail in zip(f[1], f[2], f[3], strict=True)
                    if h.startswith(f[4])
                )
            elif kind == "t":
                total += len(f[1])
            elif kind == "a":
                total += 1
            else:
                total += self._object_cost(f)
        return total

    def _object_cost(self, f: tuple) -> int:
        _, spec, phase, used, cur, _ws = f
        s = self.specs[spec]
        if s[0] == "free_object":
            if phase == 1:
                return 2 + 1 + self.min_len(s[1]) + 1
            if phase == 2:
                return 1 + self.min_len(s[1]) + 1
            if phase == 5:
                return 1 + self.min_len(s[1]) + 1
            return 1
        if phase in (0, 4):
            return self._pairs_cost(spec, used, first=phase == 0)
        if phase == 1:
            need = [i for i in s[3] if not used >> i & 1]
            if need:
                return self._pairs_cost(spec, used, first=True)
            return min(self._pair(spec, i) for i in range(len(s[1])) if not used >> i & 1) + 1
        rest = self._pairs_cost(spec, used | (1 << cur if cur >= 0 else 0), first=False)
        return (1 + self.min_len(s[2][cur]) if phase == 2 else 0) + rest

    def _keys(self, spec: int, used: int, prefix: bytes) -> list[tuple[int, bytes]]:
        keys = self.specs[spec][1]
        return [(i, k) for i, k in enumerate(keys) if not used >> i & 1 and k.startswith(prefix)]

    # -------------------------------------------------------------- transitions
    @staticmethod
    def done(state: State) -> bool:
        """The document is complete: nothing may follow."""
        return not state

    def can_end(self, state: State) -> bool:
        """The document is complete if it ends here (a top-level number may also go on)."""
        return not state or (len(state) == 1 and state[0][0] == "n" and state[0][2] in _NUMBER_DONE)

    def feed_bytes(self, state: State | None, data: bytes) -> State | None:
        """The state after `data`, or None if it is not allowed."""
        for b in data:
            if state is None:
                return None
            state = self.feed(state, b)
        return state

    def feed(self, state: State, b: int) -> State | None:
        """The state after byte `b`, or None if `b` is not allowed here."""
        if not state:
            return None
        f, below = state[-1], state[:-1]
        kind = f[0]
        if kind == "s":
            sub = string_step(f[1], b)
            if sub == DEAD:
                return None
            if sub == CLOSE:
                return self._child_done(below, -1)
            return (*below, ("s", sub))
        if kind == "v":
            if b in WS:
                return (*below, ("v", f[1], f[2] + 1)) if f[2] < MAX_WS else None
            return self._start(below, f[1], b)
        if kind == "l":
            prefix = f[2] + bytes((b,))
            if any(o.startswith(prefix) for o in f[1]):
                return self._literal(below, ("l", f[1], prefix), prefix, f[1], -1)
            if f[2] in f[1]:  # complete, and b belongs to what follows
                return self._refeed(self._child_done(below, -1), b)
            return None
        if kind == "k":
            prefix = f[3] + bytes((b,))
            keys = self._keys(f[1], f[2], prefix)
            if not keys:
                return None
            if len(keys) == 1 and keys[0][1] == prefix:
                return self._child_done(below, keys[0][0])
            return (*below, ("k", f[1], f[2], prefix))
        if kind == "h":
            read = f[4] + bytes((b,))
            match = [i for i, h in enumerate(f[1]) if h.startswith(read)]
            if not match:
                return None
            if f[1][match[0]] == read:
                return (*below, ("t", f[3][match[0]]), ("v", f[2][match[0]], 0))
            return (*below, (*f[:4], read))
        if kind == "n":
            return self._number(below, f, b)
        if kind == "o":
            return self._object(below, f, b)
        return self._array(below, f, b)

    def _refeed(self, state: State | None, b: int) -> State | None:
        return None if state is None else self.feed(state, b)

    def _literal(self, below: State, frame: tuple, prefix: bytes, options, result: int):
        if prefix in options and not any(
            len(o) > len(prefix) and o.startswith(prefix) for o in options
        ):
            return self._child_done(below, result)
        return (*below, frame)

    def _start(self, below: State, spec: int, b: int) -> State | None:
        s = self.specs[spec]
        kind = s[0]
        if kind == "union":
            member = next((m for m in s[1] if b in first_bytes(self.specs, m)), None)
            return None if member is None else self._start(below, member, b)
        if kind == "any":
            if b == ord("{"):
                return self._start(below, self.any_object, b)
            if b == ord("["):
                return self._start(below, self.any_array, b)
            if b == ord('"'):
                return (*below, ("s", 0))
            if b in _NUMBER_START:
                return self._number(below, ("n", 0, 0, 0), b)
            options = (b"true", b"false", b"null")
            return self._start_literal(below, options, b)
        if kind in ("object", "free_object"):
            return (*below, ("o", spec, 0, 0, -1, 0)) if b == ord("{") else None
        if kind == "array":
            return (*below, ("a", spec, 0, 0)) if b == ord("[") else None
        if kind == "string":
            return (*below, ("s", 0)) if b == ord('"') else None
        if kind in ("number", "integer"):
            if b not in _NUMBER_START:
                return None
            return self._number(below, ("n", int(kind == "integer"), 0, 0), b)
        return self._start_literal(below, s[1], b)

    def _start_literal(self, below: State, options: tuple, b: int) -> State | None:
        prefix = bytes((b,))
        if not any(o.startswith(prefix) for o in options):
            return None
        return self._literal(below, ("l", options, prefix), prefix, options, -1)

    def _child_done(self, state: State, result: int) -> State:
        """The innermost frame finished (result: the declared key's index, or -1)."""
        if not state:
            return ()
        f, below = state[-1], state[:-1]
        if f[0] == "a":
            return (*below, ("a", f[1], 4, 0))
        if f[0] == "t":
            return (*below, ("l", (f[1],), b"")) if f[1] else below
        _, spec, phase, used, _cur, _ws = f
        if phase == 5:  # a key
            return (*below, ("o", spec, 2, used, result, 0))
        return (*below, ("o", spec, 4, used, -1, 0))  # a value

    def _number(self, below: State, f: tuple, b: int) -> State | None:
        _, integer, phase, length = f
        room = MAX_NUMBER_BYTES - length
        nxt = None
        if b in _DIGITS:
            if phase in (0, 1):
                nxt = 2 if b == ord("0") else 3
            elif phase in (3, 5, 8):
                nxt = phase
            elif phase in (4, 6, 7):
                nxt = {4: 5, 6: 8, 7: 8}[phase]
        elif b == ord("-") and phase == 0:
            nxt = 1 if room >= 2 else None
        elif b == ord(".") and phase in (2, 3) and not integer and room >= 2:
            nxt = 4
        elif b in b"eE" and phase in (2, 3, 5) and not integer and room >= 2:
            nxt = 6
        elif b in b"+-" and phase == 6:
            nxt = 7
        if nxt is not None and room >= 1:
            return (*below, ("n", integer, nxt, length + 1))
        if phase in _NUMBER_DONE and below:
            return self._refeed(self._child_done(below, -1), b)
        return None

    def _object(self, below: State, f: tuple, b: int) -> State | None:
        _, spec, phase, used, cur, ws = f
        s = self.specs[spec]
        free = s[0] == "free_object"
        if b in WS:
            return (*below, ("o", spec, phase, used, cur, ws + 1)) if ws < MAX_WS else None
        n_keys = 0 if free else len(s[1])
        unused = free or any(not used >> i & 1 for i in range(n_keys))
        complete = free or all(used >> i & 1 for i in s[3])
        if phase in (0, 1) and b == ord('"') and unused:
            me = ("o", spec, 5, used, -1, 0)
            if free:
                return (*below, me, ("s", 0))
            return (*below, me, ("k", spec, used, b'"'))
        if phase in (0, 4) and b == ord("}") and complete:
            return self._child_done(below, -1)
        if phase == 4 and b == ord(",") and unused:
            return (*below, ("o", spec, 1, used, -1, 0))
        if phase == 2 and b == ord(":"):
            value = s[1] if free else s[2][cur]
            new_used = used if free else used | 1 << cur
            return (*below, ("o", spec, 3, new_used, cur, 0), ("v", value, 0))
        return None

    def _array(self, below: State, f: tuple, b: int) -> State | None:
        _, spec, phase, ws = f
        if b in WS:
            return (*below, ("a", spec, phase, ws + 1)) if ws < MAX_WS else None
        if b == ord("]") and phase in (0, 4):
            return self._child_done(below, -1)
        if phase == 4 and b == ord(","):
            return (*below, ("a", spec, 3, 0), ("v", self.specs[spec][1], 0))
        if phase == 0:
            return self._start((*below, ("a", spec, 3, 0)), self.specs[spec][1], b)
        return None
