"""Several draft sources in one tree under one budget.

Every source proposes its own best ``budget`` nodes. Each node gets an estimated acceptance
probability: the chance that verification accepts it given that it accepted its parent, starting
from the source's own weights and calibrated online per source from what verification accepted
(:class:`Calibration`), multiplied along the node's path. Nodes with the same path from different
sources become one node (probability: the maximum over sources, or the noisy-or). The merged tree
keeps the ``budget`` nodes of highest probability, ties broken by depth then path token ids. Since a
parent's probability is never below its child's, the result is prefix-closed, and a node is dropped
only when ``budget`` nodes rank at least as high: a merge never drops a path that a single source
ranks above a kept one.

An *extender* (``extender=``, a :class:`~restspec.draft.recycle.RecycleDrafter`) drafts no tree of
its own from the root: every merged node (and the root) offers the model's recent top candidates
after its last two tokens as children, with probability p(node) * the candidate's rate (by its rank,
and its rank in the row of the token before), and the final ``budget`` nodes are taken best-first
from candidates and extensions alike
(:func:`extend_best_first`). On HumanEval this lifts short retrieved chains and gives
recycling the context it lacks (``python -m benchmarks.replay``).

Last, the tree's probabilities go through a map per depth learned from what verification accepted
(:class:`WeightCalibration`), in the same node order: the weights of the proposed tree are the
drafter's acceptance probabilities, the ones a budget prices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

import numba as nb
import numpy as np

from restspec.draft.base import Drafter, Step, check_state_keys, check_state_shape
from restspec.draft.tree import DraftTree, node_depths

MATCH_LENGTH_EDGES = np.array([1, 2, 3, 4, 6, 9])
"""Match-length buckets (a tree's ``match_length``): 0, 1, 2, 3, 4-5, 6-8, 9+ tokens (0 = none)."""
MAX_DEPTH_BUCKET = 6
"""Depths 1..5 have their own bucket, 6 and deeper share one."""
WEIGHT_BUCKETS = 10
"""A source's own weight is bucketed in tenths."""
CORRECTION_KNOTS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Weights at which :class:`WeightCalibration`'s map is a free parameter (linear in between)."""
CORRECTION_DEPTH_EDGES: tuple[int, ...] = (2, 3, 5, 9)
"""Depth buckets with a weight map of their own: 1, 2, 3-4, 5-8, 9 and deeper."""
CORRECTION_PRIOR = 4.0
"""Ridge strength pulling the learned map toward the prior map ``w ** 2``."""
CORRECTION_DECAY = 0.999
"""Per-step decay of the correction statistics (memory of about a thousand steps)."""
CORRECTION_REFIT_STEPS = 8
"""Refit the map every this many observed steps."""


@nb.njit(cache=True)
def _outcomes(tokens, parents, depths, accepted):  # pragma: no cover - compiled
    """(known, hit) bool[n] as :func:`node_outcomes` returns them."""
    n = len(tokens)
    known = np.zeros(n, np.bool_)
    hit = np.zeros(n, np.bool_)
    for i in range(n):
        p = parents[i]
        if depths[i] <= len(accepted) and (p < 0 or hit[p]):
            known[i] = True
            hit[i] = tokens[i] == accepted[depths[i] - 1]
    return known, hit


def node_outcomes(tree: DraftTree, accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which nodes verification settled, and which of those were accepted.

    ``accepted``: the tokens the step gained (accepted drafts + the model's next token), so the
    model's choice is known at depths 1..len(accepted). Returns (known bool[n], hit bool[n]): a node
    is known when its parent was hit (or it hangs below the root) and its depth <= len(accepted)."""
    return _outcomes(tree.tokens, tree.parents, tree.depths, np.asarray(accepted, dtype=np.int64))


@nb.njit(cache=True)
def _conditional(weights, parents):  # pragma: no cover - compiled
    n = len(weights)
    out = np.empty(n, np.float64)
    for i in range(n):
        above = np.float64(weights[parents[i]]) if parents[i] >= 0 else 1.0
        out[i] = min(max(np.float64(weights[i]) / max(above, 1e-12), 0.0), 1.0)
    return out


def conditional_weights(tree: DraftTree) -> np.ndarray:
    """float64[n]: each node's weight over its parent's (its own weight below the root), in [0, 1].

    A retrieving source weighs a node by the share of occurrences that followed its whole path, so
    this is the share of those that followed the parent and went on to the node."""
    return _conditional(tree.weights, tree.parents)


@nb.njit(cache=True)
def _bins(weights, parents, depths):  # pragma: no cover - compiled
    """(depth bucket, weight bucket, conditional weight) of every node."""
    n = len(weights)
    conditional = _conditional(weights, parents)
    depth_bin = np.empty(n, np.int64)
    weight_bin = np.empty(n, np.int64)
    for i in range(n):
        depth_bin[i] = min(depths[i], MAX_DEPTH_BUCKET) - 1
        weight_bin[i] = min(int(conditional[i] * WEIGHT_BUCKETS), WEIGHT_BUCKETS - 1)
    return depth_bin, weight_bin, conditional


@nb.njit(cache=True)
def _estimate(hits, trials, strength, scale, weights, parents, depths):  # pragma: no cover - compiled
    """Calibrated path probabilities: the product of the nodes' (hits + strength * prior) / (trials +
    strength) rates from the root down (``hits``, ``trials``: one match-length bin's tables)."""
    depth_bin, weight_bin, conditional = _bins(weights, parents, depths)
    out = np.empty(len(weights), np.float64)
    for i in range(len(weights)):
        prior = min(scale * conditional[i], 1.0)
        h = hits[depth_bin[i], weight_bin[i]]
        t = trials[depth_bin[i], weight_bin[i]]
        rate = min(max((h + strength * prior) / (t + strength), 0.0), 1.0)
        out[i] = rate * out[parents[i]] if parents[i] >= 0 else rate
    return out


@nb.njit(cache=True)
def _update(hits, trials, weights, tokens, parents, depths, accepted):  # pragma: no cover - compiled
    known, hit = _outcomes(tokens, parents, depths, accepted)
    depth_bin, weight_bin, _ = _bins(weights, parents, depths)
    for i in range(len(tokens)):
        if known[i]:
            trials[depth_bin[i], weight_bin[i]] += 1.0
        if hit[i]:
            hits[depth_bin[i], weight_bin[i]] += 1.0


class Calibration:
    """Online acceptance rates per (source, match-length bucket, depth bucket, weight bucket).

    A rate is conditional: of the nodes whose parent verification accepted (or that hang below the
    root), the share it accepted too; nodes are bucketed by their conditional weight
    (:func:`conditional_weights`). ``rate`` = (hits + strength * prior) / (trials + strength), prior
    = scale * conditional weight: the source's weights until evidence accumulates, then the observed
    rate. A node's probability is the product of the rates along its path (:meth:`estimate`), so a
    long chain is worth what each of its links is, not what its first node is. In replays of
    HumanEval and MT-Bench (``python -m benchmarks.replay``, docs/benchmarks.md) this ranks nodes better than
    calibrating the path weights themselves: 1-4 % more tokens per step at a fixed tree size.
    """

    def __init__(self, n_sources: int, strength: float = 8.0, scales: Sequence[float] | None = None) -> None:
        if strength <= 0:
            raise ValueError(f"strength={strength} must be > 0")
        shape = (n_sources, len(MATCH_LENGTH_EDGES) + 1, MAX_DEPTH_BUCKET, WEIGHT_BUCKETS)
        self.hits = np.zeros(shape)
        self.trials = np.zeros(shape)
        self.strength = strength
        self.scales = np.ones(n_sources) if scales is None else np.asarray(scales, np.float64)
        if self.scales.shape != (n_sources,) or (self.scales <= 0).any():
            raise ValueError(f"scales must be {n_sources} positive numbers, got {scales}")

    def _length_bin(self, match_length: int) -> int:
        return int(np.searchsorted(MATCH_LENGTH_EDGES, match_length, side="right"))

    def estimate(self, source: int, tree: DraftTree) -> np.ndarray:
        """float64[n]: calibrated probability that verification accepts each node (its whole path),
        in the bucket of the tree's ``match_length``."""
        if len(tree) == 0:
            return np.zeros(0)
        length_bin = self._length_bin(tree.match_length)
        return _estimate(
            self.hits[source, length_bin],
            self.trials[source, length_bin],
            self.strength,
            float(self.scales[source]),
            tree.weights,
            tree.parents,
            tree.depths,
        )

    def state_dict(self) -> dict[str, Any]:
        """``hits`` and ``trials``: float64[sources, match-length, depth, weight buckets]."""
        return {"hits": self.hits.copy(), "trials": self.trials.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state, {"hits", "trials"})
        hits = check_state_shape("hits", state["hits"], self.hits.shape)
        trials = check_state_shape("trials", state["trials"], self.trials.shape)
        self.hits = np.array(hits, np.float64)
        self.trials = np.array(trials, np.float64)

    def update(self, source: int, tree: DraftTree, accepted: np.ndarray) -> None:
        """Count which of ``tree``'s nodes the step settled and accepted (``accepted``: the tokens it
        added), in the bucket of the tree's ``match_length``."""
        if len(tree) == 0:
            return
        length_bin = self._length_bin(tree.match_length)
        _update(
            self.hits[source, length_bin],
            self.trials[source, length_bin],
            tree.weights,
            tree.tokens,
            tree.parents,
            tree.depths,
            np.asarray(accepted, dtype=np.int64),
        )


_KNOTS = np.asarray(CORRECTION_KNOTS, dtype=np.float64)
_DEPTH_EDGES = np.asarray(CORRECTION_DEPTH_EDGES, dtype=np.int64)


@nb.njit(cache=True)
def _knot_columns(weights, depths, knots, edges):  # pragma: no cover - compiled
    """Where each node lies on the piecewise-linear maps: (int64[n] column ``bucket * len(knots) +
    lo`` of the knot below its weight in its depth bucket's row, float64[n] fraction ``t`` of the way
    to the next knot). A map g is then ``(1 - t) * g[column] + t * g[column + 1]``; the bucket is the
    number of ``edges`` at or below the depth, ``lo`` the number of knots at or below the weight
    (clipped to [0, 1]) less one, kept inside the last segment."""
    n = len(weights)
    k = len(knots)
    columns = np.empty(n, np.int64)
    fractions = np.empty(n, np.float64)
    for i in range(n):
        w = min(max(np.float64(weights[i]), 0.0), 1.0)
        lo = 0
        while lo < k and knots[lo] <= w:
            lo += 1
        lo = min(max(lo, 1), k - 1) - 1
        bucket = 0
        while bucket < len(edges) and edges[bucket] <= depths[i]:
            bucket += 1
        columns[i] = bucket * k + lo
        fractions[i] = (w - knots[lo]) / (knots[lo + 1] - knots[lo])
    return columns, fractions


@nb.njit(cache=True)
def _interpolate(values, columns, fractions):  # pragma: no cover - compiled
    out = np.empty(len(columns), np.float64)
    for i in range(len(columns)):
        out[i] = (1.0 - fractions[i]) * values[columns[i]] + fractions[i] * values[columns[i] + 1]
    return out


@nb.njit(cache=True)
def _accumulate(xtx, xty, decay, columns, fractions, depths, accepted):  # pragma: no cover - compiled
    """``xtx = decay * xtx + x.T @ x`` and ``xty = decay * xty + x.T @ y`` in place, for the design
    rows x (per depth, the interpolation coefficients of its nodes, summed) and y (1 for the depths
    the step accepted). x has two entries per node, so only those products are formed."""
    size = len(xty)
    x = np.zeros((depths.max(), size), np.float64)
    for i in range(len(columns)):
        x[depths[i] - 1, columns[i]] += 1.0 - fractions[i]
        x[depths[i] - 1, columns[i] + 1] += fractions[i]
    gram = np.zeros((size, size), np.float64)
    moment = np.zeros(size, np.float64)
    used = np.empty(size, np.int64)
    for d in range(len(x)):
        n_used = 0
        for c in range(size):
            if x[d, c] != 0.0:
                used[n_used] = c
                n_used += 1
        for a in range(n_used):
            ca = used[a]
            if d < accepted:
                moment[ca] += x[d, ca]
            for b in range(n_used):
                gram[ca, used[b]] += x[d, ca] * x[d, used[b]]
    for a in range(size):
        xty[a] = decay * xty[a] + moment[a]
        for b in range(size):
            xtx[a, b] = decay * xtx[a, b] + gram[a, b]


class WeightCalibration:
    """Learns ``p = g_b(w)``, the real acceptance probability of a merged node of probability ``w`` at
    a depth in bucket ``b`` (:data:`CORRECTION_DEPTH_EDGES`), from how many tokens each step accepted,
    online: :class:`MergedDrafter`'s last word on its weights (see there).

    Nodes of one depth are disjoint events (at most one of them lies on the accepted path), so
    ``P(accepted >= d) = sum of g(w_i) over depth-d nodes``; each step gives one such observation per
    depth of the verified tree. Each ``g_b`` is piecewise linear on :data:`CORRECTION_KNOTS`, fitted
    by ridge regression toward the prior ``g(w) = w ** 2``, then made non-decreasing and clipped to
    [0, 1]. Depth matters: in chat, a lone first-token guess weighted 0.43 was accepted 18 % of the
    time while nodes deep in long retrieved chains were accepted far less often than their weights
    said. The prior is ``w ** 2``, not the identity, because the merged probabilities are
    overconfident in every bucket: the maps learned over our HumanEval runs lie near ``w ** 2``
    (depth 1: 0.29 at 0.5, 0.57 at 0.7; depth 5-8: 0.14 at 0.5, 0.37 at 0.7), as does the chat
    example above (0.43 ** 2 = 0.18). Starting there spares the first requests the over-wide trees
    an identity prior verifies until enough steps have been seen.
    """

    def __init__(self) -> None:
        k = len(CORRECTION_KNOTS) * (len(CORRECTION_DEPTH_EDGES) + 1)
        self._prior = np.tile(
            np.asarray(CORRECTION_KNOTS, dtype=np.float64) ** 2, len(CORRECTION_DEPTH_EDGES) + 1
        )
        self._xtx = np.zeros((k, k))
        self._xty = np.zeros(k)
        self._steps = 0
        self.values = self._prior.reshape(-1, len(CORRECTION_KNOTS)).copy()
        """g at the knots, one row per depth bucket."""

    def __call__(self, weights: np.ndarray, depths: np.ndarray) -> np.ndarray:
        """float64[n]: calibrated probabilities of nodes with these ``weights`` at these ``depths``."""
        columns, fractions = _knot_columns(weights, depths, _KNOTS, _DEPTH_EDGES)
        return _interpolate(self.values.reshape(-1), columns, fractions)

    def observe(self, weights: np.ndarray, depths: np.ndarray, accepted: int) -> None:
        """The nodes verified in a step, their uncorrected ``weights`` and ``depths`` (float[n] and
        int[n], a tree's); ``accepted``: how many draft tokens the step accepted."""
        if len(weights) == 0:
            return
        columns, fractions = _knot_columns(weights, depths, _KNOTS, _DEPTH_EDGES)
        _accumulate(self._xtx, self._xty, CORRECTION_DECAY, columns, fractions, depths, accepted)
        self._steps += 1
        if self._steps % CORRECTION_REFIT_STEPS == 0:
            self._refit()

    def state_dict(self) -> dict[str, Any]:
        """What was learned: the statistics ``xtx``, ``xty``, ``steps`` and the map's ``values`` at
        their last refit."""
        return {
            "xtx": self._xtx.copy(),
            "xty": self._xty.copy(),
            "steps": self._steps,
            "values": self.values.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (of a calibration with the same knots)."""
        check_state_keys(self, state, {"xtx", "xty", "steps", "values"})
        xtx = check_state_shape("xtx", state["xtx"], self._xtx.shape)
        xty = check_state_shape("xty", state["xty"], self._xty.shape)
        values = check_state_shape("values", state["values"], self.values.shape)
        self._xtx = np.array(xtx, np.float64)
        self._xty = np.array(xty, np.float64)
        self._steps = int(state["steps"])
        self.values = np.array(values, np.float64)

    def _refit(self) -> None:
        a = self._xtx + CORRECTION_PRIOR * np.eye(len(self._prior))
        b = self._xty + CORRECTION_PRIOR * self._prior
        theta = np.clip(np.linalg.solve(a, b), 0.0, 1.0).reshape(self.values.shape)
        seen = np.diag(a).reshape(self.values.shape)
        self.values = np.stack([_isotonic(t, w) for t, w in zip(theta, seen, strict=True)])


def _isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in weighted least squares (pool adjacent
    violators): a knot seen often outweighs a neighbour that only has its prior."""
    blocks: list[list[float]] = []  # [weighted mean, total weight, count]
    for v, w in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(n, v) for v, _, n in blocks])


class Candidates(NamedTuple):
    """Merged nodes in rank order, parents first: ``tokens`` int32[n], ``parents`` int32[n] (index into
    the same arrays, -1 = below the root), ``probs`` float64[n] (kept in float64, unlike a
    :class:`DraftTree`'s float32 weights, so that the extension ranks exactly what the merge ranked)."""

    tokens: np.ndarray
    parents: np.ndarray
    probs: np.ndarray


def merge_trees(
    trees: Sequence[DraftTree], probs: Sequence[np.ndarray], budget: int, combine: str = "max"
) -> DraftTree:
    """One tree of at most ``budget`` nodes from ``trees`` with per-node probabilities ``probs``.

    Identical paths become one node with probability max (``combine="max"``) or noisy-or
    (``"or"``: 1 - prod(1 - p)) over the sources. Each ``probs[s]`` must not increase from parent to
    child. Nodes are ordered by probability (descending), depth, then path token ids."""
    merged = merge_candidates(trees, probs, budget, combine)
    if len(merged.tokens) == 0:
        return DraftTree.empty()
    return DraftTree(merged.tokens, merged.parents, np.clip(merged.probs.astype(np.float32), 0.0, 1.0))


@nb.njit(cache=True)
def _path_rows(tokens, parents, depths, width):  # pragma: no cover - compiled
    """int64[n, width]: each node's path from the root (token ids, -1 past its depth); parents first."""
    n = len(tokens)
    rows = np.full((n, width), -1, np.int64)
    for i in range(n):
        if parents[i] >= 0:
            rows[i, : depths[i] - 1] = rows[parents[i], : depths[i] - 1]
        rows[i, depths[i] - 1] = tokens[i]
    return rows


@nb.njit(cache=True, inline="always")
def _path_less(rows, i, j, depth):  # pragma: no cover - compiled
    """Path i before path j (both of ``depth`` tokens) in token-id order."""
    for d in range(depth):
        if rows[i, d] != rows[j, d]:
            return rows[i, d] < rows[j, d]
    return False


@nb.njit(cache=True)
def _merge_kernel(tokens, parents, probs, offsets, budget, noisy_or):  # pragma: no cover - compiled
    """(tokens, parents, probabilities) of :func:`merge_candidates`: source nodes with one path become
    one node (found among its parent's children), then the nodes are ranked by (-p, depth, path)."""
    total = len(tokens)
    m_tok = np.empty(total, np.int64)
    m_par = np.empty(total, np.int64)
    depth = np.empty(total, np.int64)
    miss = np.empty(total, np.float64)  # max: -p (min is best), or: prod(1 - p)
    first_child = np.full(total, -1, np.int64)
    next_sibling = np.full(total, -1, np.int64)
    ids = np.empty(total, np.int64)  # merged node of every source node
    root_child = -1
    n = 0
    for s in range(len(offsets) - 1):
        base = offsets[s]
        for j in range(base, offsets[s + 1]):
            mp = -1 if parents[j] < 0 else ids[base + parents[j]]
            tok = tokens[j]
            p = probs[j]
            node = root_child if mp < 0 else first_child[mp]
            while node >= 0 and m_tok[node] != tok:
                node = next_sibling[node]
            if node < 0:
                node = n
                n += 1
                m_tok[node] = tok
                m_par[node] = mp
                depth[node] = 1 if mp < 0 else depth[mp] + 1
                miss[node] = 1.0 - p if noisy_or else -p
                if mp < 0:
                    next_sibling[node] = root_child
                    root_child = node
                else:
                    next_sibling[node] = first_child[mp]
                    first_child[mp] = node
            elif noisy_or:
                miss[node] *= 1.0 - p
            else:
                miss[node] = min(miss[node], -p)
            ids[j] = node
    merged = np.empty(n, np.float64)
    for i in range(n):
        merged[i] = 1.0 - miss[i] if noisy_or else -miss[i]
        if m_par[i] >= 0 and merged[i] > merged[m_par[i]]:  # float rounding: a child never beats its parent
            merged[i] = merged[m_par[i]]
    width = 1
    for i in range(n):
        width = max(width, depth[i])
    rows = _path_rows(m_tok[:n], m_par[:n], depth[:n], width)
    order = np.arange(n)
    for a in range(1, n):  # insertion sort by (-p, depth, path): a few dozen nodes
        i = order[a]
        b = a
        while b > 0:
            j = order[b - 1]
            if merged[i] > merged[j] or (
                merged[i] == merged[j]
                and (depth[i] < depth[j] or (depth[i] == depth[j] and _path_less(rows, i, j, depth[i])))
            ):
                order[b] = j
                b -= 1
            else:
                break
        order[b] = i
    order = order[: max(min(budget, n), 0)]
    rank = np.full(n, -1, np.int64)
    for r in range(len(order)):
        rank[order[r]] = r
    out_tokens = np.empty(len(order), np.int32)
    out_parents = np.empty(len(order), np.int32)
    out_probs = np.empty(len(order), np.float64)
    for r in range(len(order)):
        i = order[r]
        out_tokens[r] = m_tok[i]
        out_parents[r] = -1 if m_par[i] < 0 else rank[m_par[i]]
        out_probs[r] = merged[i]
    return out_tokens, out_parents, out_probs


def merge_candidates(
    trees: Sequence[DraftTree], probs: Sequence[np.ndarray], budget: int, combine: str
) -> Candidates:
    """:func:`merge_trees` before the conversion to a tree: the first ``budget`` merged nodes in rank
    order, with float64 probabilities."""
    if combine not in ("max", "or"):
        raise ValueError(f"combine={combine!r} must be 'max' or 'or'")
    if len(trees) != len(probs):
        raise ValueError(f"got {len(trees)} trees but {len(probs)} probability arrays")
    sizes = [len(tree) for tree in trees]
    for size, prob in zip(sizes, probs, strict=True):
        if len(prob) != size:
            raise ValueError(f"a tree of {size} nodes got {len(prob)} probabilities")
    if sum(sizes) == 0 or budget <= 0:
        return Candidates(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
    offsets = np.zeros(len(trees) + 1, np.int64)
    offsets[1:] = np.cumsum(sizes)
    return Candidates(
        *_merge_kernel(
            np.concatenate([tree.tokens for tree in trees]),
            np.concatenate([tree.parents for tree in trees]),
            np.concatenate([np.asarray(prob, np.float64) for prob in probs]),
            offsets,
            budget,
            combine == "or",
        )
    )


@nb.njit(cache=True, inline="always")
def _entry_less(entries, a, b):  # pragma: no cover - compiled
    """Entry a pops before entry b: by (-p, depth, path, from the table, rank, parent's p).
    ``entries``: the arrays (neg_p, depth, rows, origin, rank, p_parent) of :func:`_extend_kernel`."""
    neg_p, depth, rows, origin, rank, p_parent = entries
    if neg_p[a] != neg_p[b]:
        return neg_p[a] < neg_p[b]
    if depth[a] != depth[b]:
        return depth[a] < depth[b]
    for d in range(depth[a]):
        if rows[a, d] != rows[b, d]:
            return rows[a, d] < rows[b, d]
    if origin[a] != origin[b]:
        return origin[a] < origin[b]
    if rank[a] != rank[b]:
        return rank[a] < rank[b]
    return p_parent[a] < p_parent[b]


@nb.njit(cache=True, inline="always")
def _heap_push(heap, size, e, entries):  # pragma: no cover - compiled
    """Push entry ``e`` on the binary heap ``heap[:size]``; returns the new size."""
    heap[size] = e
    child = size
    while child > 0:
        parent = (child - 1) // 2
        if not _entry_less(entries, heap[child], heap[parent]):
            break
        heap[child], heap[parent] = heap[parent], heap[child]
        child = parent
    return size + 1


@nb.njit(cache=True, inline="always")
def _heap_pop(heap, size, entries):  # pragma: no cover - compiled
    """Remove the top of ``heap[:size]`` (the caller read it); returns the new size."""
    size -= 1
    heap[0] = heap[size]
    parent = 0
    while 2 * parent + 1 < size:
        best = 2 * parent + 1
        if best + 1 < size and _entry_less(entries, heap[best + 1], heap[best]):
            best += 1
        if not _entry_less(entries, heap[best], heap[parent]):
            break
        heap[best], heap[parent] = heap[parent], heap[best]
        parent = best
    return size


@nb.njit(cache=True, inline="always")
def _taken_child(taken_tok, taken_par, n, node, tok):  # pragma: no cover - compiled
    """The taken node with parent ``node`` (-1 = the root) and token ``tok``, -2 if none."""
    for t in range(n):
        if taken_par[t] == node and taken_tok[t] == tok:
            return t
    return -2


PAIR_HASH = 2654435761
"""Multiplier of :func:`pair_slot`'s hash (Knuth's multiplicative constant)."""


class RecycleRows(NamedTuple):
    """The model's recent top-k next tokens (best first, -1 = unknown) after each token, ``table``
    int32[V, k], and after each (token before, token) pair seen lately, ``pair_rows`` int32[S, k] in a
    direct-mapped hash table of S slots (a power of two): slot :func:`pair_slot` holds the pair whose
    key ``before * V + token`` is ``pair_keys[slot]`` (int64[S], -1 = empty); a newer pair takes the
    slot of an older one."""

    table: np.ndarray
    pair_keys: np.ndarray
    pair_rows: np.ndarray


@nb.njit(cache=True, inline="always")
def pair_slot(key, slots):  # pragma: no cover - compiled
    """Slot of the pair key ``key`` (>= 0) in a hash table of ``slots`` slots (a power of two)."""
    return (key * PAIR_HASH) & (slots - 1)


@nb.njit(cache=True, inline="always")
def row_of(token, before, table, pair_keys, pair_rows):  # pragma: no cover - compiled
    """(row, kind): the pair row of (before, token) where the table holds it (kind 1), else the
    token's own row (kind 0)."""
    vocab = table.shape[0]
    if 0 <= before < vocab:
        key = before * vocab + token
        slot = pair_slot(key, len(pair_keys))
        if pair_keys[slot] == key:
            return pair_rows[slot], 1
    return table[token], 0


@nb.njit(cache=True, inline="always")
def _offer_row(
    src, length, token, before, p, rows_of, rates, max_depth, used, size, heap, entries
):  # pragma: no cover - compiled
    """Push the table children of the path ``rows[src, :length]`` (the root's when ``length`` is 0),
    whose last token is ``token``, the token before it ``before`` (-1 = unknown) and probability
    ``p``, as entries ``used``, ``used + 1``, ...: the rank-r child in the row of (before, token)
    (:func:`row_of`, of kind q) gets ``p * rates[q, r, s]``, s its rank in the row of ``before``
    alone (k when not there); returns (used, size)."""
    neg_p, depth, rows, origin, rank, p_parent = entries
    table, pair_keys, pair_rows = rows_of
    vocab, k = table.shape
    if length >= max_depth or token < 0 or token >= vocab:
        return used, size
    row, kind = row_of(token, before, table, pair_keys, pair_rows)
    for r in range(k):
        tok = row[r]
        if tok < 0:
            continue
        s = k
        if 0 <= before < vocab:
            for j in range(k):
                if table[before, j] == tok:
                    s = j
                    break
        neg_p[used] = -(p * rates[kind, r, s])
        depth[used] = length + 1
        if length > 0:
            rows[used, :length] = rows[src, :length]
        rows[used, length] = tok
        origin[used] = 1
        rank[used] = r
        p_parent[used] = p
        size = _heap_push(heap, size, used, entries)
        used += 1
    return used, size


@nb.njit(cache=True)
def _extend_kernel(
    cand_tokens, cand_parents, cand_probs, root, before_root, rows_of, rates, budget, max_depth
):  # pragma: no cover - compiled
    """(tokens, parents, probabilities) of :func:`extend_best_first`: a heap of entries (a candidate,
    or a table child offered below a path, :func:`_offer_row`), popped best first; each taken node
    offers its row's children."""
    k = rows_of[0].shape[1]
    c = len(cand_tokens)
    cand_depths = node_depths(cand_parents)
    width = max_depth + 1
    for i in range(c):
        width = max(width, cand_depths[i] + 1)
    cap = c + (budget + 1) * k + 1
    neg_p = np.empty(cap, np.float64)
    depth = np.empty(cap, np.int64)
    rows = np.full((cap, width), -1, np.int64)
    origin = np.zeros(cap, np.int64)  # 0 = candidate, 1 = table child
    rank = np.zeros(cap, np.int64)
    p_parent = np.zeros(cap, np.float64)
    entries = (neg_p, depth, rows, origin, rank, p_parent)
    heap = np.empty(cap, np.int64)
    rows[:c] = _path_rows(cand_tokens, cand_parents, cand_depths, width)
    size = 0
    for i in range(c):  # the candidates, then the root's table children
        neg_p[i] = -cand_probs[i]
        depth[i] = cand_depths[i]
        size = _heap_push(heap, size, i, entries)
    used, size = _offer_row(-1, 0, root, before_root, 1.0, rows_of, rates, max_depth, c, size, heap, entries)
    taken_tok = np.empty(budget, np.int64)
    taken_par = np.empty(budget, np.int64)
    taken_p = np.empty(budget, np.float64)
    n = 0
    while size > 0 and n < budget:
        e = heap[0]
        size = _heap_pop(heap, size, entries)
        d = depth[e]
        # the taken node of the parent path (-2 = not taken); the path itself must not be taken yet
        node = -1
        for level in range(d - 1):
            node = _taken_child(taken_tok, taken_par, n, node, rows[e, level])
            if node == -2:
                break
        if node == -2 or _taken_child(taken_tok, taken_par, n, node, rows[e, d - 1]) != -2:
            continue
        taken_tok[n] = rows[e, d - 1]
        taken_par[n] = node
        taken_p[n] = -neg_p[e]
        n += 1
        before = rows[e, d - 2] if d > 1 else root
        used, size = _offer_row(
            e, d, rows[e, d - 1], before, -neg_p[e], rows_of, rates, max_depth, used, size, heap, entries
        )
    return taken_tok[:n].astype(np.int32), taken_par[:n].astype(np.int32), taken_p[:n]


def extend_best_first(
    candidates: DraftTree | Candidates,
    context: np.ndarray,
    rows: RecycleRows,
    rates: np.ndarray,
    budget: int,
    max_depth: int,
) -> DraftTree:
    """The ``budget`` most probable nodes among ``candidates`` and their extensions from ``rows``.

    ``candidates``: a merged tree (weights = probabilities, non-increasing from parent to child), or
    :class:`Candidates` from :func:`merge_candidates`; ``context``: int[L >= 1], the tokens so far
    (the root, ``context[-1]``, is the last). ``rows``: the model's recent top-k next tokens after
    tokens and pairs (:class:`RecycleRows`); ``rates``: float[2, k, k + 1], the probability that the
    rank-r entry of a token's own row (``rates[0]``) or of a pair's row (``rates[1]``) is the model's
    next token when the row of the token before holds it at rank s (s = k: not at all). Every taken
    node (and the root, probability 1) offers children from the row of its path's last two tokens
    (the pair's row where known, else the last token's): the rank-r child of a node of probability p
    gets p * rates[q, r, s] (the token before the root is ``context[-2]``). A child equal to a
    candidate merges with it (the larger probability wins). Taken best-first, ties by depth, then
    path token ids, then candidates before table children (then lower rank), so parents precede
    children."""
    if isinstance(candidates, DraftTree):
        candidates = Candidates(candidates.tokens, candidates.parents, candidates.weights.astype(np.float64))
    k = rows.table.shape[1]
    if np.shape(rates) != (2, k, k + 1):
        raise ValueError(
            f"rates must have shape (2, {k}, {k + 1}) for rows of {k} tokens, not {np.shape(rates)}"
        )
    if budget <= 0 or len(context) == 0:
        return DraftTree.empty()
    tokens, parents, probs = _extend_kernel(
        np.asarray(candidates.tokens, np.int64),
        np.asarray(candidates.parents, np.int64),
        np.asarray(candidates.probs, np.float64),
        int(context[-1]),
        int(context[-2]) if len(context) > 1 else -1,
        (
            np.ascontiguousarray(rows.table, np.int32),
            np.ascontiguousarray(rows.pair_keys, np.int64),
            np.ascontiguousarray(rows.pair_rows, np.int32),
        ),
        np.asarray(rates, np.float64),
        int(budget),
        int(max_depth),
    )
    if len(tokens) == 0:
        return DraftTree.empty()
    return DraftTree(tokens, parents, np.clip(probs, 0.0, 1.0))


def nodes_in(tree: DraftTree, part: DraftTree) -> np.ndarray | None:
    """int64[len(part)]: the node of ``tree`` with the same path as each node of ``part`` (a tree cut
    from it: a prefix, its nodes up to a depth, one path), None if some path of ``part`` is not in
    ``tree``."""
    edges = zip(tree.parents.tolist(), tree.tokens.tolist(), strict=True)
    index = {edge: i for i, edge in enumerate(edges)}  # (parent, token) -> node
    nodes: list[int] = []
    for parent, token in zip(part.parents.tolist(), part.tokens.tolist(), strict=True):
        node = index.get((nodes[parent] if parent >= 0 else -1, token))
        if node is None:
            return None
        nodes.append(node)
    return np.asarray(nodes, np.int64)


@dataclass(frozen=True)
class MergeConfig:
    """How :class:`MergedDrafter` ranks and combines sources."""

    combine: str = "max"
    """Probability of a path several sources propose: 'max' or 'or' (noisy-or)."""
    calibrate: bool = True
    """Learn per-source acceptance rates online from observe()."""
    correct: bool = True
    """Map the merged tree's probabilities through :class:`WeightCalibration`, learned online from
    observe(), so that its weights are acceptance probabilities a budget can price."""
    strength: float = 8.0
    """Pseudo-observations behind a source's own weights in calibration."""
    extend_depth: int = 10
    """Deepest node an extension may add."""

    def __post_init__(self) -> None:
        if self.extend_depth < 1:
            raise ValueError(f"extend_depth={self.extend_depth} must be >= 1")
        if self.combine not in ("max", "or"):
            raise ValueError(f"combine={self.combine!r} must be 'max' or 'or'")
        if self.strength <= 0:
            raise ValueError(f"strength={self.strength} must be > 0")


class Extender(Drafter, Protocol):
    """What :class:`MergedDrafter` extends its merged tree with (a
    :class:`~restspec.draft.recycle.RecycleDrafter`)."""

    @property
    def rows(self) -> RecycleRows:
        """The model's recent top-k next tokens after tokens and pairs of tokens."""

    @property
    def rates(self) -> np.ndarray:
        """float[2, k, k + 1]: probability that the rank-r entry of a token's (0) or a pair's (1) row
        is the model's next token, given its rank s in the row of the token before (s = k: not in
        it)."""


class MergedDrafter:
    """Several drafters as one: their trees merged under one budget (see the module docstring).

    ``scales``: a prior multiplier per source on its own weights (1 = trust them as given).
    ``extender``: extends every node of the merged tree (not only the root) with the model's recent
    top candidates, best-first by probability; None = the merged tree as it is.

    The weights of the tree it proposes are its estimates of the probability that verification
    accepts each node, the one estimate a budget prices (:class:`~restspec.decode.budget.AdaptiveBudget`
    takes them as they are). Two learners make them, both here: the per-source rates
    (:class:`Calibration`) rank the nodes and decide the merge; then :class:`WeightCalibration`
    (``config.correct``) maps the merged and extended tree's probabilities, by depth, to how often
    nodes of that probability were accepted, learned from the verified part of each proposal
    (the uncorrected probabilities come back with the step: :attr:`DraftTree.uncorrected`). The
    order of the nodes is the merge's. Replaying 24 MT-Bench turns, the merged probabilities of the
    verified nodes added up to 1.49x the nodes accepted (mean gap by probability tenth: 0.20), the
    corrected ones to 0.99x (0.04). Neither alone does as well as both: on three HumanEval prompts
    (the embedded model, 64 tokens, the reference curve), without the depth map the trees grew from
    2.0 to 6.4 nodes and the modeled tokens per second fell 11 %; without the per-source rates,
    tokens per step fell from 1.475 to 1.462 (modeled: -1.5 %)."""

    def __init__(
        self,
        drafters: Sequence[Drafter],
        scales: Sequence[float] | None = None,
        config: MergeConfig | None = None,
        *,
        extender: Extender | None = None,
    ) -> None:
        if not drafters and extender is None:
            raise ValueError("drafters must hold at least one drafter (or pass an extender)")
        self.drafters = list(drafters)
        self.extender = extender
        self.config = config or MergeConfig()
        self.calibration = Calibration(len(self.drafters), self.config.strength, scales)
        self.correction = WeightCalibration()

    def _learners(self) -> list[Drafter]:
        return self.drafters + ([] if self.extender is None else [self.extender])

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        for drafter in self._learners():
            drafter.start_request(prompt, request)

    def stop_request(self, request: int = 0) -> None:
        for drafter in self._learners():
            drafter.stop_request(request)

    def source_trees(self, context: np.ndarray, budget: int) -> list[DraftTree]:
        """Each source's own tree (the extender drafts none: it extends the merged tree)."""
        return [drafter.propose(context, budget) for drafter in self.drafters]

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """The merged tree, its weights corrected (``config.correct``); it carries each source's own
        tree (``sources``) and the weights before the correction (``uncorrected``) for :meth:`observe`."""
        if budget <= 0:
            return DraftTree.empty()
        trees = self.source_trees(context, budget)
        if self.config.calibrate:
            probs = [self.calibration.estimate(s, tree) for s, tree in enumerate(trees)]
        else:
            probs = [np.minimum.accumulate(tree.weights.astype(np.float64)) for tree in trees]
        if self.extender is None or len(context) == 0:
            merged = merge_trees(trees, probs, budget, self.config.combine)
        else:
            # a candidate ranked below ``budget`` others can never be taken (they and their parents
            # come first), so only the first ``budget`` are offered to the extension
            candidates = merge_candidates(trees, probs, budget, self.config.combine)
            merged = extend_best_first(
                candidates, context, self.extender.rows, self.extender.rates, budget, self.config.extend_depth
            )
        if not self.config.correct or len(merged) == 0:
            return replace(merged, sources=tuple(trees))
        corrected = self.correction(merged.weights, merged.depths)
        return replace(merged, weights=corrected, uncorrected=merged.weights, sources=tuple(trees))

    def observe(self, step: Step) -> None:
        """Calibrate every source on its own tree of this step (``step.proposal.sources``), learn the
        correction from the verified nodes (``step.tree``, found in ``step.proposal`` by path), then
        let each source learn."""
        proposal = step.proposal
        if proposal is not None and self.config.calibrate:
            for s, tree in enumerate(proposal.sources):
                self.calibration.update(s, tree, step.accepted)
        if proposal is not None and proposal.uncorrected is not None and len(step.accepted) >= 1:
            nodes = nodes_in(proposal, step.tree)
            if nodes is not None:
                self.correction.observe(proposal.uncorrected[nodes], step.tree.depths, len(step.path))
        for drafter in self._learners():
            drafter.observe(step)

    def state_dict(self) -> dict[str, Any]:
        """``calibration`` (:meth:`Calibration.state_dict`), ``correction``
        (:meth:`WeightCalibration.state_dict`), ``sources`` (each source's state under its index,
        ``"0"``, ``"1"``, ...) and, with an extender, ``extender``."""
        state: dict[str, Any] = {
            "calibration": self.calibration.state_dict(),
            "correction": self.correction.state_dict(),
            "sources": {str(s): drafter.state_dict() for s, drafter in enumerate(self.drafters)},
        }
        if self.extender is not None:
            state["extender"] = self.extender.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load every part; if one does not fit, the parts loaded before it are restored too."""
        keys = {"calibration", "correction", "sources"} | (
            {"extender"} if self.extender is not None else set()
        )
        check_state_keys(self, state, keys)
        check_state_keys(self, state["sources"], {str(s) for s in range(len(self.drafters))})
        before = self.state_dict()
        try:
            self._load(state)
        except ValueError:
            self._load(before)
            raise

    def _load(self, state: dict[str, Any]) -> None:
        self.calibration.load_state_dict(state["calibration"])
        self.correction.load_state_dict(state["correction"])
        for s, drafter in enumerate(self.drafters):
            drafter.load_state_dict(state["sources"][str(s)])
        if self.extender is not None:
            self.extender.load_state_dict(state["extender"])
