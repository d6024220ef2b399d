"""MergedDrafter: one tree from several sources under one budget."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from steps import step

from restspec.draft import (
    ContextDrafter,
    MergeConfig,
    MergedDrafter,
    RecycleDrafter,
    StatelessDrafter,
    default_drafter,
    extend_best_first,
    merge_trees,
    node_outcomes,
    select_tree,
)
from restspec.draft.merge import (
    Calibration,
    Candidates,
    RecycleRows,
    conditional_weights,
    merge_candidates,
    pair_slot,
)
from restspec.draft.tree import DraftTree


def rows_of(
    table: np.ndarray, pairs: dict[tuple[int, int], list[int]] | None = None, slots: int = 64
) -> RecycleRows:
    """The recycling rows of ``table`` (int32[V, k]) and of the pairs ``{(before, token): row}``."""
    vocab, k = table.shape
    keys = np.full(slots, -1, np.int64)
    rows = np.full((slots, k), -1, np.int32)
    for (before, token), row in (pairs or {}).items():
        key = before * vocab + token
        slot = pair_slot(key, slots)
        assert keys[slot] == -1, "pairs that share a slot"
        keys[slot] = key
        rows[slot, : len(row)] = row
    return RecycleRows(np.asarray(table, np.int32), keys, rows)


def by_rank(hit_rates) -> np.ndarray:
    """Rates that depend on the rank alone (not on the row kind or the row before): float[2, k, k + 1]."""
    hit_rates = np.asarray(hit_rates, np.float64)
    return np.broadcast_to(hit_rates[None, :, None], (2, len(hit_rates), len(hit_rates) + 1)).copy()


def node_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for tok, parent in zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True):
        paths.append((paths[parent] if parent >= 0 else ()) + (tok,))
    return paths


class FixedDrafter(StatelessDrafter):
    def __init__(self, tree: DraftTree, match_length: int = 3) -> None:
        self.tree = DraftTree(tree.tokens, tree.parents, tree.weights, match_length=match_length)

    def propose(self, context, budget):
        return self.tree.truncate(budget)


def test_identical_paths_merge_and_take_the_higher_probability():
    # source A: (1)=.6 (1,2)=.5 ; source B: (1)=.9 (3)=.2 -> (1)=.9 (1,2)=.5 (3)=.2
    a = DraftTree(np.array([1, 2]), np.array([-1, 0]), np.array([0.6, 0.5]))
    b = DraftTree(np.array([1, 3]), np.array([-1, -1]), np.array([0.9, 0.2]))
    merged = merge_trees([a, b], [a.weights.astype(float), b.weights.astype(float)], 8)
    assert node_paths(merged) == [(1,), (1, 2), (3,)]
    np.testing.assert_allclose(merged.weights, [0.9, 0.5, 0.2])
    # noisy-or: (1) = 1 - 0.4 * 0.1 = 0.96
    merged_or = merge_trees([a, b], [a.weights.astype(float), b.weights.astype(float)], 8, combine="or")
    np.testing.assert_allclose(merged_or.weights[0], 0.96, rtol=1e-6)
    # budget 2 keeps the two most probable: (1) and (1,2)
    assert node_paths(merge_trees([a, b], [a.weights.astype(float), b.weights.astype(float)], 2)) == [
        (1,),
        (1, 2),
    ]


def test_single_source_without_calibration_is_unchanged():
    tree = select_tree(np.array([[1, 2, 3], [1, 2, 4], [5, 6, 7]], np.int32), 16)
    drafter = MergedDrafter([FixedDrafter(tree)], config=MergeConfig(calibrate=False))
    for budget in (0, 1, 3, 16):
        assert node_paths(drafter.propose(np.array([0], np.int32), budget)) == node_paths(tree)[:budget]


def test_node_outcomes_scores_only_settled_nodes():
    # tree: (1) (1,2) (1,3) (4) (1,2,5); accepted [1 2] (draft 1, model's next token 2)
    tree = DraftTree(np.array([1, 2, 3, 4, 5]), np.array([-1, 0, 0, -1, 1]))
    known, hit = node_outcomes(tree, np.array([1, 2]))
    assert known.tolist() == [True, True, True, True, False]  # depth 3 is beyond what is known
    assert hit.tolist() == [True, True, False, False, False]


def test_calibration_learns_that_a_source_is_wrong():
    good = DraftTree(np.array([7]), np.array([-1]), np.array([0.5]))
    bad = DraftTree(np.array([8]), np.array([-1]), np.array([0.6]))
    drafter = MergedDrafter([FixedDrafter(good), FixedDrafter(bad)])
    assert drafter.propose(np.array([0], np.int32), 1).tokens.tolist() == [8]
    for _ in range(40):
        proposal = drafter.propose(np.array([0], np.int32), 2)
        drafter.observe(step(np.array([0], np.int32), np.array([7]), tree=proposal))
    assert drafter.propose(np.array([0], np.int32), 1).tokens.tolist() == [7]


def test_calibration_learns_from_the_proposal_the_step_carries():
    # two requests' proposals are in flight at once: each step calibrates on its own proposal
    good = DraftTree(np.array([7]), np.array([-1]), np.array([0.5]))
    bad = DraftTree(np.array([8]), np.array([-1]), np.array([0.6]))
    drafter = MergedDrafter([FixedDrafter(good), FixedDrafter(bad)])
    for _ in range(40):
        first = drafter.propose(np.array([0], np.int32), 2)
        drafter.propose(np.array([1], np.int32), 2)  # another request's, observed later (or never)
        drafter.observe(step(np.array([0], np.int32), np.array([7]), tree=first))
        drafter.observe(step(np.array([1], np.int32), np.array([7])))  # no proposal: nothing to learn
    assert drafter.propose(np.array([0], np.int32), 1).tokens.tolist() == [7]
    assert len(first.sources) == 2 and first.sources[1].tokens.tolist() == [8]


def test_calibrated_probability_is_the_product_of_conditional_rates():
    # a chain 1 -> 2 -> 3; verification accepts node 2 in half of the steps that reach it, and node 3
    # in half of those that accept node 2: node 3 is accepted in a quarter of all steps
    chain = DraftTree(np.array([1, 2, 3]), np.array([-1, 0, 1]), np.array([0.9, 0.8, 0.7]))
    np.testing.assert_allclose(conditional_weights(chain), [0.9, 0.8 / 0.9, 0.7 / 0.8], rtol=1e-6)
    calibration = Calibration(1)
    # before any evidence: the source's own path weights
    np.testing.assert_allclose(calibration.estimate(0, chain), [0.9, 0.8, 0.7], rtol=1e-6)
    outcomes = [[1, 2, 3, 4], [1, 2, 9], [1, 9], [1, 9]]
    for _ in range(200):
        for accepted in outcomes:
            calibration.update(0, chain, np.array(accepted))
    estimate = calibration.estimate(0, chain)
    np.testing.assert_allclose(estimate, [1.0, 0.5, 0.25], atol=0.02)
    assert (np.diff(estimate) <= 0).all()  # a node never beats its parent


source_trees = st.lists(
    st.tuples(
        st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), min_size=1, max_size=12),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=4,
)


def source_trees_and_probs(sources) -> tuple[list[DraftTree], list[np.ndarray]]:
    """Trees of up to 20 nodes from drawn continuation rows (``pad`` empty rows each), with
    non-increasing probabilities."""
    trees = []
    for rows, pad in sources:
        width = max(len(r) for r in rows)
        cont = np.full((len(rows) + pad, width), -1, np.int32)
        for i, r in enumerate(rows):
            cont[i, : len(r)] = r
        trees.append(select_tree(cont, 20))
    return trees, [np.minimum.accumulate(t.weights.astype(np.float64)) for t in trees]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source_trees, st.integers(0, 20), st.sampled_from(["max", "or"]))
def test_merge_within_budget_and_never_drops_a_higher_ranked_path(sources, budget, combine):
    trees, probs = source_trees_and_probs(sources)
    merged = merge_trees(trees, probs, budget, combine)
    assert len(merged) <= budget
    paths = node_paths(merged)
    assert len(set(paths)) == len(paths)
    assert all(p[:-1] in paths[:i] for i, p in enumerate(paths) if len(p) > 1)  # parents first
    kept = dict(zip(paths, merged.weights.tolist(), strict=True))
    lowest_kept = min(kept.values(), default=np.inf)
    for tree, prob in zip(trees, probs, strict=True):
        for path, p in zip(node_paths(tree), prob.tolist(), strict=True):
            # a path at least as probable as the merged value of a source path is >= that source's value
            if path in kept:
                assert kept[path] >= np.float32(p) - 1e-6
            else:  # dropped: only when the tree is full of paths ranked at least as high
                assert len(merged) == budget
                assert lowest_kept >= np.float32(p) - 1e-6
    again = merge_trees(trees, probs, budget, combine)
    assert node_paths(again) == paths


def test_default_drafter_runs_a_request_lifecycle():
    drafter = default_drafter([], vocab_size=16)
    context = np.array([1, 2, 3, 1, 2], np.int32)
    drafter.start_request(context)
    tree = drafter.propose(context, 4)
    assert len(tree) <= 4
    assert node_paths(tree)[0] == (3,)  # the context drafter saw "1 2" followed by 3
    drafter.observe(step(context, np.array([3, 1], np.int32)))
    drafter.stop_request()
    assert any(isinstance(d, ContextDrafter) for d in drafter.drafters)
    assert isinstance(drafter.extender, RecycleDrafter) and drafter.extender not in drafter.drafters


def test_extension_adds_table_children_below_every_node_best_first():
    # candidates (5)=.6 (5,6)=.5; table rows: 1 -> [5 9], 5 -> [6 7], 6 -> [8 -]; hits .5 .2; root 1
    # root offers (5)=.5 (merges with the candidate .6) and (9)=.2; (5) offers (5,6)=.3 (merges),
    # (5,7)=.12; (5,6) offers (5,6,8)=.25 -> (5).6 (5,6).5 (5,6,8).25 (9).2 (5,7).12
    candidates = DraftTree(np.array([5, 6]), np.array([-1, 0]), np.array([0.6, 0.5]))
    table = np.full((10, 2), -1, np.int32)
    table[1], table[5], table[6, 0] = [5, 9], [6, 7], 8
    root, rows, rates = np.array([1]), rows_of(table), by_rank([0.5, 0.2])
    tree = extend_best_first(candidates, root, rows, rates, 8, max_depth=5)
    assert node_paths(tree) == [(5,), (5, 6), (5, 6, 8), (9,), (5, 7)]
    np.testing.assert_allclose(tree.weights, [0.6, 0.5, 0.25, 0.2, 0.12], rtol=1e-6)
    assert node_paths(extend_best_first(candidates, root, rows, rates, 3, 5)) == [
        (5,),
        (5, 6),
        (5, 6, 8),
    ]
    # depth limit 1: extensions only below the root; the candidates stay
    assert node_paths(extend_best_first(candidates, root, rows, rates, 8, 1)) == [
        (5,),
        (5, 6),
        (9,),
    ]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 5), min_size=2, max_size=40),
    st.integers(0, 12),
    st.lists(st.lists(st.integers(0, 5), min_size=2, max_size=2), min_size=1, max_size=6),
)
def test_merged_drafter_trees_are_prefix_closed_within_budget(context, budget, tables):
    drafter = default_drafter([], vocab_size=6)
    recycle = drafter.extender
    for row, tokens in enumerate(tables):
        recycle.table[row, :2] = tokens if tokens[0] != tokens[1] else [tokens[0], -1]
    ctx = np.asarray(context, np.int32)
    drafter.start_request(ctx)
    tree = drafter.propose(ctx, budget)
    again = drafter.propose(ctx, budget)
    drafter.stop_request()
    assert len(tree) <= budget
    paths = node_paths(tree)
    assert all(p[:-1] in paths[:i] for i, p in enumerate(paths) if len(p) > 1)
    assert np.all(np.diff(tree.weights) <= 1e-7)
    assert paths == node_paths(again)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source_trees,
    st.integers(1, 12),
    st.lists(st.lists(st.integers(0, 3), min_size=2, max_size=2), min_size=4, max_size=4),
)
def test_extension_needs_only_the_first_budget_candidates(sources, budget, rows):
    """MergedDrafter offers the extension only the ``budget`` best merged candidates (as float64
    paths and probabilities, ranked exactly as the extension ranks them): the rest can never be
    taken, so the tree equals the one extended from every candidate."""
    trees, probs = source_trees_and_probs(sources)
    table = rows_of(np.asarray([r if r[0] != r[1] else [r[0], -1] for r in rows], np.int32))
    rates, root = by_rank([0.5, 0.2]), np.array([0])
    every = extend_best_first(merge_candidates(trees, probs, 10**6, "or"), root, table, rates, budget, 6)
    first = extend_best_first(merge_candidates(trees, probs, budget, "or"), root, table, rates, budget, 6)
    assert node_paths(first) == node_paths(every)
    np.testing.assert_array_equal(first.weights, every.weights)


def reference_merge(trees, probs, budget, combine):
    """The merge by its definition, in Python: (paths, probabilities) sorted by (-p, depth, path)."""
    miss: dict[tuple[int, ...], float] = {}  # max: -p (the least is the best), or: prod(1 - p)
    for tree, prob in zip(trees, probs, strict=True):
        for path, p in zip(node_paths(tree), np.asarray(prob, np.float64).tolist(), strict=True):
            if combine == "max":
                miss[path] = min(miss.get(path, -p), -p)
            else:
                miss[path] = miss[path] * (1.0 - p) if path in miss else 1.0 - p
    merged = {path: -x if combine == "max" else 1.0 - x for path, x in miss.items()}
    for path in sorted(merged, key=len):  # a child never beats its parent
        if len(path) > 1:
            merged[path] = min(merged[path], merged[path[:-1]])
    order = sorted(merged, key=lambda path: (-merged[path], len(path), path))[: max(budget, 0)]
    return order, [merged[path] for path in order]


def reference_extend(cand_paths, cand_probs, context, table, pairs, rates, budget, max_depth):
    """Best-first extension by its definition, with Python's heap over (-p, depth, path, from the
    table, rank, parent's p) tuples; ``pairs``: {(before, token): row}."""
    vocab, k = table.shape
    heap = [(-float(p), len(path), path, 0, 0, 0.0) for path, p in zip(cand_paths, cand_probs, strict=True)]
    root, before_root = int(context[-1]), int(context[-2]) if len(context) > 1 else -1

    def offer(path, p_parent):
        token, before = (path[-1], path[-2] if len(path) > 1 else root) if path else (root, before_root)
        if len(path) >= max_depth or not 0 <= token < vocab:
            return
        kind, row = (1, pairs[(before, token)]) if (before, token) in pairs else (0, list(table[token]))
        row_before = list(table[before]) if 0 <= before < vocab else []
        for rank, tok in enumerate(int(t) for t in row):
            if tok >= 0:
                s = row_before.index(tok) if tok in row_before else k
                p = p_parent * float(rates[kind, rank, s])
                heapq.heappush(heap, (-p, len(path) + 1, (*path, tok), 1, rank, p_parent))

    heapq.heapify(heap)
    offer((), 1.0)
    taken: list[tuple[int, ...]] = []
    probs: list[float] = []
    while heap and len(taken) < budget:
        neg_p, _, path, _, _, _ = heapq.heappop(heap)
        if path in taken or (len(path) > 1 and path[:-1] not in taken):
            continue
        taken.append(path)
        probs.append(-neg_p)
        offer(path, -neg_p)
    return taken, probs


tied_probs = st.sampled_from([1.0, 0.5, 0.5, 0.25, 0.3, 0.125, 0.1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source_trees, st.integers(0, 25), st.sampled_from(["max", "or"]), st.data())
def test_compiled_merge_matches_its_definition_ties_included(sources, budget, combine, data):
    trees, _ = source_trees_and_probs(sources)
    # few distinct values, so that equal probabilities (ties by depth, then path) are common
    probs = [
        np.minimum.accumulate(np.asarray(data.draw(st.lists(tied_probs, min_size=len(t), max_size=len(t)))))
        for t in trees
    ]
    merged = merge_candidates(trees, probs, budget, combine)
    paths, expected = reference_merge(trees, probs, budget, combine)
    tree_paths = node_paths(DraftTree(merged.tokens, merged.parents, np.clip(merged.probs, 0, 1)))
    assert tree_paths == paths
    np.testing.assert_array_equal(merged.probs, np.asarray(expected, np.float64))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source_trees,
    st.integers(0, 14),
    st.integers(1, 6),
    st.lists(st.lists(st.integers(-1, 4), min_size=3, max_size=3), min_size=5, max_size=5),
    st.dictionaries(
        st.tuples(st.integers(0, 4), st.integers(0, 4)),
        st.lists(st.integers(0, 4), min_size=1, max_size=3, unique=True),
        max_size=4,
    ),
    st.lists(st.sampled_from([0.5, 0.25, 0.2, 0.1]), min_size=24, max_size=24),
    st.lists(st.integers(-1, 5), min_size=1, max_size=3),
    st.sampled_from(["max", "or"]),
)
def test_compiled_extension_matches_its_definition_ties_included(
    sources, budget, max_depth, rows, pairs, rates, context, combine
):
    trees, probs = source_trees_and_probs(sources)
    table = np.full((5, 3), -1, np.int32)
    for r, row in enumerate(rows):  # a row lists distinct tokens, best first, then unknowns
        distinct = list(dict.fromkeys(t for t in row if t >= 0))
        table[r, : len(distinct)] = distinct
    # pairs of one hash slot: keep the first
    slots = {}
    for pair in pairs:
        slots.setdefault(pair_slot(pair[0] * 5 + pair[1], 64), pair)
    pairs = {pair: pairs[pair] for pair in slots.values()}
    rates = np.asarray(rates).reshape(2, 3, 4)
    candidates = merge_candidates(trees, probs, budget, combine)
    cand_paths = node_paths(DraftTree(candidates.tokens, candidates.parents, np.clip(candidates.probs, 0, 1)))
    tree = extend_best_first(candidates, np.asarray(context), rows_of(table, pairs), rates, budget, max_depth)
    paths, expected = reference_extend(
        cand_paths, candidates.probs.tolist(), context, table, pairs, rates, budget, max_depth
    )
    assert node_paths(tree) == paths
    np.testing.assert_array_equal(tree.weights, np.clip(np.asarray(expected), 0, 1).astype(np.float32))


def test_candidates_must_match_their_trees():
    tree = DraftTree(np.array([1, 2]), np.array([-1, 0]), np.array([0.5, 0.4]))
    with pytest.raises(ValueError, match="2 nodes got 1 probabilities"):
        merge_candidates([tree], [np.array([0.5])], 4, "max")
    assert isinstance(merge_candidates([], [], 4, "or"), Candidates)
