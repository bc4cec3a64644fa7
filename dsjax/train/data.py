"""Grain input pipeline: documents -> tokens -> packed rows -> batches.

Per process: document indices of the split -> this process's shard -> (train)
shuffle by `config.seed`, reshuffled every epoch -> repeat -> chunks of documents
tokenized by the batched Rust encoder, each document becoming [bos] + ids + [eos]
stored as (input, target) pairs -> concatenate-then-split packing into rows of
`seq_len` pairs -> (train, `config.data.shuffle_rows` > 1) rows shuffled in windows of that
many, so one long document does not fill many consecutive batches -> batches of `batch_size // process_count` rows -> thread prefetch.

Batches are dicts of numpy arrays shaped [B, T] (T = `config.data.seq_len`): int32
``inputs``, ``targets``, ``segment_ids`` (1, 2, ... per document fragment, 0 for
padding), ``positions`` (restarting at 0 in each segment) and float32 ``weights``.
Documents are stored as pairs, so ``targets[b, t]`` is always the token after
``inputs[b, t]`` in its document (also at a row end where the document goes on in
the next row) and ``weights`` is 1.0 exactly on non-padding positions.

The iterator is a grain ``DatasetIterator`` whose state is plain JSON, so grain's
Orbax handler (`grain.checkpoint.CheckpointSave` / `CheckpointRestore`) and
`state_to_json` / `restore_state_json` both round-trip it exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import grain
import ml_collections
import numpy as np

from dsjax import run_config
from dsjax.run_config import DataOptions, RunConfig
from dsjax.text.tokenizer import Tokenizer, train_bpe

Arrays = dict[str, np.ndarray]

_TOKENIZE_CHUNK = 16  # documents per call of the batched Rust encoder
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults of the `config.data` group (declared in `dsjax.run_config.DataOptions`)."""
    return ml_collections.ConfigDict(dataclasses.asdict(DataOptions()))


def _data_field(config: ml_collections.ConfigDict | RunConfig, name: str) -> Any:
    """`config.data.<name>`, typed and checked (`dsjax.run_config`), default when absent."""
    return getattr(run_config.options(config, "data"), name)


def _int_field(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- documents
@dataclasses.dataclass(frozen=True)
class Documents:
    """Random-access text documents, each with a stable name used for the split."""

    names: list[str]
    read: Callable[[int], str]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> str:
        return self.read(index)


def _read_file(path: str) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _stdlib_documents() -> Documents:
    """Every `*.py` file of this Python's standard library, sorted by relative path."""
    root = sysconfig.get_paths()["stdlib"]
    names: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]
        rel = os.path.relpath(directory, root)
        names += [Path(rel, f).as_posix() if rel != "." else f for f in files if f.endswith(".py")]
    names.sort()
    return Documents(names, lambda i: _read_file(os.path.join(root, names[i])))


def _jsonl_texts(path: str, name: str) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path}:{lineno}: not a valid JSON line ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: each JSON line needs a string field 'text'")
            yield f"{name}:{lineno}", text


def _parquet_texts(path: str, name: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading .parquet sources needs pyarrow: pip install pyarrow") from e
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise ValueError(
            f"{path}: parquet file has no 'text' column (columns: {table.column_names})"
        )
    for row, text in enumerate(table.column("text").to_pylist()):
        yield f"{name}:{row}", text or ""


def _glob(pattern: str, check_suffix: bool = False) -> list[str]:
    files = sorted(
        p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not files:
        raise ValueError(f"config.data.source: the pattern {pattern!r} matches no files")
    for path in files if check_suffix else ():
        if Path(path).suffix.lower() not in (".txt", ".jsonl", ".parquet"):
            raise ValueError(f"config.data.source: {path!r} is not .txt, .jsonl or .parquet")
    return files


def load_documents(source: str, max_documents: int = 0) -> Documents:
    """Opens a `config.data.source`: "stdlib", a .txt/.jsonl/.parquet glob, or "arrayrecord:<glob>".

    Documents are ordered deterministically (sorted files, then line/row order)
    and named by their path relative to the matched files' common directory (plus
    ":line"/":row"), so the eval split does not depend on where the data lives.
    `max_documents` > 0 keeps only the first documents.
    """
    if source == "stdlib":
        docs = _stdlib_documents()
    elif source.startswith("arrayrecord:"):
        try:
            records = grain.sources.ArrayRecordDataSource(
                _glob(source.removeprefix("arrayrecord:"))
            )
        except ImportError as e:
            raise ImportError(
                f"config.data.source {source!r} needs array_record: pip install array-record"
            ) from e
        docs = Documents(
            [f"record:{i}" for i in range(len(records))],
            lambda i: bytes(records[i]).decode("utf-8", "replace"),
        )
    else:
        files = _glob(source, check_suffix=True)
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        entries: list[tuple[str, str | None, str]] = []  # (name, text or None for .txt, file)
        for path in files:
            remaining = max_documents - len(entries) if max_documents else None
            if remaining != 0:
                name = Path(os.path.relpath(os.path.abspath(path), root)).as_posix()
                suffix = Path(path).suffix.lower()
                texts = {".jsonl": _jsonl_texts, ".parquet": _parquet_texts}.get(suffix)
                found = itertools.islice(texts(path, name) if texts else [(name, None)], remaining)
                entries += ((doc_name, text, path) for doc_name, text in found)

        def read(i: int) -> str:
            _, text, path = entries[i]
            return _read_file(path) if text is None else text

        docs = Documents([name for name, _, _ in entries], read)
    if max_documents and len(docs) > max_documents:
        docs = Documents(docs.names[:max_documents], docs.read)
    if not len(docs):
        raise ValueError(f"config.data.source {source!r} contains no documents")
    return docs


def _unit_hash(name: str) -> float:
    """A stable hash of `name` in [0, 1) (unlike `hash`, identical across runs and machines)."""
    digest = hashlib.blake2b(name.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_documents(docs: Documents, eval_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic disjoint (train, eval) document indices.

    A document is held out when the stable hash of its name falls below
    `eval_fraction`; if that selects none although `eval_fraction` > 0, the
    document with the smallest hash is held out so the eval split is never empty.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"config.data.eval_fraction must be in [0, 1), got {eval_fraction!r}")
    hashes = [_unit_hash(name) for name in docs.names]
    held_out = {i for i, h in enumerate(hashes) if h < eval_fraction}
    if eval_fraction > 0 and not held_out and len(hashes) > 1:
        held_out = {int(np.argmin(hashes))}
    train = [i for i in range(len(hashes)) if i not in held_out]
    if not train:
        raise ValueError(f"no training documents left with eval_fraction={eval_fraction}")
    return train, sorted(held_out)


# ----------------------------------------------------------------------------- tokenizer
def get_tokenizer(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> Tokenizer:
    """Loads `config.data.tokenizer`, else `workdir/tokenizer/`, else trains a BPE saved there.

    The BPE has `config.model.vocab_size` tokens and is trained on at most
    `config.data.tokenizer_train_bytes` bytes of training documents (taken in an
    order shuffled by `config.seed`). Raises ValueError if the tokenizer has more
    tokens than `config.model.vocab_size`.
    """
    vocab_size = _int_field(config.model.vocab_size, "config.model.vocab_size", 1)
    path = _data_field(config, "tokenizer")
    local = Path(workdir) / "tokenizer"
    if path:
        tokenizer = Tokenizer.load(path)
    elif (local / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(local)
    else:
        docs = load_documents(_data_field(config, "source"), _data_field(config, "max_documents"))
        train, _ = split_documents(docs, float(_data_field(config, "eval_fraction")))
        budget = _int_field(
            _data_field(config, "tokenizer_train_bytes"), "config.data.tokenizer_train_bytes", 1
        )
        order = np.random.default_rng(int(config.seed)).permutation(train)
        seen = [0]

        def counted() -> Iterator[str]:
            for text in _budgeted_texts(docs, order, budget):
                seen[0] += len(text)
                yield text

        tokenizer = train_bpe(counted(), vocab_size)
        if not seen[0]:
            raise ValueError(
                f"config.data.source {_data_field(config, 'source')!r}: its {len(train)} "
                "training documents hold no text (all empty)"
            )
        # Save to a temporary directory first so a crash never leaves half a tokenizer.
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = tokenizer.save(tempfile.mkdtemp(prefix=".tokenizer-", dir=local.parent))
        try:
            os.replace(tmp, local)
        except OSError:  # another process saved one first (training is deterministic)
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer = Tokenizer.load(local)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but config.model.vocab_size is "
            f"{vocab_size}; raise config.model.vocab_size or use a smaller tokenizer"
        )
    return tokenizer


def _budgeted_texts(docs: Documents, order: Iterable[int], budget: int) -> Iterator[str]:
    """Yields documents in `order` until `budget` UTF-8 bytes are reached (truncating the last)."""
    for index in order:
        text = docs[int(index)]
        data = text.encode("utf-8", errors="replace")
        if len(data) >= budget:
            yield data[:budget].decode("utf-8", errors="ignore")
            return
        budget -= len(data)
        yield text


# ----------------------------------------------------------------------------- packing
def _tokenize_chunk(indices: Sequence[int], docs: Documents, tok: Tokenizer) -> list[np.ndarray]:
    """Tokenizes documents into [n, 2] int32 (input, target) pair arrays; empty ones are dropped."""
    prefix = [] if tok.bos_id is None else [tok.bos_id]
    chunk = []
    for ids in tok.encode_batch([docs[i] for i in indices]):
        if ids:
            stream = np.array(prefix + ids + [tok.eos_id], dtype=np.int32)
            chunk.append(np.stack([stream[:-1], stream[1:]], axis=1))
    return chunk


class PackIterDataset(grain.IterDataset):
    """Concatenate-then-split packing of chunks of (input, target) pair arrays into rows.

    Parent elements are lists of [n, 2] int32 arrays (one per document). Rows hold
    `seq_len` pairs; a document that does not fit is split and continues in the
    next row. Only the final row of a finite stream is padded.
    """

    def __init__(
        self, parent: grain.IterDataset, seq_len: int, max_empty_chunks: int | None = None
    ) -> None:
        super().__init__(parent)
        self._seq_len = seq_len
        self._max_empty = max_empty_chunks

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._max_empty)


class _PackIterator(grain.DatasetIterator):
    """Iterator of `PackIterDataset`.

    State: ``{"parent": <parent state before the current chunk>, "doc": i,
    "offset": k}``: the next pair is pair k of document i of the chunk the parent
    yields from that state. Only ints, so it survives a JSON round trip.
    """

    def __init__(
        self, parent: grain.DatasetIterator, seq_len: int, max_empty_chunks: int | None = None
    ) -> None:
        super().__init__(parent)
        self._seq_len = seq_len
        self._max_empty = max_empty_chunks
        self._positions = np.arange(seq_len, dtype=np.int32)
        self._chunk: list[np.ndarray] | None = None
        self._chunk_state: dict[str, Any] = {}
        self._doc = self._offset = 0

    def _next_chunk(self) -> bool:
        """Fetches the next non-empty chunk; False when the parent is exhausted.

        A repeated stream whose every document is empty would loop here for ever: more than
        `max_empty_chunks` empty chunks in a row (two epochs' worth) raise ValueError."""
        empty = 0
        while True:
            state = self._parent.get_state()
            try:
                chunk = next(self._parent)
            except StopIteration:
                return False
            if not chunk:
                empty += 1
                if self._max_empty is not None and empty > self._max_empty:
                    raise ValueError(
                        "the documents of this split hold no text (every one is empty after "
                        "tokenizing): check config.data.source"
                    )
            if chunk:
                self._chunk, self._chunk_state, self._doc, self._offset = chunk, state, 0, 0
                return True

    def __next__(self) -> Arrays:
        length = self._seq_len
        row = np.zeros((4, length), dtype=np.int32)  # inputs, targets, segment_ids, positions
        filled = segment = 0
        while filled < length:
            if self._chunk is None and not self._next_chunk():
                break
            assert self._chunk is not None
            pairs = self._chunk[self._doc]
            take = min(length - filled, len(pairs) - self._offset)
            end = filled + take
            row[:2, filled:end] = pairs[self._offset : self._offset + take].T
            segment += 1
            row[2, filled:end] = segment
            row[3, filled:end] = self._positions[:take]
            filled, self._offset = end, self._offset + take
            if self._offset == len(pairs):
                self._doc, self._offset = self._doc + 1, 0
                if self._doc == len(self._chunk):
                    self._chunk = None
        if filled == 0:
            raise StopIteration
        return {"inputs": row[0], "targets": row[1], "segment_ids": row[2], "positions": row[3]}

    def get_state(self) -> dict[str, Any]:
        if self._chunk is None:
            return {"parent": copy.deepcopy(self._parent.get_state()), "doc": 0, "offset": 0}
        return {
            "parent": copy.deepcopy(self._chunk_state),
            "doc": self._doc,
            "offset": self._offset,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._chunk = None
        doc, offset = int(state["doc"]), int(state["offset"])
        if doc or offset:
            if not self._next_chunk():
                raise ValueError(f"cannot restore packing state {state}: the parent is exhausted")
            assert self._chunk is not None
            if doc >= len(self._chunk) or offset >= len(self._chunk[doc]):
                raise ValueError(f"packing state {state} does not match the data")
            self._doc, self._offset = doc, offset


def _stack_rows(rows: Sequence[Arrays], batch_size: int) -> Arrays:
    """Stacks packed rows into a batch, padding a short final batch with empty rows."""
    pad = ((0, batch_size - len(rows)), (0, 0))
    keys = ("inputs", "targets", "segment_ids", "positions")
    batch = {k: np.pad(np.stack([r[k] for r in rows]), pad) for k in keys}
    batch["weights"] = (batch["segment_ids"] > 0).astype(np.float32)
    return batch


# ----------------------------------------------------------------------------- pipeline
def make_iterator(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    split: Literal["train", "eval"] = "train",
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | Literal["auto"] | None = "auto",
    prefetch: int = 8,
) -> grain.DatasetIterator:
    """The checkpointable iterator of batches of one process (see the module docstring).

    `num_epochs`: None repeats forever; "auto" means None for train and 1 for eval.
    A finite stream ends with a padded partial row and, if needed, a batch padded
    with empty rows (segment_ids 0, weights 0), so every batch is [B, T].
    `prefetch` batches are prepared ahead in a background thread (0: none).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    batch_size = _int_field(config.train.batch_size, "config.train.batch_size", 1)
    process_count = _int_field(process_count, "process_count", 1)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if batch_size % process_count:
        raise ValueError(
            f"config.train.batch_size ({batch_size}) must be divisible by the number of "
            f"processes (process_count={process_count})"
        )
    seq_len = _int_field(_data_field(config, "seq_len"), "config.data.seq_len", 1)
    max_docs = _int_field(_data_field(config, "max_documents"), "config.data.max_documents", 0)
    window = _int_field(_data_field(config, "shuffle_rows"), "config.data.shuffle_rows", 0)
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos_token; packing needs one to end each document")
    if num_epochs == "auto":
        num_epochs = None if split == "train" else 1
    if num_epochs is not None:
        num_epochs = _int_field(num_epochs, "num_epochs", 1)

    docs = load_documents(_data_field(config, "source"), max_docs)
    train, held_out = split_documents(docs, float(_data_field(config, "eval_fraction")))
    indices = train if split == "train" else held_out
    if not indices:
        eval_fraction = float(_data_field(config, "eval_fraction"))
        why = (
            "because config.data.eval_fraction is 0"
            if eval_fraction == 0
            else f"with config.data.eval_fraction={eval_fraction}: the corpus has only "
            f"{len(docs)} document(s) and at least one must stay for training"
        )
        raise ValueError(f"the eval split is empty {why}")
    shard = indices[process_index::process_count]
    if not shard:
        raise ValueError(
            f"the {split} split has {len(indices)} documents, < {process_count} processes"
        )

    ds = grain.MapDataset.source(shard)
    if split == "train":
        ds = ds.shuffle(seed=int(config.seed))  # `repeat` re-seeds the shuffle every epoch
    ds = ds.repeat(num_epochs).batch(_TOKENIZE_CHUNK, batch_fn=list)
    ds = ds.map(functools.partial(_tokenize_chunk, docs=docs, tok=tokenizer))
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    empty_limit = 2 * (len(shard) // _TOKENIZE_CHUNK + 2)  # two epochs of chunks
    rows = PackIterDataset(ds.to_iter_dataset(read_options), seq_len, empty_limit)
    if split == "train" and window > 1:  # a long document would otherwise fill many batches
        rows = grain.experimental.WindowShuffleIterDataset(
            rows, window_size=window, seed=int(config.seed)
        )
    per_process = batch_size // process_count
    stack = functools.partial(_stack_rows, batch_size=per_process)
    batches = rows.batch(per_process, drop_remainder=False, batch_fn=stack)
    if prefetch > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=prefetch
        )
    return iter(batches)


def state_to_json(iterator: grain.DatasetIterator) -> str:
    """The iterator's position as a JSON string (what grain's Orbax handler also writes)."""
    return json.dumps(iterator.get_state(), sort_keys=True)


def restore_state_json(iterator: grain.DatasetIterator, state: str) -> None:
    """Moves `iterator` (built with the same config) to a position saved by `state_to_json`."""
    iterator.set_state(json.loads(state))
