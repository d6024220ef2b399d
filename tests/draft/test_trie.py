"""select_tree: worked examples and properties against a brute-force Python trie."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trie_reference import count_trie, select_tree_numpy

from restspec.draft import DraftTree, select_tree


def node_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    """The token path of every node, in node order."""
    paths: list[tuple[int, ...]] = []
    for tok, parent in zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True):
        paths.append((paths[parent] if parent >= 0 else ()) + (tok,))
    return paths


def brute_force(continuations: np.ndarray, budget: int) -> list[tuple[tuple[int, ...], int]]:
    """Reference: count every prefix in a dict trie, sort by (count desc, depth, path), keep budget."""
    counts: dict[tuple[int, ...], int] = {}
    for row in continuations.tolist():
        path: tuple[int, ...] = ()
        for tok in row:
            if tok < 0:
                break
            path += (tok,)
            counts[path] = counts.get(path, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
    return ranked[:budget]


def as_ranked(tree: DraftTree, k: int) -> list[tuple[tuple[int, ...], int]]:
    return list(zip(node_paths(tree), np.rint(tree.weights * k).astype(int).tolist(), strict=True))


def test_worked_example_counts_prefixes():
    # rows: [5 6 7], [5 6 8], [5 6 -], [9 - -]
    # prefix counts: (5)=3, (5,6)=3, (9)=1, (5,6,7)=1, (5,6,8)=1
    # order: count desc, then depth asc, then path ids: (5) (5,6) (9) (5,6,7) (5,6,8)
    cont = np.array([[5, 6, 7], [5, 6, 8], [5, 6, -1], [9, -1, -1]], np.int32)
    tree = select_tree(cont, 10)
    assert node_paths(tree) == [(5,), (5, 6), (9,), (5, 6, 7), (5, 6, 8)]
    assert tree.parents.tolist() == [-1, 0, -1, 1, 1]
    np.testing.assert_allclose(tree.weights, [3 / 4, 3 / 4, 1 / 4, 1 / 4, 1 / 4])
    # budget 3 keeps the three best: (5) (5,6) (9)
    assert node_paths(select_tree(cont, 3)) == [(5,), (5, 6), (9,)]


def test_ties_break_by_depth_then_token_ids_independent_of_row_order():
    # (2)=2, (1)=2, (2,4)=2, (1,3)=1, (1,0)=1 -> (1) (2) (2,4) (1,0) (1,3)
    cont = np.array([[2, 4], [1, 3], [2, 4], [1, 0]], np.int32)
    expected = [(1,), (2,), (2, 4), (1, 0), (1, 3)]
    assert node_paths(select_tree(cont, 5)) == expected
    assert node_paths(select_tree(cont[::-1].copy(), 5)) == expected


def test_padding_is_a_suffix_tokens_after_minus_one_are_ignored():
    # [3 -1 4]: only (3) counts; the 4 after the padding is not a continuation
    cont = np.array([[3, -1, 4]], np.int32)
    assert node_paths(select_tree(cont, 5)) == [(3,)]


def test_empty_inputs_give_empty_trees():
    assert len(select_tree(np.zeros((0, 10), np.int32), 8)) == 0
    assert len(select_tree(np.full((4, 3), -1, np.int32), 8)) == 0
    assert len(select_tree(np.array([[1, 2]], np.int32), 0)) == 0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget=-1"):
        select_tree(np.zeros((1, 1), np.int32), -1)
    with pytest.raises(ValueError, match="2-D"):
        select_tree(np.zeros(3, np.int32), 4)


def test_large_vocabulary_ids_sort_correctly():
    # ids above 2**16 need more radix passes; (70000) twice beats (65536) once
    cont = np.array([[70000, 1], [65536, 2], [70000, 1]] * 10, np.int32)
    assert node_paths(select_tree(cont, 3)) == [(70000,), (70000, 1), (65536,)]


continuation_arrays = st.integers(1, 60).flatmap(
    lambda k: st.integers(1, 6).flatmap(
        lambda m: st.tuples(
            st.lists(st.lists(st.integers(0, 4), min_size=m, max_size=m), min_size=k, max_size=k),
            st.lists(st.integers(0, m), min_size=k, max_size=k),
        )
    )
)


def build(rows_and_lengths) -> np.ndarray:
    rows, lengths = rows_and_lengths
    cont = np.asarray(rows, np.int32)
    cont[np.arange(cont.shape[1])[None, :] >= np.asarray(lengths)[:, None]] = -1
    return cont


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(continuation_arrays, st.integers(0, 40))
def test_matches_brute_force_trie(rows_and_lengths, budget):
    cont = build(rows_and_lengths)
    tree = select_tree(cont, budget)
    assert as_ranked(tree, len(cont)) == brute_force(cont, budget)
    reference = select_tree_numpy(cont, budget)
    assert tree.tokens.tolist() == reference.tokens.tolist()
    assert tree.parents.tolist() == reference.parents.tolist()
    np.testing.assert_allclose(tree.weights, reference.weights)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(continuation_arrays, st.integers(0, 40), st.randoms(use_true_random=False))
def test_prefix_closed_within_budget_deterministic(rows_and_lengths, budget, rnd):
    cont = build(rows_and_lengths)
    tree = select_tree(cont, budget)
    assert len(tree) <= budget
    # prefix closed: every node's parent is earlier (DraftTree validates) and weights never rise
    for i, parent in enumerate(tree.parents.tolist()):
        assert parent < i
        if parent >= 0:
            assert tree.weights[i] <= tree.weights[parent]
    assert np.all(np.diff(tree.weights) <= 0)
    shuffled = cont[rnd.sample(range(len(cont)), len(cont))]
    again = select_tree(shuffled, budget)
    assert node_paths(again) == node_paths(tree)
    # a smaller budget is a prefix of a larger one
    assert node_paths(select_tree(cont, budget // 2)) == node_paths(tree)[: budget // 2]


def test_count_trie_counts_every_prefix():
    # rows [1 2], [1 3]: nodes (1)=2, (1,2)=1, (1,3)=1
    tokens, depths, counts, parents, _ = count_trie(np.array([[1, 2], [1, 3]], np.int32))
    assert sorted(zip(tokens.tolist(), depths.tolist(), counts.tolist(), strict=True)) == [
        (1, 1, 2),
        (2, 2, 1),
        (3, 2, 1),
    ]
    assert parents[depths == 2].tolist() == [0, 0]
