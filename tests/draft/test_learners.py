"""Every learner's state travels through state_dict / load_state_dict: a fresh learner loaded with
another's state proposes (chooses) what the other does. Match lengths travel with the trees."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from steps import step

from restspec.decode.budget import AdaptiveBudget, FixedBudget, LatencyCurve
from restspec.draft import (
    ContextDrafter,
    Drafter,
    DraftTree,
    EmptyDrafter,
    HistoryDrafter,
    MergedDrafter,
    RecycleDrafter,
    StatelessDrafter,
    TreeLogits,
    default_drafter,
)

VOCAB = 12
TEXT = np.array([1, 2, 3, 4, 5, 1, 2, 3, 6, 7, 1, 2, 3, 4, 8, 9, 1, 2, 3, 4, 5], np.int32)


def accepted_path(tree: DraftTree, truth: np.ndarray) -> list[int]:
    """The nodes greedy verification accepts: the longest tree path spelling a prefix of ``truth``."""
    path: list[int] = []
    for token in truth[:-1].tolist():  # the last true token is the model's own
        below = [i for i in tree.children(path[-1] if path else -1).tolist() if tree.tokens[i] == token]
        if not below:
            break
        path.append(below[0])
    return path


def drive(drafter: Drafter, requests: int = 2, seed: int = 0) -> None:
    """Draft ``TEXT`` ``requests`` times as a model whose next token is always TEXT's: every step
    proposes, accepts the matching path and observes random verification logits."""
    rng = np.random.default_rng(seed)
    for _ in range(requests):
        drafter.start_request(TEXT[:2])
        pos = 2
        while pos < len(TEXT):
            context = TEXT[:pos]
            tree = drafter.propose(context, 6)
            path = accepted_path(tree, TEXT[pos:])
            accepted = TEXT[pos : pos + len(path) + 1]
            inputs = np.concatenate([context[-1:], tree.tokens]).astype(np.int32)
            logits = TreeLogits(inputs, rng.standard_normal((len(inputs), VOCAB)).astype(np.float32))
            drafter.observe(step(context, accepted, logits, tree=tree, path=path))
            pos += len(accepted)
        drafter.stop_request()


def same_trees(a: DraftTree, b: DraftTree) -> bool:
    return (
        a.tokens.tolist() == b.tokens.tolist()
        and a.parents.tolist() == b.parents.tolist()
        and a.weights.tolist() == b.weights.tolist()
        and a.match_length == b.match_length
    )


DRAFTERS: dict[str, Callable[[], Drafter]] = {
    "empty": EmptyDrafter,
    "context": lambda: ContextDrafter(min_len=1),
    "history": lambda: HistoryDrafter(min_len=1),
    "recycle": lambda: RecycleDrafter(VOCAB, k=3),
    "merged": lambda: default_drafter([], VOCAB),
}


@pytest.mark.parametrize("name", DRAFTERS)
def test_a_loaded_drafter_proposes_the_same_trees(name):
    trained = DRAFTERS[name]()
    drive(trained)
    loaded = DRAFTERS[name]()
    loaded.load_state_dict(trained.state_dict())
    for drafter in (trained, loaded):
        drafter.start_request(TEXT[:2])
    for end in range(1, len(TEXT) + 1):
        assert same_trees(trained.propose(TEXT[:end], 6), loaded.propose(TEXT[:end], 6)), end
    # both go on learning alike: the state was a copy, not shared arrays
    for drafter in (trained, loaded):
        drafter.stop_request()
        drive(drafter, requests=1, seed=1)
        drafter.start_request(TEXT[:2])
    for end in range(1, len(TEXT) + 1):
        assert same_trees(trained.propose(TEXT[:end], 6), loaded.propose(TEXT[:end], 6)), end


def test_the_drafters_learn_something_to_carry():
    trained = default_drafter([], VOCAB)
    drive(trained)
    fresh = default_drafter([], VOCAB)
    fresh.start_request(TEXT[:2])
    trained.start_request(TEXT[:2])
    differs = [not same_trees(trained.propose(TEXT[:e], 6), fresh.propose(TEXT[:e], 6)) for e in range(2, 12)]
    assert any(differs)  # the round trip above compares learned states, not two fresh drafters


def test_a_state_that_does_not_fit_is_refused_and_changes_nothing():
    trained = default_drafter([], VOCAB)
    drive(trained)
    other = default_drafter([], VOCAB + 1)  # another vocabulary: the recycling table does not fit
    drive(other, seed=2)
    before = other.state_dict()
    with pytest.raises(ValueError, match="table"):
        other.load_state_dict(trained.state_dict())
    after = other.state_dict()
    np.testing.assert_array_equal(after["calibration"]["trials"], before["calibration"]["trials"])
    np.testing.assert_array_equal(after["sources"]["1"]["tokens"], before["sources"]["1"]["tokens"])
    with pytest.raises(ValueError, match="keys"):
        ContextDrafter().load_state_dict(trained.state_dict())
    with pytest.raises(ValueError, match="keys"):
        trained.load_state_dict({})


def run_policy(policy: AdaptiveBudget, steps: int, seed: int) -> list[int]:
    """Choose on random chains, accept a random prefix of the choice, observe; the choices."""
    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(steps):
        weights = np.sort(rng.random(8))[::-1]
        tree = DraftTree.chain(np.arange(10, 18), np.minimum.accumulate(weights))
        c = policy.choose(tree, 100)
        a = int(rng.integers(0, c + 1))
        accepted = [*range(10, 10 + a), 99]
        policy.observe(step([1], accepted, tree=tree.truncate(c), path=np.arange(a), seconds=0.01 * (c + 1)))
        chosen.append(c)
    return chosen


def test_a_loaded_policy_keeps_its_own_costs():
    # the adaptive policy learns only this machine's costs and rate: its state is empty, and a policy
    # loaded from a trained one starts from its own curve (what is learned about drafts is the drafter's)
    curve = LatencyCurve((1, 4, 13), (0.05, 0.06, 0.10))
    trained = AdaptiveBudget(curve)
    run_policy(trained, 50, seed=0)
    assert trained.state_dict() == {}
    loaded = AdaptiveBudget(curve)
    loaded.load_state_dict(trained.state_dict())
    assert loaded.rate == AdaptiveBudget(curve).rate != trained.rate  # costs and rate: measured afresh
    with pytest.raises(ValueError, match="keys"):
        loaded.load_state_dict({"calibration": {}})


def test_stateless_learners_have_empty_states():
    for learner in (FixedBudget(4), ContextDrafter(), EmptyDrafter()):
        assert learner.state_dict() == {}
        learner.load_state_dict({})
        with pytest.raises(ValueError, match="keys"):
            learner.load_state_dict({"table": np.zeros(3)})


class FixedDrafter(StatelessDrafter):
    def __init__(self, tree: DraftTree) -> None:
        self.tree = tree

    def propose(self, context, budget):
        return self.tree.truncate(budget)


def test_merge_calibrates_a_source_in_the_bucket_of_its_trees_match_length():
    # match-length buckets 0, 1, 2, 3, 4-5, 6-8, 9+: a tree drafted from a 5-token match lands in
    # bucket 4; the tree's match length survives truncation
    tree = DraftTree(np.array([7, 8]), np.array([-1, 0]), np.array([0.5, 0.4]), match_length=5)
    assert tree.truncate(1).match_length == 5
    drafter = MergedDrafter([FixedDrafter(tree)])
    for _ in range(3):
        verified = drafter.propose(np.array([0], np.int32), 2)
        drafter.observe(step([0], [7, 9], tree=verified, path=[0]))
    trials = drafter.calibration.trials[0]  # [match-length bucket, depth bucket, weight bucket]
    assert trials.sum(axis=(1, 2)).tolist() == [0, 0, 0, 0, 6, 0, 0]
    assert drafter.calibration.hits[0].sum() == 3  # node 7 accepted, node 8 (after 7, not 9) not
    with pytest.raises(ValueError, match="match_length"):
        DraftTree(np.array([1]), np.array([-1]), None, match_length=-1)
