"""DraftTree: worked examples and properties of the masks, positions and paths."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from restspec.draft.tree import DraftTree

# root ─┬─ 0:a(5) ── 2:c(7) ── 3:d(8)
#       └─ 1:b(6)
EXAMPLE = DraftTree(np.array([5, 6, 7, 8]), np.array([-1, -1, 0, 2]), np.array([0.9, 0.5, 0.6, 0.3]))


def test_depths_and_positions():
    assert EXAMPLE.depths.tolist() == [1, 1, 2, 3]
    # the root sits at past_len, node i at past_len + depth_i
    assert EXAMPLE.position_ids(10).tolist() == [10, 11, 11, 12, 13]


def test_ancestor_mask_rows_see_root_ancestors_and_self():
    expected = [
        [1, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0],  # a
        [1, 0, 1, 0, 0],  # b: not a (its sibling)
        [1, 1, 0, 1, 0],  # c: root, a, itself
        [1, 1, 0, 1, 1],  # d: root, a, c, itself
    ]
    assert EXAMPLE.ancestor_mask.astype(int).tolist() == expected


def test_attention_mask_sees_whole_cache():
    mask = EXAMPLE.attention_mask(3)
    assert mask.shape == (5, 8)
    assert mask[:, :3].all()
    assert (mask[:, 3:] == EXAMPLE.ancestor_mask).all()


def test_paths_and_children():
    assert [p.tolist() for p in EXAMPLE.paths()] == [[1], [0, 2, 3]]
    assert EXAMPLE.children(-1).tolist() == [0, 1]
    assert EXAMPLE.children(0).tolist() == [2]


def test_truncate_keeps_a_prefix_closed_tree():
    assert EXAMPLE.truncate(3).tokens.tolist() == [5, 6, 7]
    assert EXAMPLE.truncate(10) is EXAMPLE
    assert len(EXAMPLE.truncate(0)) == 0


def test_empty_and_chain():
    empty = DraftTree.empty()
    assert len(empty) == 0
    assert empty.attention_mask(4).shape == (1, 5)
    assert empty.position_ids(4).tolist() == [4]
    assert empty.paths() == []
    chain = DraftTree.chain([3, 3, 3])
    assert chain.parents.tolist() == [-1, 0, 1]
    assert chain.depths.tolist() == [1, 2, 3]


def test_arrays_are_read_only():
    with pytest.raises(ValueError):
        EXAMPLE.tokens[0] = 1


@pytest.mark.parametrize(
    ("tokens", "parents", "weights", "message"),
    [
        ([1, 2], [-1, 1], None, r"parents\[1\]=1 must be -1 or a node before 1"),
        ([1, 2], [-1, -2], None, r"parents\[1\]=-2"),
        ([1, 1], [-1, -1], None, "same token"),
        ([1], [-1, -1], None, "one length"),
        ([1], [-1], [1.5], r"weights must lie in \[0, 1\]"),
        ([-3], [-1], None, "token ids must be >= 0"),
    ],
)
def test_invalid_trees_are_refused(tokens, parents, weights, message):
    with pytest.raises(ValueError, match=message):
        DraftTree(np.array(tokens), np.array(parents), None if weights is None else np.array(weights))


@st.composite
def trees(draw):
    n = draw(st.integers(0, 30))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = []
    used: dict[int, set[int]] = {}
    for p in parents:
        siblings = used.setdefault(p, set())
        token = draw(st.integers(0, 100_000).filter(lambda t, s=siblings: t not in s))
        siblings.add(token)
        tokens.append(token)
    return DraftTree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64))


@given(trees(), st.integers(0, 50))
def test_mask_matches_brute_force_ancestry(tree, past_len):
    n = len(tree)
    mask = tree.attention_mask(past_len)
    for i in range(n):
        ancestors = {i}
        node = int(tree.parents[i])
        while node >= 0:
            ancestors.add(node)
            node = int(tree.parents[node])
        row = mask[i + 1, past_len + 1 :]
        assert set(np.flatnonzero(row).tolist()) == ancestors
        assert tree.position_ids(past_len)[i + 1] == past_len + len(ancestors)


@given(trees(), st.integers(0, 30))
def test_every_truncation_is_a_valid_tree(tree, size):
    cut = tree.truncate(size)
    assert len(cut) == min(size, len(tree))
    # re-validating through the constructor checks parents precede children
    DraftTree(cut.tokens, cut.parents, cut.weights)
    # every node sits on exactly one path, and paths start at root children
    nodes_on_paths = sorted({int(x) for p in cut.paths() for x in p})
    assert nodes_on_paths == list(range(len(cut)))
