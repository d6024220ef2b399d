"""Arctic Inference's SuffixDecoding as a Drafter: tree conversion and the request lifecycle."""

from __future__ import annotations

import numpy as np
import pytest
from steps import step

from benchmarks.suffix import SuffixConfig, suffix_draft_to_tree


def test_draft_is_reordered_by_probability_parents_first():
    # Arctic's order: 5 (p=.9) -> 6 (p=.3), 5 -> 7 (p=.6); ours: 5, 7, 6
    tree = suffix_draft_to_tree([5, 6, 7], [-1, 0, 0], [0.9, 0.3, 0.6])
    assert tree.tokens.tolist() == [5, 7, 6]
    assert tree.parents.tolist() == [-1, 0, 0]
    assert np.allclose(tree.weights, [0.9, 0.6, 0.3])
    # equal probabilities: the parent still comes first
    tree = suffix_draft_to_tree([1, 2, 3], [-1, 0, 1], [0.5, 0.5, 0.5])
    assert tree.tokens.tolist() == [1, 2, 3] and tree.parents.tolist() == [-1, 0, 1]
    assert len(suffix_draft_to_tree([], [], [])) == 0


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_spec_tokens=0"):
        SuffixConfig(max_spec_tokens=0)


def test_drafter_lifecycle_and_global_cache():
    pytest.importorskip("arctic_inference.suffix_decoding")
    from benchmarks.suffix import SuffixDrafter

    drafter = SuffixDrafter()
    prompt = np.array([1, 2, 3, 4, 5, 1, 2, 3, 6, 7, 1, 2, 3, 4, 8], np.int32)
    prompt.flags.writeable = False  # the generate loop passes read-only views
    drafter.start_request(prompt)
    with pytest.raises(ValueError, match="still active"):
        drafter.start_request(prompt)
    # "1 2" occurred three times in the prompt, followed by "3 4" twice and "3 6" once
    context = np.array([9, 1, 2], np.int32)
    context.flags.writeable = False
    tree = drafter.propose(context, 16)
    assert tree.tokens[0] == 3 and tree.parents[0] == -1
    assert len(drafter.propose(np.array([9, 1, 2], np.int32), 1)) == 1
    drafter.observe(step(prompt, np.array([40, 41, 42, 43], np.int32)))
    drafter.stop_request()
    # the earlier response is in the global cache for the next request
    drafter.start_request(np.array([99], np.int32))
    tree = drafter.propose(np.array([99, 40, 41], np.int32), 16)
    assert tree.tokens.tolist()[:2] == [42, 43]
    drafter.stop_request()
    with pytest.raises(ValueError, match="propose before start_request"):
        drafter.propose(prompt, 4)


def test_padded_drafter_fills_every_tree_to_the_width():
    from benchmarks.methods import PaddedDrafter
    from restspec.draft.base import EmptyDrafter, StatelessDrafter
    from restspec.draft.tree import DraftTree

    class Two(StatelessDrafter):
        def propose(self, context, budget):
            return DraftTree(np.array([1, 5]), np.array([-1, 0]), np.array([0.9, 0.5]))

    tree = PaddedDrafter(Two(), 4).propose(np.array([7], np.int32), 64)
    # the two real nodes first, then root children 0 and 2 (1 is taken at the root), weight 0
    assert tree.tokens.tolist() == [1, 5, 0, 2]
    assert tree.parents.tolist() == [-1, 0, -1, -1]
    assert tree.weights.tolist() == [pytest.approx(0.9), 0.5, 0.0, 0.0]
    assert len(PaddedDrafter(EmptyDrafter(), 8).propose(np.array([7], np.int32), 64)) == 8
    assert len(PaddedDrafter(Two(), 8).propose(np.array([7], np.int32), 3)) == 3  # never over budget
