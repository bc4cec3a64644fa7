"""Tests for dsjax.train.data: sources, split, tokenizer bootstrap, packing, determinism, resume, shards."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import grain
import ml_collections
import numpy as np
import pytest

from dsjax.text.tokenizer import Tokenizer
from dsjax.train import data

SEQ_LEN = 32
KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def _corpus() -> list[str]:
    """Distinct documents of real code with very different lengths (some span many rows)."""
    code = Path(shutil.__file__).read_text()
    lengths = [0, 3, 40, 150, 700, 10, 2500, 90, 1, 400, 60, 1200]
    return [f"# doc {i}\n{code[i * 997 : i * 997 + n]}" for i, n in enumerate(lengths * 3)]


def make_config(source: str, **data_overrides: object) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {"seed": 0, "train": {"batch_size": 4}, "model": {"vocab_size": 384}}
    )
    config.data = data.default_data_config()
    config.data.update(
        dict(source=source, seq_len=SEQ_LEN, eval_fraction=0.25, tokenizer_train_bytes=200_000)
        | data_overrides
    )
    return config


@pytest.fixture(scope="module")
def corpus_glob(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("corpus")
    docs = _corpus()
    # Two .jsonl files (with a blank line to skip) -> sorted order a.jsonl, b.jsonl.
    for name, part in (("a.jsonl", docs[:20]), ("b.jsonl", docs[20:])):
        lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(part)]
        (directory / name).write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    return str(directory / "*.jsonl")


@pytest.fixture(scope="module")
def tok(corpus_glob: str, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return data.get_tokenizer(make_config(corpus_glob), tmp_path_factory.mktemp("workdir"))


def take(it: grain.DatasetIterator, n: int | None = None) -> list[dict[str, np.ndarray]]:
    """The next `n` batches (all remaining ones if None); closes the iterator when drained."""
    batches = list(itertools.islice(it, n))
    if n is None:
        it.close()
    return batches


def assert_same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def flat_stream(batches: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of all non-padding positions, in order."""
    inputs = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
    targets = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
    return inputs, targets


def decode_documents(batches: list[dict[str, np.ndarray]], tok: Tokenizer) -> list[str]:
    """Re-assembles the document texts: every document's last target is eos."""
    inputs, targets = flat_stream(batches)
    ends = np.flatnonzero(targets == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(inputs[s : e + 1]) for s, e in zip(starts, ends, strict=True)]


def reference_rows(streams: list[list[int]], seq_len: int) -> dict[str, np.ndarray]:
    """Concatenate-then-split packing computed the slow, obvious way."""
    pairs = [(s[t], s[t + 1], d, t) for d, s in enumerate(streams) for t in range(len(s) - 1)]
    rows = {k: [] for k in KEYS}
    for start in range(0, len(pairs), seq_len):
        chunk = pairs[start : start + seq_len]
        segment, seg_ids, positions = 0, [], []
        for j, (_, _, doc, _) in enumerate(chunk):
            if j == 0 or doc != chunk[j - 1][2]:
                segment, seg_start = segment + 1, j
            seg_ids.append(segment)
            positions.append(j - seg_start)
        pad = [0] * (seq_len - len(chunk))
        rows["inputs"].append([p[0] for p in chunk] + pad)
        rows["targets"].append([p[1] for p in chunk] + pad)
        rows["segment_ids"].append(seg_ids + pad)
        rows["positions"].append(positions + pad)
        rows["weights"].append([1.0] * len(chunk) + pad)
    return {k: np.array(v) for k, v in rows.items()}


# ----------------------------------------------------------------------------- sources
def test_stdlib_source_lists_python_files() -> None:
    docs = data.load_documents("stdlib")
    assert len(docs) > 500
    assert docs.names == sorted(docs.names)
    assert "json/__init__.py" in docs.names and "os.py" in docs.names
    assert all(n.endswith(".py") and "site-packages" not in n for n in docs.names)
    assert docs[docs.names.index("os.py")] == Path(shutil.__file__).with_name("os.py").read_text()
    assert data.load_documents("stdlib", max_documents=7).names == docs.names[:7]


def test_jsonl_source(corpus_glob: str) -> None:
    docs = data.load_documents(corpus_glob)
    expected = _corpus()
    assert [docs[i] for i in range(len(docs))] == expected
    assert docs.names[0] == "a.jsonl:1" and docs.names[3] == "a.jsonl:5"  # line 4 is blank
    assert docs.names[20] == "b.jsonl:1"
    small = data.load_documents(corpus_glob, max_documents=5)
    assert [small[i] for i in range(len(small))] == expected[:5]


def test_txt_source_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    texts = {"b.txt": "second\n\tindented", "a.txt": "first ü", "sub/c.txt": "third"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "ignored.md").write_text("not matched")
    docs = data.load_documents(str(tmp_path / "**" / "*.txt"))
    assert docs.names == ["a.txt", "b.txt", "sub/c.txt"]
    assert [docs[i] for i in range(3)] == ["first ü", "second\n\tindented", "third"]


def test_arrayrecord_source(tmp_path: Path) -> None:
    module = pytest.importorskip("array_record.python.array_record_module")
    writer = module.ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for text in ["one", "zwei 2", "три"]:
        writer.write(text.encode())
    writer.close()
    docs = data.load_documents(f"arrayrecord:{tmp_path}/*.array_record")
    assert [docs[i] for i in range(len(docs))] == ["one", "zwei 2", "три"]


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.data\.source.*nothing-here/\*\.jsonl"):
        data.load_documents(str(tmp_path / "nothing-here" / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x\.csv"):
        data.load_documents(str(tmp_path / "*.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*'text'"):
        data.load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pyarrow"):
            data.load_documents(str(tmp_path / "t.parquet"))


def test_split_is_deterministic_disjoint_and_name_based(corpus_glob: str) -> None:
    docs = data.load_documents(corpus_glob)
    train, held_out = data.split_documents(docs, 0.25)
    assert sorted(train + held_out) == list(range(len(docs)))
    assert 0 < len(held_out) < len(docs) // 2
    # Membership depends on the name only, not on position or Python's hash seed.
    reversed_docs = data.Documents(docs.names[::-1], lambda i: "")
    _, held_out_rev = data.split_documents(reversed_docs, 0.25)
    assert {docs.names[i] for i in held_out} == {reversed_docs.names[i] for i in held_out_rev}
    # A tiny fraction still yields one eval document; 0 yields none.
    assert len(data.split_documents(docs, 1e-9)[1]) == 1
    assert data.split_documents(docs, 0.0)[1] == []
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_documents(docs, 1.0)


# ----------------------------------------------------------------------------- tokenizer
def test_get_tokenizer_trains_saves_and_reloads(corpus_glob: str, tmp_path: Path) -> None:
    config = make_config(corpus_glob, tokenizer_train_bytes=5_000)
    tok = data.get_tokenizer(config, tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert tok.vocab_size <= 384 and (tok.bos_id, tok.eos_id) == (1, 2)
    again = data.get_tokenizer(config, tmp_path)  # loads, does not retrain
    text = _corpus()[6]
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    config.data.tokenizer = str(tmp_path / "tokenizer")
    assert data.get_tokenizer(config, tmp_path / "other").encode(text) == tok.encode(text)
    config.model.vocab_size = 300
    with pytest.raises(ValueError, match=rf"{tok.vocab_size}.*config\.model\.vocab_size is 300"):
        data.get_tokenizer(config, tmp_path)


def test_tokenizer_training_respects_byte_budget(corpus_glob: str) -> None:
    docs = data.load_documents(corpus_glob)
    texts = list(data._budgeted_texts(docs, range(len(docs)), 1000))
    assert sum(len(t.encode()) for t in texts) <= 1000
    assert sum(len(t.encode()) for t in texts) > 900
    assert texts[:-1] == [docs[i] for i in range(len(texts) - 1)]


# ----------------------------------------------------------------------------- packing
def check_row_invariants(batch: dict[str, np.ndarray], tok: Tokenizer, rows: int) -> None:
    assert set(batch) == set(KEYS)
    for k in KEYS:
        assert batch[k].shape == (rows, SEQ_LEN)
        assert batch[k].dtype == (np.float32 if k == "weights" else np.int32)
    for inp, tgt, seg, pos, w in zip(*(batch[k] for k in KEYS), strict=True):
        real = seg > 0
        np.testing.assert_array_equal(w, real.astype(np.float32))
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # padding only at the end
        assert not (inp[n:].any() or tgt[n:].any() or pos[n:].any())
        if n == 0:
            continue
        starts = np.flatnonzero(np.diff(seg[:n], prepend=0))
        np.testing.assert_array_equal(seg[starts], np.arange(1, len(starts) + 1))
        for s, e in zip(starts, [*starts[1:], n], strict=True):
            np.testing.assert_array_equal(pos[s:e], np.arange(e - s))
            np.testing.assert_array_equal(tgt[s : e - 1], inp[s + 1 : e])
            if e < n:  # an inner segment is a complete document tail: it ends with eos
                assert tgt[e - 1] == tok.eos_id and inp[e] == tok.bos_id
        assert tok.eos_id not in inp and tok.pad_id not in inp[:n]


def test_train_batches_satisfy_packing_invariants(corpus_glob: str, tok: Tokenizer) -> None:
    it = data.make_iterator(make_config(corpus_glob), tok)
    batches = take(it, 12)
    for batch in batches:
        check_row_invariants(batch, tok, rows=4)
        assert batch["weights"].all()  # an endless stream is never padded
    inputs, targets = flat_stream(batches)
    cont = targets[:-1] != tok.eos_id
    np.testing.assert_array_equal(targets[:-1][cont], inputs[1:][cont])
    np.testing.assert_array_equal(inputs[1:][~cont], tok.bos_id)


def test_stdlib_pipeline_smoke(tok: Tokenizer) -> None:
    config = make_config("stdlib", max_documents=30)
    for batch in take(data.make_iterator(config, tok), 3):
        check_row_invariants(batch, tok, rows=4)


def test_eval_stream_matches_reference_packing(corpus_glob: str, tok: Tokenizer) -> None:
    config = make_config(corpus_glob)
    docs = data.load_documents(corpus_glob)
    _, held_out = data.split_documents(docs, 0.25)
    streams = [[tok.bos_id, *tok.encode(docs[i]), tok.eos_id] for i in held_out if docs[i]]
    expected = reference_rows(streams, SEQ_LEN)
    batches = take(data.make_iterator(config, tok, "eval"))
    for batch in batches:
        check_row_invariants(batch, tok, rows=4)
    got = {k: np.concatenate([b[k] for b in batches]) for k in KEYS}
    rows = len(expected["inputs"])
    assert rows <= len(got["inputs"]) < rows + 4  # the final batch is padded with empty rows
    for k in KEYS:
        np.testing.assert_array_equal(got[k][:rows], expected[k], err_msg=k)
        assert not got[k][rows:].any()
    # The token streams concatenate back to the tokenized documents, in order.
    assert decode_documents(batches, tok) == [docs[i] for i in held_out if docs[i]]
    # More epochs repeat the same order; the empty document was skipped.
    assert len(take(data.make_iterator(config, tok, "eval", num_epochs=2))) >= 2 * len(batches) - 1


def test_train_epochs_are_reshuffled_permutations(corpus_glob: str, tok: Tokenizer) -> None:
    config = make_config(corpus_glob, eval_fraction=0.0)
    texts = decode_documents(take(data.make_iterator(config, tok, num_epochs=2)), tok)
    corpus = [t for t in _corpus() if t]
    first, second = texts[: len(corpus)], texts[len(corpus) :]
    assert sorted(first) == sorted(corpus) and sorted(second) == sorted(corpus)
    assert first != second and first != corpus


# ----------------------------------------------------------------------------- determinism, resume
def test_same_seed_same_batches_different_seed_different(corpus_glob: str, tok: Tokenizer) -> None:
    config = make_config(corpus_glob)
    a = take(data.make_iterator(config, tok), 5)
    assert_same(a, take(data.make_iterator(config, tok, prefetch=0), 5))
    config.seed = 1
    b = take(data.make_iterator(config, tok), 5)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("k", [0, 1, 4, 9, 40, 100])
def test_resume_reproduces_the_uninterrupted_run(corpus_glob: str, tok: Tokenizer, k: int) -> None:
    config = make_config(corpus_glob)
    reference = take(data.make_iterator(config, tok), k + 6)
    it = data.make_iterator(config, tok)
    assert_same(take(it, k), reference[:k])
    saved = data.state_to_json(it)
    assert_same(take(it, 6), reference[k:])  # continuing does not disturb the saved state
    restored = data.make_iterator(config, tok)
    data.restore_state_json(restored, saved)
    assert_same(take(restored, 6), reference[k:])


def test_resume_eval_and_through_grain_orbax_handler(
    corpus_glob: str, tok: Tokenizer, tmp_path: Path
) -> None:
    from etils import epath

    config = make_config(corpus_glob)
    reference = take(data.make_iterator(config, tok, "eval"))
    it = data.make_iterator(config, tok, "eval")
    take(it, len(reference) - 2)
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
    restored = data.make_iterator(config, tok, "eval")
    grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=restored)
    assert_same(take(restored), reference[-2:])


# ----------------------------------------------------------------------------- shards and splits
def test_process_shards_are_disjoint_and_cover_the_split(corpus_glob: str, tok: Tokenizer) -> None:
    config = make_config(corpus_glob)
    all_train = sorted(decode_documents(take(data.make_iterator(config, tok, num_epochs=1)), tok))
    shards = []
    for index in range(2):
        it = data.make_iterator(config, tok, process_index=index, process_count=2, num_epochs=1)
        batches = take(it)
        assert all(b["inputs"].shape == (2, SEQ_LEN) for b in batches)
        shards.append(decode_documents(batches, tok))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == all_train


def test_train_and_eval_documents_are_disjoint(corpus_glob: str, tok: Tokenizer) -> None:
    config = make_config(corpus_glob)
    train = decode_documents(take(data.make_iterator(config, tok, num_epochs=1)), tok)
    held_out = decode_documents(take(data.make_iterator(config, tok, "eval")), tok)
    assert held_out and not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(t for t in _corpus() if t)


def test_make_iterator_errors(corpus_glob: str, tok: Tokenizer) -> None:
    config = make_config(corpus_glob)
    config.train.batch_size = 6
    with pytest.raises(ValueError, match=r"batch_size \(6\).*process_count=4"):
        data.make_iterator(config, tok, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.make_iterator(config, tok, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="split"):
        data.make_iterator(config, tok, "test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval_fraction is 0"):
        data.make_iterator(make_config(corpus_glob, eval_fraction=0.0), tok, "eval")
    with pytest.raises(ValueError, match=r"config\.data\.seq_len"):
        data.make_iterator(make_config(corpus_glob, seq_len=0), tok)
    with pytest.raises(ValueError, match=r"config\.data\.source.*missing"):
        data.make_iterator(make_config(corpus_glob.replace("*", "missing*")), tok)


def test_row_shuffle_window_permutes_rows_and_resumes_exactly(
    corpus_glob: str, tok: Tokenizer
) -> None:
    """`shuffle_rows`: the first window's rows are the packing-order rows in another order, and
    a resume inside or across windows reproduces the uninterrupted stream."""
    window = 8  # rows: two batches of 4
    plain = take(data.make_iterator(make_config(corpus_glob), tok), 2)
    config = make_config(corpus_glob, shuffle_rows=window)
    reference = take(data.make_iterator(config, tok), 9)
    rows = lambda bs: sorted(r.tobytes() for b in bs for r in b["inputs"])  # noqa: E731
    assert rows(reference[:2]) == rows(plain)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(reference, plain, strict=False))
    for k in (1, 3):
        it = data.make_iterator(config, tok)
        take(it, k)
        restored = data.make_iterator(config, tok)
        data.restore_state_json(restored, data.state_to_json(it))
        assert_same(take(restored, 9 - k), reference[k:])
