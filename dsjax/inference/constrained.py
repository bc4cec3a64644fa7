"""Constrained decoding: a byte-level grammar turned into allowed-token masks over a vocabulary.

`VocabIndex` holds what is computed once per vocabulary: every token's bytes, the tokens sorted
by their bytes (a trie walk skips every token below a dead prefix with one bisection), and, per
string-interior lexer substate, where each token ends when read inside a JSON string (one
vectorised pass over a [V, longest token] byte matrix). `TokenMasks` answers "which tokens may
come next" for one `Grammar` state and caches the answer per state, shared by every request of
that grammar: inside a string (where nearly the whole vocabulary is allowed) the answer is the
precomputed table plus a simulation of the few tokens that close the string; elsewhere it is a
pruned trie walk. Each cached answer keeps, per allowed token, an upper bound on the bytes
still needed after it, so a request with `remaining` tokens left only takes tokens after which
the document can still be completed (each byte is one token at worst), and so it ends complete
instead of being cut.

`GrammarConstraint` is the engine's `TokenConstraint` for one request.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from dsjax.inference.sampling import pack_allowed
from dsjax.text.json_grammar import (
    CLOSE,
    DEAD,
    STRING_SUBSTATES,
    Grammar,
    State,
    string_step,
    string_substate_cost,
)

__all__ = ["GrammarConstraint", "TokenMasks", "VocabIndex"]

_STRING_TABLE = np.array(
    [[string_step(s, b) for b in range(256)] for s in range(STRING_SUBSTATES)], np.int8
)
_SUB_COST = np.array([string_substate_cost(s) for s in range(STRING_SUBSTATES)], np.int32)


class VocabIndex:
    """What one vocabulary needs for constrained decoding (build once, share).

    Args:
      pieces: each token id's bytes (`dsjax.text.token_bytes.token_bytes`); None or b"" for
        tokens that are never allowed (special tokens).
      mask_size: the model's vocabulary size (the mask covers it; ids past `pieces` are never
        allowed).
      eos_id: allowed (ending the request) where a document may end but could also go on.
    """

    def __init__(self, pieces: Sequence[bytes | None], mask_size: int, eos_id: int | None = None):
        if mask_size < len(pieces):
            raise ValueError(f"mask_size={mask_size} < {len(pieces)} tokens")
        self.pieces = [p or b"" for p in pieces]
        self.mask_size, self.eos_id = mask_size, eos_id
        order = sorted((p, i) for i, p in enumerate(self.pieces) if p)
        self.sorted_bytes = [p for p, _ in order]
        self.sorted_ids = [i for _, i in order]
        lengths = np.array([len(p) for p in self.pieces], np.int32)
        width = int(lengths.max(initial=1))
        self.lengths = lengths
        self.matrix = np.zeros((len(self.pieces), width), np.uint8)
        for i, p in enumerate(self.pieces):
            self.matrix[i, : len(p)] = np.frombuffer(p, np.uint8)
        self._strings: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def string_table(self, sub: int) -> tuple[np.ndarray, np.ndarray]:
        """Per token, read inside a string from substate `sub`: (end substate, or DEAD / CLOSE;
        bytes read up to and including the closing quote, or 0)."""
        with self._lock:
            hit = self._strings.get(sub)
            if hit is not None:
                return hit
            V = len(self.pieces)
            state = np.where(self.lengths > 0, sub, DEAD).astype(np.int8)
            closed_at = np.zeros(V, np.int32)
            for j in range(self.matrix.shape[1]):
                live = np.flatnonzero((state >= 0) & (self.lengths > j))
                if not live.size:
                    break
                nxt = _STRING_TABLE[state[live], self.matrix[live, j]]
                state[live] = nxt
                closed_at[live[nxt == CLOSE]] = j + 1
            self._strings[sub] = (state, closed_at)
            return state, closed_at


class _Answer:
    """Allowed next tokens of one state: ids, the bytes still needed after each, packed mask."""

    def __init__(self, ids: np.ndarray, dists: np.ndarray, mask_size: int):
        order = np.argsort(ids, kind="stable")
        self.ids, self.dists = ids[order].astype(np.int64), dists[order].astype(np.int64)
        self.mask_size = mask_size
        self.max_dist = int(self.dists.max(initial=0))
        self.words = self.pack(self.ids)

    def pack(self, ids: np.ndarray) -> np.ndarray:
        allowed = np.zeros(self.mask_size, bool)
        allowed[ids] = True
        return pack_allowed(allowed)[0]

    def within(self, budget: int) -> np.ndarray:
        """The mask of tokens after which at most `budget` bytes complete the document (the
        closest ones when none is that close)."""
        if self.max_dist <= budget:
            return self.words
        keep = self.dists <= budget
        if not keep.any():
            keep = self.dists == self.dists.min()
        return self.pack(self.ids[keep])


class TokenMasks:
    """Allowed-token masks of one grammar over one vocabulary, cached per grammar state.

    Args:
      grammar: the automaton; index: the vocabulary's `VocabIndex`.
      cache_states: answers kept (least recently used dropped first).
    """

    def __init__(self, grammar: Grammar, index: VocabIndex, cache_states: int = 4096):
        self.grammar, self.index, self.cache_states = grammar, index, cache_states
        self._cache: OrderedDict[State, _Answer] = OrderedDict()
        self._lock = threading.Lock()

    def allowed_words(self, state: State, remaining: int) -> np.ndarray:
        """Packed mask of the tokens allowed after `state` with `remaining` tokens left (this
        one included)."""
        return self.answer(state).within(max(remaining - 1, 0))

    def answer(self, state: State) -> _Answer:
        with self._lock:
            hit = self._cache.get(state)
            if hit is not None:
                self._cache.move_to_end(state)
                return hit
        ids, dists = self._string(state) if state and state[-1][0] == "s" else self._walk(state)
        if self.index.eos_id is not None and state and self.grammar.can_end(state):
            ids, dists = ids + [self.index.eos_id], dists + [0]
        if not ids:
            raise ValueError(f"no token of the vocabulary can continue the document here ({state})")
        hit = _Answer(np.array(ids), np.array(dists), self.index.mask_size)
        with self._lock:
            self._cache[state] = hit
            while len(self._cache) > self.cache_states:
                self._cache.popitem(last=False)
        return hit

    def next_state(self, state: State, token: int) -> State | None:
        """The state after `token`, or None if it is not allowed."""
        if token == self.index.eos_id and state and self.grammar.can_end(state):
            return ()
        piece = self.index.pieces[token] if 0 <= token < len(self.index.pieces) else b""
        return self.grammar.feed_bytes(state, piece) if piece else None

    def _string(self, state: State) -> tuple[list[int], list[int]]:
        """Inside a string: the precomputed table, and the tokens that close it simulated."""
        sub = state[-1][1]
        ends, closed_at = self.index.string_table(sub)
        base = self.grammar.dist(state) - string_substate_cost(sub)
        inside = np.flatnonzero(ends >= 0)
        ids = inside.tolist()
        dists = (base + _SUB_COST[ends[inside]]).tolist()
        grammar, pieces = self.grammar, self.index.pieces
        after_close = grammar.feed(state, ord('"'))
        for t in np.flatnonzero(ends == CLOSE).tolist():
            nxt = grammar.feed_bytes(after_close, pieces[t][closed_at[t] :])
            if nxt is not None:
                ids.append(t)
                dists.append(grammar.dist(nxt))
        return ids, dists

    def _walk(self, state: State) -> tuple[list[int], list[int]]:
        """Every token whose bytes the grammar accepts from `state` (a pruned trie walk)."""
        keys, ids_of = self.index.sorted_bytes, self.index.sorted_ids
        grammar = self.grammar
        ids: list[int] = []
        dists: list[int] = []
        work = [(0, len(keys), 0, state)]  # token range sharing `depth` bytes, their state
        while work:
            lo, hi, depth, st = work.pop()
            while lo < hi and len(keys[lo]) == depth:  # tokens that end here
                ids.append(ids_of[lo])
                dists.append(grammar.dist(st))
                lo += 1
            while lo < hi:
                b = keys[lo][depth]
                end = hi
                if b < 255:
                    end = bisect.bisect_left(keys, keys[lo][:depth] + bytes((b + 1,)), lo, hi)
                nxt = grammar.feed(st, b)
                if nxt is not None:
                    work.append((lo, end, depth + 1, nxt))
                lo = end
        return ids, dists


class GrammarConstraint:
    """One request's `TokenConstraint` (dsjax.inference.engine): its grammar state."""

    def __init__(self, masks: TokenMasks):
        self.masks = masks
        self.state: State = masks.grammar.initial
        self.tokens: list[int] = []

    @property
    def finished(self) -> bool:
        return self.masks.grammar.done(self.state)

    def allowed_words(self, remaining: int) -> np.ndarray:
        return self.masks.allowed_words(self.state, remaining)

    def advance(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            nxt = self.masks.next_state(self.state, int(t))
            if nxt is None:
                raise ValueError(f"token {int(t)} is not allowed by the grammar here")
            self.state = nxt
            self.tokens.append(int(t))
