"""The default (standard library) datastore: where it lives, what it reads, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from restspec.datastore import (
    Datastore,
    default_datastore_path,
    ensure_default_datastore,
    tokenizer_fingerprint,
)
from restspec.datastore import default as default_mod


def test_path_in_cache_keyed_by_fingerprint(tmp_path, small_tokenizer, other_tokenizer):
    path = default_datastore_path(small_tokenizer)
    assert path.parent == tmp_path / "cache"  # RESTSPEC_CACHE (set by conftest)
    assert tokenizer_fingerprint(small_tokenizer) in path.name
    assert default_datastore_path(other_tokenizer) != path


def test_stdlib_files_are_sources_without_tests_or_site_packages():
    files = default_mod.stdlib_files()
    names = {f.name for f in files}
    assert "os.py" in names and "argparse.py" in names
    assert not any({"site-packages", "test", "tests"} & set(f.parts) for f in files)


def test_built_once(tmp_path, small_tokenizer, monkeypatch: pytest.MonkeyPatch):
    corpus = tmp_path / "lib"
    corpus.mkdir()
    (corpus / "mod.py").write_text("def add ( x , y ) : return x + y")
    monkeypatch.setattr(default_mod, "stdlib_files", lambda: [corpus / "mod.py"])
    path = ensure_default_datastore(small_tokenizer, progress=False)
    assert path == default_datastore_path(small_tokenizer)
    stamp = (path / "datastore.json").stat().st_mtime_ns
    assert ensure_default_datastore(small_tokenizer, progress=False) == path
    assert (path / "datastore.json").stat().st_mtime_ns == stamp
    ds = Datastore.open(path, small_tokenizer)
    assert ds.longest_match(small_tokenizer.encode("return x +", add_special_tokens=False)).length == 3


def test_no_sources_is_a_clear_error(small_tokenizer, monkeypatch: pytest.MonkeyPatch):
    from restspec.errors import CorpusError

    monkeypatch.setattr(default_mod, "stdlib_files", lambda: [])
    with pytest.raises(CorpusError, match="--datastore"):
        ensure_default_datastore(small_tokenizer, progress=False)
    assert not Path(default_datastore_path(small_tokenizer)).exists()
