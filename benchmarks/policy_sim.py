"""Budget policies replayed on recorded greedy references, timed with a latency curve (no model).

For tuning the adaptive budget while the machine is busy: the drafter proposes its largest tree
for the true context, the policy picks how many nodes to verify, the accepted tokens are exactly what
greedy verification would accept (see :mod:`benchmarks.simulate`), and each step costs
``latency(c + 1)`` from a calibration curve. The predicted speedup over plain decoding is then
``(tokens / seconds) * latency(1)``; drafting time is not included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.simulate import Reference, accepted_path, step_logits
from restspec.decode.budget import BudgetPolicy, LatencyCurve
from restspec.decode.warm import WarmStart
from restspec.draft.base import Drafter, Step
from restspec.draft.tree import DraftTree
from restspec.errors import RestspecError


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
                budget = policy.max_budget
                proposal = drafter.propose(context, budget) if budget else DraftTree.empty()
                tree = proposal.truncate(policy.choose(proposal, len(context) - 1))
                truth = ref.output[pos:]
                path = accepted_path(tree, truth)[: len(truth) - 1]
                n_draft = len(path)
                gained = truth[: n_draft + 1]
                top = ref.top[prompt_len + pos - 1 : prompt_len + pos + n_draft]
                logits = step_logits(tree, path, int(context[-1]), top, vocab_size)
                step = Step(context, tree, path, gained, logits, proposal=proposal)
                drafter.observe(step)
                policy.observe(step)
                n = len(tree)
                seconds += float(latency(n + 1))
                steps += 1
                nodes += n
                tokens += len(gained)
                pos += len(gained)
        finally:
            drafter.stop_request()
    return PolicyReplay(steps, tokens, nodes, seconds, float(latency(1)))


def policy_table(
    refs: Sequence[Reference],
    datastores: Sequence,
    vocab_size: int,
    latency: LatencyCurve,
    warm: WarmStart | None = None,
) -> str:
    """Markdown: tokens per step, nodes per step and predicted speedup of restspec's default mix under
    the adaptive and fixed budgets, REST as published and SuffixDecoding (if installed); every drafter
    and policy started from ``warm``, if given, as restspec's engine starts them."""
    from benchmarks.simulate import make_drafter
    from restspec.decode.budget import DEFAULT_MAX_BUDGET, AdaptiveBudget, FixedBudget, default_max_budget

    default_cap = default_max_budget(latency)
    rows: list[tuple[str, str, Drafter, BudgetPolicy]] = [
        (
            "restspec default mix",
            f"adaptive, at most {cap}" + (" (default)" if cap == default_cap else ""),
            make_drafter("merged", datastores, vocab_size),
            AdaptiveBudget(latency, cap),
        )
        for cap in sorted({8, DEFAULT_MAX_BUDGET, default_cap, 16, 32, 64})
    ]
    rows += [
        (
            "restspec default mix",
            f"fixed {size}",
            make_drafter("merged", datastores, vocab_size),
            FixedBudget(size),
        )
        for size in (2, 4, 8, 16)
    ]
    rows.append(
        (
            "REST (datastore only)",
            "fixed 64",
            make_drafter("datastore", datastores, vocab_size),
            FixedBudget(64),
        )
    )
    try:
        from benchmarks.suffix import SuffixDrafter

        suffix = SuffixDrafter()
        rows.append(
            ("SuffixDecoding (Arctic)", f"fixed {suffix.max_tokens}", suffix, FixedBudget(suffix.max_tokens))
        )
    except RestspecError:
        pass  # the optional extra is not installed (SuffixDrafter says so with a RestspecError)
    lines = [
        "| drafter | budget | tokens/step | nodes/step | predicted speedup |",
        "|---|---|---:|---:|---:|",
    ]
    for name, budget, drafter, policy in rows:
        if warm is not None:
            warm.apply(drafter, policy)
        r = replay_policy(refs, drafter, policy, latency, vocab_size)
        lines.append(f"| {name} | {budget} | {r.mean_accepted:.2f} | {r.mean_nodes:.1f} | {r.speedup:.2f}x |")
    return "\n".join(lines)
