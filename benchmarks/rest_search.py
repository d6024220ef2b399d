"""REST's retrieval, as published, for the datastore benchmark's baseline: a plain forward suffix array,
searched span by span (the longest context suffix first, 16, 15, ..., 2 tokens, one binary search
each) and the first k occurrences of the winning span gathered.

restspec's own search (:mod:`restspec.datastore.search`) narrows one range on a reversed suffix array
instead, so no span is searched twice; :mod:`benchmarks.datastore` times both on the same tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba.extending import register_jitable


def forward_suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Plain suffix array (REST's index), for the baseline in the benchmark."""
    from pydivsufsort import divsufsort

    sa = divsufsort(np.ascontiguousarray(tokens))
    return sa.astype(np.int32 if len(tokens) < 2**31 else np.int64, copy=False)


@register_jitable
def _rest_span_bound(tokens, fsa, ctx, start, length, a, b, upper):  # pragma: no cover - run compiled
    """Binary search in fsa[a:b] against the pattern ctx[start:start+length]: the first i whose suffix
    tokens[fsa[i]:] compares >= the pattern on its first ``length`` tokens (> it when ``upper``), else b.
    A suffix that ends before ``length`` tokens counts as smaller."""
    n = fsa.shape[0]
    while a < b:
        mid = (a + b) >> 1
        p = fsa[mid]
        cmp = 0
        for t in range(length):
            if p + t >= n:
                cmp = -1
                break
            x = tokens[p + t]
            y = ctx[start + t]
            if x != y:
                cmp = -1 if x < y else 1
                break
        if cmp < 0 or (upper and cmp == 0):
            a = mid + 1
        else:
            b = mid
    return a


def rest_span_search_kernel(tokens, fsa, ctx, max_len, min_len):  # pragma: no cover
    """REST's strategy on a plain forward suffix array ``fsa`` of ``tokens``: for L = max_len .. min_len,
    binary-search the range of ctx[-L:]; the first non-empty one wins. Returns (length, lo, hi)."""
    n = fsa.shape[0]
    n_ctx = ctx.shape[0]
    for length in range(min(max_len, n_ctx), min_len - 1, -1):
        start = n_ctx - length
        lo = _rest_span_bound(tokens, fsa, ctx, start, length, 0, n, False)  # first suffix >= pattern
        hi = _rest_span_bound(tokens, fsa, ctx, start, length, lo, n, True)  # first suffix > pattern
        if hi > lo:
            return length, lo, hi
    return 0, 0, 0


def rest_continuations_kernel(tokens, fsa, lo, hi, length, k, m, separator, out):  # pragma: no cover
    """REST's gathering: the first k occurrences of the range, m tokens after each (stops at SEP)."""
    n = min(hi - lo, k)
    for i in range(n):
        q = fsa[lo + i] + length
        for t in range(m):
            if q + t >= tokens.shape[0]:
                break
            v = tokens[q + t]
            if v == separator:
                break
            out[i, t] = v
    return n


class RestKernels(NamedTuple):
    span_search: object
    continuations: object


@functools.cache
def rest_kernels() -> RestKernels:
    """REST's search kernels compiled with numba (lazily, cached on disk); ``_rest_span_bound`` is
    ``register_jitable``, so it is compiled into the kernel that calls it."""
    import numba

    funcs = (rest_span_search_kernel, rest_continuations_kernel)
    return RestKernels(*(numba.njit(cache=True, nogil=True)(f) for f in funcs))
