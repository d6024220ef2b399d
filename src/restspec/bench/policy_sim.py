"""Budget policies replayed on recorded greedy references, timed with a latency curve (no model).

For tuning the adaptive budget while the machine is busy: the drafter proposes its largest tree
for the true context, the policy picks how many nodes to verify, the accepted tokens are exactly what
greedy verification would accept (see :mod:`restspec.bench.simulate`), and each step costs
``latency(c + 1)`` from a calibration curve. The predicted speedup over plain decoding is then
``(tokens / seconds) * latency(1)``; drafting time is not included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from restspec.bench.simulate import Reference, longest_accepted, synthesized_logits
from restspec.decode.budget import BudgetPolicy, LatencyCurve
from restspec.draft.base import Drafter


@dataclass(frozen=True)
class PolicyReplay:
    steps: int
    tokens: int
    nodes: int
    """Draft nodes verified in total."""
    seconds: float
    """Sum of ``latency(c + 1)`` over steps."""
    plain_step_s: float

    @property
    def mean_accepted(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def mean_nodes(self) -> float:
        return self.nodes / max(self.steps, 1)

    @property
    def speedup(self) -> float:
        """Predicted tokens/s over plain decoding's (one token per ``latency(1)``)."""
        return self.tokens * self.plain_step_s / self.seconds if self.seconds else 0.0


def replay_policy(
    refs: Sequence[Reference], drafter: Drafter, policy: BudgetPolicy, latency: LatencyCurve, vocab_size: int
) -> PolicyReplay:
    """Replay ``refs`` in order through ``drafter`` with tree sizes chosen by ``policy``."""
    steps = tokens = nodes = 0
    seconds = 0.0
    for ref in refs:
        prompt_len = len(ref.prompt)
        full = np.concatenate([ref.prompt, ref.output]).astype(np.int32)
        drafter.start_request(ref.prompt)
        try:
            pos = 0
            while pos < len(ref.output):
                context = full[: prompt_len + pos]
                tree = drafter.propose(context, policy.max_budget) if policy.max_budget else None
                if tree is not None and len(tree):
                    tree = tree.truncate(policy.choose(tree, len(context) - 1))
                truth = ref.output[pos:]
                n_draft = 0 if tree is None else min(longest_accepted(tree, truth), len(truth) - 1)
                gained = truth[: n_draft + 1]
                inputs = full[prompt_len + pos - 1 : prompt_len + pos + n_draft]
                top = ref.top[prompt_len + pos - 1 : prompt_len + pos + n_draft]
                drafter.observe(context, gained, synthesized_logits(inputs, top, vocab_size))
                n = 0 if tree is None else len(tree)
                seconds += float(latency(n + 1))
                steps += 1
                nodes += n
                tokens += len(gained)
                pos += len(gained)
        finally:
            drafter.stop_request()
    return PolicyReplay(steps, tokens, nodes, seconds, float(latency(1)))
