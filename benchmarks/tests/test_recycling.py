"""Token Recycling as published (benchmarks/recycling.py): the matrix update, the template fill, and a run
through the bench runner."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.recycling import TREE_TEMPLATE, TokenRecyclingDrafter, TreeTemplate
from restspec.draft.base import Step, TreeLogits
from restspec.draft.tree import DraftTree

# root -> (0,) (1,); (0,) -> (0, 0) (0, 1); (0, 0) -> (0, 0, 0); (1,) -> (1, 0)
SMALL = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))


def drafter_with(rows: dict[int, list[int]], vocab: int = 10, k: int = 2, template=SMALL):
    drafter = TokenRecyclingDrafter(vocab, k=k, template=template)
    for token, row in rows.items():
        drafter.table[token] = row
    return drafter


def test_the_template_is_the_official_80_node_tree():
    template = TreeTemplate.from_paths(TREE_TEMPLATE, 8)
    assert len(template) == 80
    assert [stop - start for start, stop in template.levels] == [8, 21, 25, 15, 8, 3]
    # a fully known matrix fills every node: (token t's candidates are t+1 .. t+8)
    table = (np.arange(100)[:, None] + np.arange(1, 9)[None, :]).astype(np.int32)
    tree = template.fill(table, 0)
    assert len(tree) == 80
    assert tree.tokens[:8].tolist() == list(range(1, 9))
    assert tree.tokens[TREE_TEMPLATE.index((0, 1, 2))] == 1 + 2 + 3  # ranks 0, 1, 2 add 1, 2, 3


def test_fill_takes_each_nodes_rank_in_its_parents_row():
    drafter = drafter_with({5: [1, 2], 1: [3, 4], 2: [6, 7], 3: [8, 9]})
    tree = drafter.propose(np.array([0, 5], np.int32), 10)
    # (0,)=M[5][0]=1  (1,)=M[5][1]=2  (0,0)=M[1][0]=3  (0,1)=M[1][1]=4  (1,0)=M[2][0]=6  (0,0,0)=M[3][0]=8
    assert tree.tokens.tolist() == [1, 2, 3, 4, 6, 8]
    assert tree.parents.tolist() == [-1, -1, 0, 0, 1, 2]
    assert drafter.propose(np.array([0, 5], np.int32), 3).tokens.tolist() == [1, 2, 3]  # template order


def test_an_unseen_row_leaves_its_subtree_out():
    # token 1's row is unknown: (0, 0), (0, 1) and (0, 0, 0) go; (1, 0) moves up and keeps its parent
    drafter = drafter_with({5: [1, 2], 2: [6, 7]})
    tree = drafter.propose(np.array([5], np.int32), 10)
    assert tree.tokens.tolist() == [1, 2, 6]
    assert tree.parents.tolist() == [-1, -1, 1]
    # an unknown entry inside a known row (vocab smaller than k) leaves out that node alone
    partial = drafter_with({5: [1, -1], 1: [3, 4]}).propose(np.array([5], np.int32), 10)
    assert partial.tokens.tolist() == [1, 3, 4]
    assert len(drafter_with({}).propose(np.array([5], np.int32), 10)) == 0  # nothing seen: no draft


def step_with(context: list[int], tree: DraftTree, logits: np.ndarray) -> Step:
    root_and_nodes = np.concatenate([[context[-1]], tree.tokens]).astype(np.int32)
    return Step(
        np.asarray(context, np.int32),
        tree,
        np.zeros(0, np.int32),
        np.zeros(1, np.int32),
        TreeLogits(root_and_nodes, logits.astype(np.float32)),
    )


def test_observe_overwrites_the_rows_of_every_input_accepted_or_not():
    drafter = drafter_with({4: [9, 9], 7: [9, 8]}, vocab=10)
    tree = DraftTree(np.array([7, 3, 4]), np.array([-1, -1, 0]))  # root 4; nodes 7, 3, then 4 below 7
    logits = np.zeros((4, 10))
    logits[0, [2, 6]] = [5, 6]  # root 4: best 6, then 2
    logits[1, [1, 0]] = [4, 3]  # node 7: best 1, then 0
    logits[2, [8, 5]] = [2, 1]  # node 3: best 8, then 5
    logits[3, [3, 9]] = [1, 7]  # node 4 again: its row is the later one
    drafter.observe(step_with([0, 4], tree, logits))
    assert drafter.table[4].tolist() == [9, 3]
    assert drafter.table[7].tolist() == [1, 0]
    assert drafter.table[3].tolist() == [8, 5]
    assert (drafter.table[[0, 1, 2, 5, 6, 8, 9]] == -1).all()  # no other row changes


def test_steps_without_logits_and_inputs_outside_the_vocabulary_teach_nothing():
    drafter = drafter_with({}, vocab=10)
    drafter.observe(Step.finished(np.array([1, 2], np.int32), np.array([3, 4], np.int32)))
    tree = DraftTree(np.array([3]), np.array([-1]))
    logits = np.arange(20, dtype=np.float64).reshape(2, 10)
    step = step_with([1, 2], tree, logits)
    marked = Step(
        step.context, tree, step.path, step.accepted, TreeLogits(np.array([-1, 3]), step.logits.logits)
    )
    drafter.observe(marked)  # a replay's missing row: -1
    assert drafter.table[3].tolist() == [9, 8]
    assert (np.delete(drafter.table, 3, axis=0) == -1).all()


def test_state_round_trips_and_rejects_another_shape():
    drafter = drafter_with({5: [1, 2]})
    other = TokenRecyclingDrafter(10, k=2, template=SMALL)
    other.load_state_dict(drafter.state_dict())
    assert (other.table == drafter.table).all()
    with pytest.raises(ValueError, match="shape"):
        TokenRecyclingDrafter(11, k=2, template=SMALL).load_state_dict(drafter.state_dict())


@pytest.mark.parametrize(
    ("template", "message"),
    [(((0, 0), (0,)), "shallow first"), (((0,), (1, 0)), "must come before"), (((2,),), r"in \[0, 2\)")],
)
def test_bad_templates_are_refused(template, message):
    with pytest.raises(ValueError, match=message):
        TokenRecyclingDrafter(10, k=2, template=template)


def test_recycle_runs_exact_through_the_bench_runner(lab_bench):
    methods = lab_bench("plain,recycle", ["hello world, hello"] * 2, 12)
    assert [m["method"] for m in methods] == ["plain", "recycle"]
    assert all(m["exact"] == 1.0 for m in methods)  # float32 greedy: the 80-node trees reproduce plain
    assert methods[1]["mean_accepted"] > 1.0  # the second prompt repeats the first: the matrix knows it
