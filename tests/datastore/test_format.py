"""Bad datastores on disk: each gives a DatastoreError that names the value and what to do."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from restspec.datastore import Datastore
from restspec.datastore.format import FORMAT_VERSION, HEADER_BYTES, MAGIC, MANIFEST_NAME
from restspec.errors import DatastoreError

TEXTS = ["the cat sat on the mat", "def add ( x , y ) : return x + y"]


@pytest.fixture
def ds_path(tmp_path, small_tokenizer):
    return Datastore.build_from_texts(TEXTS, tmp_path / "ds", small_tokenizer, progress=False).path


def shard_file(path):
    return path / "shard-00000.rsds"


def patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_open_maps_without_copying(ds_path):
    ds = Datastore.open(ds_path)
    for arr in (ds.shards[0].tokens, ds.shards[0].sa, ds.shards[0].bucket):
        assert not arr.flags.owndata and not arr.flags.writeable  # views of the read-only mapping
        assert isinstance(arr.base, np.memmap)
    ds.verify()
    info = ds.info()
    assert info["token_dtype"] == "uint16"
    assert info["num_docs"] == 2
    assert info["num_tokens"] == 6 + 12


def test_missing_and_not_a_datastore(tmp_path):
    with pytest.raises(DatastoreError, match="'/no/such/ds' does not exist; build it with `restspec build`"):
        Datastore.open("/no/such/ds")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatastoreError, match="is a file"):
        Datastore.open(tmp_path / "file")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DatastoreError, match=r"no datastore.json.*did not finish"):
        Datastore.open(tmp_path / "folder")


def test_manifest_magic_version_and_garbage(ds_path):
    manifest_path = ds_path / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "magic": "something-else"}))
    with pytest.raises(DatastoreError, match="magic 'something-else', expected 'restspec-datastore'"):
        Datastore.open(ds_path)
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DatastoreError, match=r"format version 99.*reads version 1.*rebuild"):
        Datastore.open(ds_path)
    manifest_path.write_bytes(b"\xff{not json")
    with pytest.raises(DatastoreError, match="corrupt"):
        Datastore.open(ds_path)


def test_truncated_shard(ds_path):
    path = shard_file(ds_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DatastoreError, match=f"is {size - 100} bytes, its header says {size}: truncated"):
        Datastore.open(ds_path)
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(DatastoreError, match="truncated"):
        Datastore.open(ds_path)


def test_wrong_shard_magic_and_version(ds_path):
    path = shard_file(ds_path)
    patch(path, 0, b"GGUF\0\0\0\0")
    with pytest.raises(DatastoreError, match=r"not a restspec shard \(magic b'GGUF"):
        Datastore.open(ds_path)
    patch(path, 0, MAGIC)
    patch(path, 8, struct.pack("<I", FORMAT_VERSION + 1))
    with pytest.raises(DatastoreError, match=f"format version {FORMAT_VERSION + 1}"):
        Datastore.open(ds_path)


def test_corrupt_header_detected_on_open(ds_path):
    path = shard_file(ds_path)
    head = bytearray(path.read_bytes()[:HEADER_BYTES])
    i = head.index(b'"num_docs": 2')
    patch(path, i + len(b'"num_docs": '), b"3")
    with pytest.raises(DatastoreError, match="corrupt header"):
        Datastore.open(ds_path)


def test_corrupt_body_detected_by_verify(ds_path):
    path = shard_file(ds_path)
    patch(path, HEADER_BYTES + 2, b"\x07\x00")  # a token in the body
    ds = Datastore.open(ds_path)  # open stays cheap: it does not read the body
    with pytest.raises(DatastoreError, match=r"is corrupt \(section 'tokens' has CRC-32 .*\); rebuild"):
        ds.verify()


def test_shard_swapped_on_disk(ds_path, tmp_path, small_tokenizer):
    other = Datastore.build_from_texts(["the dog ran"], tmp_path / "o", small_tokenizer, progress=False)
    shard_file(ds_path).write_bytes(shard_file(other.path).read_bytes())
    with pytest.raises(DatastoreError, match="not the one the manifest lists"):
        Datastore.open(ds_path)


def test_fingerprint_mismatch_names_both_and_the_fix(ds_path, small_tokenizer, other_tokenizer):
    from restspec.datastore import tokenizer_fingerprint

    Datastore.open(ds_path, small_tokenizer)
    with pytest.raises(DatastoreError) as info:
        Datastore.open(ds_path, other_tokenizer)
    message = str(info.value)
    assert tokenizer_fingerprint(small_tokenizer) in message
    assert tokenizer_fingerprint(other_tokenizer) in message
    assert "restspec build" in message and "--model" in message
