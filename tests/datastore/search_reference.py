"""Brute-force reference of the search, for tests: no suffix array, every position compared directly.

It defines the answer the fast path must give: the longest suffix of the context (at most max_len,
at least min_len) occurring inside one document; the occurrences ordered shard by shard, and within a
shard by the stream read backwards from the match's last token (``SEP d0 SEP d1 ... SEP`` layout,
SEP = vocab_size, shorter-is-smaller); when there are more than k, row i takes occurrence i*count//k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stream(docs: Sequence[Sequence[int]], separator: int) -> list[int]:
    """SEP d0 SEP d1 ... SEP (empty documents are dropped)."""
    out = [separator]
    for doc in docs:
        if len(doc) == 0:
            continue
        out.extend(int(t) for t in doc)
        out.append(separator)
    return out


def occurrences(tokens: list[int], pattern: Sequence[int]) -> list[int]:
    """End positions q with tokens[q-len+1 .. q] == pattern, in backward-text order."""
    n, length = len(tokens), len(pattern)
    pattern = [int(t) for t in pattern]
    ends = [q for q in range(length - 1, n) if tokens[q - length + 1 : q + 1] == pattern]
    return sorted(ends, key=lambda q: tokens[q::-1])


def brute_longest_match(
    shards: Sequence[Sequence[Sequence[int]]], ctx: Sequence[int], vocab_size: int, max_len: int, min_len: int
) -> tuple[int, list[list[int]]]:
    """(length, per-shard occurrence end positions). length 0 when shorter than min_len."""
    streams = [stream(docs, vocab_size) for docs in shards]
    ctx = [int(t) for t in ctx][-max_len:] if max_len else []
    for length in range(len(ctx), 0, -1):
        pattern = ctx[len(ctx) - length :]
        if any(t < 0 or t >= vocab_size for t in pattern):
            continue
        found = [occurrences(s, pattern) for s in streams]
        if any(found):
            if length < min_len:
                return 0, [[] for _ in streams]
            return length, found
    return 0, [[] for _ in streams]


def brute_continuations(
    shards: Sequence[Sequence[Sequence[int]]],
    ctx: Sequence[int],
    vocab_size: int,
    max_len: int,
    min_len: int,
    k: int,
    m: int,
) -> tuple[int, int, np.ndarray]:
    """(length, count, int32[min(k, count), m] continuations, -1 padded at a separator)."""
    length, found = brute_longest_match(shards, ctx, vocab_size, max_len, min_len)
    streams = [stream(docs, vocab_size) for docs in shards]
    flat = [(s, q) for s, ends in enumerate(found) for q in ends]
    count = len(flat)
    n = min(k, count)
    out = np.full((n, m), -1, dtype=np.int32)
    for i in range(n):
        s, q = flat[(i * count) // n]
        for t in range(m):
            v = streams[s][q + 1 + t]
            if v == vocab_size:
                break
            out[i, t] = v
    return length, count, out
