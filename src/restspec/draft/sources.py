"""Drafters that retrieve: a datastore (REST), the request's own context, outputs of earlier requests.

Each finds the longest suffix of the context that occurs in its text, gathers what followed its
occurrences and keeps the most frequent continuations as a tree (:func:`select_tree`). A node's
weight is its count over the number of occurrences plus ``prior_rows`` (a few occurrences are weak
evidence: one occurrence gives 1 / (1 + prior_rows), not certainty). The tree's ``match_length`` is
the length of the matched suffix, for :class:`~restspec.draft.merge.MergedDrafter`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from restspec.draft.base import StatelessDrafter, Step, check_state_keys
from restspec.draft.lookup import SEPARATOR, longest_suffix_continuations
from restspec.draft.tree import DraftTree
from restspec.draft.trie import select_tree

if TYPE_CHECKING:
    from restspec.datastore import Datastore


@dataclass(frozen=True)
class LookupConfig:
    """How a retrieving drafter searches and counts."""

    max_len: int = 16
    """Longest context suffix searched for."""
    min_len: int = 2
    """Shortest suffix accepted as a match."""
    k: int = 5000
    """Most occurrences whose continuations are counted."""
    m: int = 10
    """Tokens of continuation taken after each occurrence (the deepest a tree can be)."""
    prior_rows: float = 1.0
    """Pseudo-occurrences that followed none of the drafted paths: weight = count / (n + prior_rows)."""

    def __post_init__(self) -> None:
        if self.min_len < 1:
            raise ValueError(f"min_len={self.min_len} must be >= 1")
        if self.max_len < self.min_len:
            raise ValueError(f"max_len={self.max_len} must be >= min_len={self.min_len}")
        if self.k < 1:
            raise ValueError(f"k={self.k} must be >= 1")
        if self.m < 1:
            raise ValueError(f"m={self.m} must be >= 1")
        if self.prior_rows < 0:
            raise ValueError(f"prior_rows={self.prior_rows} must be >= 0")


def tree_from_continuations(
    continuations: np.ndarray, budget: int, prior_rows: float, match_length: int
) -> DraftTree:
    """:func:`select_tree` with weights shrunk to count / (n + prior_rows), drafted from a suffix match
    of ``match_length`` tokens."""
    tree = select_tree(continuations, budget, denominator=len(continuations) + prior_rows)
    return DraftTree(tree.tokens, tree.parents, tree.weights, match_length=match_length)


def _context_array(context: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(context, dtype=np.int32)


class DatastoreDrafter(StatelessDrafter):
    """REST: the longest context suffix (``min_len`` to ``max_len`` tokens) found in the datastores,
    and a tree of the most frequent continuations after up to ``k`` of its occurrences.

    Over several datastores the longest match wins; datastores that match it equally contribute
    their continuations together."""

    def __init__(
        self,
        datastores: Datastore | Sequence[Datastore],
        max_len: int = 16,
        min_len: int = 2,
        k: int = 5000,
        m: int = 10,
        prior_rows: float = 1.0,
    ) -> None:
        self.datastores = [datastores] if hasattr(datastores, "longest_match") else list(datastores)
        self.config = LookupConfig(max_len=max_len, min_len=min_len, k=k, m=m, prior_rows=prior_rows)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        cfg = self.config
        if budget <= 0 or not self.datastores:
            return DraftTree.empty()
        ids = _context_array(context)
        matches = [ds.longest_match(ids, cfg.max_len, cfg.min_len) for ds in self.datastores]
        best = max(match.length for match in matches)
        if best == 0:
            return DraftTree.empty()
        rows = [
            ds.continuations(match, cfg.k, cfg.m)
            for ds, match in zip(self.datastores, matches, strict=True)
            if match.length == best
        ]
        continuations = rows[0] if len(rows) == 1 else np.concatenate(rows)[: cfg.k]
        return tree_from_continuations(continuations, budget, cfg.prior_rows, best)


class ContextDrafter(StatelessDrafter):
    """Prompt lookup as a tree: the longest context suffix (``min_len`` to ``max_len`` tokens) that
    occurred earlier in the same context, and the most frequent continuations over all its earlier
    occurrences (up to ``k``, the most recent first). ``m=16``: long copied spans pay off on code
    (``python -m benchmarks.replay``)."""

    def __init__(
        self, max_len: int = 16, min_len: int = 1, k: int = 256, m: int = 16, prior_rows: float = 1.0
    ) -> None:
        self.config = LookupConfig(max_len=max_len, min_len=min_len, k=k, m=m, prior_rows=prior_rows)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        cfg = self.config
        if budget <= 0:
            return DraftTree.empty()
        ids = _context_array(context)
        found = longest_suffix_continuations(
            ids, ids, end=len(ids), max_len=cfg.max_len, min_len=cfg.min_len, m=cfg.m, max_rows=cfg.k
        )
        if found.length == 0:
            return DraftTree.empty()
        return tree_from_continuations(found.continuations, budget, cfg.prior_rows, found.length)


class HistoryDrafter:
    """Outputs of earlier requests in this process, searched like :class:`ContextDrafter`.

    Keeps at most ``max_tokens`` tokens of past outputs (the oldest outputs are evicted first). An
    output joins the history at :meth:`stop_request`; with ``persist`` (a datastore) outputs are also
    appended to it as a new shard once ``persist_every`` tokens have gathered (every shard costs a
    suffix-array build and a search per lookup, so not one per request), and by :meth:`flush`,
    which the owner calls before exiting, so later processes can draft from them."""

    def __init__(
        self,
        max_tokens: int = 200_000,
        persist: Datastore | None = None,
        persist_every: int = 16_384,
        max_len: int = 16,
        min_len: int = 2,
        k: int = 256,
        m: int = 10,
        prior_rows: float = 1.0,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        if persist_every < 1:
            raise ValueError(f"persist_every={persist_every} must be >= 1")
        self.max_tokens = max_tokens
        self.persist = persist
        self.persist_every = persist_every
        self._pending: list[np.ndarray] = []  # outputs not yet appended to ``persist``
        self.config = LookupConfig(max_len=max_len, min_len=min_len, k=k, m=m, prior_rows=prior_rows)
        self._outputs: deque[np.ndarray] = deque()
        self._stored = 0
        self._buffer = np.zeros(0, np.int32)  # outputs joined by SEPARATOR, oldest first
        self._current: dict[int, list[np.ndarray]] = {}  # per request in flight: its output so far

    @property
    def num_tokens(self) -> int:
        """Tokens of past outputs held (separators not counted)."""
        return self._stored

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        if request in self._current:
            raise ValueError(f"start_request called twice for request {request} without stop_request")
        self._current[request] = []

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        cfg = self.config
        if budget <= 0 or len(self._buffer) == 0:
            return DraftTree.empty()
        found = longest_suffix_continuations(
            self._buffer,
            _context_array(context),
            max_len=cfg.max_len,
            min_len=cfg.min_len,
            m=cfg.m,
            max_rows=cfg.k,
        )
        if found.length == 0:
            return DraftTree.empty()
        return tree_from_continuations(found.continuations, budget, cfg.prior_rows, found.length)

    def observe(self, step: Step) -> None:
        current = self._current.get(step.request)
        if current is None:
            raise ValueError(f"observe called outside request {step.request}: call start_request first")
        current.append(np.asarray(step.accepted, dtype=np.int32))

    def stop_request(self, request: int = 0) -> None:
        current = self._current.pop(request, None)
        if current is None:
            raise ValueError(f"stop_request called for request {request} without start_request")
        self.add(np.concatenate(current) if current else np.zeros(0, np.int32))

    def state_dict(self) -> dict[str, Any]:
        """The held outputs: ``tokens`` int32[N] (joined, oldest first), ``lengths`` int64[n]."""
        joined = np.concatenate(self._outputs) if self._outputs else np.zeros(0, np.int32)
        return {"tokens": joined.copy(), "lengths": np.asarray([len(o) for o in self._outputs], np.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hold these outputs instead (not appended to ``persist``: they were outputs of another run)."""
        check_state_keys(self, state, {"tokens", "lengths"})
        tokens = np.asarray(state["tokens"], np.int32)
        lengths = np.asarray(state["lengths"], np.int64)
        if lengths.ndim != 1 or (lengths < 1).any() or int(lengths.sum()) != len(tokens):
            raise ValueError(f"history lengths {lengths.tolist()} do not split {len(tokens)} tokens")
        if self._current:
            raise ValueError("load_state_dict called while requests are in flight: stop them first")
        self._outputs.clear()
        self._stored = 0
        for output in np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []:
            self._hold(output.copy())
        self._rebuild()

    def add(self, output: np.ndarray) -> None:
        """Add one finished output (int32[T]) to the history (and to ``persist``)."""
        output = np.asarray(output, dtype=np.int32)
        if len(output) == 0:
            return
        if self.persist is not None:
            self._pending.append(output)
            if sum(len(o) for o in self._pending) >= self.persist_every:
                self.flush()
        self._hold(output)
        self._rebuild()

    def _hold(self, output: np.ndarray) -> None:
        """Keep ``output`` (its last ``max_tokens`` tokens), evicting the oldest beyond ``max_tokens``."""
        output = output[-self.max_tokens :]
        self._outputs.append(output)
        self._stored += len(output)
        while self._stored > self.max_tokens:
            self._stored -= len(self._outputs.popleft())

    def _rebuild(self) -> None:
        """The search buffer from the held outputs."""
        parts = [np.zeros(0, np.int32)]
        for out in self._outputs:
            parts.extend((out, np.array([SEPARATOR], np.int32)))
        self._buffer = np.concatenate(parts)
        self._buffer.setflags(write=False)  # read-only like the generate loop's context (one compiled lookup)

    def flush(self) -> None:
        """Append the outputs gathered since the last flush to ``persist`` as one shard."""
        if self.persist is not None and self._pending:
            pending, self._pending = self._pending, []
            self.persist.append_tokens(pending)
