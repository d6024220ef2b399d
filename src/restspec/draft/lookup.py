"""Suffix lookup in a token buffer: the longest context suffix that occurs in it, and what followed.

Used by the drafters that search text they hold in memory (the request's own context, past
outputs). Pure numpy over int32 arrays; documents in a buffer are separated by -1, which never
equals a token, so a match or a continuation never spans two documents.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # (n,): candidate end positions of a match: the query's last token, followed by >= 1 token
    ends = np.flatnonzero(buffer[: limit - 1] == query[-1])
    if len(ends) == 0:
        return Lookup.none(m)
    # (n, q_len): buffer[end - j] vs query[-1 - j], matched while every earlier j matched too
    back = ends[:, None] - np.arange(q_len)[None, :]
    reversed_query = query[::-1][:q_len]
    equal = (buffer[np.maximum(back, 0)] == reversed_query[None, :]) & (back >= 0)
    lengths = np.logical_and.accumulate(equal, axis=1).sum(axis=1)
    best = int(lengths.max())
    if best < min_len:
        return Lookup.none(m)
    chosen = ends[lengths == best][-max_rows:][::-1]  # most recent first
    # (n, m): the tokens after each occurrence, -1 past the buffer or after a separator
    ahead = chosen[:, None] + 1 + np.arange(m)[None, :]
    rows = np.where(ahead < len(buffer), buffer[np.minimum(ahead, len(buffer) - 1)], SEPARATOR)
    rows = np.where(np.logical_and.accumulate(rows >= 0, axis=1), rows, SEPARATOR)
    return Lookup(best, rows.astype(np.int32))
