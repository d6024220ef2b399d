"""The tenants' drafting memory on disk, so that a restart keeps what the server learned.

One ``.npz`` file: the arrays of every tenant's state, and a JSON manifest (``__manifest__``) with the
nesting, the numbers and the order of the tenants (least recently served first). Written atomically:
to a temporary file in the same folder, flushed to disk, then renamed over the old one, so a flush that
is killed at any point leaves either the previous file or the new one, never a torn file."""

from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from restspec.errors import RestspecError

MANIFEST = "__manifest__"
FORMAT_VERSION = 1


class HistoryFileError(RestspecError):
    """The history file cannot be read or does not fit the drafter."""


def save_states(path: Path, states: dict[str, dict[str, Any]]) -> None:
    """Write ``{tenant: state_dict}`` to ``path`` atomically (see the module's docstring)."""
    arrays: dict[str, np.ndarray] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, dict):
            return {"dict": {str(k): encode(v) for k, v in value.items()}}
        if isinstance(value, np.ndarray) and value.dtype != object:
            name = f"a{len(arrays)}"
            arrays[name] = value
            return {"array": name}
        if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
            return {"number": value.item() if isinstance(value, np.generic) else value}
        kind = f"array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise TypeError(f"a drafter state holds a {kind}; states hold numeric arrays, numbers and dicts")

    manifest = {"version": FORMAT_VERSION, "tenants": [[t, encode(s)] for t, s in states.items()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **{MANIFEST: np.frombuffer(json.dumps(manifest).encode(), np.uint8)}, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)


def load_states(path: Path) -> dict[str, dict[str, Any]]:
    """``{tenant: state_dict}`` as :func:`save_states` wrote it, in the same order."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            manifest = json.loads(archive[MANIFEST].tobytes())
            arrays = {name: archive[name] for name in archive.files if name != MANIFEST}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise HistoryFileError(
            f"history file {str(path)!r} cannot be read as one restspec wrote ({error}); if it is a "
            "history file, delete it to start afresh, else pass another --history-file"
        ) from None
    if manifest.get("version") != FORMAT_VERSION:
        raise HistoryFileError(
            f"history file {str(path)!r} has format {manifest.get('version')!r}, this restspec writes "
            f"{FORMAT_VERSION}; delete it to start afresh"
        )

    def decode(node: dict[str, Any]) -> Any:
        if "dict" in node:
            return {k: decode(v) for k, v in node["dict"].items()}
        if "array" in node:
            return arrays[node["array"]]
        return node["number"]

    return {tenant: decode(state) for tenant, state in manifest["tenants"]}


class HistoryStore:
    """Where and how often the tenants' states are saved; :meth:`due` says when the next save is."""

    def __init__(self, path: Path, every_s: float) -> None:
        if not every_s > 0:
            raise ValueError(f"every_s={every_s} must be > 0 seconds")
        self.path = Path(path)
        self.every_s = every_s
        self._saved_at = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._saved_at >= self.every_s

    def save(self, states: dict[str, dict[str, Any]]) -> None:
        save_states(self.path, states)
        self._saved_at = time.monotonic()
