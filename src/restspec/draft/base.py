"""The one drafter interface.

Every source of drafts (datastore, the request's own context, past outputs, the model's recent top
candidates, a merge of several) implements :class:`Drafter`. The generate loop calls, per request::

    drafter.start_request(prompt_ids)
    loop:   tree = drafter.propose(context, budget)
            ... verify tree, accept ...
            drafter.observe(context, accepted, logits)
    drafter.stop_request()          # always, also on errors

``context`` is the whole token sequence so far (prompt + output) as int32[L], read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from restspec.draft.tree import DraftTree


@dataclass(frozen=True, eq=False)
class TreeLogits:
    """What the verification pass computed, for drafters that learn from it.

    ``input_ids``: int32[n+1], the root (last accepted token) then the tree's nodes, in the order the
    model saw them. ``logits``: float32[n+1, V]; row r scores the token that follows ``input_ids[r]``
    on its tree path (raw model logits, before any sampling warp).
    """

    input_ids: np.ndarray
    logits: np.ndarray

    def top_candidates(self, k: int) -> np.ndarray:
        """int32[n+1, k]: the k highest-scoring next tokens after each input, best first."""
        k = min(k, self.logits.shape[-1])
        part = np.argpartition(-self.logits, k - 1, axis=-1)[:, :k]
        order = np.take_along_axis(-self.logits, part, axis=-1).argsort(axis=-1, kind="stable")
        return np.take_along_axis(part, order, axis=-1).astype(np.int32)


@runtime_checkable
class Drafter(Protocol):
    """A source of draft trees. ``budget`` is the most nodes the returned tree may have."""

    def start_request(self, prompt: np.ndarray) -> None:
        """A new request begins with these prompt tokens (int32[L])."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """A draft tree of at most ``budget`` nodes continuing ``context``; empty is a normal answer."""

    def observe(self, context: np.ndarray, accepted: np.ndarray, logits: TreeLogits | None = None) -> None:
        """After verification: ``context`` as passed to propose, ``accepted`` the tokens it gained
        (accepted draft tokens plus the model's own next token), ``logits`` of the verified tree."""

    def stop_request(self) -> None:
        """The current request is over (finished, stopped or failed)."""


class StatelessDrafter:
    """Base for drafters that keep nothing across steps: lifecycle and observe do nothing."""

    def start_request(self, prompt: np.ndarray) -> None:
        return None

    def observe(self, context: np.ndarray, accepted: np.ndarray, logits: TreeLogits | None = None) -> None:
        return None

    def stop_request(self) -> None:
        return None


class EmptyDrafter(StatelessDrafter):
    """Drafts nothing: the generate loop then decodes one token per step (the plain baseline)."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        return DraftTree.empty()
