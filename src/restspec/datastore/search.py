"""Suffix sorting and the search kernels over one shard.

Layout (one shard): ``tokens`` T[N] = SEP d0 SEP d1 SEP ... SEP, with SEP = vocab_size. The index is the
suffix array of the *reversed* stream R = T[::-1], stored as forward positions: ``sa[i] = q`` means the
i-th smallest reversed suffix is T[q], T[q-1], T[q-2], ... (the text read backwards from q).

The longest suffix of a context c[0..L) that occurs is then found by narrowing one range: the range
for the last token c[L-1] comes from ``bucket``; at depth d every suffix in the range already agrees on
T[q], ..., T[q-d+1] = c[L-1], ..., c[L-d], and sorted by T[q-d], so two binary searches on T[q-d] give
the sub-range that also matches c[L-1-d]. No span is searched twice (REST re-searches 16, 15, ..., 2).
Because T starts with SEP and a context never holds SEP, T[q-d] is never read before index 0, and a
match never spans two documents. A continuation starts at q + 1 and stops at the next SEP.

Those guarantees hold for the arrays as built, not for a file damaged on disk. The kernels therefore
check every index they take from the arrays (a bucket range inside ``sa``, every ``sa[i] - d`` and
every continuation position inside ``tokens``, every token at most SEP) and report
:data:`CORRUPT` instead of reading outside the arrays: a few comparisons per binary-search probe.

The kernels are plain Python functions over arrays; :func:`kernels` compiles them with numba on first
use (``cache=True``: compiled once per machine), and ``kernels(jit=False)`` runs the same code in Python.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

CORRUPT = -1
"""Returned by the kernels (as the match length, or as their status) when an index read from the
arrays points outside them or a token exceeds the separator: the shard file is damaged."""


def longest_match_kernel(tokens, sa, bucket, ctx, vocab_size):  # pragma: no cover - run compiled
    """ctx: int64[L], oldest first. Returns (length, lo, hi): the longest ctx[L-length:] found and its
    range sa[lo:hi]; (0, 0, 0) when even the last token does not occur; (CORRUPT, 0, 0) when the
    arrays point outside themselves."""
    n_ctx = ctx.shape[0]
    if n_ctx == 0:
        return 0, 0, 0
    c = ctx[n_ctx - 1]
    if c < 0 or c >= vocab_size:
        return 0, 0, 0
    lo = bucket[c]
    hi = bucket[c + 1]
    if lo < 0 or hi > sa.shape[0]:
        return CORRUPT, 0, 0
    if lo >= hi:
        return 0, 0, 0
    n_tokens = tokens.shape[0]
    length = 1
    for d in range(1, n_ctx):
        c = ctx[n_ctx - 1 - d]
        if c < 0 or c >= vocab_size:
            break
        # lower bound: first i in [lo, hi) with T[sa[i] - d] >= c
        a = lo
        b = hi
        while a < b:
            mid = (a + b) >> 1
            p = sa[mid] - d
            if p < 0 or p >= n_tokens:
                return CORRUPT, 0, 0
            if tokens[p] < c:
                a = mid + 1
            else:
                b = mid
        new_lo = a
        # upper bound: first i in [new_lo, hi) with T[sa[i] - d] > c
        b = hi
        while a < b:
            mid = (a + b) >> 1
            p = sa[mid] - d
            if p < 0 or p >= n_tokens:
                return CORRUPT, 0, 0
            if tokens[p] <= c:
                a = mid + 1
            else:
                b = mid
        if new_lo == a:
            break
        lo = new_lo
        hi = a
        length = d + 1
    return length, lo, hi


def continuations_kernel(tokens, sa, lo, offset, count, total, m, separator, out):  # pragma: no cover
    """Fill the rows of out (int32[n, m]) that belong to the occurrences sa[lo:lo+count] of one shard,
    whose first occurrence has global index ``offset`` among ``total``. Row i takes global occurrence
    j = i * total // n (all occurrences when total <= n, else evenly spaced); it is padded with -1 from
    the next separator on. Each row belongs to exactly one shard, so the shards together fill out.
    Returns 0, or CORRUPT when a position or a token read from the arrays is out of range."""
    n = out.shape[0]
    n_tokens = tokens.shape[0]
    if lo < 0 or lo + count > sa.shape[0]:
        return CORRUPT
    starts = np.empty(n, dtype=np.int64)
    # pass 1: gather the start positions (independent loads: the CPU overlaps the cache misses)
    for i in range(n):
        j = (i * total) // n - offset
        starts[i] = -1
        if 0 <= j < count:
            if sa[lo + j] < 0:
                return CORRUPT
            starts[i] = sa[lo + j] + 1
    # pass 2: copy m tokens after each start (T ends with SEP, so q + t stays inside T unless damaged)
    for i in range(n):
        q = starts[i]
        if q < 0:
            continue
        ended = False
        for t in range(m):
            if not ended:
                if q + t >= n_tokens:
                    return CORRUPT
                v = tokens[q + t]
                if v > separator:
                    return CORRUPT
                if v == separator:
                    ended = True
            out[i, t] = -1 if ended else v
    return 0


class Kernels(NamedTuple):
    longest_match: object
    continuations: object


@functools.cache
def kernels(jit: bool = True) -> Kernels:
    """The search kernels, compiled with numba (lazily, cached on disk) unless ``jit`` is False."""
    funcs = (longest_match_kernel, continuations_kernel)
    if not jit:
        return Kernels(*funcs)
    import numba

    return Kernels(*(numba.njit(cache=True, nogil=True)(f) for f in funcs))


def reversed_suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Forward end positions q sorted by T[q], T[q-1], ..., T[0] (the suffix array of T[::-1]).

    pydivsufsort sorts integer arrays by their big-endian bytes (order preserving); int32 output while
    the byte length fits, else int64.
    """
    from pydivsufsort import divsufsort

    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    reversed_tokens = np.ascontiguousarray(tokens[::-1])
    sa = divsufsort(reversed_tokens)
    sa_dtype = np.int32 if n < 2**31 else np.int64
    sa = sa.astype(sa_dtype, copy=False)
    np.subtract(n - 1, sa, out=sa)  # reversed start p -> forward end q = n - 1 - p
    return sa


def bucket_starts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64[vocab_size + 2]: sa[b[t]:b[t+1]] are the positions holding token t (SEP = vocab_size)."""
    counts = np.bincount(tokens, minlength=vocab_size + 1)
    starts = np.zeros(vocab_size + 2, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return starts.astype("<i8", copy=False)
