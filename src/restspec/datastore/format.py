"""On-disk format: one folder with a manifest (``datastore.json``) and one file per shard.

A shard file is a 4096-byte header followed by raw little-endian arrays at page-aligned offsets, so
numpy maps them without copying (see docs/datastore-format.md):

    offset 0   magic  b"RSPECDS\\0"                      (8 bytes)
    offset 8   format version, uint32 LE                 (4 bytes)
    offset 12  length of the JSON metadata, uint32 LE    (4 bytes)
    offset 16  CRC-32 of the JSON metadata, uint32 LE    (4 bytes)
    offset 20  JSON metadata (UTF-8), zero padded to HEADER_BYTES
    sections   tokens (uint16 | uint32), suffix array (int32 | int64), bucket (int64[vocab_size + 2])

Opening checks magic, version, the header CRC, the manifest's copy of that CRC, every file size and
the invariants that cost a few reads (:func:`check_invariants`): cheap and independent of the
datastore's size. The CRC-32 of each section is checked by :func:`verify_shard`, which reads every
byte (``Datastore`` runs it in the background after opening, see ``Datastore.open``).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from restspec.errors import DatastoreError

MAGIC = b"RSPECDS\0"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
SECTION_ALIGN = 4096
PREFIX = struct.Struct("<8sIII")  # magic, version, json length, json crc32
MANIFEST_NAME = "datastore.json"
MANIFEST_MAGIC = "restspec-datastore"
SHARD_SUFFIX = ".rsds"
SECTIONS = ("tokens", "sa", "bucket")
UINT16_MAX_VOCAB = 65535
"""Vocabularies up to this size store tokens as uint16 (ids 0..65534, separator = vocab_size)."""
CRC_CHUNK_BYTES = 1 << 24


def token_dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id and the separator (= vocab_size) fit, else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1")
    if vocab_size <= UINT16_MAX_VOCAB:
        return np.dtype("<u2")
    if vocab_size < 2**32 - 1:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token ids")


def _crc32(buffer: np.ndarray | bytes | memoryview) -> int:
    view = memoryview(buffer).cast("B")
    crc = 0
    for start in range(0, len(view), CRC_CHUNK_BYTES):
        crc = zlib.crc32(view[start : start + CRC_CHUNK_BYTES], crc)
    return crc


def _align(offset: int) -> int:
    return -(-offset // SECTION_ALIGN) * SECTION_ALIGN


@dataclass(frozen=True)
class ShardArrays:
    """One shard's arrays in memory, as written. ``tokens``: [N] with a separator before every document
    and after the last; ``sa``: [N] forward end positions sorted by the reversed suffix ending there;
    ``bucket``: int64[vocab_size + 2], ``sa[bucket[t]:bucket[t + 1]]`` are the positions holding t."""

    tokens: np.ndarray
    sa: np.ndarray
    bucket: np.ndarray
    num_docs: int
    vocab_size: int
    fingerprint: str


def write_shard(path: Path, arrays: ShardArrays) -> int:
    """Write a shard file to ``path + '.tmp'``, fsync, rename. Returns the header CRC-32."""
    sections = {"tokens": arrays.tokens, "sa": arrays.sa, "bucket": arrays.bucket}
    meta_sections = {}
    offset = HEADER_BYTES
    for name in SECTIONS:
        arr = np.ascontiguousarray(sections[name])
        sections[name] = arr
        meta_sections[name] = {
            "offset": offset,
            "nbytes": int(arr.nbytes),
            "dtype": arr.dtype.str,
            "length": len(arr),
            "crc32": _crc32(arr),
        }
        offset = _align(offset + arr.nbytes)
    n = len(arrays.tokens)
    meta = {
        "vocab_size": arrays.vocab_size,
        "separator": arrays.vocab_size,
        "token_dtype": np.dtype(arrays.tokens.dtype).name,
        "sa_dtype": np.dtype(arrays.sa.dtype).name,
        "tokenizer_fingerprint": arrays.fingerprint,
        "num_docs": arrays.num_docs,
        "num_tokens": n - arrays.num_docs - 1 if n else 0,
        "stream_length": n,
        "file_bytes": offset,
        "sections": meta_sections,
    }
    blob = json.dumps(meta, sort_keys=True).encode()
    if PREFIX.size + len(blob) > HEADER_BYTES:
        raise ValueError(f"shard metadata of {len(blob)} bytes does not fit the {HEADER_BYTES}-byte header")
    header_crc = zlib.crc32(blob)
    header = PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob), header_crc) + blob
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        for name in SECTIONS:
            info = meta_sections[name]
            f.seek(info["offset"])
            sections[name].tofile(f)
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return header_crc


@dataclass(frozen=True)
class Shard:
    """A memory-mapped shard (read-only views; nothing is copied into RAM)."""

    path: Path
    meta: dict
    header_crc: int
    tokens: np.ndarray
    sa: np.ndarray
    bucket: np.ndarray

    @property
    def num_docs(self) -> int:
        return int(self.meta["num_docs"])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])


def read_shard_header(path: Path) -> tuple[dict, int]:
    """Parse and check a shard header: magic, version, CRC, size. Returns (metadata, header CRC)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DatastoreError(
            f"shard file {str(path)!r} listed in the manifest is missing; rebuild the datastore"
        ) from None
    if len(head) < PREFIX.size:
        raise DatastoreError(f"shard {str(path)!r} is truncated ({size} bytes); rebuild the datastore")
    magic, version, blob_len, crc = PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise DatastoreError(
            f"{str(path)!r} is not a restspec shard (magic {magic!r}, expected {MAGIC!r}); "
            "rebuild it with `restspec build`"
        )
    if version != FORMAT_VERSION:
        raise DatastoreError(
            f"shard {str(path)!r} has format version {version}, this restspec reads version "
            f"{FORMAT_VERSION}; rebuild it with `restspec build` (or use the restspec that made it)"
        )
    blob = head[PREFIX.size : PREFIX.size + blob_len]
    if len(blob) != blob_len or zlib.crc32(blob) != crc:
        raise DatastoreError(
            f"shard {str(path)!r} has a corrupt header (CRC mismatch); rebuild the datastore"
        )
    meta = json.loads(blob)
    if size != meta["file_bytes"]:
        raise DatastoreError(
            f"shard {str(path)!r} is {size} bytes, its header says {meta['file_bytes']}: truncated or "
            "damaged; rebuild the datastore"
        )
    return meta, crc


def open_shard(path: Path) -> Shard:
    """Map a shard's arrays read-only (cost independent of its size)."""
    meta, crc = read_shard_header(path)
    arrays = {}
    for name in SECTIONS:
        info = meta["sections"][name]
        if info["length"] == 0:
            arrays[name] = np.zeros(0, dtype=np.dtype(info["dtype"]))
            continue
        mapped = np.memmap(
            path, dtype=np.dtype(info["dtype"]), mode="r", offset=info["offset"], shape=(info["length"],)
        )
        # a plain ndarray view of the mapping (its .base keeps the map alive): numba dispatches on
        # exact ndarrays about 2 us faster than on the memmap subclass
        arrays[name] = mapped.view(np.ndarray)
    shard = Shard(path=path, meta=meta, header_crc=crc, **arrays)
    check_invariants(shard)
    return shard


def corrupt_shard_error(path: Path, what: str) -> DatastoreError:
    """The error for a shard file whose contents are damaged: ``what`` says what was found."""
    return DatastoreError(f"shard {str(path)!r} is corrupt ({what}); rebuild the datastore")


def check_invariants(shard: Shard) -> None:
    """What a valid shard satisfies and a few reads can check (the bucket table has vocab_size + 2
    entries; nothing else is read whole): sections inside the file with the lengths and dtypes the
    metadata names, the stream starting and ending with the separator, and the bucket table
    non-decreasing from 0 to the stream length. With these, the search kernels only need per-index
    checks to never read outside the arrays."""
    meta = shard.meta
    n = int(meta["stream_length"])
    vocab = int(meta["vocab_size"])
    expected = {
        "tokens": (n, token_dtype_for(vocab)),
        "sa": (n, np.dtype(meta["sa_dtype"])),
        "bucket": (vocab + 2, np.dtype("<i8")),
    }
    for name, (length, dtype) in expected.items():
        info = meta["sections"][name]
        array = getattr(shard, name)
        if len(array) != length or array.dtype != dtype:
            raise corrupt_shard_error(
                shard.path,
                f"section {name!r} holds {len(array)} {array.dtype} values, expected {length} {dtype}",
            )
        if info["offset"] + info["nbytes"] > meta["file_bytes"]:
            raise corrupt_shard_error(shard.path, f"section {name!r} ends past the end of the file")
    if n == 0:
        return
    sep = int(meta["separator"])
    if int(shard.tokens[0]) != sep or int(shard.tokens[-1]) != sep:
        raise corrupt_shard_error(shard.path, "the token stream does not start and end with the separator")
    bucket = shard.bucket
    if int(bucket[0]) != 0 or int(bucket[-1]) != n or bool((bucket[1:] < bucket[:-1]).any()):
        raise corrupt_shard_error(
            shard.path, "the bucket table is not a non-decreasing run from 0 to the stream length"
        )


def verify_shard(shard: Shard) -> None:
    """Read every byte and compare each section's CRC-32 with the header's."""
    for name in SECTIONS:
        info = shard.meta["sections"][name]
        actual = _crc32(getattr(shard, name))
        if actual != info["crc32"]:
            raise corrupt_shard_error(
                shard.path, f"section {name!r} has CRC-32 {actual:08x}, its header says {info['crc32']:08x}"
            )


def write_manifest(folder: Path, manifest: dict) -> None:
    """Atomically replace ``folder/datastore.json``."""
    tmp = folder / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST_NAME)


def check_folder(folder: Path) -> None:
    """A datastore path exists and is a folder (what it holds is checked on opening)."""
    if not folder.exists():
        raise DatastoreError(f"datastore {str(folder)!r} does not exist; build it with `restspec build`")
    if not folder.is_dir():
        raise DatastoreError(
            f"{str(folder)!r} is a file, a datastore is a folder made by `restspec build`; pass that folder"
        )


def read_manifest(folder: Path) -> dict:
    """Read and check the manifest: magic and version."""
    check_folder(folder)
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise DatastoreError(
            f"{str(folder)!r} has no {MANIFEST_NAME}: not a restspec datastore, or a build that did not "
            "finish; (re)build it with `restspec build`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatastoreError(f"{str(path)!r} is corrupt ({error}); rebuild the datastore") from None
    if not isinstance(manifest, dict) or manifest.get("magic") != MANIFEST_MAGIC:
        found = manifest.get("magic") if isinstance(manifest, dict) else None
        raise DatastoreError(
            f"{str(path)!r} has magic {found!r}, expected {MANIFEST_MAGIC!r}: not a restspec datastore; "
            "build one with `restspec build`"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatastoreError(
            f"datastore {str(folder)!r} has format version {manifest.get('format_version')!r}, this restspec "
            f"reads version {FORMAT_VERSION}; rebuild it with `restspec build`"
        )
    return manifest
