"""``Datastore``: build, open (memory-mapped), search and append to a sharded suffix-array datastore."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from restspec.datastore.build import (
    DEFAULT_SHARD_TOKENS,
    BuildStats,
    ShardWriter,
    tokenize_documents,
)
from restspec.datastore.corpus import CorpusStats, input_bytes, iter_documents, iter_texts, resolve_sources
from restspec.datastore.fingerprint import tokenizer_fingerprint, vocab_size_of
from restspec.datastore.format import (
    FORMAT_VERSION,
    MANIFEST_MAGIC,
    MANIFEST_NAME,
    Shard,
    corrupt_shard_error,
    open_shard,
    read_manifest,
    token_dtype_for,
    verify_shard,
    write_manifest,
)
from restspec.datastore.search import CORRUPT, kernels
from restspec.errors import CorpusError, DatastoreError

DEFAULT_MAX_LEN = 16
DEFAULT_MIN_LEN = 2
DEFAULT_K = 5000
DEFAULT_M = 10
PAD = -1
VerifyMode = Literal["background", "now", "off"]
"""When :meth:`Datastore.open` checks the section checksums (every byte): on a background thread,
before returning, or never."""


@dataclass(frozen=True)
class ShardRange:
    """Occurrences ``sa[lo:hi]`` of the match in shard ``shard``."""

    shard: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Match:
    """The longest context suffix found: ``length`` tokens (0 = none of at least min_len), occurring
    ``count`` times in all shards together; ``ranges`` locate them for :meth:`Datastore.continuations`."""

    length: int
    count: int
    ranges: tuple[ShardRange, ...] = ()

    @classmethod
    def none(cls) -> Match:
        return cls(0, 0, ())


class Datastore:
    """Token stream + reversed suffix array per shard, memory-mapped; searched as one datastore.

    Build with :meth:`build` / :meth:`build_from_texts` / :meth:`build_from_tokens`, open with
    :meth:`open`. Search is thread-safe (read-only arrays); appending is for a single writer.
    """

    def __init__(self, path: Path, manifest: dict, shards: list[Shard]) -> None:
        self.path = path
        self._manifest = manifest
        self.shards = shards
        self.last_build: BuildStats | None = None
        """Timings of the build that made this object (None when opened)."""
        self.corpus_stats: CorpusStats | None = None
        """What the corpus readers saw and skipped during that build."""
        self._kernels = None
        self._sep = int(manifest["vocab_size"])
        self._check: _BodyCheck | None = None

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return int(self._manifest["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return str(self._manifest["tokenizer_fingerprint"])

    @property
    def num_tokens(self) -> int:
        """Document tokens in all shards (separators not counted)."""
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    @property
    def token_dtype(self) -> np.dtype:
        return token_dtype_for(self.vocab_size)

    def nbytes(self) -> int:
        """Bytes on disk (all shard files and the manifest)."""
        return sum(s.path.stat().st_size for s in self.shards) + (self.path / "datastore.json").stat().st_size

    def info(self) -> dict:
        """What ``restspec inspect`` shows."""
        return {
            "path": str(self.path),
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "token_dtype": self.token_dtype.name,
            "tokenizer_fingerprint": self.fingerprint,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "bytes_on_disk": self.nbytes(),
            "shards": [
                {
                    "file": s.path.name,
                    "num_docs": s.num_docs,
                    "num_tokens": s.num_tokens,
                    "sa_dtype": s.meta["sa_dtype"],
                    "bytes": s.meta["file_bytes"],
                }
                for s in self.shards
            ],
        }

    def __repr__(self) -> str:
        return (
            f"Datastore({str(self.path)!r}, {self.num_tokens:,} tokens, {self.num_docs:,} docs, "
            f"{len(self.shards)} shards, tokenizer {self.fingerprint})"
        )

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str | Path, tokenizer=None, *, verify: VerifyMode = "background") -> Datastore:
        """Map a datastore read-only. Opening costs the same at any size: it checks the headers (magic,
        version, CRC of the header, file sizes) and the invariants a few reads can check
        (:func:`~restspec.datastore.format.check_invariants`); the searches check every index they
        read, so a damaged file never makes them read outside its arrays.

        ``verify`` says when the CRC-32 of every section is checked (reading every byte, about 2.5 s
        per GB): ``"background"`` on a daemon thread, after which searches raise DatastoreError if
        it found a mismatch (:meth:`wait_verified` waits for it); ``"now"`` before returning;
        ``"off"`` only by an explicit :meth:`verify`. With ``tokenizer``, its fingerprint must match
        the one the datastore was built with."""
        if verify not in ("background", "now", "off"):
            raise ValueError(f"verify={verify!r} must be 'background', 'now' or 'off'")
        folder = Path(path)
        manifest = read_manifest(folder)
        shards = []
        for entry in manifest["shards"]:
            shard = open_shard(folder / entry["file"])
            if shard.header_crc != entry["header_crc32"]:
                raise DatastoreError(
                    f"shard {entry['file']!r} of {str(folder)!r} is not the one the manifest lists "
                    "(header CRC differs): the folder was modified; rebuild the datastore"
                )
            for key in ("vocab_size", "tokenizer_fingerprint"):
                if shard.meta[key] != manifest[key]:
                    raise DatastoreError(
                        f"shard {entry['file']!r} has {key}={shard.meta[key]!r}, the datastore "
                        f"{manifest[key]!r}; rebuild the datastore"
                    )
            shards.append(shard)
        store = cls(folder, manifest, shards)
        if tokenizer is not None:
            store.check_tokenizer(tokenizer)
        if verify == "now":
            store.verify()
        elif verify == "background":
            store._check = _BodyCheck(shards)
        return store

    def check_tokenizer(self, tokenizer) -> None:
        """Raise DatastoreError unless ``tokenizer`` is the one this datastore was built with."""
        theirs = tokenizer_fingerprint(tokenizer)
        if theirs != self.fingerprint:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise DatastoreError(
                f"datastore {str(self.path)!r} was built with tokenizer {self.fingerprint}, the model's "
                f"tokenizer ({name}) is {theirs}; rebuild it for this model with "
                f"`restspec build CORPUS... --model MODEL --out {self.path}`"
            )

    def verify(self) -> None:
        """Read every byte of every shard and check the section CRC-32s (slow: linear in size)."""
        for shard in self.shards:
            verify_shard(shard)

    def wait_verified(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds) for the background checksum pass of :meth:`open`; raise
        its DatastoreError if it found a damaged section. Returns whether the pass has finished
        (False also when none was started: ``verify="off"``, or a datastore made by a build)."""
        if self._check is None:
            return False
        finished = self._check.wait(timeout)
        self._raise_if_corrupt()
        return finished

    def _raise_if_corrupt(self) -> None:
        check = self._check
        if check is not None and check.error is not None:
            raise check.error

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        sources: Sequence[str | Path],
        out: str | Path,
        tokenizer,
        *,
        glob: str | None = None,
        jsonl_field: str | None = None,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        progress: bool = True,
        overwrite: bool = False,
    ) -> Datastore:
        """Tokenize files / folders (``glob``, default every file) / JSON Lines (``jsonl_field``) /
        stdin (``'-'``) into a new datastore at ``out``. Undecodable inputs are skipped and counted."""
        if isinstance(sources, (str, Path)):
            sources = [sources]
        inputs = resolve_sources(sources, glob)
        stats = CorpusStats()
        with _Progress(progress, input_bytes(inputs)) as bar:
            docs = iter_documents(inputs, jsonl_field, stats, on_bytes=bar.advance_bytes)
            return cls._build_docs(docs, out, tokenizer, shard_tokens, bar, overwrite, stats)

    @classmethod
    def build_from_texts(
        cls,
        texts: Iterable[str],
        out: str | Path,
        tokenizer,
        *,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        progress: bool = True,
        overwrite: bool = False,
    ) -> Datastore:
        """A datastore whose documents are ``texts``."""
        stats = CorpusStats()
        with _Progress(progress, None) as bar:
            return cls._build_docs(
                iter_texts(texts, stats), out, tokenizer, shard_tokens, bar, overwrite, stats
            )

    @classmethod
    def build_from_tokens(
        cls,
        docs: Iterable[np.ndarray | Sequence[int]],
        out: str | Path,
        *,
        vocab_size: int,
        fingerprint: str,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        progress: bool = False,
        overwrite: bool = False,
    ) -> Datastore:
        """A datastore of already tokenized documents (ids in [0, vocab_size))."""
        with _Progress(progress, None) as bar:

            def arrays():
                for doc in docs:
                    arr = np.asarray(doc, dtype=np.int64)
                    bar.advance_tokens(len(arr))
                    yield arr

            return cls._write_new(arrays(), out, vocab_size, fingerprint, shard_tokens, bar, overwrite, None)

    @classmethod
    def _build_docs(cls, docs, out, tokenizer, shard_tokens, bar, overwrite, stats: CorpusStats):
        fingerprint = tokenizer_fingerprint(tokenizer)
        vocab_size = vocab_size_of(tokenizer)
        token_docs = tokenize_documents(docs, tokenizer, on_tokens=bar.advance_tokens)
        return cls._write_new(token_docs, out, vocab_size, fingerprint, shard_tokens, bar, overwrite, stats)

    @classmethod
    def _write_new(cls, token_docs, out, vocab_size, fingerprint, shard_tokens, bar, overwrite, corpus):
        out = Path(out)
        if out.exists() and not overwrite:
            raise DatastoreError(
                f"{str(out)!r} already exists; choose another --out, or replace it with --force "
                "(overwrite=True)"
            )
        if out.exists() and not _replaceable(out):
            raise DatastoreError(
                f"{str(out)!r} is not a restspec datastore (a folder with {MANIFEST_NAME}) nor an empty "
                "folder: --force (overwrite=True) replaces only those; choose another --out"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        stats = BuildStats()
        t0 = time.perf_counter()
        writer = ShardWriter(tmp, vocab_size, fingerprint, shard_tokens, 0, stats, on_shard=bar.sorting)
        try:
            t_tok = time.perf_counter()
            for doc in token_docs:
                writer.add(doc)
            stats.tokenize_seconds = time.perf_counter() - t_tok  # includes waits for the sorter
            entries = writer.finish()
            if not entries:
                detail = f" ({corpus.summary()})" if corpus is not None else ""
                hint = (
                    "check --jsonl-field"
                    if corpus and (corpus.skipped_records or corpus.skipped_not_json)
                    else "give files with text"
                )
                raise CorpusError(f"the corpus yielded no tokens{detail}; {hint}")
            write_manifest(tmp, _manifest(vocab_size, fingerprint, entries))
            _replace_dir(tmp, out)
        except BaseException:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        stats.total_seconds = time.perf_counter() - t0
        store = cls.open(out, verify="off")  # just written and checksummed by this process
        store.last_build = stats
        store.corpus_stats = corpus
        bar.done(stats, corpus)
        return store

    # ------------------------------------------------------------------ append
    def append_tokens(
        self, docs: Iterable[np.ndarray | Sequence[int]], *, shard_tokens: int = DEFAULT_SHARD_TOKENS
    ):
        """Add the documents as new shard(s); old shards are untouched. Returns the BuildStats.

        An id outside [0, vocab_size) (a model may have more output rows than its tokenizer has
        tokens) can never be matched: it ends the document there instead of failing."""
        vocab = self.vocab_size
        arrays = (piece for d in docs for piece in _split_out_of_vocab(np.asarray(d, dtype=np.int64), vocab))
        return self._append(arrays, shard_tokens)

    def append_texts(self, texts: Iterable[str], tokenizer, *, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        """Tokenize ``texts`` (with the datastore's tokenizer: checked) and add them as new shard(s)."""
        self.check_tokenizer(tokenizer)
        stats = CorpusStats()
        return self._append(tokenize_documents(iter_texts(texts, stats), tokenizer), shard_tokens)

    def append(self, docs: Iterable, tokenizer=None, *, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        """:meth:`append_texts` when ``tokenizer`` is given, else :meth:`append_tokens`."""
        if tokenizer is not None:
            return self.append_texts(docs, tokenizer, shard_tokens=shard_tokens)
        return self.append_tokens(docs, shard_tokens=shard_tokens)

    def _append(self, token_docs, shard_tokens: int) -> BuildStats:
        manifest = read_manifest(self.path)
        if [e["file"] for e in manifest["shards"]] != [s.path.name for s in self.shards]:
            raise DatastoreError(
                f"datastore {str(self.path)!r} changed on disk since it was opened; open it again"
            )
        first = 1 + max((_shard_index(s.path) for s in self.shards), default=-1)
        stats = BuildStats()
        writer = ShardWriter(self.path, self.vocab_size, self.fingerprint, shard_tokens, first, stats)
        try:
            for doc in token_docs:
                writer.add(doc)
            entries = writer.finish()
        except BaseException:
            writer.abort()
            raise
        if not entries:
            return stats
        # the new shard files are complete; the manifest rename makes them part of the datastore
        manifest["shards"] = manifest["shards"] + entries
        write_manifest(self.path, manifest)
        self._manifest = manifest
        self.shards = self.shards + [open_shard(self.path / e["file"]) for e in entries]
        return stats

    def compact(self, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> int:
        """Merge runs of consecutive shards whose tokens together fit ``shard_tokens`` into one shard
        each (many small appends make every lookup visit many shards). Documents keep their order.
        Atomic like :meth:`append`: new shard files, then the manifest, then old files are deleted.
        Returns the number of shards removed."""
        groups: list[list[int]] = []
        size = 0
        for i, shard in enumerate(self.shards):
            if groups and size + shard.num_tokens <= shard_tokens:
                groups[-1].append(i)
                size += shard.num_tokens
            else:
                groups.append([i])
                size = shard.num_tokens
        if all(len(g) == 1 for g in groups):
            return 0
        manifest = read_manifest(self.path)
        entries_by_file = {e["file"]: e for e in manifest["shards"]}
        next_index = 1 + max(_shard_index(s.path) for s in self.shards)
        new_entries: list[dict] = []
        stats = BuildStats()
        for group in groups:
            if len(group) == 1:
                new_entries.append(entries_by_file[self.shards[group[0]].path.name])
                continue
            writer = ShardWriter(self.path, self.vocab_size, self.fingerprint, 2**62, next_index, stats)
            try:
                for i in group:
                    for doc in _shard_docs(self.shards[i], self._sep):
                        writer.add(doc.astype(np.int64))
                new_entries.extend(writer.finish())
            except BaseException:
                writer.abort()
                raise
            next_index += 1
        old = [s.path for s in self.shards]
        manifest["shards"] = new_entries
        write_manifest(self.path, manifest)
        self._manifest = manifest
        self.shards = [open_shard(self.path / e["file"]) for e in new_entries]
        kept = {s.path for s in self.shards}
        for path in old:
            if path not in kept:
                path.unlink(missing_ok=True)
        return len(old) - len(self.shards)

    # ------------------------------------------------------------------ search
    def _k(self):
        if self._kernels is None:
            self._kernels = kernels(jit=os.environ.get("RESTSPEC_NO_JIT", "") == "")
        return self._kernels

    def longest_match(self, ids, max_len: int = DEFAULT_MAX_LEN, min_len: int = DEFAULT_MIN_LEN) -> Match:
        """Longest suffix of ``ids`` of at most ``max_len`` tokens that occurs (never across two
        documents); ``Match.none()`` when it is shorter than ``min_len``. Over several shards the
        length is the maximum and the count sums the shards that reach it."""
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        ctx = ids if type(ids) is np.ndarray and ids.dtype == np.int64 else np.asarray(ids, dtype=np.int64)
        if ctx.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {ctx.shape}")
        if len(ctx) > max_len:
            ctx = ctx[-max_len:]
        if not ctx.flags.c_contiguous:
            ctx = np.ascontiguousarray(ctx)
        self._raise_if_corrupt()
        kernel = self._k().longest_match
        best = 0
        found: list[ShardRange] = []
        for i, shard in enumerate(self.shards):
            length, lo, hi = kernel(shard.tokens, shard.sa, shard.bucket, ctx, self._sep)
            if length == CORRUPT:
                raise corrupt_shard_error(shard.path, "its suffix array points outside its token stream")
            if length > best:
                best = length
                found = [ShardRange(i, lo, hi)]
            elif length == best and length > 0:
                found.append(ShardRange(i, lo, hi))
        if best < min_len:
            return Match.none()
        return Match(best, sum(r.hi - r.lo for r in found), tuple(found))

    def continuations(self, match: Match, k: int = DEFAULT_K, m: int = DEFAULT_M) -> np.ndarray:
        """int32[n, m], n = min(k, match.count): the m tokens after each of n occurrences, -1 after a
        document's end. Order: shards in order, then the suffix-array order (by the text before the
        match, read backwards); when count > k, occurrence j = i * count // k for row i (evenly spaced)."""
        if k < 0 or m < 0:
            raise ValueError(f"k={k} and m={m} must be >= 0")
        n = min(k, match.count)
        if n == 0 or m == 0:
            return np.full((n, m), PAD, dtype=np.int32)
        self._raise_if_corrupt()
        out = np.empty((n, m), dtype=np.int32)  # every row is written by exactly one shard
        kernel = self._k().continuations
        offset = 0
        for r in match.ranges:
            shard = self.shards[r.shard]
            status = kernel(shard.tokens, shard.sa, r.lo, offset, r.hi - r.lo, match.count, m, self._sep, out)
            if status == CORRUPT:
                raise corrupt_shard_error(
                    shard.path, "a continuation runs past its token stream or holds an id above the separator"
                )
            offset += r.hi - r.lo
        return out


class _BodyCheck:
    """The section checksums of ``shards``, checked on a daemon thread; ``error`` is the first
    mismatch (None while none was found). zlib's CRC-32 releases the GIL, so searches go on meanwhile."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.error: DatastoreError | None = None
        self._thread = threading.Thread(
            target=self._run, args=(list(shards),), name="restspec-datastore-verify", daemon=True
        )
        self._thread.start()

    def _run(self, shards: list[Shard]) -> None:
        for shard in shards:
            try:
                verify_shard(shard)
            except DatastoreError as error:
                self.error = error
                return

    def wait(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _split_out_of_vocab(doc: np.ndarray, vocab_size: int) -> list[np.ndarray]:
    bad = np.flatnonzero((doc < 0) | (doc >= vocab_size))
    if not len(bad):
        return [doc]
    edges = [-1, *bad.tolist(), len(doc)]
    return [doc[a + 1 : b] for a, b in itertools.pairwise(edges) if b > a + 1]


def _shard_index(path: Path) -> int:
    """shard-00012.rsds -> 12."""
    return int(path.name.split("-")[1].split(".")[0])


def _shard_docs(shard: Shard, separator: int) -> list[np.ndarray]:
    """The documents of a shard (the pieces between separators)."""
    seps = np.flatnonzero(np.asarray(shard.tokens) == separator)
    return [shard.tokens[a + 1 : b] for a, b in itertools.pairwise(seps) if b > a + 1]


def _manifest(vocab_size: int, fingerprint: str, entries: list[dict]) -> dict:
    return {
        "magic": MANIFEST_MAGIC,
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "token_dtype": token_dtype_for(vocab_size).name,
        "tokenizer_fingerprint": fingerprint,
        "shards": entries,
    }


def _replaceable(out: Path) -> bool:
    """Whether a build may replace ``out``: a datastore (even a damaged one) or an empty folder, never
    a file or a folder of anything else (it could be the very corpus being built from)."""
    return (
        out.is_dir() and not out.is_symlink() and ((out / MANIFEST_NAME).exists() or not any(out.iterdir()))
    )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an existing ``out`` is moved aside first and removed."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


class _Progress:
    """Rich progress on stderr: bytes read (when known), tokens, tokens/s; then a shard-sorting line."""

    def __init__(self, enabled: bool, total_bytes: int | None) -> None:
        self.enabled = enabled
        self.total_bytes = total_bytes
        self.tokens = 0
        self._progress = None
        self._task = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[tokens]:>12,} tokens"),
                TextColumn("{task.fields[rate]:>10,.0f} tokens/s"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("tokenizing", total=self.total_bytes, tokens=0, rate=0.0)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _update(self, **kw) -> None:
        if self._progress is not None:
            rate = self.tokens / max(time.perf_counter() - self._t0, 1e-9)
            self._progress.update(self._task, tokens=self.tokens, rate=rate, **kw)

    def advance_bytes(self, n: int) -> None:
        self._update(advance=n)

    def advance_tokens(self, n: int) -> None:
        self.tokens += n
        self._update()

    def sorting(self, name: str, n_tokens: int) -> None:
        if self._progress is not None:
            self._progress.console.print(f"suffix sorting {name} ({n_tokens:,} tokens)")

    def done(self, stats: BuildStats, corpus: CorpusStats | None) -> None:
        if self._progress is not None:
            self._update(completed=self.total_bytes) if self.total_bytes else self._update()
            line = (
                f"{stats.tokens:,} tokens in {stats.shards} shard(s), {stats.total_seconds:.1f} s "
                f"(suffix sorting {stats.sort_seconds:.1f} s)"
            )
            if corpus is not None:
                line += f"; {corpus.summary()}"
            self._progress.console.print(line)
