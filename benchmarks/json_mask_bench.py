"""Per-step cost of JSON-constrained decoding masks over a DeepSeek-sized vocabulary.

    python benchmarks/json_mask_bench.py [--vocab=129280] [--steps=300] [--walks=4]

A synthetic byte-level vocabulary of `--vocab` pieces (the 256 single bytes, space-prefixed and
bare words, digit runs, JSON punctuation clusters, whitespace runs, UTF-8 fragments) stands in
for a real tokenizer (none is downloaded). For `json_object` and a schema, random walks draw
uniformly from each step's allowed set (the worst case for the cache: every allowed token is as
likely). Reported: the index build, the first and the cached per-step mask times (ms), and the
allowed-set sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsjax.inference.constrained import GrammarConstraint, TokenMasks, VocabIndex  # noqa: E402
from dsjax.inference.sampling import unpack_allowed  # noqa: E402
from dsjax.text.json_grammar import Grammar  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    pieces = {bytes((b,)) for b in range(256)}
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
    punct = [b'"', b",", b":", b"{", b"}", b"[", b"]", b" ", b"\n", b".", b"_", b"-", b"\\"]
    while len(pieces) < size:
        kind = rng.random()
        if kind < 0.55:  # words, most with a leading space
            word = bytes(rng.choice(letters, rng.integers(2, 12)))
            pieces.add((b" " if rng.random() < 0.6 else b"") + word)
        elif kind < 0.65:
            pieces.add(bytes(rng.integers(0x30, 0x3A, rng.integers(1, 4)).astype(np.uint8)))
        elif kind < 0.8:
            pieces.add(b"".join(punct[i] for i in rng.integers(0, len(punct), rng.integers(2, 5))))
        elif kind < 0.85:
            pieces.add(b" " * int(rng.integers(2, 16)) or b"\n" + b" " * int(rng.integers(1, 12)))
        else:  # UTF-8 text (CJK) and fragments of it
            text = "".join(chr(int(c)) for c in rng.integers(0x4E00, 0x9FFF, rng.integers(1, 4)))
            raw = text.encode()
            cut = int(rng.integers(1, len(raw) + 1))
            pieces.add(raw[:cut] if rng.random() < 0.3 else raw)
    return sorted(pieces)[:size]


def walk(masks: TokenMasks, steps: int, rng) -> tuple[list[float], list[int]]:
    constraint = GrammarConstraint(masks)
    times, sizes = [], []
    for i in range(steps):
        if constraint.finished:
            break
        t0 = time.perf_counter()
        words = constraint.allowed_words(steps - i)
        times.append(time.perf_counter() - t0)
        allowed = np.flatnonzero(np.asarray(unpack_allowed(words[None], masks.index.mask_size))[0])
        sizes.append(allowed.size)
        constraint.advance([int(rng.choice(allowed))])
    return times, sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, default=129280)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--walks", type=int, default=4)
    args = p.parse_args()
    pieces = synthetic_vocab(args.vocab)
    t0 = time.perf_counter()
    index = VocabIndex(pieces, args.vocab, eos_id=None)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.string_table(0)
    table = time.perf_counter() - t0
    print(f"vocab {args.vocab}: index {build:.2f} s, first string table {table * 1e3:.0f} ms")
    for name, schema in (("json_object", None), ("schema", SCHEMA)):
        masks = TokenMasks(Grammar(schema), index)
        rng = np.random.default_rng(1)
        runs = [walk(masks, args.steps, rng) for _ in range(args.walks)]
        first = np.array(runs[0][0]) * 1e3
        later = np.concatenate([r[0] for r in runs[1:]]) * 1e3 if args.walks > 1 else first
        sizes = np.concatenate([r[1] for r in runs])
        print(
            f"{name}: first walk {first.mean():.2f} ms/step (max {first.max():.0f}), later walks "
            f"{later.mean():.3f} ms/step (p50 {np.median(later):.3f}, p99 "
            f"{np.percentile(later, 99):.2f}); allowed tokens p50 {int(np.median(sizes))}, "
            f"max {sizes.max()}; {len(masks._cache)} states cached"
        )


if __name__ == "__main__":
    main()
