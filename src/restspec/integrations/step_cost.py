"""What one batched speculative step costs, learned from its wall times, and how many draft tokens
each request of the batch gets for it.

vLLM verifies every request's chain in one step. Its wall time grows with the rows decoded and with
the draft tokens verified, at different rates: on vLLM 0.32's CPU backend (SmolLM2-135M, 2 cores) a
step cost about 50-70 ms, plus 4-7 ms per row and 2.5 ms per draft token (a row carries sampling and
bookkeeping that a draft token does not). :class:`StepCost` fits those three numbers online;
:func:`chain_lengths` spends draft tokens where they raise the batch's tokens per second.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from restspec.draft.base import check_state_keys, check_state_shape

STEP_COST_DECAY = 0.99
"""Per-step decay of the step-time statistics (a memory of about a hundred steps)."""
STEP_COST_PRIOR = 2.0
"""Steps' worth of weight that pulls each coefficient toward the prior shape (``knee_tokens``)."""
STEP_STALL = 1.5
"""Once :data:`STEP_COST_PRIOR` steps have been seen, a step counts as at most this multiple of its
predicted time: a stall (another process on the CPU, a compilation, the engine waiting for
requests) is no row's or draft token's cost. Before that the prediction is the prior's, which may be
far off, so steps count as they are. In simulated steps with one in ten stalled by 2-7 step times,
1.5 kept the price of a batch of 16 rows within 10 % of the truth, 2 and 3 overpriced it by 20-60 %
(drafts looked cheap); with no stalls all three are exact."""
STEP_COST_FLOOR = 0.05
"""No coefficient falls below this share of its prior: noise must never make draft tokens free."""


class StepCost:
    """``seconds ~ fixed + per_row * rows + per_draft * drafts`` for one engine step, fitted online.

    Decayed least squares (:data:`STEP_COST_DECAY`) with a ridge pull of the per-row and per-draft
    costs toward the prior ``u``, where ``u`` (seconds per input) is the observed mean time over the
    mean ``knee_tokens + rows + drafts``: before any step (then the fixed cost is ``u *
    knee_tokens``), and along directions the steps do not vary in (a batch that never drafts says
    nothing about draft tokens), the prior decides; the steps decide the rest. Only ratios matter
    for the choice (:meth:`base_tokens`), so the prior's scale is free. A step counts as at most
    :data:`STEP_STALL` times its prediction."""

    def __init__(self, knee_tokens: float) -> None:
        if not knee_tokens > 0:
            raise ValueError(f"knee_tokens={knee_tokens} must be > 0")
        self.knee_tokens = float(knee_tokens)
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)
        self._weight = 0.0  # decayed count of steps
        self._units = 0.0  # decayed sum of knee_tokens + rows + drafts
        self._seconds = 0.0  # decayed sum of (clipped) seconds
        self.coefficients = self._prior()
        """float64[3]: (fixed, per_row, per_draft) seconds; in arbitrary units before any step."""

    def _prior(self) -> np.ndarray:
        scale = self._seconds / self._units if self._units > 0 else 1.0
        return scale * np.array([self.knee_tokens, 1.0, 1.0])

    def __call__(self, rows: int, drafts: int) -> float:
        """Predicted seconds of a step over ``rows`` rows and ``drafts`` draft tokens."""
        return float(self.coefficients @ np.array([1.0, rows, drafts]))

    def base_tokens(self, rows: int) -> float:
        """A step over ``rows`` rows with no drafts, priced in draft tokens (its cost / per_draft)."""
        fixed, per_row, per_draft = self.coefficients
        return (fixed + per_row * rows) / per_draft

    def observe(self, rows: int, drafts: int, seconds: float) -> None:
        """A step decoded ``rows`` rows, verified ``drafts`` draft tokens and took ``seconds``."""
        if rows < 1 or drafts < 0 or not seconds > 0:
            return
        if self._weight >= STEP_COST_PRIOR:
            seconds = min(seconds, STEP_STALL * self(rows, drafts))
        x = np.array([1.0, rows, drafts])
        self._xtx = STEP_COST_DECAY * self._xtx + np.outer(x, x)
        self._xty = STEP_COST_DECAY * self._xty + x * seconds
        self._weight = STEP_COST_DECAY * self._weight + 1.0
        self._units = STEP_COST_DECAY * self._units + self.knee_tokens + rows + drafts
        self._seconds = STEP_COST_DECAY * self._seconds + seconds
        self._refit()

    def _refit(self) -> None:
        prior = self._prior()
        # each per-input cost is pulled as hard as STEP_COST_PRIOR steps' worth of its feature's
        # spread (variance, at least 1, so that a feature that never varied, such as drafts in a
        # batch that never drafted, keeps its prior); the fixed cost is left to the data, so that a
        # prior far off does not bend the per-input costs to make up for it
        mean = self._xtx[0] / self._weight  # (1, mean rows, mean drafts): x[0] is always 1
        spread = np.diag(self._xtx) / self._weight - mean**2
        pull = STEP_COST_PRIOR * np.maximum(spread, 1.0)
        pull[0] = 0.0
        theta = np.linalg.solve(self._xtx + np.diag(pull), self._xty + pull * prior)
        self.coefficients = np.maximum(theta, STEP_COST_FLOOR * prior)

    def state_dict(self) -> dict[str, Any]:
        """The decayed statistics ``xtx`` float64[3, 3], ``xty`` float64[3], ``weight``, ``units``,
        ``seconds``."""
        return {
            "xtx": self._xtx.copy(),
            "xty": self._xty.copy(),
            "weight": self._weight,
            "units": self._units,
            "seconds": self._seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state, {"xtx", "xty", "weight", "units", "seconds"})
        self._xtx = np.array(check_state_shape("xtx", state["xtx"], (3, 3)), np.float64)
        self._xty = np.array(check_state_shape("xty", state["xty"], (3,)), np.float64)
        self._weight = float(state["weight"])
        self._units = float(state["units"])
        self._seconds = float(state["seconds"])
        self.coefficients = self._prior()
        if self._weight > 0:
            self._refit()


def chain_lengths(
    path_probs: Sequence[np.ndarray], base_tokens: float, max_tokens: Sequence[int]
) -> list[int]:
    """How many tokens of each request's best path to draft in one batched step.

    ``path_probs[r]``: float[d_r], the probability that request r's path is accepted up to each depth
    (non-increasing). ``base_tokens``: the step's cost without drafts in draft tokens
    (:meth:`StepCost.base_tokens`), so a step with n draft tokens costs ``base_tokens + n`` of them
    and yields A tokens in expectation: one per request plus the probabilities of its drafted tokens.
    Drafting one more token of probability p raises the throughput A / (base_tokens + n) exactly when
    ``p > A / (base_tokens + n)``. Tokens are taken in order of falling p over the whole batch (ties:
    request, then depth, so every request keeps a prefix), each while it passes that test and its
    request has fewer than ``max_tokens[r]``; the test only gets harder as tokens are added, so the
    first failure ends the choice. A batch whose rows cost many draft tokens' worth drafts nothing."""
    if len(path_probs) != len(max_tokens):
        raise ValueError(f"got {len(path_probs)} paths but {len(max_tokens)} limits")
    lengths = [0] * len(path_probs)
    candidates = sorted(
        (-float(p), r, depth)
        for r, probs in enumerate(path_probs)
        for depth, p in enumerate(np.asarray(probs, np.float64)[: max(max_tokens[r], 0)])
    )
    expected = float(len(path_probs))
    for drafted, (neg_p, r, depth) in enumerate(candidates):
        p = -neg_p
        if depth != lengths[r] or p <= expected / (base_tokens + drafted):
            break
        lengths[r] += 1
        expected += p
    return lengths
