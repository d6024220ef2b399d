"""The one drafter interface, and the step record every learner learns from.

Every source of drafts (datastore, the request's own context, past outputs, the model's recent top
candidates, a merge of several) implements :class:`Drafter`. The generate loop calls, per request::

    drafter.start_request(prompt_ids, request)
    loop:   proposal = drafter.propose(context, budget)
            ... the budget policy truncates the tree, verify it, accept ...
            step = Step(context, tree, path, accepted, logits, timings, proposal=proposal, request=request)
            drafter.observe(step); policy.observe(step)
    drafter.stop_request(request)   # always, also on errors

``context`` is the whole token sequence so far (prompt + output) as int32[L], read-only.

Several requests may be under way at once (continuous batching): ``request`` is an id unique among
the requests in flight, and a drafter keeps per-request state (if any) under it. Between ``propose``
and ``observe`` other requests' proposals may come, so a drafter keeps nothing per step: what it needs
of its proposal comes back as :attr:`Step.proposal`.

Anything that learns across steps is a :class:`Learner`: it learns only from :meth:`observe`, and
its learned state travels only through :meth:`~Learner.state_dict` / :meth:`~Learner.load_state_dict`
(as torch modules' do), so a warm start or a checkpoint never reaches into its arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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


@dataclass(frozen=True, eq=False)
class Step:
    """One verification step, as every learner sees it."""

    context: np.ndarray
    """int32[L], read-only: the sequence before the step (what the drafter was given); ``context[-1]``
    is the root."""
    tree: DraftTree
    """The tree the model verified (after the budget's truncation); ``len(tree)`` nodes."""
    path: np.ndarray
    """int32[a]: the accepted nodes (indices into ``tree``), root to leaf."""
    accepted: np.ndarray
    """int32[<= a + 1]: the tokens the step added: the accepted drafts and the model's own next token,
    cut at an end of sequence, a stop string or the length limit."""
    logits: TreeLogits | None
    """The verification logits (root + nodes); None where not available (e.g. a replay)."""
    draft_s: float = 0.0
    """Seconds in the drafter's propose."""
    forward_s: float = 0.0
    """Seconds in the verification forward."""
    accept_s: float = 0.0
    """Seconds in everything else up to the record: the budget's choice, the mask, acceptance, cache
    compaction (the learners' own observe calls come after it)."""
    proposal: DraftTree | None = None
    """What the drafter proposed, before the budget's truncation (None where not known, e.g. a replay
    or a finished conversation)."""
    request: int = 0
    """Id of the request the step belongs to (unique among the requests in flight)."""
    batch_size: int = 1
    """Requests verified in the same forward as this one (1 = alone)."""
    batch_width: int = 0
    """Inputs of that whole forward, every request's root and nodes (0 = alone: :attr:`width`)."""

    @property
    def width(self) -> int:
        """Inputs of this request's part of the verification forward: the root and the tree's nodes."""
        return len(self.tree) + 1

    @property
    def forward_width(self) -> int:
        """Inputs of the whole verification forward this step was part of."""
        return self.batch_width or self.width

    @property
    def seconds(self) -> float:
        """Wall time of the step up to its record."""
        return self.draft_s + self.forward_s + self.accept_s

    @classmethod
    def finished(cls, prompt: np.ndarray, output: np.ndarray, request: int = 0) -> Step:
        """A whole request as one step with no draft: ``output`` (int32[T]) followed ``prompt``
        (int32[L]). How finished conversations (a warm start) reach a drafter; the one kind of step
        whose ``accepted`` is longer than ``path`` + 1, which a budget policy takes for no evidence."""
        empty = np.zeros(0, np.int32)
        return cls(
            np.asarray(prompt, np.int32),
            DraftTree.empty(),
            empty,
            np.asarray(output, np.int32),
            None,
            request=request,
        )


@runtime_checkable
class Learner(Protocol):
    """Learns from verification steps; its learned state is a dict of numpy arrays, numbers and
    nested dicts of them (string keys), picklable and, flattened, ``np.savez``-able."""

    def observe(self, step: Step) -> None:
        """After a verification step: learn from it."""

    def state_dict(self) -> dict[str, Any]:
        """What was learned so far (copies: later steps do not change it)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a learner of the same shape; ``ValueError`` (and no
        change) when it does not fit."""


@runtime_checkable
class Drafter(Learner, Protocol):
    """A source of draft trees. ``budget`` is the most nodes the returned tree may have."""

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        """Request ``request`` begins with these prompt tokens (int32[L])."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """A draft tree of at most ``budget`` nodes continuing ``context``; empty is a normal answer."""

    def stop_request(self, request: int = 0) -> None:
        """Request ``request`` is over (finished, stopped or failed)."""


def check_state_keys(owner: object, state: dict[str, Any], keys: set[str]) -> None:
    """``ValueError`` unless ``state`` has exactly ``keys`` (a state of another kind of learner)."""
    if set(state) != keys:
        raise ValueError(
            f"{type(owner).__name__} state needs the keys {sorted(keys)}, got {sorted(state)}; "
            "was it saved from another kind of learner?"
        )


def check_state_shape(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as an array, or ``ValueError`` unless its shape is ``shape``."""
    array = np.asarray(value)
    if array.shape != shape:
        raise ValueError(f"state {name!r} has shape {array.shape}, this learner needs {shape}")
    return array


class StatelessDrafter:
    """Base for drafters that keep nothing across steps: lifecycle and observe do nothing, the
    state is empty."""

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        return None

    def observe(self, step: Step) -> None:
        return None

    def stop_request(self, request: int = 0) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state, set())


class EmptyDrafter(StatelessDrafter):
    """Drafts nothing: the generate loop then decodes one token per step (the plain baseline)."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        return DraftTree.empty()
