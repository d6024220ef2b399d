"""Building shards: batch tokenizing (Rust, all cores), cutting the stream into shards, suffix sorting
each shard in a background thread while the next one is tokenized, atomic writes."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from restspec.datastore.format import SHARD_SUFFIX, ShardArrays, token_dtype_for, write_shard
from restspec.datastore.search import bucket_starts, reversed_suffix_array

DEFAULT_SHARD_TOKENS = 1 << 26
"""Tokens per shard (67M): suffix sorting one takes about 1 GB of RAM."""
MIN_SHARD_TOKENS = 1
BATCH_CHARS = 1 << 21
"""Characters handed to the tokenizer per call; its Rust side spreads a batch over all cores."""
PIECE_CHARS = 1 << 18
"""Longer documents are tokenized in pieces cut at line ends (bounded memory, parallel pieces)."""


@dataclass
class BuildStats:
    """Timings and sizes of one build or append."""

    tokens: int = 0
    documents: int = 0
    shards: int = 0
    tokenize_seconds: float = 0.0
    sort_seconds: float = 0.0
    write_seconds: float = 0.0
    total_seconds: float = 0.0
    shard_files: list[str] = field(default_factory=list)


class BatchTokenizer:
    """Encodes lists of texts without special tokens, through the fast (Rust) backend when there is one."""

    def __init__(self, tokenizer) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())  # a copy: leave the caller's settings alone
            backend.no_truncation()
            backend.no_padding()
        self._backend = backend
        self._tokenizer = tokenizer

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return list(self._tokenizer(texts, add_special_tokens=False)["input_ids"])


def _pieces(text: str) -> list[str]:
    if len(text) <= PIECE_CHARS:
        return [text]
    pieces = []
    start = 0
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            if cut > start:
                end = cut + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def tokenize_documents(docs: Iterable[str], tokenizer, on_tokens=None) -> Iterator[np.ndarray]:
    """int64 token arrays, one per document, in order. Small documents are batched; a long one is
    tokenized as a batch of its pieces. ``on_tokens(n)`` is told after each batch."""
    encoder = BatchTokenizer(tokenizer)
    batch: list[str] = []
    chars = 0

    def flush() -> Iterator[np.ndarray]:
        for ids in encoder.encode(batch):
            yield np.asarray(ids, dtype=np.int64)

    for text in docs:
        pieces = _pieces(text)
        if len(pieces) > 1:
            if batch:
                arrays = list(flush())
                batch.clear()
                chars = 0
                if on_tokens:
                    on_tokens(sum(len(a) for a in arrays))
                yield from arrays
            ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in encoder.encode(pieces)])
            if on_tokens:
                on_tokens(len(ids))
            yield ids
            continue
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            arrays = list(flush())
            batch.clear()
            chars = 0
            if on_tokens:
                on_tokens(sum(len(a) for a in arrays))
            yield from arrays
    if batch:
        arrays = list(flush())
        if on_tokens:
            on_tokens(sum(len(a) for a in arrays))
        yield from arrays


def shard_arrays(docs: list[np.ndarray], vocab_size: int, fingerprint: str) -> tuple[ShardArrays, float]:
    """Lay out SEP d0 SEP d1 ... SEP, sort the reversed suffixes. Returns the arrays and sort seconds."""
    dtype = token_dtype_for(vocab_size)
    total = 1 + sum(len(d) + 1 for d in docs)
    tokens = np.empty(total, dtype=dtype)
    tokens[0] = vocab_size
    pos = 1
    for doc in docs:
        tokens[pos : pos + len(doc)] = doc
        tokens[pos + len(doc)] = vocab_size
        pos += len(doc) + 1
    t0 = time.perf_counter()
    sa = reversed_suffix_array(tokens)
    sort_seconds = time.perf_counter() - t0
    arrays = ShardArrays(
        tokens=tokens,
        sa=sa.astype(sa.dtype.newbyteorder("<"), copy=False),
        bucket=bucket_starts(tokens, vocab_size),
        num_docs=len(docs),
        vocab_size=vocab_size,
        fingerprint=fingerprint,
    )
    return arrays, sort_seconds


def shard_name(index: int) -> str:
    return f"shard-{index:05d}{SHARD_SUFFIX}"


class ShardWriter:
    """Collects documents into shards of at most ``shard_tokens`` tokens (a longer document is cut) and
    sorts + writes each full shard in a background thread (pydivsufsort releases the GIL), so the next
    shard is tokenized meanwhile. At most one shard waits, which bounds memory to about two shards."""

    def __init__(
        self,
        folder: Path,
        vocab_size: int,
        fingerprint: str,
        shard_tokens: int,
        first_index: int,
        stats: BuildStats,
        on_shard=None,
    ) -> None:
        if shard_tokens < MIN_SHARD_TOKENS:
            raise ValueError(f"shard_tokens={shard_tokens} must be >= {MIN_SHARD_TOKENS}")
        self.folder = folder
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint
        self.shard_tokens = shard_tokens
        self.next_index = first_index
        self.stats = stats
        self.entries: list[dict] = []
        self._docs: list[np.ndarray] = []
        self._size = 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None
        self._on_shard = on_shard

    def add(self, doc: np.ndarray) -> None:
        if len(doc) == 0:
            return
        if doc.min() < 0 or doc.max() >= self.vocab_size:
            bad = doc[(doc < 0) | (doc >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} outside the vocabulary [0, {self.vocab_size})")
        self.stats.documents += 1
        self.stats.tokens += len(doc)
        while len(doc):
            room = self.shard_tokens - self._size
            piece, doc = doc[:room], doc[room:]
            self._docs.append(piece)
            self._size += len(piece)
            if self._size >= self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if not self._docs:
            return
        docs, self._docs, self._size = self._docs, [], 0
        name = shard_name(self.next_index)
        self.next_index += 1
        self._wait()
        self._pending = self._pool.submit(self._write, docs, name)

    def _write(self, docs: list[np.ndarray], name: str) -> dict:
        if self._on_shard:
            self._on_shard(name, sum(len(d) for d in docs))
        arrays, sort_seconds = shard_arrays(docs, self.vocab_size, self.fingerprint)
        t0 = time.perf_counter()
        crc = write_shard(self.folder / name, arrays)
        self.stats.sort_seconds += sort_seconds
        self.stats.write_seconds += time.perf_counter() - t0
        return {
            "file": name,
            "num_docs": arrays.num_docs,
            "num_tokens": int(len(arrays.tokens) - arrays.num_docs - 1),
            "file_bytes": (self.folder / name).stat().st_size,
            "header_crc32": crc,
        }

    def _wait(self) -> None:
        if self._pending is not None:
            entry = self._pending.result()
            self.entries.append(entry)
            self.stats.shards += 1
            self.stats.shard_files.append(entry["file"])
            self._pending = None

    def finish(self) -> list[dict]:
        try:
            self._flush()
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
        return self.entries

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
