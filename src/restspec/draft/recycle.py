"""Token Recycling (Luo et al., 2024): draft from the model's own recent top candidates.

An adjacency table ``table[V, k]`` holds, for every token, the model's k most likely next tokens
the last time the model scored a position holding that token (best first; -1 = never seen). The
verification pass scores every tree node anyway, so :meth:`RecycleDrafter.observe` refreshes the
rows of all verified inputs (accepted or not) for free.

Drafting expands a tree from the last context token, best first: a node's children are its token's
table row, each with the probability that the path is accepted, the parent's times a rate learned
online in ``observe`` (starting from ``INITIAL_HIT_RATES``). The rate of a rank-r candidate is
learned per rank in the row of the token *before* the node as well (LogitSpec's next-next-token
observation, Liu et al., 2025: the model's runners-up for one position often hold the token after
it). Below the root that row is the one verification just computed, whose top token the root is; in
the recorded MT-Bench references a rank-0 candidate that also stands at rank 1-3 there is right
about 75-80 % of the time, against about 41 % otherwise. Rows are kept per token and per pair of
tokens (the token before and the token): a pair seen before drafts from its own row.
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np

from restspec.draft.base import Step, check_state_keys, check_state_shape
from restspec.draft.merge import Candidates, RecycleRows, extend_best_first, pair_slot, row_of
from restspec.draft.tree import DraftTree

INITIAL_HIT_RATES = (0.35, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)
"""Prior rank hit rates (rank 0 first), whatever the rank in the row of the token before, extended by
the last value for larger k. A prior that doubled them where the row before agrees (what the
recorded references show) over-spent the adaptive budget while cold: on 8 HumanEval prompts the mix
lost 2.7 % of predicted speed against Token Recycling's rates, and gained 3.5 % with this one
(``python -m benchmarks.sources``)."""
PRIOR_STRENGTH = 8.0
"""Pseudo-observations behind the prior of each (row kind, rank, rank before) rate."""

PAIR_SLOTS = 1 << 17
"""Pairs of tokens whose rows are held (a direct-mapped hash table; 4 MiB of rows for k = 8)."""

_STATE_KEYS = {"table", "pair_keys", "pair_rows", "hits", "trials"}


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
def _refresh_rows(
    table, pair_keys, pair_rows, hits, trials, inputs, before, top
):  # pragma: no cover - compiled
    """Score, then overwrite, the rows of ``inputs`` with their new top candidates ``top``.

    ``before[i]``: the token before input i on its path (-1 = unknown). Each input's old row is the
    one drafting used (the pair row of (before, input) where held, else the input's own row; read
    before any row is written, so a token verified twice is scored against its old row both times).
    Each known candidate of it, rank r, counts a trial in ``trials[q, r, s]`` (q: 1 for a pair row;
    s: its rank in the old row of the token before, k when not there) and a hit in ``hits[q, r, s]``
    when it is the new top-1. Then the input's own row and its pair's row become ``top``."""
    n, width = top.shape
    vocab, k = table.shape
    old = np.empty((n, k), table.dtype)
    kinds = np.empty(n, np.int64)
    old_before = np.full((n, k), -1, table.dtype)
    for i in range(n):
        row, kinds[i] = row_of(inputs[i], before[i], table, pair_keys, pair_rows)
        old[i] = row
        if 0 <= before[i] < vocab:
            old_before[i] = table[before[i]]
    for i in range(n):
        for r in range(k):
            if old[i, r] < 0:
                continue
            s = k
            for j in range(k):
                if old_before[i, j] == old[i, r]:
                    s = j
                    break
            trials[kinds[i], r, s] += 1.0
            if old[i, r] == top[i, 0]:
                hits[kinds[i], r, s] += 1.0
    for i in range(n):  # in order: a token verified twice keeps its last row
        table[inputs[i], :width] = top[i]
        if 0 <= before[i] < vocab:
            key = before[i] * vocab + inputs[i]
            slot = pair_slot(key, len(pair_keys))
            pair_keys[slot] = key
            pair_rows[slot] = -1
            pair_rows[slot, :width] = top[i]


class RecycleDrafter:
    """Drafts from the model's own recent top-``k`` next tokens (Token Recycling), after each token
    and after each pair of tokens seen lately (``pair_slots`` of them at most, a power of two).

    The rows and rates persist across requests (they describe the model, not the request)."""

    def __init__(self, vocab_size: int, k: int = 8, max_depth: int = 8, pair_slots: int = PAIR_SLOTS) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        if max_depth < 1:
            raise ValueError(f"max_depth={max_depth} must be >= 1")
        if pair_slots < 1 or pair_slots & (pair_slots - 1):
            raise ValueError(f"pair_slots={pair_slots} must be a power of two")
        self.vocab_size = vocab_size
        self.k = k
        self.max_depth = max_depth
        self.rows = RecycleRows(
            np.full((vocab_size, k), -1, np.int32),
            np.full(pair_slots, -1, np.int64),
            np.full((pair_slots, k), -1, np.int32),
        )
        padded = INITIAL_HIT_RATES + (INITIAL_HIT_RATES[-1],) * max(0, k - len(INITIAL_HIT_RATES))
        rank = np.asarray(padded[:k])
        # [own row or pair's, rank, rank in the row before]
        self._prior = np.broadcast_to(rank[None, :, None], (2, k, k + 1)).copy()
        self.hits = np.zeros((2, k, k + 1))  # times the candidate was the model's next token
        self.trials = np.zeros((2, k, k + 1))  # candidates checked

    @property
    def table(self) -> np.ndarray:
        """int32[V, k]: the model's recent top-k next tokens after each token (-1 = unknown)."""
        return self.rows.table

    @property
    def rates(self) -> np.ndarray:
        """float64[2, k, k + 1]: estimated probability that the rank-r candidate of a token's own row
        (``[0]``) or of a pair's row (``[1]``) is the model's next token, when the row of the token
        before holds it at rank s (s = k: not at all)."""
        return (self.hits + PRIOR_STRENGTH * self._prior) / (self.trials + PRIOR_STRENGTH)

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        return None

    def stop_request(self, request: int = 0) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """``table`` int32[V, k], ``pair_keys`` int64[S], ``pair_rows`` int32[S, k] (:class:`RecycleRows`);
        ``hits`` and ``trials`` float64[2, k, k + 1], behind :attr:`rates`."""
        return {
            "table": self.rows.table.copy(),
            "pair_keys": self.rows.pair_keys.copy(),
            "pair_rows": self.rows.pair_rows.copy(),
            "hits": self.hits.copy(),
            "trials": self.trials.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state, _STATE_KEYS)
        checked = {
            name: check_state_shape(name, state[name], current.shape)
            for name, current in (
                ("table", self.rows.table),
                ("pair_keys", self.rows.pair_keys),
                ("pair_rows", self.rows.pair_rows),
                ("hits", self.hits),
                ("trials", self.trials),
            )
        }
        self.rows = RecycleRows(
            np.array(checked["table"], np.int32),
            np.array(checked["pair_keys"], np.int64),
            np.array(checked["pair_rows"], np.int32),
        )
        self.hits = np.array(checked["hits"], np.float64)
        self.trials = np.array(checked["trials"], np.float64)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        empty = Candidates(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
        tree = extend_best_first(empty, context, self.rows, self.rates, budget, self.max_depth)
        # match_length 1: the table row of the root, its last token, is what it drafted from
        return DraftTree(tree.tokens, tree.parents, tree.weights, match_length=1) if len(tree) else tree

    def observe(self, step: Step) -> None:
        """Refresh the rows of every verified input from its logits; count rank hits.

        ``step.logits`` holds the root's row, then one row per node of ``step.tree``; inputs outside
        the vocabulary (a replay marks the rows it lacks with -1) are skipped."""
        logits = step.logits
        if logits is None:
            self._learn_pairs(step.context, step.accepted)
            return
        inputs = np.asarray(logits.input_ids, dtype=np.int64)
        if len(inputs) != len(step.tree) + 1:
            raise ValueError(
                f"the step's logits have {len(inputs)} rows, its tree {len(step.tree)} nodes: "
                "the rows must be the root's, then one per node"
            )
        # the token before each input on its path: context[-2] before the root, the parent's token
        before = np.empty(len(inputs), np.int64)
        before[0] = step.context[-2] if len(step.context) > 1 else -1
        before[1:] = inputs[step.tree.parents.astype(np.int64) + 1]
        valid = (inputs >= 0) & (inputs < self.vocab_size)
        rows = logits.logits
        if not valid.all():
            inputs, before, rows = inputs[valid], before[valid], rows[valid]
        if len(inputs):
            top = top_k_rows(rows, self.k)
            _refresh_rows(*self.rows, self.hits, self.trials, inputs, before, top)

    def _learn_pairs(self, context: np.ndarray, accepted: np.ndarray) -> None:
        """Without logits: move each observed next token to the front of its predecessor's row and
        of its predecessor pair's row."""
        if len(context) == 0 or len(accepted) == 0:
            return
        head = len(context[-2:])
        seq = np.concatenate([np.asarray(context[-2:], np.int64), np.asarray(accepted, np.int64)])
        ok = (seq >= 0) & (seq < self.vocab_size)
        table, pair_keys, pair_rows = self.rows
        for i in range(head - 1, len(seq) - 1):  # len(accepted) tokens, each after seq[i]
            prev, nxt = int(seq[i]), int(seq[i + 1])
            if not (ok[i] and ok[i + 1]):
                continue
            _to_front(table[prev], nxt)
            if i > 0 and ok[i - 1]:
                key = int(seq[i - 1]) * self.vocab_size + prev
                slot = pair_slot(key, len(pair_keys))
                if pair_keys[slot] != key:
                    pair_keys[slot] = key
                    pair_rows[slot] = -1
                _to_front(pair_rows[slot], nxt)


def _to_front(row: np.ndarray, token: int) -> None:
    """Move ``token`` to the front of ``row`` (int32[k], best first, -1 = unknown), in place."""
    rest = row[(row != token) & (row >= 0)]
    row[:] = -1
    row[0] = token
    row[1 : 1 + min(len(rest), len(row) - 1)] = rest[: len(row) - 1]
