"""Finished requests' KV caches, kept so that a prompt that starts with an earlier request's tokens
is prefilled from where they end (prefix reuse).

A chat's second turn repeats the first turn's prompt and answer: on MT-Bench 5,233 of the 5,910
second-turn prompt tokens. Without reuse both are prefilled again from scratch (about 1.25 ms a token
in float32 on a 2-core CPU). When a request ends, the rows of its cache that belong to its tokens are
copied here; a later request of the same *scope* (a tenant: nobody's prefill time tells of another's
conversations) starts from a copy of the longest match and prefills only the rest::

    request 1: [system, user 1] + answer 1          ──finish──► kept: rows of [system, user 1, answer 1]
    request 2: [system, user 1, answer 1, user 2]   ──admit───► copy of the match; prefill [user 2] only

Reused rows were computed by other forwards than a fresh prefill would run (verification steps of
another width), so they may differ from a fresh prefill's in the last bits, the same kind of difference
tree verification itself has; the outputs stay the model's own (tests/decode/test_prefix.py compares
them with fresh generations).

Memory is bounded by ``max_bytes`` (least recently used entries go first); an entry whose tokens
extend an older one of the same scope replaces it. Not thread-safe: the generate loop's thread alone
calls it.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from restspec.decode.verify import new_cache
from restspec.errors import GenerationError

DEFAULT_PREFIX_CACHE_MB = 256
"""Default bound of the kept caches (the embedded model's rows take 46 KB a token: about 5,800 tokens)."""


def check_prefix_cache_mb(megabytes: float) -> None:
    """``GenerationError`` unless ``megabytes`` (a bound of the kept caches) is a number >= 0."""
    if not megabytes >= 0:  # also rejects NaN
        raise GenerationError(f"prefix_cache_mb={megabytes} must be >= 0 (0 = no prefix reuse)")


@dataclass(frozen=True, eq=False)
class _Entry:
    scope: Hashable
    tokens: np.ndarray  # int32[n]: what the rows belong to
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys, values), (1, heads, n, dim)
    nbytes: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """Copies of finished requests' cache rows, looked up by the longest common token prefix."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0 (0 = keep nothing)")
        self.max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # oldest first
        self._ids = 0
        self.nbytes = 0
        """Bytes held now."""

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, scope: Hashable, tokens: np.ndarray, cache: Any) -> None:
        """Keep a copy of the first ``len(tokens)`` rows of ``cache`` (a finished request's), which
        belong to ``tokens``; older entries of ``scope`` that ``tokens`` extends are dropped."""
        n = len(tokens)
        layers = [layer for layer in cache.layers if layer.is_initialized]
        if not self.max_bytes or n == 0 or not layers or len(layers) != len(cache.layers):
            return
        if any(layer.keys.shape[-2] < n for layer in layers):
            raise ValueError(f"the cache holds fewer rows than the {n} tokens to keep")
        views = [(layer.keys[:, :, :n], layer.values[:, :, :n]) for layer in layers]
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in views)
        if nbytes > self.max_bytes:
            return
        try:
            rows = tuple((k.clone(), v.clone()) for k, v in views)
        except (MemoryError, RuntimeError):  # out of memory (torch's allocators raise RuntimeError)
            return  # keeping a copy is an optimisation: the finished request is not failed for it
        tokens = np.array(tokens, dtype=np.int32)
        for key, entry in list(self._entries.items()):
            if entry.scope == scope and common_prefix(entry.tokens, tokens) == len(entry.tokens):
                self._drop(key)
        while self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._ids += 1
        self._entries[self._ids] = _Entry(scope, tokens, rows, nbytes)
        self.nbytes += nbytes

    def take(self, scope: Hashable, prompt: np.ndarray) -> tuple[Any, int] | None:
        """A fresh cache holding the rows of the longest kept prefix of ``prompt`` in ``scope``, and
        its length (at most ``len(prompt) - 1``: the last prompt token is the first step's root), or
        None when nothing of ``prompt`` is kept."""
        best, best_len = None, 0
        for key, entry in self._entries.items():
            if entry.scope == scope:
                length = common_prefix(entry.tokens, prompt)
                if length > best_len:
                    best, best_len = key, length
        n = min(best_len, len(prompt) - 1)
        if best is None or n <= 0:
            return None
        self._entries.move_to_end(best)
        cache = new_cache()
        for index, (keys, values) in enumerate(self._entries[best].layers):
            cache.update(keys[:, :, :n], values[:, :, :n], index)
        return cache, n

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
