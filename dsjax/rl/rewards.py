"""The GRPO demo task: arithmetic prompts generated on the fly, their tokenizer, and R1's two
rule-based rewards.

- `ArithTask`: `a+b=` (or `a-b=`) problems with operands in [0, max_operand]; a fixed, disjoint
  held-out set (problems whose index hashes into the held-out bucket never appear in training);
  problem number n of a seed is a pure function of (seed, n), so the prompt iterator's state is one
  integer (exact resume).
- `TaskTokenizer`: what the GRPO loop needs of a tokenizer (encode / decode / bos / eos / pad /
  vocab_size). Two implementations: `ArithTokenizer`, a character vocabulary (digits, operators,
  `=`, space) plus the R1 tag strings `<think>`, `</think>`, `<answer>`, `</answer>` as single
  tokens and pad/bos/eos (the demo); `HFTaskTokenizer`, a Hugging Face checkpoint's own
  tokenizer (`dsjax.text.tokenizer.Tokenizer`), whatever tokens it gives the tags. Rewards always
  run on decoded text.
- `format_reward`: 1 iff the completion is `<think>…</think><answer>…</answer>` and nothing else
  (whitespace around and between the two blocks allowed; no tag inside a block).
- `accuracy_reward`: 1 iff the completion has exactly one `<answer>…</answer>` whose content is an
  integer equal to the true answer.
- `cold_start_completion`: the "noisy teacher" the SFT stage imitates (format right, answers
  right only some of the time), so RL has accuracy left to gain.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "TAGS",
    "ArithTask",
    "ArithTokenizer",
    "HFTaskTokenizer",
    "Problem",
    "TaskTokenizer",
    "accuracy_reward",
    "cold_start_completion",
    "format_reward",
    "parse_answer",
    "scratchpad",
]

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
_CHARS = tuple("0123456789+-*= ")

_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INT_RE = re.compile(r"-?\d+")


# ====================================================================== rewards
def format_reward(text: str) -> float:
    """1.0 iff `text` is `<think>…</think><answer>…</answer>` and nothing else, else 0.0.

    Whitespace may surround the blocks; neither block may contain a tag (no repeated or nested
    tags); the answer block must not be empty.
    """
    m = _FORMAT_RE.fullmatch(text)
    if m is None:
        return 0.0
    think, answer = m.group(1), m.group(2)
    if any(tag in think or tag in answer for tag in TAGS) or not answer.strip():
        return 0.0
    return 1.0


def parse_answer(text: str) -> int | None:
    """The integer inside the one `<answer>…</answer>` of `text` (None: no answer block, more
    than one, or content that is not exactly an integer)."""
    found = _ANSWER_RE.findall(text)
    if len(found) != 1:
        return None
    content = found[0].strip()
    if not _INT_RE.fullmatch(content):
        return None
    return int(content)


def accuracy_reward(text: str, answer: int) -> float:
    """1.0 iff the completion's answer block holds exactly the integer `answer`."""
    return 1.0 if parse_answer(text) == answer else 0.0


# ====================================================================== task
@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b


class ArithTask:
    """On-the-fly arithmetic problems with a fixed held-out split.

    Args:
      max_operand: operands are drawn uniformly from [0, max_operand].
      ops: the operators to draw from ("+", "-").
      seed: the stream's seed; `problem(n)` depends only on (seed, n).
      heldout_every: a problem (a, b, op) is held out iff its index in the full problem table is
        divisible by `heldout_every` (after a fixed shuffle): never a training prompt.
    """

    def __init__(self, max_operand: int, ops: str = "+", seed: int = 0, heldout_every: int = 10):
        if max_operand < 1:
            raise ValueError(f"config.task.max_operand={max_operand} must be >= 1")
        if not ops or any(o not in "+-" for o in ops):
            raise ValueError(f"config.task.ops={ops!r} must be a non-empty string of '+' and '-'")
        if heldout_every < 2:
            raise ValueError(f"config.task.heldout_every={heldout_every} must be >= 2")
        self.max_operand, self.ops, self.seed = max_operand, ops, seed
        n = max_operand + 1
        table = [(a, b, op) for op in ops for a in range(n) for b in range(n)]
        order = np.random.default_rng(12345).permutation(len(table))  # split fixed for all seeds
        held = np.zeros(len(table), bool)
        held[order[::heldout_every]] = True
        self._train = [table[i] for i in range(len(table)) if not held[i]]
        self._heldout = [table[i] for i in range(len(table)) if held[i]]

    def problem(self, n: int) -> Problem:
        """Training problem number n of this seed's stream."""
        rng = np.random.default_rng([self.seed, n])
        return Problem(*self._train[int(rng.integers(len(self._train)))])

    def problems(self, start: int, count: int) -> list[Problem]:
        return [self.problem(start + i) for i in range(count)]

    def heldout(self, count: int) -> list[Problem]:
        """The first `count` held-out problems (a fixed list, disjoint from training)."""
        if count > len(self._heldout):
            raise ValueError(
                f"config.grpo.eval_prompts={count} exceeds the {len(self._heldout)} held-out "
                "problems"
            )
        return [Problem(*p) for p in self._heldout[:count]]


def scratchpad(problem: Problem) -> str:
    """The teacher's digit-by-digit working for `problem` (addition; other ops restate it):
    47+38 -> "7+8=15 4+3+1=8" (ones, then tens plus the carry)."""
    if problem.op != "+":
        return f"{problem.a} {problem.op} {problem.b}"
    a1, b1, a10, b10 = problem.a % 10, problem.b % 10, problem.a // 10, problem.b // 10
    ones = a1 + b1
    return f"{a1}+{b1}={ones} {a10}+{b10}+{ones // 10}={a10 + b10 + ones // 10}"


def cold_start_completion(
    problem: Problem, rng: np.random.Generator, *, p_correct: float, p_bad_format: float
) -> str:
    """The noisy teacher's completion: the right digit-by-digit working in `<think>` (see
    `scratchpad`), then an answer that is right with probability `p_correct` (else off by
    1..10), and with probability `p_bad_format` a broken format (a missing closing tag or
    trailing text). RL can then gain accuracy by making the answer follow the working."""
    answer = problem.answer
    if rng.random() >= p_correct:
        answer += int(rng.choice([-1, 1])) * int(rng.integers(1, 11))
    think = scratchpad(problem)
    text = f"{THINK}{think}{END_THINK}{ANSWER}{answer}{END_ANSWER}"
    if rng.random() < p_bad_format:
        if rng.random() < 0.5:
            text = f"{THINK}{think}{ANSWER}{answer}{END_ANSWER}"  # no </think>
        else:
            text = text + f"{answer}"  # trailing text
    return text


# ====================================================================== tokenizer
@runtime_checkable
class TaskTokenizer(Protocol):
    """What the GRPO loop needs of a tokenizer.

    `encode(text, add_bos)` -> ids (bos first when `add_bos` and the tokenizer has one);
    `decode(ids)` -> the text of a completion: stops at the first `eos_id`, drops bos/pad and
    ids outside the vocabulary. `eos_id` ends a rollout; `pad_id` fills the right of a batch.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ArithTokenizer:
    """Character vocabulary for the arithmetic task; the tags are single tokens.

    ids: 0 pad, 1 bos, 2 eos, then the four tags, then the characters `0-9 + - * =` and space.
    """

    def __init__(self):
        self.tokens: tuple[str, ...] = (PAD, BOS, EOS, *TAGS, *_CHARS)
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._split = re.compile("|".join(re.escape(t) for t in (*TAGS, *_CHARS)))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; ValueError naming the first character outside the vocabulary."""
        ids, pos = [], 0
        for m in self._split.finditer(text):
            if m.start() != pos:
                raise ValueError(
                    f"character {text[pos]!r} at {pos} of {text!r} is not in the "
                    "arithmetic vocabulary"
                )
            ids.append(self._ids[m.group(0)])
            pos = m.end()
        if pos != len(text):
            raise ValueError(
                f"character {text[pos]!r} at {pos} of {text!r} is not in the arithmetic vocabulary"
            )
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, stopping at the first eos; pad and bos are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id) or not 0 <= i < len(self.tokens):
                continue
            out.append(self.tokens[i])
        return "".join(out)


class HFTaskTokenizer:
    """A Hugging Face tokenizer as a `TaskTokenizer`.

    Args:
      tokenizer: a `dsjax.text.tokenizer.Tokenizer` (tokenizer.json [+ tokenizer_config.json]).
      bos_id: prepended by `encode(..., add_bos=True)`; None: the model has no bos (nothing is
        prepended).
      eos_id: ends a completion (rollouts stop on it; `decode` cuts there).
      pad_id: right padding of batches (masked out; any id works).

    Special-token strings inside text are encoded as text; `decode` keeps the text of every
    other token, special or not (an R1 tag that the tokenizer marks special still reaches the
    format reward, and stray special tokens count as extra text).
    """

    def __init__(self, tokenizer: Any, *, bos_id: int | None, eos_id: int, pad_id: int):
        n = tokenizer.vocab_size
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is None and name == "bos_id":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise ValueError(
                    f"{name}={value!r} must be a token id in [0, {n}) of the tokenizer"
                )
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, stopping at the first eos; bos, pad and out-of-vocabulary ids dropped."""
        kept, n = [], self.vocab_size
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.bos_id, self.pad_id) and 0 <= i < n:
                kept.append(i)
        return self.tokenizer.decode(kept, skip_special_tokens=False)
