"""Which thread runs torch's parallel work, and giving back the OpenMP workers of one that is done.

torch's CPU builds for Linux use GNU OpenMP, which keeps a pool of worker threads per thread that
ever ran parallel work. Once a process holds more such workers than it has cores, *every* pool spins
only briefly before sleeping (libgomp's "throttled" spin), and each small operation of a forward then
pays for waking its workers: on a 2-core machine a one-input forward of the embedded model took
31 ms on the thread that loaded it and 52 ms on a second thread while the first still held its pool.

restspec's forwards run on the generator's loop thread; a thread that is done with torch (the one
that loaded the model, a caller waiting for its tokens) gives its pool back with
:func:`release_openmp_pool` (OpenMP 5's ``omp_pause_resource_all``, which frees the calling thread's
pool; libgomp makes a new one when that thread runs parallel work again). Measured on the same
machine: 30 ms on the second thread once the first gave its pool back
(``python -m benchmarks.openmp_threads``).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

OMP_PAUSE_SOFT = 1
"""``omp_pause_soft``: free the threads, keep what the runtime needs to start them again."""


@functools.cache
def gnu_openmp_path() -> Path | None:
    """The file of the GNU OpenMP runtime torch loaded, or None (not Linux, or another OpenMP runtime,
    whose pools do not throttle each other this way). Looked up once: torch is imported first, so the
    answer cannot change later. Native code linked to this file runs on torch's OpenMP threads."""
    import torch  # noqa: F401 - loads the OpenMP runtime looked for here

    if not sys.platform.startswith("linux"):
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for path in sorted({line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            return Path(path)
    return None


@functools.cache
def _gnu_openmp() -> ctypes.CDLL | None:
    """The runtime of :func:`gnu_openmp_path`, loaded, or None."""
    path = gnu_openmp_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
    lib.omp_pause_resource_all.restype = ctypes.c_int
    return lib


def release_openmp_pool() -> bool:
    """Give back the calling thread's OpenMP worker threads (if it has any); True when GNU OpenMP
    freed them. Call it on a thread that is done with torch for now: the next parallel operation on
    it starts a new pool (a few threads, well under a millisecond)."""
    lib = _gnu_openmp()
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
