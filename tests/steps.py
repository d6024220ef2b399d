"""Step records for tests that feed a learner by hand."""

from __future__ import annotations

import numpy as np

from restspec.draft import DraftTree, Step, TreeLogits


def step(
    context: np.ndarray,
    accepted: np.ndarray,
    logits: TreeLogits | None = None,
    *,
    tree: DraftTree | None = None,
    path: list[int] | np.ndarray = (),
    seconds: float = 0.0,
) -> Step:
    """A step after ``context`` that added ``accepted``; by default nothing was drafted (as in a
    replay): the tree is empty, the path too. ``tree`` is also the proposal (nothing truncated)."""
    return Step(
        np.asarray(context, np.int32),
        DraftTree.empty() if tree is None else tree,
        np.asarray(path, np.int32),
        np.asarray(accepted, np.int32),
        logits,
        forward_s=seconds,
        proposal=tree,
    )
