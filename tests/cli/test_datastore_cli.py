"""restspec build / inspect / lookup: worked examples and user errors (one line, exit code 2)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from restspec.cli import app

_spec = importlib.util.spec_from_file_location(
    "datastore_test_tokenizers", Path(__file__).parents[1] / "datastore" / "conftest.py"
)
_tokenizers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tokenizers)
WORDS, word_tokenizer = _tokenizers.WORDS, _tokenizers.word_tokenizer  # the datastore tests' tiny tokenizer

USER_ERROR = 2


def model_folder(out: Path, tokenizer) -> Path:
    """A Hugging Face folder with the tokenizer and a config (no weights: the commands load none)."""
    from transformers import LlamaConfig

    tokenizer.save_pretrained(out)
    LlamaConfig(vocab_size=len(tokenizer)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("tok"), word_tokenizer(WORDS))


@pytest.fixture(scope="module")
def other_tok_dir(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("tok2"), word_tokenizer([*WORDS, "extra"]))


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def built(tmp_path, tok_dir) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def add ( x , y ) : return x + y")
    (corpus / "b.py").write_text("def add ( x , y ) : return x - y")
    (corpus / "c.txt").write_text("the cat sat on the mat")
    out = tmp_path / "ds"
    result = run("build", corpus, "--glob", "*.py", "--model", tok_dir, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "2 documents" in result.output
    return out


def test_build_inspect_lookup(built, tok_dir):
    result = run("inspect", built, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["num_docs"] == 2 and info["token_dtype"] == "uint16"
    result = run("inspect", built, "--verify")
    assert result.exit_code == 0 and "checksums: OK" in result.output

    result = run("lookup", built, "--text", "def add ( x", "--model", tok_dir, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert (found["match_length"], found["occurrences"]) == (4, 2)
    texts = [c["text"] for c in found["continuations"]]
    assert len(texts) == 2 and all(t.startswith(", y ) : return x") for t in texts)
    comma = found["continuations"][0]["ids"][0]
    assert found["next_tokens"] == [{"count": 2, "id": comma, "text": ","}]

    result = run("lookup", built, "--text", "the cat", "--model", tok_dir)
    assert result.exit_code == 0 and "no suffix of at least 2 tokens" in result.output


def test_lookup_shows_every_next_token(built, tok_dir):
    result = run("lookup", built, "--text", "return x", "--model", tok_dir)
    assert result.exit_code == 0, result.output
    assert "2 occurrences" in result.output
    assert "'+'" in result.output and "'-'" in result.output  # the two next tokens


def test_build_from_stdin(tmp_path, tok_dir):
    out = tmp_path / "ds"
    result = run("build", "-", "--model", tok_dir, "--out", out, "-q", input="the cat sat on the mat")
    assert result.exit_code == 0, result.output
    result = run("lookup", out, "--text", "on the", "--model", tok_dir, "--json")
    assert json.loads(result.stdout)["continuations"][0]["text"] == "mat"


def test_build_jsonl_and_shards(tmp_path, tok_dir):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"the cat sat {i}"}) for i in "012") + "\n")
    out = tmp_path / "ds"
    result = run(
        "build", path, "--jsonl-field", "body", "--shard-tokens", "4", "--model", tok_dir, "--out", out, "-q"
    )
    assert result.exit_code == 0, result.output
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["num_docs"] == 3 and len(info["shards"]) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "/no/such/dir", "--out", "{tmp}/x"], "corpus path '/no/such/dir' does not exist"),
        (["inspect", "/no/such/ds"], "'/no/such/ds' does not exist"),
        (["build", "{tmp}/empty.txt", "--out", "{tmp}/x"], "yielded no tokens"),
        (["build", "{tmp}/empty.txt", "--out", "{tmp}/x", "--shard-tokens", "-1"], "--shard-tokens=-1"),
    ],
)
def test_user_errors_are_one_line(tmp_path, tok_dir, args, message):
    (tmp_path / "empty.txt").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    if args[0] == "build":
        args += ["--model", str(tok_dir), "-q"]
    result = run(*args)
    assert result.exit_code == USER_ERROR, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_lookup_with_another_tokenizer(built, other_tok_dir):
    result = run("lookup", built, "--text", "def add", "--model", other_tok_dir)
    assert result.exit_code == USER_ERROR
    assert "built with tokenizer" in result.output and "restspec build" in result.output


def test_corrupt_datastore_reported(built):
    with open(built / "shard-00000.rsds", "r+b") as f:
        f.truncate(5000)
    result = run("inspect", built)
    assert result.exit_code == USER_ERROR and "truncated" in result.output


def test_lookup_on_a_datastore_damaged_in_the_middle_fails_clearly(tmp_path, tok_dir):
    # what a new user tried (issue 23): 16 bytes overwritten in the middle of the largest file, which
    # for a corpus of a few thousand tokens lies in the suffix array
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(0, 3000 * 7, 7)))
    out = tmp_path / "ds"
    assert run("build", corpus, "--model", tok_dir, "--out", out, "-q").exit_code == 0
    largest = max(out.iterdir(), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.seek(largest.stat().st_size // 2)
        f.write(bytes(range(100, 116)))
    result = run("lookup", out, "--text", "the a cat", "--model", tok_dir)
    assert result.exit_code == USER_ERROR, result.output
    assert "is corrupt (section 'sa' has CRC-32" in result.output and "rebuild the datastore" in result.output
    assert "Traceback" not in result.output
    assert run("inspect", out).exit_code == 0  # opening stays cheap: the body is not read
    result = run("inspect", out, "--verify")
    assert result.exit_code == USER_ERROR and "is corrupt" in result.output
