"""Corpus readers: files, folders with a glob, JSON Lines with a chosen field, stdin. Each yields
documents (str). Undecodable files and unusable JSON lines are skipped and counted, never fatal."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from restspec.errors import CorpusError

STDIN = "-"
DEFAULT_GLOB = "**/*"
MAX_SKIPPED_NAMED = 5
"""How many skipped files a summary names; the rest are only counted."""


@dataclass
class CorpusStats:
    """What the readers saw: documents yielded, and what they skipped (with a few examples)."""

    files: int = 0
    documents: int = 0
    bytes_read: int = 0
    skipped_undecodable: int = 0
    skipped_records: int = 0
    """JSON lines without a usable text field."""
    skipped_not_json: int = 0
    """Lines of a --jsonl-field input that are not JSON."""
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, what: str, *, record: bool = False, not_json: bool = False) -> None:
        if not_json:
            self.skipped_not_json += 1
        elif record:
            self.skipped_records += 1
        else:
            self.skipped_undecodable += 1
        if len(self.skipped_examples) < MAX_SKIPPED_NAMED:
            self.skipped_examples.append(what)

    def summary(self) -> str:
        parts = [f"{self.documents:,} documents from {self.files:,} inputs"]
        if self.skipped_undecodable:
            parts.append(f"{self.skipped_undecodable:,} undecodable (not UTF-8) skipped")
        if self.skipped_records:
            parts.append(f"{self.skipped_records:,} JSON lines without a usable text field skipped")
        if self.skipped_not_json:
            parts.append(f"{self.skipped_not_json:,} lines that are not JSON skipped")
        return ", ".join(parts)


def resolve_sources(sources: Sequence[str | Path], glob: str | None) -> list[Path | str]:
    """Expand folders with ``glob`` (default all files) into sorted file lists; check every path exists."""
    if not sources:
        raise CorpusError("no corpus given: pass files, folders, or '-' for stdin")
    resolved: list[Path | str] = []
    for source in sources:
        if str(source) == STDIN:
            resolved.append(STDIN)
            continue
        path = Path(source)
        if not path.exists():
            raise CorpusError(f"corpus path {str(path)!r} does not exist; check the path")
        if path.is_dir():
            pattern = glob or DEFAULT_GLOB
            files = sorted(p for p in path.glob(pattern) if p.is_file())
            if not files:
                raise CorpusError(
                    f"folder {str(path)!r} has no file matching --glob {pattern!r}; check the pattern"
                )
            resolved.extend(files)
        else:
            resolved.append(path)
    return resolved


def input_bytes(inputs: Sequence[Path | str]) -> int | None:
    """Total size of the inputs, or None when stdin is among them (unknown length)."""
    if STDIN in inputs:
        return None
    return sum(Path(p).stat().st_size for p in inputs)


def _decode(data: bytes, name: str, stats: CorpusStats) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip(name)
        return None


def _jsonl_documents(text: str, name: str, jsonl_field: str, stats: CorpusStats) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats.skip(f"{name}:{lineno}", not_json=True)
            continue
        value = record.get(jsonl_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            stats.skip(f"{name}:{lineno}", record=True)
            continue
        if value:
            yield value


def iter_documents(
    inputs: Sequence[Path | str], jsonl_field: str | None, stats: CorpusStats, on_bytes=None
) -> Iterator[str]:
    """Documents of every input in order: a whole file (or stdin) is one document, or with
    ``jsonl_field`` each JSON line's field is one. ``on_bytes(n)`` is told the bytes consumed."""
    for item in inputs:
        if item == STDIN:
            data = sys.stdin.buffer.read()
            name = "<stdin>"
        else:
            try:
                data = Path(item).read_bytes()
            except OSError as error:
                stats.skip(f"{item} ({error.strerror})")
                continue
            name = str(item)
        stats.files += 1
        stats.bytes_read += len(data)
        text = _decode(data, name, stats)
        if text is not None:
            if jsonl_field is None:
                if text:
                    stats.documents += 1
                    yield text
            else:
                for doc in _jsonl_documents(text, name, jsonl_field, stats):
                    stats.documents += 1
                    yield doc
        if on_bytes is not None:
            on_bytes(len(data))


def iter_texts(texts, stats: CorpusStats) -> Iterator[str]:
    """Documents given as strings (empty ones are dropped)."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}")
        if text:
            stats.documents += 1
            yield text
