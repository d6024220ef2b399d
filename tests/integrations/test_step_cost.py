"""Pricing vLLM's batched step: the learned step cost and the chain lengths it buys (no vLLM needed)."""

from __future__ import annotations

import numpy as np
import pytest

from restspec.integrations.step_cost import STEP_COST_FLOOR, StepCost, chain_lengths


def test_chain_lengths_weigh_each_token_against_the_batch():
    probs = np.array([0.9, 0.8, 0.5, 0.1])
    # one request, a base of 65 draft tokens: a token pays when p > A / (65 + drafted), A = 1 + the
    # drafted p's: 0.9 > 1/65, 0.8 > 1.9/66, 0.5 > 2.7/67, 0.1 > 3.2/68 = 0.047: all four
    assert chain_lengths([probs], base_tokens=65, max_tokens=[8]) == [4]
    assert chain_lengths([probs], base_tokens=65, max_tokens=[2]) == [2]
    # a base of 5: 0.1 < 3.2 / 8 = 0.4 stops the chain after three tokens
    assert chain_lengths([probs], base_tokens=5, max_tokens=[8]) == [3]
    # 32 requests on a base of 36: every first token passes (0.9 > (32 + 0.9 j) / (36 + j) for
    # j < 32), no second one does (0.8 < 60.8 / 68)
    assert chain_lengths([probs] * 32, base_tokens=36, max_tokens=[8] * 32) == [1] * 32
    # 64 requests on a base of 68: 0.9 < 64 / 68 already, so the batch drafts nothing
    assert chain_lengths([probs] * 64, base_tokens=68, max_tokens=[8] * 64) == [0] * 64


def test_chain_lengths_prefer_the_likelier_request():
    sure, unsure = np.array([0.95, 0.9, 0.9]), np.array([0.3, 0.2, 0.1])
    lengths = chain_lengths([unsure, sure] * 4, base_tokens=16, max_tokens=[3] * 8)
    assert lengths[1::2] == [3] * 4
    assert lengths[0::2] == [0] * 4


def test_the_prior_prices_a_row_and_a_draft_token_alike():
    cost = StepCost(knee_tokens=16)
    # fixed = 16 draft tokens, a row = 1: a batch of 4 rows costs 20 draft tokens
    assert cost.base_tokens(4) == pytest.approx(20)
    with pytest.raises(ValueError, match="knee_tokens=0 must be > 0"):
        StepCost(knee_tokens=0)


def simulated_steps(cost: StepCost, rng: np.random.Generator, steps: int, *, drafts: bool = True) -> None:
    """Steps of a machine where a step costs 60 ms + 5 ms a row + 2.5 ms a draft token (vLLM's CPU
    backend, SmolLM2-135M, 2 cores), with 5 % noise and one step in ten stalled by 0.3-1 s."""
    for _ in range(steps):
        rows = int(rng.integers(1, 17))
        drafted = int(rng.integers(0, 4 * rows + 1)) if drafts else 0
        seconds = (0.060 + 0.005 * rows + 0.0025 * drafted) * rng.normal(1.0, 0.05)
        if rng.random() < 0.1:
            seconds += rng.uniform(0.3, 1.0)
        cost.observe(rows, drafted, seconds)


def test_the_step_cost_is_learned_from_noisy_steps_with_stalls():
    cost = StepCost(knee_tokens=64)  # the prior is far off: a draft token as dear as a row
    simulated_steps(cost, np.random.default_rng(0), 400)
    _, per_row, per_draft = cost.coefficients
    # the stalls inflate the costs a little (each counts as up to 1.5 times its prediction); the
    # ratios that decide stay close: a draft token costs half a row, a batch of 16 rows 56 draft tokens
    assert per_draft / per_row == pytest.approx(0.5, rel=0.2)
    assert cost.base_tokens(16) == pytest.approx((0.060 + 0.005 * 16) / 0.0025, rel=0.2)
    assert cost(16, 0) == pytest.approx(0.140, rel=0.25)


def test_a_batch_that_never_drafted_keeps_the_prior_price_of_a_draft_token():
    cost = StepCost(knee_tokens=16)
    simulated_steps(cost, np.random.default_rng(1), 300, drafts=False)
    fixed, per_row, per_draft = cost.coefficients
    # rows vary, so the fixed cost and a row's are learned (60 ms and 5 ms, inflated by the stalls);
    # a draft token was never seen and keeps the prior's share: one input of the prior's scale
    assert per_row / fixed == pytest.approx(0.005 / 0.060, rel=0.3)
    assert per_draft > STEP_COST_FLOOR * per_row


def test_the_step_cost_state_round_trips():
    cost = StepCost(knee_tokens=16)
    simulated_steps(cost, np.random.default_rng(2), 50)
    copy = StepCost(knee_tokens=16)
    copy.load_state_dict(cost.state_dict())
    np.testing.assert_allclose(copy.coefficients, cost.coefficients)
    with pytest.raises(ValueError, match="xtx"):
        copy.load_state_dict({**cost.state_dict(), "xtx": np.zeros((2, 2))})
