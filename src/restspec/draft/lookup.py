"""Suffix lookup in a token buffer: the longest context suffix that occurs in it, and what followed.

Used by the drafters that search text they hold in memory (the request's own context, past
outputs). A compiled scan over int32 arrays; documents in a buffer are separated by -1, which never
equals a token, so a match or a continuation never spans two documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

SEPARATOR = -1
"""Separates documents in a buffer (and pads continuations)."""


@dataclass(frozen=True, eq=False)
class Lookup:
    """``length``: tokens of the longest matched suffix (0 = none); ``continuations``: int32[n, m],
    the m tokens after each of its n most recent occurrences, -1 padded."""

    length: int
    continuations: np.ndarray

    @classmethod
    def none(cls, m: int) -> Lookup:
        return cls(0, np.zeros((0, m), np.int32))


def longest_suffix_continuations(
    buffer: np.ndarray,
    query: np.ndarray,
    *,
    end: int | None = None,
    max_len: int,
    min_len: int,
    m: int,
    max_rows: int,
) -> Lookup:
    """Occurrences in ``buffer[:end]`` of the longest suffix of ``query`` (``min_len`` to ``max_len``
    tokens) that has at least one token after it, and the ``m`` tokens that follow each.

    ``buffer``: int32[N] (documents separated by -1); ``query``: int32[Q]. An occurrence ends at
    position q < end - 1, so its continuation starts inside ``buffer[:end]``; continuation tokens may
    run past ``end`` (up to the buffer's end or a separator). Keeps the ``max_rows`` most recent
    occurrences (highest q).
    """
    limit = len(buffer) if end is None else min(end, len(buffer))
    q_len = min(max_len, len(query))
    if q_len < min_len or limit < 2 or len(query) == 0:
        return Lookup.none(m)
    best, rows = _lookup(
        np.ascontiguousarray(buffer, dtype=np.int32),
        np.array(query[-q_len:], dtype=np.int32),  # a writable copy: one compiled signature for all
        limit,
        min_len,
        m,
        max_rows,
    )
    return Lookup(best, rows) if best else Lookup.none(m)


@nb.njit(cache=True)
def _lookup(buffer, query, limit, min_len, m, max_rows):  # pragma: no cover - compiled
    """:func:`longest_suffix_continuations` over ``query`` (the suffix of at most max_len tokens):
    (length of the longest match, int32[n, m] continuations, most recent first); (0, empty) if the
    longest is shorter than ``min_len``."""
    q_len = len(query)
    last = query[q_len - 1]
    best = 0
    count = 0  # occurrences of the best length so far
    lengths = np.zeros(limit, np.int64)
    for q in range(limit - 1):  # an occurrence ends at q and has at least one token after it
        if buffer[q] != last:
            continue
        length = 1
        while length < q_len and q - length >= 0 and buffer[q - length] == query[q_len - 1 - length]:
            length += 1
        lengths[q] = length
        if length > best:
            best = length
            count = 0
        if length == best:
            count += 1
    if best < min_len:
        return 0, np.zeros((0, m), np.int32)
    rows = np.full((min(count, max_rows), m), SEPARATOR, np.int32)
    r = 0
    for q in range(limit - 2, -1, -1):  # the most recent first
        if r == len(rows):
            break
        if lengths[q] != best:
            continue
        for t in range(m):  # the tokens after it, up to the buffer's end or a separator
            pos = q + 1 + t
            if pos >= len(buffer) or buffer[pos] < 0:
                break
            rows[r, t] = buffer[pos]
        r += 1
    return best, rows
