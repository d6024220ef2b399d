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

A :class:`RecycleDrafter` among the sources is used as an *extender* (``MergeConfig.extend``):
instead of a tree of its own from the root, every merged node (and the root) offers the model's
recent top candidates after its token as children, with probability p(node) * hit rate of the
candidate's rank, and the final ``budget`` nodes are taken best-first from candidates and extensions
alike (:func:`extend_best_first`). On HumanEval this lifts short retrieved chains and gives
recycling the context it lacks (``docs/benchmarks-simulator.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba as nb
import numpy as np

from restspec.draft.base import Drafter, TreeLogits
from restspec.draft.tree import DraftTree

MATCH_LENGTH_EDGES = np.array([1, 2, 3, 4, 6, 9])
"""Match-length buckets: 0, 1, 2, 3, 4-5, 6-8, 9+ tokens (0 = the source reports no match)."""
MAX_DEPTH_BUCKET = 6
"""Depths 1..5 have their own bucket, 6 and deeper share one."""
WEIGHT_BUCKETS = 10
"""A source's own weight is bucketed in tenths."""


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
    HumanEval and MT-Bench (``restspec simulate``, docs/benchmarks.md) this ranks nodes better than
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

    def estimate(self, source: int, match_length: int, tree: DraftTree) -> np.ndarray:
        """float64[n]: calibrated probability that verification accepts each node (its whole path)."""
        if len(tree) == 0:
            return np.zeros(0)
        length_bin = self._length_bin(match_length)
        return _estimate(
            self.hits[source, length_bin],
            self.trials[source, length_bin],
            self.strength,
            float(self.scales[source]),
            tree.weights,
            tree.parents,
            tree.depths,
        )

    def update(self, source: int, match_length: int, tree: DraftTree, accepted: np.ndarray) -> None:
        if len(tree) == 0:
            return
        length_bin = self._length_bin(match_length)
        _update(
            self.hits[source, length_bin],
            self.trials[source, length_bin],
            tree.weights,
            tree.tokens,
            tree.parents,
            tree.depths,
            np.asarray(accepted, dtype=np.int64),
        )


def merge_trees(
    trees: Sequence[DraftTree], probs: Sequence[np.ndarray], budget: int, combine: str = "max"
) -> DraftTree:
    """One tree of at most ``budget`` nodes from ``trees`` with per-node probabilities ``probs``.

    Identical paths become one node with probability max (``combine="max"``) or noisy-or
    (``"or"``: 1 - prod(1 - p)) over the sources. Each ``probs[s]`` must not increase from parent to
    child. Nodes are ordered by probability (descending), depth, then path token ids."""
    paths, merged = _merge_paths(trees, probs, budget, combine)
    if not paths:
        return DraftTree.empty()
    position = {path: rank for rank, path in enumerate(paths)}
    return DraftTree(
        np.asarray([path[-1] for path in paths], np.int32),
        np.asarray([position[path[:-1]] if len(path) > 1 else -1 for path in paths], np.int32),
        np.clip(np.asarray(merged, np.float32), 0.0, 1.0),
    )


def _merge_paths(
    trees: Sequence[DraftTree], probs: Sequence[np.ndarray], budget: int, combine: str
) -> tuple[list[tuple[int, ...]], list[float]]:
    """:func:`merge_trees` as (paths, probabilities) in final order."""
    if combine not in ("max", "or"):
        raise ValueError(f"combine={combine!r} must be 'max' or 'or'")
    index: dict[tuple[int, int], int] = {}
    paths: list[tuple[int, ...]] = []
    parents: list[int] = []
    miss: list[float] = []  # max: -p (min is best), or: prod(1 - p)
    for tree, prob in zip(trees, probs, strict=True):
        ids: list[int] = []
        for tok, parent, p in zip(tree.tokens.tolist(), tree.parents.tolist(), prob.tolist(), strict=True):
            merged_parent = -1 if parent < 0 else ids[parent]
            key = (merged_parent, tok)
            node = index.get(key)
            if node is None:
                node = index[key] = len(paths)
                paths.append((paths[merged_parent] if merged_parent >= 0 else ()) + (tok,))
                parents.append(merged_parent)
                miss.append(-p if combine == "max" else 1.0 - p)
            elif combine == "max":
                miss[node] = min(miss[node], -p)
            else:
                miss[node] *= 1.0 - p
            ids.append(node)
    if not paths or budget <= 0:
        return [], []
    merged = [-x for x in miss] if combine == "max" else [1.0 - x for x in miss]
    for i, parent in enumerate(parents):  # guard against float rounding: a child never beats its parent
        if parent >= 0 and merged[i] > merged[parent]:
            merged[i] = merged[parent]
    order = sorted(range(len(paths)), key=lambda i: (-merged[i], len(paths[i]), paths[i]))[:budget]
    return [paths[i] for i in order], [merged[i] for i in order]


def extend_best_first(
    candidates: DraftTree | tuple[list[tuple[int, ...]], list[float]],
    root: int,
    table: np.ndarray,
    hit_rates: np.ndarray,
    budget: int,
    max_depth: int,
) -> DraftTree:
    """The ``budget`` most probable nodes among ``candidates`` and their extensions from ``table``.

    ``candidates``: a merged tree (weights = probabilities, non-increasing from parent to child).
    ``table``: int32[V, k], the model's recent top-k next tokens after each token (-1 = unknown);
    ``hit_rates``: float[k], probability that the rank-r entry is the model's next token. Every taken
    node (and the root, token ``root``, probability 1) offers its table row as children with
    probability p(node) * hit_rates[r]; a child equal to a candidate merges with it (the larger
    probability wins). Taken best-first, ties by depth then path, so parents precede children.
    ``candidates`` may also be given as (paths, probabilities), parents first."""
    import heapq

    if isinstance(candidates, DraftTree):
        cand_paths: list[tuple[int, ...]] = []
        for tok, parent in zip(candidates.tokens.tolist(), candidates.parents.tolist(), strict=True):
            cand_paths.append((cand_paths[parent] if parent >= 0 else ()) + (tok,))
        cand_probs = candidates.weights.tolist()
    else:
        cand_paths, cand_probs = candidates
    vocab, k = table.shape
    # heap entries: (-p, depth, path, from_table, rank, p_parent)
    heap: list[tuple[float, int, tuple[int, ...], int, int, float]] = [
        (-float(p), len(path), path, 0, 0, 0.0) for path, p in zip(cand_paths, cand_probs, strict=True)
    ]

    def offer(parent_path: tuple[int, ...], parent_token: int, rank: int, p_parent: float) -> None:
        if rank >= k or len(parent_path) >= max_depth or not 0 <= parent_token < vocab:
            return
        tok = int(table[parent_token, rank])
        if tok >= 0:
            p = p_parent * float(hit_rates[rank])
            heapq.heappush(heap, (-p, len(parent_path) + 1, (*parent_path, tok), 1, rank, p_parent))

    heapq.heapify(heap)
    offer((), root, 0, 1.0)
    taken: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    while heap and len(tokens) < budget:
        neg_p, _, path, from_table, rank, p_parent = heapq.heappop(heap)
        if from_table:  # the next rank below the same parent
            offer(path[:-1], path[-2] if len(path) > 1 else root, rank + 1, p_parent)
        if path in taken or (len(path) > 1 and path[:-1] not in taken):
            continue
        taken[path] = len(tokens)
        tokens.append(path[-1])
        parents.append(taken[path[:-1]] if len(path) > 1 else -1)
        probs.append(-neg_p)
        offer(path, path[-1], 0, -neg_p)
    if not tokens:
        return DraftTree.empty()
    return DraftTree(
        np.asarray(tokens, np.int32), np.asarray(parents, np.int32), np.clip(np.asarray(probs), 0.0, 1.0)
    )


@dataclass(frozen=True)
class MergeConfig:
    """How :class:`MergedDrafter` ranks and combines sources."""

    combine: str = "max"
    """Probability of a path several sources propose: 'max' or 'or' (noisy-or)."""
    calibrate: bool = True
    """Learn per-source acceptance rates online from observe()."""
    strength: float = 8.0
    """Pseudo-observations behind a source's own weights in calibration."""
    extend: bool = True
    """Use a :class:`RecycleDrafter` among the sources to extend every node of the merged tree (not
    only the root) with the model's recent top candidates, best-first by probability."""
    extend_depth: int = 10
    """Deepest node an extension may add."""

    def __post_init__(self) -> None:
        if self.extend_depth < 1:
            raise ValueError(f"extend_depth={self.extend_depth} must be >= 1")
        if self.combine not in ("max", "or"):
            raise ValueError(f"combine={self.combine!r} must be 'max' or 'or'")
        if self.strength <= 0:
            raise ValueError(f"strength={self.strength} must be > 0")


class MergedDrafter:
    """Several drafters as one: their trees merged under one budget (see the module docstring).

    ``scales``: a prior multiplier per source on its own weights (1 = trust them as given)."""

    def __init__(
        self,
        drafters: Sequence[Drafter],
        scales: Sequence[float] | None = None,
        config: MergeConfig | None = None,
    ) -> None:
        if not drafters:
            raise ValueError("drafters must hold at least one drafter")
        self.drafters = list(drafters)
        self.config = config or MergeConfig()
        self.calibration = Calibration(len(self.drafters), self.config.strength, scales)
        self._last: list[tuple[DraftTree, int]] = []
        from restspec.draft.recycle import RecycleDrafter

        recyclers = [d for d in self.drafters if isinstance(d, RecycleDrafter)]
        self.extender: RecycleDrafter | None = recyclers[0] if self.config.extend and recyclers else None

    def start_request(self, prompt: np.ndarray) -> None:
        for drafter in self.drafters:
            drafter.start_request(prompt)

    def stop_request(self) -> None:
        for drafter in self.drafters:
            drafter.stop_request()

    def source_trees(self, context: np.ndarray, budget: int) -> list[tuple[DraftTree, int]]:
        """Each source's own tree and its match length (0 when it reports none). The extender, if
        any, proposes nothing here: it extends the merged tree instead."""
        out = []
        for drafter in self.drafters:
            if drafter is self.extender:
                out.append((DraftTree.empty(), 0))
                continue
            tree = drafter.propose(context, budget)
            out.append((tree, int(getattr(drafter, "last_match_length", 0))))
        return out

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if budget <= 0:
            self._last = []
            return DraftTree.empty()
        self._last = self.source_trees(context, budget)
        trees = [tree for tree, _ in self._last]
        if self.config.calibrate:
            probs = [
                self.calibration.estimate(s, length, tree) for s, (tree, length) in enumerate(self._last)
            ]
        else:
            probs = [np.minimum.accumulate(tree.weights.astype(np.float64)) for tree in trees]
        if self.extender is None or len(context) == 0:
            return merge_trees(trees, probs, budget, self.config.combine)
        # a candidate ranked below ``budget`` others can never be taken (they and their parents come
        # first), so only the first ``budget`` are offered to the extension
        candidates = _merge_paths(trees, probs, budget, self.config.combine)
        return extend_best_first(
            candidates,
            int(context[-1]),
            self.extender.table,
            self.extender.hit_rates,
            budget,
            self.config.extend_depth,
        )

    def observe(self, context: np.ndarray, accepted: np.ndarray, logits: TreeLogits | None = None) -> None:
        if self.config.calibrate:
            for s, (tree, length) in enumerate(self._last):
                self.calibration.update(s, length, tree, accepted)
        self._last = []
        for drafter in self.drafters:
            drafter.observe(context, accepted, logits)
