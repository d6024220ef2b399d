"""The draft tree: the one object that flows from drafting to verification.

A tree of n draft nodes hangs below the *root*, the last accepted token (which the model has not
seen yet). Verification feeds ``[root, node 0, ..., node n-1]`` to the model in one forward pass, so
row 0 of every per-step array is the root and row ``i + 1`` is node ``i``.

Invariants (checked on construction):
- ``parents[i] < i`` (parents precede children; -1 means a child of the root), so every prefix
  ``nodes[:c]`` is itself a prefix-closed tree: ``truncate(c)`` is a slice;
- no two siblings carry the same token;
- ``weights[i]`` in [0, 1] estimates the probability that node i is accepted (its whole path
  matches the model). Drafters order nodes by falling weight, so the first c nodes are the best c.

``match_length`` says what the tree was drafted from: the length of the context suffix a retrieving
source matched (0 = no match, or a source that does not match suffixes); a merged tree carries the
trees of its ``sources``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numba as nb
import numpy as np


def _frozen_int32(values: np.ndarray | list[int]) -> np.ndarray:
    arr = np.ascontiguousarray(values, dtype=np.int32)
    arr.setflags(write=False)
    return arr


@nb.njit(cache=True)
def node_depths(parents):  # pragma: no cover - compiled
    """int32[n]: 1 for children of the root, parent's depth + 1 below (parents precede children)."""
    depths = np.empty(len(parents), np.int32)
    for i in range(len(parents)):
        depths[i] = 1 if parents[i] < 0 else depths[parents[i]] + 1
    return depths


@nb.njit(cache=True)
def _first_violation(tokens, parents, weights):  # pragma: no cover - compiled
    """(code, index) of the first broken invariant, (0, -1) if none: 1 weight outside [0, 1] or not
    finite, 2 negative token, 3 parent not before its node, 4 two siblings with one token. One
    compiled pass: drafters build several trees per decoding step."""
    n = len(tokens)
    for i in range(n):
        if not (weights[i] >= 0.0 and weights[i] <= 1.0):
            return 1, i
    for i in range(n):
        if tokens[i] < 0:
            return 2, i
    for i in range(n):
        if parents[i] < -1 or parents[i] >= i:
            return 3, i
    pairs = np.empty(n, np.int64)
    for i in range(n):
        pairs[i] = np.int64(parents[i]) * (np.int64(1) << 32) + tokens[i]
    pairs.sort()
    for i in range(1, n):
        if pairs[i] == pairs[i - 1]:
            return 4, i
    return 0, -1


@dataclass(frozen=True, eq=False)
class DraftTree:
    """Draft tokens as a parent-index tree. ``tokens``, ``parents``: int32[n]; ``weights``: float32[n]."""

    tokens: np.ndarray
    parents: np.ndarray
    weights: np.ndarray = field(default=None)  # type: ignore[assignment]
    match_length: int = 0
    """Tokens of the context suffix the source matched to draft this tree (0 = none)."""
    sources: tuple[DraftTree, ...] = ()
    """The trees a merge of several sources was built from, one per source (empty for a source's
    own tree); they come back to the merge with the step (:attr:`restspec.draft.base.Step.proposal`)."""
    uncorrected: np.ndarray | None = None
    """float32[n]: the weights before the drafter's last correction of them, None where none was
    applied; they come back to the drafter with the step, so that it learns the correction from
    what it corrected (:class:`restspec.draft.merge.MergedDrafter`)."""

    def __post_init__(self) -> None:
        if self.match_length < 0:
            raise ValueError(f"match_length={self.match_length} must be >= 0")
        tokens = _frozen_int32(self.tokens)
        parents = _frozen_int32(self.parents)
        if tokens.ndim != 1 or parents.shape != tokens.shape:
            raise ValueError(
                f"tokens and parents must be 1-D of one length, got {tokens.shape} and {parents.shape}"
            )
        n = len(tokens)
        if self.weights is None:
            weights = np.ones(n, dtype=np.float32)
        else:
            weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        if weights.shape != tokens.shape:
            raise ValueError(f"weights must have shape {tokens.shape}, got {weights.shape}")
        weights.setflags(write=False)
        if self.uncorrected is not None:
            uncorrected = np.ascontiguousarray(self.uncorrected, dtype=np.float32)
            if uncorrected.shape != tokens.shape:
                raise ValueError(f"uncorrected must have shape {tokens.shape}, got {uncorrected.shape}")
            uncorrected.setflags(write=False)
            object.__setattr__(self, "uncorrected", uncorrected)
        code, i = _first_violation(tokens, parents, weights) if n else (0, -1)
        if code == 1:
            raise ValueError(f"weights must lie in [0, 1], got {weights.min()}..{weights.max()}")
        if code == 2:
            raise ValueError(f"token ids must be >= 0, got {tokens.min()}")
        if code == 3:
            raise ValueError(f"parents[{i}]={parents[i]} must be -1 or a node before {i}")
        if code == 4:
            raise ValueError("two sibling nodes carry the same token; merge identical paths")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "weights", weights)

    @classmethod
    def empty(cls) -> DraftTree:
        """The normal 'nothing to draft' result: the step then decodes one token."""
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))

    @classmethod
    def chain(
        cls, tokens: np.ndarray | list[int], weights: np.ndarray | list[float] | None = None
    ) -> DraftTree:
        """A single path: node i is the child of node i - 1."""
        n = len(tokens)
        return cls(np.asarray(tokens), np.arange(-1, n - 1), None if weights is None else np.asarray(weights))

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"DraftTree(n={len(self)}, tokens={self.tokens.tolist()}, parents={self.parents.tolist()}, "
            f"match_length={self.match_length})"
        )

    @cached_property
    def depths(self) -> np.ndarray:
        """int32[n]: 1 for children of the root, parent's depth + 1 below."""
        depths = node_depths(self.parents)
        depths.setflags(write=False)
        return depths

    @cached_property
    def ancestor_mask(self) -> np.ndarray:
        """bool[n+1, n+1] over [root, nodes]: row r may attend to column c (itself, its ancestors, root)."""
        n = len(self)
        mask = np.zeros((n + 1, n + 1), dtype=bool)
        mask[:, 0] = True
        mask[0, 0] = True
        for i, p in enumerate(self.parents.tolist()):
            row = i + 1
            if p >= 0:
                mask[row, :row] = mask[p + 1, :row]
            mask[row, row] = True
        mask.setflags(write=False)
        return mask

    def attention_mask(self, past_len: int) -> np.ndarray:
        """bool[n+1, past_len+n+1]: every row sees the whole cache, then its tree ancestors."""
        n = len(self)
        mask = np.ones((n + 1, past_len + n + 1), dtype=bool)
        mask[:, past_len:] = self.ancestor_mask
        return mask

    def position_ids(self, past_len: int) -> np.ndarray:
        """int64[n+1]: the root sits at past_len, node i at past_len + depth_i."""
        return past_len + np.concatenate(([0], self.depths)).astype(np.int64)

    def paths(self) -> list[np.ndarray]:
        """Node indices of every root-to-leaf path, leaves in node order."""
        is_parent = np.zeros(len(self), dtype=bool)
        is_parent[self.parents[self.parents >= 0]] = True
        out = []
        for leaf in np.flatnonzero(~is_parent).tolist():
            path = []
            node = leaf
            while node >= 0:
                path.append(node)
                node = int(self.parents[node])
            out.append(np.asarray(path[::-1], dtype=np.int32))
        return out

    def children(self, node: int) -> np.ndarray:
        """Indices of the children of ``node`` (-1 for the root)."""
        return np.flatnonzero(self.parents == node).astype(np.int32)

    def truncate(self, size: int) -> DraftTree:
        """The first ``size`` nodes (prefix-closed because parents precede children).

        A prefix of a valid tree is valid, so it is not checked again, and it keeps the depths
        already computed (the generate loop truncates every step's tree once or twice)."""
        if size >= len(self):
            return self
        size = max(size, 0)
        prefix = object.__new__(DraftTree)
        for name in ("tokens", "parents", "weights"):
            object.__setattr__(prefix, name, getattr(self, name)[:size])
        object.__setattr__(prefix, "match_length", self.match_length)
        if "depths" in self.__dict__:
            prefix.__dict__["depths"] = self.depths[:size]
        return prefix
