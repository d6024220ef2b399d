"""RecycleDrafter: the rows learn from verification logits; trees follow the rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from steps import step

from restspec.draft import RecycleDrafter, TreeLogits
from restspec.draft.recycle import INITIAL_HIT_RATES, top_k_rows
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


def test_unknown_token_drafts_nothing():
    drafter = RecycleDrafter(VOCAB, k=2)
    assert len(drafter.propose(np.array([3], np.int32), 4)) == 0


def chain(tokens: list[int]) -> DraftTree:
    """A chain of draft nodes, each below the one before."""
    n = len(tokens)
    return DraftTree(np.asarray(tokens), np.arange(-1, n - 1), np.linspace(0.9, 0.5, n))


def test_observe_fills_rows_of_all_verified_inputs_and_propose_expands_them():
    drafter = RecycleDrafter(VOCAB, k=2, max_depth=2)
    # the verified tree 2, 7 (both below the root 1) fed inputs 1, 2 and 7; a rejected node's row
    # is learned too
    tree = DraftTree(np.array([2, 7]), np.array([-1, -1]), np.array([0.5, 0.4]))
    drafter.observe(
        step(
            np.array([1], np.int32),
            np.array([2], np.int32),
            logits_ranking([1, 2, 7], [[2, 7], [3, 4], [5, 6]]),
            tree=tree,
            path=[0],
        )
    )
    assert drafter.table[1].tolist() == [2, 7]
    assert drafter.table[7].tolist() == [5, 6]
    tree = drafter.propose(np.array([0, 1], np.int32), 6)
    # from token 1: children 2 (rank 0) and 7 (rank 1); below 2: 3, 4; below 7: 5, 6
    assert set(node_paths(tree)) == {(2,), (7,), (2, 3), (2, 4), (7, 5), (7, 6)}
    assert node_paths(tree)[0] == (2,)
    assert np.all(np.diff(tree.weights) <= 0)


def test_logits_must_be_the_root_and_every_node():
    drafter = RecycleDrafter(VOCAB, k=2)
    with pytest.raises(ValueError, match="3 rows, its tree 0 nodes"):
        drafter.observe(
            step(np.array([1], np.int32), np.array([2], np.int32), logits_ranking([1, 2, 7], [[2]] * 3))
        )


def test_rows_marked_minus_one_are_skipped():
    # a replay marks the nodes whose rows it lacks with -1: no row is learned for them
    drafter = RecycleDrafter(VOCAB, k=2)
    tree = DraftTree(np.array([2, 7]), np.array([-1, -1]), np.array([0.5, 0.4]))
    logits = logits_ranking([1, 2, -1], [[2, 7], [3, 4], [5, 6]])
    drafter.observe(step(np.array([1], np.int32), np.array([2, 3], np.int32), logits, tree=tree, path=[0]))
    assert drafter.table[2].tolist() == [3, 4]
    assert drafter.table[7].tolist() == [-1, -1]


def test_a_pair_seen_before_drafts_from_its_own_row():
    drafter = RecycleDrafter(VOCAB, k=2)
    # after "4 1" the model predicted 2 then 3; after "5 1" it predicted 6 then 3
    for before, after in ((4, [2, 3]), (5, [6, 3])):
        drafter.observe(
            step(
                np.array([before, 1], np.int32), np.array([after[0]], np.int32), logits_ranking([1], [after])
            )
        )
    assert drafter.table[1].tolist() == [6, 3]  # the token's own row: the latest
    assert node_paths(drafter.propose(np.array([4, 1], np.int32), 1)) == [(2,)]  # the pair "4 1"'s row
    assert node_paths(drafter.propose(np.array([5, 1], np.int32), 1)) == [(6,)]
    assert node_paths(drafter.propose(np.array([9, 1], np.int32), 1)) == [(6,)]  # unseen pair: own row


def test_rates_track_which_rank_was_right():
    drafter = RecycleDrafter(VOCAB, k=2)
    drafter.observe(step(np.array([1], np.int32), np.array([2], np.int32), logits_ranking([1], [[2, 3]])))
    before = drafter.rates.copy()
    # the model now prefers 3 after 1: the old row's rank-1 candidate was right (no token before 1,
    # so the candidates count in the column "not in the row before", of the token's own row)
    for _ in range(50):
        drafter.observe(step(np.array([1], np.int32), np.array([3], np.int32), logits_ranking([1], [[3, 2]])))
        drafter.observe(step(np.array([1], np.int32), np.array([2], np.int32), logits_ranking([1], [[2, 3]])))
    assert drafter.rates[0, 1, 2] > before[0, 1, 2]
    assert drafter.rates[0, 0, 2] < before[0, 0, 2]
    np.testing.assert_array_equal(drafter.rates[1], before[1])  # no pair row was ever drafted from


def test_agreement_is_learned_in_its_own_cell():
    drafter = RecycleDrafter(VOCAB, k=3)
    # the row of 8 holds 5 at rank 1; the root 1's row: 2, 5, 6; then after "8 1" the model says 5
    drafter.observe(step(np.array([8], np.int32), np.array([1], np.int32), logits_ranking([8], [[1, 5, 9]])))
    drafter.observe(step(np.array([1], np.int32), np.array([2], np.int32), logits_ranking([1], [[2, 5, 6]])))
    before = drafter.rates.copy()
    drafter.observe(
        step(np.array([8, 1], np.int32), np.array([5], np.int32), logits_ranking([1], [[5, 2, 6]]))
    )
    # scored against the row of 1 (no pair row for "8 1" yet): rank 1, held at rank 1 by the row of 8
    assert drafter.rates[0, 1, 1] > before[0, 1, 1]
    assert drafter.rates[0, 0, 3] < before[0, 0, 3]  # 2: rank 0, not in the row of 8, wrong
    assert drafter.rates[0, 1, 3] == before[0, 1, 3]


def test_agreement_with_the_row_before_raises_a_child():
    drafter = RecycleDrafter(VOCAB, k=3)
    drafter.observe(step(np.array([8], np.int32), np.array([1], np.int32), logits_ranking([8], [[1, 5, 9]])))
    drafter.observe(step(np.array([1], np.int32), np.array([2], np.int32), logits_ranking([1], [[2, 5, 6]])))
    state = drafter.state_dict()
    state["hits"][:, 1, 1], state["trials"][:, 1, 1] = 92.0, 100.0  # rank 1 held at rank 1 before: right
    drafter.load_state_dict(state)

    def weight_of_5(before: int) -> float:
        tree = drafter.propose(np.array([before, 1], np.int32), 3)
        return float(tree.weights[node_paths(tree).index((5,))])

    assert weight_of_5(8) == pytest.approx(drafter.rates[0, 1, 1])  # the row of 8 holds 5 at rank 1
    assert weight_of_5(7) == pytest.approx(INITIAL_HIT_RATES[1])  # the row of 7 is unknown


def test_state_round_trips_and_rejects_other_shapes():
    drafter = RecycleDrafter(VOCAB, k=2, pair_slots=8)
    drafter.observe(step(np.array([4, 1], np.int32), np.array([2], np.int32), logits_ranking([1], [[2, 3]])))
    other = RecycleDrafter(VOCAB, k=2, pair_slots=8)
    other.load_state_dict(drafter.state_dict())
    context = np.array([4, 1], np.int32)
    assert node_paths(other.propose(context, 4)) == node_paths(drafter.propose(context, 4))
    with pytest.raises(ValueError, match="pair_keys"):
        RecycleDrafter(VOCAB, k=2, pair_slots=16).load_state_dict(drafter.state_dict())


def test_without_logits_observed_pairs_move_to_the_front():
    drafter = RecycleDrafter(VOCAB, k=3)
    drafter.observe(step(np.array([4], np.int32), np.array([5, 6], np.int32)))  # pairs 4->5, 5->6
    drafter.observe(step(np.array([4], np.int32), np.array([8], np.int32)))  # 4->8
    assert drafter.table[4].tolist() == [8, 5, -1]
    assert drafter.table[5].tolist() == [6, -1, -1]
    # and the pair "4 5" was followed by 6: its own row drafts 6 after 4 5 even once 5 -> 9 is newer
    drafter.observe(step(np.array([3, 5], np.int32), np.array([9], np.int32)))
    assert node_paths(drafter.propose(np.array([4, 5], np.int32), 1)) == [(6,)]
    assert node_paths(drafter.propose(np.array([3, 5], np.int32), 1)) == [(9,)]


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
