"""Tiny in-memory tokenizers (no model files): whitespace word-level, one with a vocabulary above
65,535 so tokens are stored as uint32."""

from __future__ import annotations

import pytest

BIG_VOCAB = 70_000
"""Above 65,535: forces uint32 token storage."""
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "to",
    "home",
    "def",
    "return",
    "if",
    "else",
    "for",
    "in",
    "range",
    "print",
    "import",
    "class",
    "self",
    "x",
    "y",
    "z",
    "0",
    "1",
    "2",
    "(",
    ")",
    ":",
    "=",
    "+",
    "-",
    ".",
    ",",
]


def word_tokenizer(words, unk="[UNK]"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {unk: 0}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk)


@pytest.fixture(scope="session")
def make_tokenizer():
    """A factory of fresh small tokenizers (tests/cli has its own conftest module of the same name)."""
    return lambda extra=(): word_tokenizer([*WORDS, *extra])


@pytest.fixture(scope="session")
def small_tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="session")
def other_tokenizer():
    """Same words, one more: a different fingerprint."""
    return word_tokenizer([*WORDS, "extra"])


@pytest.fixture(scope="session")
def big_tokenizer():
    return word_tokenizer([*WORDS, *(f"w{i}" for i in range(BIG_VOCAB))])


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path / "cache"))
