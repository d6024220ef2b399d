"""RecycleDrafter: the table learns from verification logits; trees follow the table."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from steps import step

from restspec.draft import RecycleDrafter, TreeLogits
from restspec.draft.recycle import best_first_template, top_k_rows
from restspec.draft.tree import DraftTree

VOCAB = 10


def logits_ranking(input_ids: list[int], rankings: list[list[int]]) -> TreeLogits:
    """Row r ranks rankings[r] first to last, everything else below."""
    logits = np.full((len(input_ids), VOCAB), -100.0, np.float32)
    for r, ranking in enumerate(rankings):
        logits[r, ranking] = -np.arange(len(ranking), dtype=np.float32)
    return TreeLogits(np.asarray(input_ids, np.int32), logits)


def node_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for tok, parent in zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True):
        paths.append((paths[parent] if parent >= 0 else ()) + (tok,))
    return paths


def test_template_is_best_first_with_parents_first():
    # hit rates 0.5 / 0.25: paths (0)=.5, (0,0)=.25, (1)=.25, (0,0,0)=.125, (0,1)=.125, ...
    parents, ranks, probs = best_first_template(np.array([0.5, 0.25]), 5, max_depth=3)
    assert probs.tolist() == [0.5, 0.25, 0.25, 0.125, 0.125]
    assert np.all(parents < np.arange(5))
    assert ranks[0] == 0 and parents[0] == -1


def test_unknown_token_drafts_nothing():
    drafter = RecycleDrafter(VOCAB, k=2)
    assert len(drafter.propose(np.array([3], np.int32), 4)) == 0


def test_observe_fills_rows_of_all_verified_inputs_and_propose_expands_them():
    drafter = RecycleDrafter(VOCAB, k=2, max_depth=2)
    # the verified tree fed inputs 1 (root), 2 and 7 (a rejected node's row is learned too)
    drafter.observe(
        step(
            np.array([1], np.int32),
            np.array([2], np.int32),
            logits_ranking([1, 2, 7], [[2, 7], [3, 4], [5, 6]]),
        )
    )
    assert drafter.table[1].tolist() == [2, 7]
    assert drafter.table[7].tolist() == [5, 6]
    tree = drafter.propose(np.array([0, 1], np.int32), 6)
    # from token 1: children 2 (rank 0) and 7 (rank 1); below 2: 3, 4; below 7: 5, 6
    assert set(node_paths(tree)) == {(2,), (7,), (2, 3), (2, 4), (7, 5), (7, 6)}
    assert node_paths(tree)[0] == (2,)
    assert np.all(np.diff(tree.weights) <= 0)


def test_hit_rates_track_which_rank_was_right():
    drafter = RecycleDrafter(VOCAB, k=2)
    drafter.observe(step(np.array([1], np.int32), np.array([2], np.int32), logits_ranking([1], [[2, 3]])))
    before = drafter.hit_rates.copy()
    # the model now prefers 3 after 1: the old row's rank-1 candidate was right
    for _ in range(50):
        drafter.observe(step(np.array([1], np.int32), np.array([3], np.int32), logits_ranking([1], [[3, 2]])))
        drafter.observe(step(np.array([1], np.int32), np.array([2], np.int32), logits_ranking([1], [[2, 3]])))
    assert drafter.hit_rates[1] > before[1]
    assert drafter.hit_rates[0] < before[0]


def test_without_logits_observed_pairs_move_to_the_front():
    drafter = RecycleDrafter(VOCAB, k=3)
    drafter.observe(step(np.array([4], np.int32), np.array([5, 6], np.int32)))  # pairs 4->5, 5->6
    drafter.observe(step(np.array([4], np.int32), np.array([8], np.int32)))  # 4->8
    assert drafter.table[4].tolist() == [8, 5, -1]
    assert drafter.table[5].tolist() == [6, -1, -1]


def test_budget_is_respected_when_rows_are_missing():
    drafter = RecycleDrafter(VOCAB, k=3)
    drafter.observe(step(np.array([1], np.int32), np.array([2], np.int32), logits_ranking([1], [[2, 3, 4]])))
    for budget in range(6):
        tree = drafter.propose(np.array([1], np.int32), budget)
        assert len(tree) <= min(budget, 3)  # only token 1's row is known: at most its 3 children


def test_top_k_rows_matches_tree_logits_top_candidates():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    expected = TreeLogits(np.zeros(5, np.int32), logits).top_candidates(8)
    assert top_k_rows(logits, 8).tolist() == expected.tolist()
    # ties keep the lower id first; k above V gives V columns (like top_candidates)
    assert top_k_rows(np.array([[1.0, 3.0, 3.0]]), 5).tolist() == [[1, 2, 0]]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 700),
    st.integers(1, 12),
    st.integers(1, 6),
    st.integers(0, 2**32 - 1),
)
def test_top_k_rows_is_a_stable_top_k_when_blocks_are_skipped(vocab, k, levels, seed):
    # few distinct values (many ties, -inf among them) over vocabularies of many blocks
    rng = np.random.default_rng(seed)
    values = np.concatenate([[-np.inf], np.arange(levels - 1, dtype=np.float32)])
    logits = rng.choice(values, size=(3, vocab)).astype(np.float32)
    expected = np.argsort(-logits, axis=1, kind="stable")[:, : min(k, vocab)]
    assert top_k_rows(logits, k).tolist() == expected.tolist()
