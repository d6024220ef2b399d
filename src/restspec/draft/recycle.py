"""Token Recycling (Luo et al., 2024): draft from the model's own recent top candidates.

An adjacency table ``table[V, k]`` holds, for every token, the model's k most likely next tokens
the last time the model scored a position holding that token (best first; -1 = never seen). The
verification pass scores every tree node anyway, so :meth:`RecycleDrafter.observe` refreshes the
rows of all verified inputs (accepted or not) for free.

Drafting expands a tree from the last context token: node children are the table row of its token.
Which (rank path) nodes to expand is a static *template* chosen best-first by the estimated
probability that the path is accepted, the product of per-rank hit rates along it:
``hit[r]`` = how often the table's rank-r candidate turned out to be the model's next token,
tracked online in ``observe`` (starting from ``INITIAL_HIT_RATES``).
"""

from __future__ import annotations

import heapq
from typing import Any

import numba as nb
import numpy as np

from restspec.draft.base import Step, check_state_keys, check_state_shape
from restspec.draft.tree import DraftTree

INITIAL_HIT_RATES = (0.35, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)
"""Prior rank hit rates (rank 0 first), extended by the last value for larger k."""
PRIOR_STRENGTH = 20.0
"""Pseudo-observations behind the prior hit rates."""
TEMPLATE_SLACK = 2
"""The template holds ``TEMPLATE_SLACK * budget`` paths: some drop out when a table row is unknown."""
TEMPLATE_REFRESH = 64
"""Rebuild the template after this many new hit observations."""


_STATE_KEYS = {
    "table",
    "hits",
    "trials",
    "template_parents",
    "template_ranks",
    "template_probs",
    "template_size",
    "since_refresh",
}


TOP_K_BLOCK = 64
"""Logits per block in :func:`top_k_rows`: once k candidates are held, a block whose maximum does not
beat the k-th is skipped after one pass over it (most of a row's 49152 logits on SmolLM2)."""


@nb.njit(cache=True, inline="always")
def _block_max(row, start, stop):  # pragma: no cover - compiled
    best = row[start]
    for v in range(start + 1, stop):
        x = row[v]
        best = x if x > best else best
    return best


@nb.njit(cache=True)
def _top_k_rows_kernel(logits, k, block):  # pragma: no cover - compiled
    n, vocab = logits.shape
    out = np.empty((n, k), np.int32)
    best = np.empty(k, np.float32)
    for r in range(n):
        row = logits[r]
        size = 0
        for start in range(0, vocab, block):
            stop = min(start + block, vocab)
            if size == k and not _block_max(row, start, stop) > best[k - 1]:
                continue  # nothing in this block enters the top k
            for v in range(start, stop):
                x = row[v]
                if size == k and not x > best[k - 1]:  # the common case: one comparison per token
                    continue
                i = size if size < k else k - 1
                if size < k:
                    size += 1
                while i > 0 and best[i - 1] < x:  # insertion: equal values keep the lower id first
                    best[i] = best[i - 1]
                    out[r, i] = out[r, i - 1]
                    i -= 1
                best[i] = x
                out[r, i] = v
        for i in range(size, k):
            out[r, i] = -1
    return out


def top_k_rows(logits: np.ndarray, k: int) -> np.ndarray:
    """int32[n, k]: the k highest logits' token ids per row of float[n, V], best first (ties: lower
    id first). Same as ``TreeLogits.top_candidates`` in one pass per row (no partition copies)."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [n, V], got shape {logits.shape}")
    return _top_k_rows_kernel(logits, min(k, logits.shape[1]), TOP_K_BLOCK)


@nb.njit(cache=True)
def _refresh_rows(table, hits, inputs, top):  # pragma: no cover - compiled
    """Score, then overwrite, the table rows of ``inputs`` with their new top candidates ``top``.

    For each input whose row was known before the step (rows read before any is written, so a token
    verified twice is scored against its old row both times), ``hits[r]`` counts old rank r holding
    the new top-1. Returns how many inputs had a known row."""
    n, width = top.shape
    old = np.empty((n, table.shape[1]), table.dtype)
    for r in range(n):
        old[r] = table[inputs[r]]
    known = 0
    for r in range(n):
        if old[r, 0] < 0:
            continue
        known += 1
        for rank in range(old.shape[1]):
            if old[r, rank] == top[r, 0]:
                hits[rank] += 1.0
    for r in range(n):  # in order: a token verified twice keeps its last row
        table[inputs[r], :width] = top[r]
    return known


def best_first_template(
    hit: np.ndarray, size: int, max_depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``size`` rank paths of highest probability (product of ``hit`` along the path).

    Returns (parents int32[n], ranks int32[n], probs float64[n]) ordered by falling probability,
    parents first (a child's probability never exceeds its parent's, since every hit <= 1)."""
    k = len(hit)
    parents: list[int] = []
    ranks: list[int] = []
    probs: list[float] = []
    depths: list[int] = []
    # heap of (-prob, counter, parent, rank, depth); counter makes ties deterministic
    heap = [(-float(hit[0]), 0, -1, 0, 1)]
    counter = 1
    while heap and len(parents) < size:
        neg, _, parent, rank, depth = heapq.heappop(heap)
        node = len(parents)
        parents.append(parent)
        ranks.append(rank)
        probs.append(-neg)
        depths.append(depth)
        if rank + 1 < k:  # next sibling
            prob_sibling = (probs[parent] if parent >= 0 else 1.0) * float(hit[rank + 1])
            heapq.heappush(heap, (-prob_sibling, counter, parent, rank + 1, depth))
            counter += 1
        if depth < max_depth:  # first child
            heapq.heappush(heap, (neg * float(hit[0]), counter, node, 0, depth + 1))
            counter += 1
    return np.asarray(parents, np.int32), np.asarray(ranks, np.int32), np.asarray(probs, np.float64)


class RecycleDrafter:
    """Drafts from an adjacency table of the model's own top-``k`` next tokens (Token Recycling).

    The table and hit rates persist across requests (they describe the model, not the request)."""

    def __init__(self, vocab_size: int, k: int = 8, max_depth: int = 8) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        if max_depth < 1:
            raise ValueError(f"max_depth={max_depth} must be >= 1")
        self.vocab_size = vocab_size
        self.k = k
        self.max_depth = max_depth
        self.table = np.full((vocab_size, k), -1, np.int32)  # (V, k), best first
        prior = np.asarray(INITIAL_HIT_RATES + (INITIAL_HIT_RATES[-1],) * max(0, k - len(INITIAL_HIT_RATES)))
        self._prior = prior[:k]
        self.hits = np.zeros(k, np.float64)  # times the rank-r candidate was the model's next token
        self.trials = 0.0  # rows checked (with a known table row)
        self._template: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._template_size = 0
        self._since_refresh = 0

    @property
    def hit_rates(self) -> np.ndarray:
        """float64[k]: estimated probability that the rank-r candidate is the model's next token."""
        return (self.hits + PRIOR_STRENGTH * self._prior) / (self.trials + PRIOR_STRENGTH)

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        return None

    def stop_request(self, request: int = 0) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """``table`` int32[V, k], rank ``hits`` float64[k], ``trials``, and the drafting template in
        use (``template_parents``, ``template_ranks``, ``template_probs``: empty when none is built;
        ``template_size``, ``since_refresh``), so a loaded drafter proposes the same trees."""
        parents, ranks, probs = self._template or (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
        return {
            "table": self.table.copy(),
            "hits": self.hits.copy(),
            "trials": float(self.trials),
            "template_parents": parents.copy(),
            "template_ranks": ranks.copy(),
            "template_probs": probs.copy(),
            "template_size": self._template_size if self._template is not None else 0,
            "since_refresh": self._since_refresh,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state, _STATE_KEYS)
        table = check_state_shape("table", state["table"], self.table.shape)
        hits = check_state_shape("hits", state["hits"], self.hits.shape)
        n = len(np.asarray(state["template_parents"]))
        parents, ranks, probs = (
            check_state_shape(f"template_{name}", state[f"template_{name}"], (n,)).astype(dtype)
            for name, dtype in (("parents", np.int32), ("ranks", np.int32), ("probs", np.float64))
        )
        self.table = np.array(table, np.int32)
        self.hits = np.array(hits, np.float64)
        self.trials = float(state["trials"])
        self._template = (parents, ranks, probs) if n else None
        self._template_size = int(state["template_size"])
        self._since_refresh = int(state["since_refresh"])

    def _get_template(self, size: int):
        if self._template is None or self._template_size < size or self._since_refresh >= TEMPLATE_REFRESH:
            self._template = best_first_template(self.hit_rates, size, self.max_depth)
            self._template_size = size
            self._since_refresh = 0
        return self._template

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if budget <= 0 or len(context) == 0:
            return DraftTree.empty()
        root = int(context[-1])
        if not 0 <= root < self.vocab_size or self.table[root, 0] < 0:
            return DraftTree.empty()
        parents, ranks, probs = self._get_template(TEMPLATE_SLACK * budget)
        n = len(parents)
        # instantiate: token[i] = table[token[parent i], rank i]; a node under an unknown row is dropped
        tokens = np.full(n, -1, np.int64)
        for i in range(n):  # parents precede children; n <= 2 * budget
            p = parents[i]
            source = root if p < 0 else tokens[p]
            if source >= 0:
                tokens[i] = self.table[source, ranks[i]]
        keep = np.flatnonzero(tokens >= 0)[:budget]
        if len(keep) == 0:
            return DraftTree.empty()
        position = np.full(n, -1, np.int64)
        position[keep] = np.arange(len(keep))
        kept_parents = parents[keep]
        tree_parents = np.where(kept_parents >= 0, position[np.maximum(kept_parents, 0)], -1)
        # match_length 1: the table row of the root, its last token, is what it drafted from
        return DraftTree(tokens[keep], tree_parents, np.minimum(probs[keep], 1.0), match_length=1)

    def observe(self, step: Step) -> None:
        """Refresh the table rows of every verified input from its logits; count rank hits.

        A rank hit is scored for each input whose row was known before: which rank of the old row
        was the model's new top-1 token (a miss when it was in none)."""
        logits = step.logits
        if logits is None:
            self._learn_pairs(step.context, step.accepted)
            return
        inputs = np.asarray(logits.input_ids, dtype=np.int64)
        valid = (inputs >= 0) & (inputs < self.vocab_size)
        rows = logits.logits
        if not valid.all():
            inputs, rows = inputs[valid], rows[valid]
        if len(inputs) == 0:
            return
        known = _refresh_rows(self.table, self.hits, inputs, top_k_rows(rows, self.k))
        self.trials += known
        self._since_refresh += known

    def _learn_pairs(self, context: np.ndarray, accepted: np.ndarray) -> None:
        """Without logits: move each observed next token to the front of its predecessor's row."""
        if len(context) == 0 or len(accepted) == 0:
            return
        seq = np.concatenate([np.asarray(context[-1:], np.int64), np.asarray(accepted, np.int64)])
        for prev, nxt in zip(seq[:-1].tolist(), seq[1:].tolist(), strict=True):  # len(accepted) pairs
            if not (0 <= prev < self.vocab_size and 0 <= nxt < self.vocab_size):
                continue
            row = self.table[prev]
            rest = row[(row != nxt) & (row >= 0)]
            new = np.full(self.k, -1, np.int32)
            new[0] = nxt
            new[1 : 1 + min(len(rest), self.k - 1)] = rest[: self.k - 1]
            self.table[prev] = new
