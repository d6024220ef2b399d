"""The merged tree's weights are the drafter's acceptance probabilities: WeightCalibration maps them
per depth, learned from the verified nodes of each proposal; a budget prices them as they are."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from steps import step

from restspec.decode.budget import AdaptiveBudget, LatencyCurve
from restspec.draft import MergeConfig, MergedDrafter, StatelessDrafter
from restspec.draft import merge as merge_module
from restspec.draft.base import Step
from restspec.draft.merge import CORRECTION_REFIT_STEPS, WeightCalibration, nodes_in
from restspec.draft.tree import DraftTree


def chain(weights):
    return DraftTree.chain(list(range(10, 10 + len(weights))), weights)


class FixedDrafter(StatelessDrafter):
    def __init__(self, tree: DraftTree) -> None:
        self.tree = tree

    def propose(self, context, budget):
        return self.tree.truncate(budget)


def uncalibrated(tree: DraftTree, correct: bool = True) -> MergedDrafter:
    """A merge of one source that proposes ``tree`` and whose own weights are taken as they are."""
    return MergedDrafter([FixedDrafter(tree)], config=MergeConfig(calibrate=False, correct=correct))


def test_the_proposal_carries_corrected_weights_in_the_merges_order():
    # prior map w ** 2 at every depth: 0.9, 0.8, 0.5 -> 0.81, 0.64, 0.25; the merge's own weights come
    # along as ``uncorrected``
    drafter = uncalibrated(chain([0.9, 0.8, 0.5]))
    proposal = drafter.propose(np.array([1], np.int32), 3)
    assert proposal.tokens.tolist() == [10, 11, 12]
    np.testing.assert_allclose(proposal.weights, [0.81, 0.64, 0.25], rtol=1e-6)
    np.testing.assert_allclose(proposal.uncorrected, [0.9, 0.8, 0.5], rtol=1e-6)
    plain = uncalibrated(chain([0.9, 0.8, 0.5]), correct=False).propose(np.array([1], np.int32), 3)
    np.testing.assert_allclose(plain.weights, [0.9, 0.8, 0.5], rtol=1e-6)
    assert plain.uncorrected is None


def test_drafts_that_fail_lose_weight_and_the_budget_shrinks_the_tree():
    # 0.3 per node after the first: with the weights believed, 4 nodes pay; when nothing is ever
    # accepted the drafter's map sends its weights toward 0 and the policy, pricing them as they are,
    # stops drafting
    drafter = uncalibrated(chain([0.99, 0.98, 0.97, 0.96]))
    policy = AdaptiveBudget(LatencyCurve((1, 2, 65), (1.0, 1.1, 20.0)), max_budget=16)
    context = np.array([1], np.int32)
    proposal = drafter.propose(context, 4)
    first = last = policy.choose(proposal, 100)
    assert first == 4
    for _ in range(80):
        tree = proposal.truncate(last)
        record = Step(context, tree, np.zeros(0, np.int32), np.array([99], np.int32), None, proposal=proposal)
        drafter.observe(record)  # nothing accepted: the step adds the model's token only
        policy.observe(record)
        proposal = drafter.propose(context, 4)
        last = policy.choose(proposal, 100)
    assert proposal.weights[0] < 0.3
    assert last < first
    # a finished request replayed as one step (a warm start's conversation) is no evidence
    before = drafter.correction.values.copy()
    for _ in range(CORRECTION_REFIT_STEPS):
        drafter.observe(Step.finished(np.array([1, 2], np.int32), np.arange(30, dtype=np.int32)))
    assert np.array_equal(drafter.correction.values, before)


def test_the_correction_learns_from_the_uncorrected_weights_of_the_verified_nodes():
    # two root children and a grandchild; the step verified the first two nodes and accepted node 0:
    # the map sees the merge's own (float32) weights of those two nodes, not the corrected ones
    tree = DraftTree(np.array([10, 20, 11]), np.array([-1, -1, 0]), np.array([0.7, 0.4, 0.6]))
    drafter = uncalibrated(tree)
    reference = WeightCalibration()
    context = np.array([1], np.int32)
    for _ in range(CORRECTION_REFIT_STEPS):
        proposal = drafter.propose(context, 3)
        verified = step(context, [10, 12], tree=proposal.truncate(2), path=[0])
        drafter.observe(replace(verified, proposal=proposal))
        reference.observe(np.array([0.7, 0.4], np.float32), np.array([1, 1]), 1)
    np.testing.assert_array_equal(drafter.correction.values, reference.values)
    assert not np.array_equal(reference.values, WeightCalibration().values)


def test_nodes_in_finds_the_verified_nodes_by_path():
    # node order differs from the proposal's when the loop keeps only shallow nodes or when a chain
    # is cut from the tree (vLLM's proposer): nodes are matched by their path
    tree = DraftTree(np.array([10, 20, 11, 12, 21]), np.array([-1, -1, 0, 2, 1]))
    assert nodes_in(tree, tree.truncate(3)).tolist() == [0, 1, 2]
    assert nodes_in(tree, DraftTree(np.array([10, 20, 21]), np.array([-1, -1, 1]))).tolist() == [0, 1, 4]
    assert nodes_in(tree, DraftTree.chain([10, 11, 12])).tolist() == [0, 2, 3]
    assert nodes_in(tree, DraftTree.chain([10, 12])) is None  # 12 hangs below 11, not 10
    assert nodes_in(tree, DraftTree.empty()).tolist() == []


def test_weight_calibration_learns_per_depth_rates():
    # a chain of two nodes weighted 0.4 and 0.3 whose first node is accepted 10% of the time and the
    # second never: g_1(0.4) -> ~0.1, g_2(0.3) -> ~0 (ridge toward the prior keeps a little)
    rng = np.random.default_rng(0)
    cal = WeightCalibration()
    tree = chain([0.4, 0.3])
    for _ in range(3000):
        cal.observe(tree.weights, tree.depths, int(rng.random() < 0.1))
    g = cal(np.array([0.4, 0.3, 1.0, 0.4]), np.array([1, 2, 1, 6]))
    assert g[0] == pytest.approx(0.1, abs=0.04)
    assert g[1] < 0.06
    assert g[2] == pytest.approx(1.0)  # never observed: stays at the prior
    assert g[3] == pytest.approx(0.4**2)  # depth 6 has a map of its own, never observed: the prior


def test_weight_calibration_tells_depths_apart():
    # the same weight 0.5 at depth 1 (a lone guess) is accepted 50% of the time, at depth 9 (deep in
    # a chain whose 8 ancestors are always right) 10%: one map per depth bucket learns both
    rng = np.random.default_rng(1)
    cal = WeightCalibration()
    lone = chain([0.5])
    deep = chain([1.0] * 8 + [0.5])
    for _ in range(3000):
        cal.observe(lone.weights, lone.depths, int(rng.random() < 0.5))
        cal.observe(deep.weights, deep.depths, 8 + int(rng.random() < 0.1))
    g = cal(np.array([0.5, 0.5]), np.array([1, 9]))
    assert g[0] == pytest.approx(0.5, abs=0.05)
    assert g[1] == pytest.approx(0.1, abs=0.05)


def test_weight_calibration_statistics_follow_their_definition():
    # per step: x[d] = the interpolation coefficients of the depth-(d+1) nodes on their bucket's knots,
    # summed; y[d] = 1 if the step accepted d+1 drafts; xtx = decay * xtx + x.T x, xty likewise
    rng = np.random.default_rng(2)
    knots = np.asarray(merge_module.CORRECTION_KNOTS)
    edges = merge_module.CORRECTION_DEPTH_EDGES
    size = len(knots) * (len(edges) + 1)
    cal = WeightCalibration()
    xtx, xty = np.zeros((size, size)), np.zeros(size)
    for _ in range(20):
        n = int(rng.integers(1, 14))
        parents = np.array([int(rng.integers(-1, i)) for i in range(n)])
        tree = DraftTree(np.arange(n), parents, rng.random(n))
        accepted = int(rng.integers(0, n + 1))
        x = np.zeros((int(tree.depths.max()), size))
        for w, d in zip(tree.weights.astype(np.float64), tree.depths, strict=True):
            lo = min(int(np.searchsorted(knots, w, side="right")), len(knots) - 1) - 1
            t = (w - knots[lo]) / (knots[lo + 1] - knots[lo])
            column = int(np.searchsorted(edges, d, side="right")) * len(knots) + lo
            x[d - 1, column] += 1 - t
            x[d - 1, column + 1] += t
        y = (np.arange(1, len(x) + 1) <= accepted).astype(np.float64)
        xtx = merge_module.CORRECTION_DECAY * xtx + x.T @ x
        xty = merge_module.CORRECTION_DECAY * xty + x.T @ y
        cal.observe(tree.weights, tree.depths, accepted)
        np.testing.assert_allclose(cal._xtx, xtx, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cal._xty, xty, rtol=1e-12, atol=1e-12)
