"""Token Recycling as published (Luo et al., 2024, "Turning Trash into Treasure: Accelerating Inference
of Large Language Models with Token Recycling", arXiv 2408.08696), as a restspec :class:`Drafter`.

The baseline ``recycle`` of ``python -m benchmarks.bench`` runs it inside restspec's generate loop
with a fixed budget of the whole template, so that only the drafter differs from restspec's. It is
the paper's algorithm, not restspec's own variant (:class:`restspec.draft.recycle.RecycleDrafter`,
which learns rank rates, keeps pair rows and grows its tree best first):

- an adjacency matrix ``M[V, k]`` (k = 8) holds, for every token, its top-k next tokens from the
  latest verification in which it was an input;
- after every verification the rows of *all* its inputs (the root and every tree node, accepted or
  not) are overwritten with the top-k of their logits rows;
- every step fills the one static tree template (:data:`TREE_TEMPLATE`) from ``M``, starting at the
  last context token, and verifies all of it.

As in the official code (``evaluation/inference_recycling.py`` of Luowaterbi/TokenRecycling), the
matrix is created once per run and kept across requests (never reset, no warm-up), and the prompt's
prefill logits do not update it. Two details differ. The official matrix starts as zeros, so a
token never seen drafts token 0 at every child slot (eight identical siblings, which a restspec tree
cannot hold); here an unseen row is -1 and its children, with their subtrees, are left out (a smaller
tree until the rows fill). Where one token is an input twice in a step, the later row wins (numpy's
assignment order; the official CUDA ``index_put`` leaves it open).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from restspec.draft.base import Step, check_state_keys, check_state_shape
from restspec.draft.recycle import top_k_rows
from restspec.draft.tree import DraftTree

TOP_K = 8
"""Candidates kept per token: the paper's k, the official code's ``--output-id-topk`` default."""

TREE_TEMPLATE: tuple[tuple[int, ...], ...] = (
    # depth 1: 8 nodes
    *((i,) for i in range(8)),
    # depth 2: 21 nodes
    *((0, i) for i in range(8)),
    *((1, i) for i in range(4)),
    *((2, i) for i in range(3)),
    (3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0),
    # depth 3: 25 nodes
    *((0, 0, i) for i in range(8)),
    (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1),
    (0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 6, 0), (0, 7, 0),
    (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    # depth 4: 15 nodes
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 3), (0, 0, 0, 4),
    (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0),
    (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    # depth 5: 8 nodes
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0),
    (0, 0, 0, 2, 0), (0, 0, 1, 0, 0), (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    # depth 6: 3 nodes
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)  # fmt: skip
"""The static draft tree, 80 nodes in 6 levels (8, 21, 25, 15, 8, 3), in the official order: each node
is its path of candidate ranks from the root (``(0, 1)``: the rank-1 candidate after the root's rank-0
candidate). Template version "2.2.2" of Luowaterbi/TokenRecycling, ``model/recycling/tree_template_.py``
(commit 1b4c05c), the default of its ``evaluation/inference_recycling.py`` and the tree its README and
the paper describe."""


@dataclass(frozen=True)
class TreeTemplate:
    """A static tree as arrays: node i is candidate ``ranks[i]`` of the token of node ``parents[i]``
    (-1: of the root). Nodes are ordered by depth, parents first; ``levels`` holds each depth's
    ``(start, stop)`` node range, the order in which the nodes are filled."""

    parents: np.ndarray
    """int32[n]: index of each node's parent, -1 for the root's children."""
    ranks: np.ndarray
    """int32[n]: which candidate of its parent's row each node takes."""
    levels: tuple[tuple[int, int], ...]
    """The node range of depth 1, 2, ...: a level's parents all lie in the levels before it."""

    @classmethod
    def from_paths(cls, paths: tuple[tuple[int, ...], ...], k: int) -> TreeTemplate:
        """The template of rank paths such as :data:`TREE_TEMPLATE`; ``ValueError`` unless the paths are
        non-empty, ordered by length, their ranks below ``k``, and every node's parent path before it."""
        index = {path: i for i, path in enumerate(paths)}
        parents = np.empty(len(paths), np.int32)
        ranks = np.empty(len(paths), np.int32)
        levels: list[tuple[int, int]] = []
        for i, path in enumerate(paths):
            if not path or not all(0 <= r < k for r in path):
                raise ValueError(f"template node {i} {path}: needs at least one rank, each in [0, {k})")
            if len(path) == len(levels):
                levels[-1] = (levels[-1][0], i + 1)
            elif len(path) == len(levels) + 1:
                levels.append((i, i + 1))
            else:
                raise ValueError(f"template node {i} {path}: nodes must come shallow first, by depth")
            parent = index.get(path[:-1], -1) if len(path) > 1 else -1
            if len(path) > 1 and not 0 <= parent < i:
                raise ValueError(f"template node {i} {path}: its parent {path[:-1]} must come before it")
            parents[i], ranks[i] = parent, path[-1]
        return cls(parents, ranks, tuple(levels))

    def __len__(self) -> int:
        return len(self.parents)

    def fill(self, table: np.ndarray, root: int) -> DraftTree:
        """The template filled from ``table`` (int32[V, k], -1 = unknown) below token ``root``: node i
        takes ``table[its parent's token, ranks[i]]``. A node whose entry is -1 is left out with its
        subtree; the others keep the template order (so any prefix of the tree is a tree). Weights are all
        1: the template ranks nothing."""
        if not 0 <= root < len(table):
            return DraftTree.empty()
        tokens = np.full(len(self) + 1, -1, np.int64)  # [root, nodes]
        tokens[0] = root
        for start, stop in self.levels:
            source = tokens[self.parents[start:stop] + 1]  # the parents' tokens, -1 where left out
            found = table[np.maximum(source, 0), self.ranks[start:stop]]
            tokens[start + 1 : stop + 1] = np.where(source >= 0, found, -1)
        keep = tokens[1:] >= 0
        if not keep.any():
            return DraftTree.empty()
        new_index = np.cumsum(keep) - 1  # a kept node's parent is kept: its token was known
        parents = np.where(self.parents < 0, -1, new_index[np.maximum(self.parents, 0)])
        # match_length 1: the root's row, its last token, is what the tree was drafted from
        return DraftTree(tokens[1:][keep], parents[keep], match_length=1)


class TokenRecyclingDrafter:
    """Token Recycling's drafter: an adjacency matrix of the model's latest top-k next tokens per token,
    read through a static tree template. The matrix describes the model, not a request: it persists
    across requests, and requests in flight together share it."""

    def __init__(
        self, vocab_size: int, k: int = TOP_K, template: tuple[tuple[int, ...], ...] = TREE_TEMPLATE
    ) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        self.vocab_size = vocab_size
        self.k = k
        self.template = TreeTemplate.from_paths(template, k)
        self.table = np.full((vocab_size, k), -1, np.int32)
        """int32[V, k]: the adjacency matrix, each token's latest top-k next tokens, best first (-1 =
        never an input of a verification)."""

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        """Nothing per request: the prompt does not touch the matrix (its prefill logits are not seen)."""
        return None

    def stop_request(self, request: int = 0) -> None:
        """Nothing per request: the matrix stays for the next one."""
        return None

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """The template filled below ``context[-1]``, its first ``budget`` nodes."""
        if budget <= 0 or len(context) == 0:
            return DraftTree.empty()
        return self.template.fill(self.table, int(context[-1])).truncate(budget)

    def observe(self, step: Step) -> None:
        """Overwrite the row of every verified input (the root and each node, accepted or not) with the
        top-k of its logits row. Steps without logits teach nothing; inputs outside the vocabulary (a
        replay marks the rows it lacks with -1) are skipped."""
        logits = step.logits
        if logits is None:
            return
        inputs = np.asarray(logits.input_ids, dtype=np.int64)
        valid = (inputs >= 0) & (inputs < self.vocab_size)
        if valid.any():
            # rows assigned in input order: a token verified twice keeps its later row
            self.table[inputs[valid], : min(self.k, logits.logits.shape[-1])] = top_k_rows(
                logits.logits[valid], self.k
            )

    def state_dict(self) -> dict[str, Any]:
        """``table``: int32[V, k], the adjacency matrix."""
        return {"table": self.table.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a drafter of the same vocabulary and k."""
        check_state_keys(self, state, {"table"})
        self.table = np.array(check_state_shape("table", state["table"], self.table.shape), np.int32)
