"""How many draft nodes to verify in a step.

The generate loop asks the drafter for ``policy.max_budget`` nodes, then verifies the first
``policy.choose(tree, past_len)`` of them (any prefix of a tree's nodes is a valid tree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from restspec.draft.tree import DraftTree


@runtime_checkable
class BudgetPolicy(Protocol):
    @property
    def max_budget(self) -> int:
        """The most nodes a step may verify; the drafter is asked for this many."""

    def choose(self, tree: DraftTree, past_len: int) -> int:
        """How many of ``tree``'s first nodes to verify on top of a cache of ``past_len`` tokens."""


@dataclass(frozen=True)
class FixedBudget:
    """Verify up to ``size`` nodes every step."""

    size: int
    """Most draft nodes per step (0 = plain decoding)."""

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"size={self.size} must be >= 0")

    @property
    def max_budget(self) -> int:
        return self.size

    def choose(self, tree: DraftTree, past_len: int) -> int:
        return min(self.size, len(tree))
