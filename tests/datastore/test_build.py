"""Building from real inputs, sharding, appending, atomicity, fingerprints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from search_reference import brute_continuations

from restspec.datastore import Datastore, tokenizer_fingerprint
from restspec.errors import CorpusError, DatastoreError

DOC_A = "def add ( x , y ) : return x + y"
DOC_B = "the cat sat on the mat"
DOC_C = "for x in range ( 2 ) : print ( x )"


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_build_files_folder_glob_jsonl(tmp_path, small_tokenizer):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text(DOC_A)
    (src / "b.txt").write_text(DOC_B)  # not matched by the glob
    single = tmp_path / "c.txt"
    single.write_text(DOC_C)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": DOC_B, "id": 1}) + "\n" + json.dumps({"text": DOC_C}) + "\n")

    ds = Datastore.build([src, single], tmp_path / "ds", small_tokenizer, glob="**/*.py", progress=False)
    assert ds.num_docs == 2  # a.py and c.txt
    assert ds.num_tokens == len(ids(small_tokenizer, DOC_A)) + len(ids(small_tokenizer, DOC_C))
    assert ds.longest_match(ids(small_tokenizer, "the cat")).length == 0  # b.txt left out
    match = ds.longest_match(ids(small_tokenizer, "def add ( x"))
    assert (match.length, match.count) == (4, 1)
    assert ds.continuations(match, m=2).tolist() == [ids(small_tokenizer, ", y")]

    js = Datastore.build([jsonl], tmp_path / "js", small_tokenizer, jsonl_field="text", progress=False)
    assert js.num_docs == 2
    assert js.longest_match(ids(small_tokenizer, "the cat sat")).length == 3


def test_separator_blocks_cross_document_matches(tmp_path, small_tokenizer):
    # DOC_B ends with "mat", a second document starts with "the"; "mat the" never occurs inside one
    ds = Datastore.build_from_texts([DOC_B, DOC_B], tmp_path / "ds", small_tokenizer, progress=False)
    assert ds.longest_match(ids(small_tokenizer, "mat the")).length == 0
    match = ds.longest_match(ids(small_tokenizer, "on the mat"))
    assert (match.length, match.count) == (3, 2)
    assert ds.continuations(match, m=2).tolist() == [[-1, -1], [-1, -1]]  # document ends right after


def test_undecodable_files_skipped_and_counted(tmp_path, small_tokenizer):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "good.txt").write_text(DOC_B)
    (tmp_path / "src" / "bad.bin").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    ds = Datastore.build([tmp_path / "src"], tmp_path / "ds", small_tokenizer, progress=False)
    assert ds.num_docs == 1
    assert ds.corpus_stats.skipped_undecodable == 1
    assert "bad.bin" in ds.corpus_stats.skipped_examples[0]
    assert "1 undecodable" in ds.corpus_stats.summary()


def test_empty_corpus_is_an_error(tmp_path, small_tokenizer):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.bin").write_bytes(b"\xff\xff")
    with pytest.raises(CorpusError, match=r"no tokens.*1 undecodable"):
        Datastore.build([tmp_path / "empty.txt", tmp_path / "bad.bin"], tmp_path / "ds", small_tokenizer)
    with pytest.raises(CorpusError, match="no tokens"):
        Datastore.build_from_texts([], tmp_path / "ds", small_tokenizer, progress=False)
    (tmp_path / "folder").mkdir()
    with pytest.raises(CorpusError, match=r"no file matching --glob '\*\*/\*\.py'"):
        Datastore.build([tmp_path / "folder"], tmp_path / "ds", small_tokenizer, glob="**/*.py")
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")] == []


def test_jsonl_bad_lines_and_missing_field(tmp_path, small_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "the cat"}\nnot json\n{"other": "x"}\n["list"]\n')
    ds = Datastore.build([path], tmp_path / "ds", small_tokenizer, jsonl_field="text", progress=False)
    assert ds.num_docs == 1
    assert (ds.corpus_stats.skipped_records, ds.corpus_stats.skipped_not_json) == (2, 1)
    assert (
        "2 JSON lines without a usable text field skipped, 1 lines that are not JSON"
        in ds.corpus_stats.summary()
    )
    with pytest.raises(
        CorpusError, match=r"no tokens.*3 JSON lines.*1 lines that are not JSON.*--jsonl-field"
    ):
        Datastore.build([path], tmp_path / "ds2", small_tokenizer, jsonl_field="body", progress=False)


def test_missing_path(tmp_path, small_tokenizer):
    with pytest.raises(CorpusError, match="'/no/such/corpus' does not exist"):
        Datastore.build(["/no/such/corpus"], tmp_path / "ds", small_tokenizer)


def test_existing_out_needs_overwrite(tmp_path, small_tokenizer):
    Datastore.build_from_texts([DOC_A], tmp_path / "ds", small_tokenizer, progress=False)
    with pytest.raises(DatastoreError, match=r"already exists.*--force"):
        Datastore.build_from_texts([DOC_B], tmp_path / "ds", small_tokenizer, progress=False)
    ds = Datastore.build_from_texts([DOC_B], tmp_path / "ds", small_tokenizer, progress=False, overwrite=True)
    assert ds.longest_match(ids(small_tokenizer, "the cat")).length == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_overwrite_replaces_only_a_datastore_or_an_empty_folder(tmp_path, small_tokenizer):
    """--force must not delete what is not a datastore: a folder of other files (the corpus itself, given
    as --out by mistake) or a file is left as it was."""
    corpus = tmp_path / "proj"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "notes.txt").write_text(DOC_A, encoding="utf-8")
    (corpus / "sub" / "m.py").write_text(DOC_B, encoding="utf-8")
    source = tmp_path / "a.txt"
    source.write_text(DOC_C, encoding="utf-8")
    for out in (corpus, source):
        with pytest.raises(DatastoreError, match=r"not a restspec datastore.*choose another --out"):
            Datastore.build([corpus, source], out, small_tokenizer, progress=False, overwrite=True)
    assert sorted(str(p.relative_to(corpus)) for p in corpus.rglob("*")) == ["notes.txt", "sub", "sub/m.py"]
    assert source.read_text(encoding="utf-8") == DOC_C
    (tmp_path / "empty").mkdir()
    ds = Datastore.build([source], tmp_path / "empty", small_tokenizer, progress=False, overwrite=True)
    assert ds.num_docs == 1


def test_shards_search_as_one(tmp_path, small_tokenizer):
    texts = [DOC_A, DOC_B, DOC_C, DOC_B, DOC_A]
    ds = Datastore.build_from_texts(texts, tmp_path / "ds", small_tokenizer, shard_tokens=12, progress=False)
    assert len(ds.shards) > 2
    # a document longer than a shard is cut at the shard boundary: shard contents are what is searched
    shards = [np.asarray(s.tokens) for s in ds.shards]
    shard_docs = [[d.tolist() for d in np.split(t, np.flatnonzero(t == ds.vocab_size))[1:-1]] for t in shards]
    shard_docs = [[d[1:] for d in docs] for docs in shard_docs]
    for text in ["the cat sat on", "x + y", ": print ( x", "mat"]:
        ctx = ids(small_tokenizer, text)
        match = ds.longest_match(ctx, min_len=1)
        length, count, ref = brute_continuations(shard_docs, ctx, ds.vocab_size, 16, 1, 5000, 4)
        assert (match.length, match.count) == (length, count)
        np.testing.assert_array_equal(ds.continuations(match, m=4), ref)


def test_append_adds_a_shard_and_persists(tmp_path, small_tokenizer, other_tokenizer):
    ds = Datastore.build_from_texts([DOC_A], tmp_path / "ds", small_tokenizer, progress=False)
    before = (tmp_path / "ds" / "shard-00000.rsds").stat().st_mtime_ns
    assert ds.longest_match(ids(small_tokenizer, "the cat")).length == 0
    ds.append_texts([DOC_B], small_tokenizer)
    assert ds.longest_match(ids(small_tokenizer, "the cat")).length == 2
    ds.append_tokens([ids(small_tokenizer, "the cat ran")])
    assert (tmp_path / "ds" / "shard-00000.rsds").stat().st_mtime_ns == before  # old shard untouched
    again = Datastore.open(tmp_path / "ds", small_tokenizer)
    assert len(again.shards) == 3
    match = again.longest_match(ids(small_tokenizer, "the cat"))
    assert match.count == 2
    assert sorted(again.continuations(match, m=1)[:, 0].tolist()) == sorted(ids(small_tokenizer, "sat ran"))
    with pytest.raises(DatastoreError, match="built with tokenizer"):
        ds.append_texts([DOC_C], other_tokenizer)


def test_append_interrupted_before_manifest_leaves_store_as_is(tmp_path, small_tokenizer, monkeypatch):
    import restspec.datastore.store as store

    ds = Datastore.build_from_texts([DOC_A], tmp_path / "ds", small_tokenizer, progress=False)
    monkeypatch.setattr(store, "write_manifest", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ds.append_texts([DOC_B], small_tokenizer)
    again = Datastore.open(tmp_path / "ds")
    assert len(again.shards) == 1
    assert again.longest_match(ids(small_tokenizer, "the cat")).length == 0


def test_exception_before_rename_leaves_nothing(tmp_path, small_tokenizer, monkeypatch):
    import restspec.datastore.store as store

    def boom(*args):
        raise RuntimeError("injected failure before the rename")

    monkeypatch.setattr(store, "_replace_dir", boom)
    with pytest.raises(RuntimeError, match="injected"):
        Datastore.build_from_texts([DOC_A], tmp_path / "ds", small_tokenizer, progress=False)
    assert list(tmp_path.iterdir()) == []


KILLED_BUILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import word_tokenizer, WORDS
    import restspec.datastore.build as build
    from restspec.datastore import Datastore

    real = build.shard_arrays
    def slow(*args):
        arrays = real(*args)
        print("sorted", flush=True)
        time.sleep(60)   # killed here, after the first shard was written
        return arrays
    build.shard_arrays = slow
    Datastore.build_from_texts(["the cat sat on the mat"] * 50, {out!r}, word_tokenizer(WORDS),
                               shard_tokens=20, progress=False)
    """
)


def test_killed_build_leaves_nothing_that_opens(tmp_path):
    out = tmp_path / "ds"
    script = KILLED_BUILD.format(tests=os.path.dirname(__file__), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sorted"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert leftovers  # the partial folder of the killed build
    for path in leftovers:
        with pytest.raises(DatastoreError, match="did not finish"):
            Datastore.open(path)


def test_fingerprint_stable_and_distinct(small_tokenizer, other_tokenizer, make_tokenizer):
    fp = tokenizer_fingerprint(small_tokenizer)
    assert len(fp) == 16
    assert fp == tokenizer_fingerprint(make_tokenizer())  # a fresh, equal tokenizer
    assert fp != tokenizer_fingerprint(make_tokenizer(["more"]))
    assert fp != tokenizer_fingerprint(other_tokenizer)


def test_big_vocab_builds_uint32(tmp_path, big_tokenizer):
    text = "w69999 w65536 the cat w69999 w65536 sat"
    ds = Datastore.build_from_texts([text], tmp_path / "ds", big_tokenizer, progress=False)
    assert ds.vocab_size > 65535
    assert ds.shards[0].tokens.dtype == np.uint32
    match = ds.longest_match(ids(big_tokenizer, "w69999 w65536"))
    assert (match.length, match.count) == (2, 2)


def test_progress_bar_reports_tokens(tmp_path, small_tokenizer, capsys):
    (tmp_path / "a.txt").write_text(DOC_A)
    Datastore.build([tmp_path / "a.txt"], tmp_path / "ds", small_tokenizer, progress=True)
    err = capsys.readouterr().err
    assert "tokens/s" in err
    assert "1 documents" in err


def test_compact_merges_small_shards(tmp_path, small_tokenizer):
    ds = Datastore.build_from_texts([DOC_A], tmp_path / "ds", small_tokenizer, progress=False)
    for text in [DOC_B, DOC_C, DOC_B]:
        ds.append_texts([text], small_tokenizer)
    ctx = ids(small_tokenizer, "on the mat")
    before = ds.longest_match(ctx)
    assert len(ds.shards) == 4 and before.count == 2
    assert ds.compact() == 3
    assert len(ds.shards) == 1 and ds.num_docs == 4
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["datastore.json", "shard-00004.rsds"]
    again = Datastore.open(tmp_path / "ds", small_tokenizer)
    match = again.longest_match(ctx)
    assert (match.length, match.count) == (before.length, before.count)
    assert again.compact() == 0


def test_append_tokens_out_of_vocab_ends_the_document(tmp_path, small_tokenizer):
    ds = Datastore.build_from_texts([DOC_A], tmp_path / "ds", small_tokenizer, progress=False)
    v = ds.vocab_size
    ds.append_tokens([[1, 2, v + 5, 3, 4, -1, 5]])  # e.g. ids from a model's padded output layer
    assert ds.shards[-1].num_docs == 3 and ds.shards[-1].num_tokens == 5
    assert ds.longest_match([2, 3], min_len=2).length == 0  # no match across the dropped id
    assert ds.longest_match([3, 4]).count == 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Datastore.build_from_tokens([[1, v]], tmp_path / "bad", vocab_size=v, fingerprint="x")
