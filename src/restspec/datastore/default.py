"""The demo's default datastore: the Python standard library's sources (and its docs, when installed)
found on this machine, built on first use into the cache, one per tokenizer."""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from restspec.datastore.fingerprint import tokenizer_fingerprint
from restspec.errors import CorpusError

CACHE_ENV = "RESTSPEC_CACHE"
DEFAULT_CACHE = Path("~/.cache/restspec")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
"""Third-party packages are not the standard library; its test suites are big and repetitive."""
DOC_DIRS = (Path(sys.prefix) / "share" / "doc" / f"python{sys.version_info[0]}.{sys.version_info[1]}",)
DOC_SUFFIXES = (".txt", ".rst")


def cache_dir() -> Path:
    """``$RESTSPEC_CACHE`` or ~/.cache/restspec."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def model_cache_file(kind: str, model_name: str, dtype: str, key: str, suffix: str) -> Path:
    """``$RESTSPEC_CACHE/<kind>/<model>-<dtype>-<12 hex digits of sha256(key)><suffix>``: one cached
    artifact of a model, ``key`` holding whatever else it depends on (the name made file-safe)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_name)
    return cache_dir() / kind / f"{safe}-{dtype}-{digest}{suffix}"


def default_datastore_path(tokenizer) -> Path:
    """Where the default datastore for this tokenizer lives (it may not exist yet)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return cache_dir() / f"stdlib-py{version}-{tokenizer_fingerprint(tokenizer)}"


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no site-packages, no test suites) and its text docs, sorted."""
    roots = {Path(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib")}
    files: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
            files.update(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    for doc_dir in DOC_DIRS:
        if doc_dir.is_dir():
            files.update(p for p in doc_dir.rglob("*") if p.is_file() and p.suffix in DOC_SUFFIXES)
    return sorted(files)


def ensure_default_datastore(tokenizer, progress: bool = True) -> Path:
    """The default datastore's folder, built first if missing (about 3-4M tokens, under a minute)."""
    from restspec.datastore.store import Datastore

    path = default_datastore_path(tokenizer)
    if (path / "datastore.json").exists():
        return path
    files = stdlib_files()
    if not files:
        raise CorpusError(
            f"no Python standard library sources found under {sysconfig.get_paths()['stdlib']!r}; "
            "pass --datastore with a datastore built by `restspec build`"
        )
    if progress:
        from rich.console import Console

        Console(stderr=True).print(
            f"Building the default datastore from {len(files):,} standard library files into {path} "
            "(once per tokenizer)"
        )
    try:
        Datastore.build(files, path, tokenizer, progress=progress)
    except Exception:
        if (path / "datastore.json").exists():  # another process finished the same build first
            return path
        raise
    return path
