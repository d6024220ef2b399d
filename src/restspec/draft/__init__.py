"""Drafting: draft trees and the sources that propose them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from restspec.draft.base import Drafter, EmptyDrafter, Learner, StatelessDrafter, Step, TreeLogits
from restspec.draft.lookup import Lookup, longest_suffix_continuations
from restspec.draft.merge import (
    Calibration,
    Extender,
    MergeConfig,
    MergedDrafter,
    RecycleRows,
    extend_best_first,
    merge_trees,
    node_outcomes,
)
from restspec.draft.recycle import RecycleDrafter
from restspec.draft.sources import ContextDrafter, DatastoreDrafter, HistoryDrafter, LookupConfig
from restspec.draft.tree import DraftTree
from restspec.draft.trie import select_tree

if TYPE_CHECKING:
    from restspec.datastore import Datastore

DEFAULT_SCALES = {"datastore": 0.5, "context": 1.0, "history": 1.0}
"""Prior trust per source in :func:`default_drafter` (multiplies a source's own weights until
calibration has evidence); tuned by replaying HumanEval and MT-Bench under the adaptive budget
(``python -m benchmarks.replay``): the datastore's short matches are weaker evidence than their counts say,
most of all in chat."""
DEFAULT_MERGE = MergeConfig(combine="or")
"""How :func:`default_drafter` merges: a path several sources propose is more likely than any one
of them says (noisy-or), which the same replays favoured over the maximum."""


def default_drafter(datastores: Sequence[Datastore], vocab_size: int) -> MergedDrafter:
    """restspec's default mix: datastore + the request's context + past outputs, extended by token
    recycling."""
    sources: list[tuple[str, Drafter]] = []
    if datastores:
        sources.append(("datastore", DatastoreDrafter(datastores)))
    sources += [("context", ContextDrafter()), ("history", HistoryDrafter())]
    return MergedDrafter(
        [d for _, d in sources],
        scales=[DEFAULT_SCALES[name] for name, _ in sources],
        config=DEFAULT_MERGE,
        extender=RecycleDrafter(vocab_size),
    )


__all__ = [
    "DEFAULT_MERGE",
    "DEFAULT_SCALES",
    "Calibration",
    "ContextDrafter",
    "DatastoreDrafter",
    "DraftTree",
    "Drafter",
    "EmptyDrafter",
    "Extender",
    "HistoryDrafter",
    "Learner",
    "Lookup",
    "LookupConfig",
    "MergeConfig",
    "MergedDrafter",
    "RecycleDrafter",
    "RecycleRows",
    "StatelessDrafter",
    "Step",
    "TreeLogits",
    "default_drafter",
    "extend_best_first",
    "longest_suffix_continuations",
    "merge_trees",
    "node_outcomes",
    "select_tree",
]
