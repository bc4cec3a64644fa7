"""Tests for dsjax.text.tokenizer: byte-level BPE training, exact round trips, save/load layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from dsjax.text.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MIN_BPE_VOCAB_SIZE,
    PAD_TOKEN,
    Tokenizer,
    train_bpe,
)

# A small corpus of real code plus some prose and non-ASCII text.
_CORPUS = [Path(json.__file__).read_text(), Path(shutil.__file__).read_text()] + [
    "Grüße aus Köln! 漢字かな交じり文. Ωμέγα. 🙂🚀 " * 20,
    "def f(x):\n\tif x:\n\t\treturn x  # tabs\n    return None\n" * 20,
]

TRICKY_TEXTS = [
    "",
    " ",
    "\n",
    "\t",
    "  \n\t \n",
    "    def indented(self):\n        return  {'a':\t1}\n",
    "\t\tmixed\t \ttabs and    spaces   \n\n\n",
    "trailing spaces   ",
    "windows\r\nline\r\nendings\r\n",
    "é漢字🙂 Ωmega Ünïcödé 👩‍👩‍👧‍👦 \u200b zero-width",
    "\x00\x01\x7f control bytes \x1b[31m",
    'x = "<|eos|>" + "<|bos|>" + "<|pad|>"',
    "a" * 500,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(_CORPUS, 400)


def test_special_tokens_have_fixed_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.backend.id_to_token(0) == PAD_TOKEN
    assert tok.backend.id_to_token(1) == BOS_TOKEN
    assert tok.backend.id_to_token(2) == EOS_TOKEN
    assert tok.chat_template is None


@pytest.mark.parametrize("vocab_size", [MIN_BPE_VOCAB_SIZE, 300, 400, 512])
def test_vocab_size_is_exact_on_enough_data(vocab_size: int) -> None:
    tok = train_bpe(_CORPUS, vocab_size)
    # The corpus has far more than 512 possible merges, so the size is reached exactly.
    assert tok.vocab_size == vocab_size
    assert max(tok.backend.get_vocab().values()) == vocab_size - 1


def test_vocab_size_never_exceeds_request_on_tiny_corpus() -> None:
    tok = train_bpe(["ab ab ab"], 5000)
    assert MIN_BPE_VOCAB_SIZE <= tok.vocab_size < 5000
    assert tok.decode(tok.encode("ab ab ab")) == "ab ab ab"
    # Every byte is still representable.
    assert tok.decode(tok.encode("zq\u00ff🙂")) == "zq\u00ff🙂"


def test_train_bpe_rejects_bad_vocab_size() -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        train_bpe(_CORPUS, 258)
    with pytest.raises(TypeError, match="vocab_size"):
        train_bpe(_CORPUS, 300.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_tricky_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text
    # No special token is produced from raw text, even from their literal spelling.
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_arbitrary_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_empty_string_encodes_to_nothing(tok: Tokenizer) -> None:
    assert tok.encode("") == []
    assert tok.encode("", add_bos=True) == [1]
    assert tok.decode([]) == ""


def test_bpe_compresses_seen_code(tok: Tokenizer) -> None:
    text = _CORPUS[0][:2000]
    # Byte-level would give one token per byte; merges must do markedly better.
    assert len(tok.encode(text)) < 0.8 * len(text.encode())


def test_add_bos_and_special_handling(tok: Tokenizer) -> None:
    ids = tok.encode("hello")
    assert tok.encode("hello", add_bos=True) == [1, *ids]
    assert tok.decode([1, *ids, 2]) == "hello"
    assert tok.decode([1, *ids, 2], skip_special_tokens=False) == f"{BOS_TOKEN}hello{EOS_TOKEN}"
    parsed = tok.encode(f"hi{EOS_TOKEN}", parse_special=True)
    assert parsed[-1] == tok.eos_id and parsed[:-1] == tok.encode("hi")


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = TRICKY_TEXTS + [_CORPUS[1][:3000]]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_bos=True) == [tok.encode(t, add_bos=True) for t in texts]
    assert tok.encode_batch([]) == []


def test_save_and_load_directory(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tk")
    assert (tmp_path / "tk" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "tk" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == BOS_TOKEN
    assert config["eos_token"] == EOS_TOKEN
    assert config["pad_token"] == PAD_TOKEN
    assert "chat_template" not in config
    loaded = Tokenizer.load(tmp_path / "tk")
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (400, 1, 2, 0)
    for text in TRICKY_TEXTS:
        assert loaded.encode(text) == tok.encode(text)


def test_load_bare_tokenizer_json_finds_known_special_tokens(
    tok: Tokenizer, tmp_path: Path
) -> None:
    tok.backend.save(str(tmp_path / "my_tok.json"))  # no tokenizer_config.json next to it
    loaded = Tokenizer.load(str(tmp_path / "my_tok.json"))
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
    assert loaded.encode("x = 1\n") == tok.encode("x = 1\n")


def test_load_file_path_uses_sibling_config(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    config["chat_template"] = "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.pad_id is None and loaded.bos_id == 1
    assert loaded.chat_template == "{{ messages }}"


def _deepseek_style_dir(tmp_path: Path) -> tuple[Path, tokenizers.Tokenizer]:
    """A checkpoint directory laid out like deepseek-ai/DeepSeek-V3's tokenizer files."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hello": 0, "world": 1}, "hello"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"])
    tmp_path.mkdir(parents=True, exist_ok=True)
    backend.save(str(tmp_path / "tokenizer.json"))

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True}

    config = {
        "add_bos_token": True,
        "bos_token": added("<｜begin▁of▁sentence｜>"),
        "eos_token": added("<｜end▁of▁sentence｜>"),
        "pad_token": added("<｜end▁of▁sentence｜>"),
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "tokenizer_class": "LlamaTokenizerFast",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return tmp_path, backend


def test_load_hf_checkpoint_with_dict_special_tokens(tmp_path: Path) -> None:
    directory, backend = _deepseek_style_dir(tmp_path)
    tok = Tokenizer.load(directory)
    assert tok.bos_id == backend.token_to_id("<｜begin▁of▁sentence｜>") == 2
    assert tok.eos_id == backend.token_to_id("<｜end▁of▁sentence｜>") == 3
    assert tok.pad_id == tok.eos_id
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tok.vocab_size == 4
    assert tok.encode("world hello", add_bos=True) == [2, 1, 0]
    # Saving writes plain strings that load back identically.
    tok.save(tmp_path / "resaved")
    again = Tokenizer.load(tmp_path / "resaved")
    assert (again.bos_id, again.eos_id, again.pad_id) == (2, 3, 3)
    assert again.chat_template == tok.chat_template


def test_load_named_chat_templates(tmp_path: Path) -> None:
    directory, _ = _deepseek_style_dir(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D"},
    ]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(directory).chat_template == "D"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json
    directory, _ = _deepseek_style_dir(tmp_path / "d")
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<missing>"}))
    with pytest.raises(ValueError, match="bos_token '<missing>'"):
        Tokenizer.load(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.load(directory)


def test_add_bos_without_bos_token_raises(tmp_path: Path) -> None:
    directory, _ = _deepseek_style_dir(tmp_path)
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))
    tok = Tokenizer.load(directory)
    assert tok.bos_id is None
    with pytest.raises(ValueError, match="no bos_token"):
        tok.encode("hello", add_bos=True)


def test_saved_directory_loads_in_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)
    text = "    return {'a':\t1}  # é🙂\n"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
