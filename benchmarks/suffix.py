"""SuffixDecoding (Arctic Inference's ``SuffixDecodingCache``) as a restspec :class:`Drafter`.

Used by ``restspec bench --methods suffix`` to compare against the published method inside the same
generate loop. Its settings are Arctic Inference's defaults (suffix trees of depth 64,
``max_spec_factor=1.0``, ``max_spec_offset=0``, ``min_token_prob=0.1``, 16 speculative tokens as its
vLLM ``suffix`` method uses) with tree speculation on. The cache's global tree holds the responses of
earlier requests (and, as in Arctic, the running response), the per-request tree holds the prompt.

Optional dependency: ``pip install 'restspec[suffix]'`` (see docs/benchmarks.md for the CPU build).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from restspec.draft.base import Step
from restspec.draft.tree import DraftTree, node_depths
from restspec.errors import RestspecError


@dataclass(frozen=True)
class SuffixConfig:
    """Arctic Inference's SuffixDecoding settings (defaults = Arctic's)."""

    max_tree_depth: int = 64
    """Depth of the suffix trees, and the longest context suffix matched."""
    max_spec_tokens: int = 16
    """Most draft tokens per step (Arctic's vLLM ``suffix`` method default)."""
    max_spec_factor: float = 1.0
    """Draft length limit per matched context token."""
    max_spec_offset: float = 0.0
    """Draft length limit offset."""
    min_token_prob: float = 0.1
    """Drop draft tokens whose estimated probability falls below this."""
    use_tree_spec: bool = True
    """Speculate a tree rather than a single path."""
    max_cached_requests: int = -1
    """Responses kept in the global tree (-1 = all)."""

    def __post_init__(self) -> None:
        if self.max_tree_depth < 1:
            raise ValueError(f"max_tree_depth={self.max_tree_depth} must be >= 1")
        if self.max_spec_tokens < 1:
            raise ValueError(f"max_spec_tokens={self.max_spec_tokens} must be >= 1")
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob={self.min_token_prob} must lie in [0, 1]")


def _writable_int32(ids: np.ndarray) -> np.ndarray:
    """A contiguous, writable int32 copy: Arctic's native calls reject read-only arrays (the generate
    loop hands drafters read-only views of its context)."""
    return np.array(ids, dtype=np.int32, copy=True, order="C")


def _import_cache() -> type:
    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    except ImportError as e:
        raise RestspecError(
            f"the 'suffix' method needs Arctic Inference ({e}); install it with: "
            "pip install nanobind==2.9.2 cmake ninja && "
            "pip install --no-build-isolation --no-deps arctic-inference"
        ) from None
    return SuffixDecodingCache


def suffix_draft_to_tree(token_ids: list[int], parents: list[int], probs: list[float]) -> DraftTree:
    """Arctic's draft (parent indices into its own token list, -1 = root) as a :class:`DraftTree`.

    Nodes are reordered by falling probability, parents first, so any prefix is a valid tree.
    """
    n = len(token_ids)
    if n == 0:
        return DraftTree.empty()
    parents_arr = np.asarray(parents, dtype=np.int64)
    probs_arr = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    late = np.flatnonzero(parents_arr >= np.arange(n))
    if len(late):  # Arctic emits parents before children; depth needs that order
        i = int(late[0])
        raise ValueError(f"suffix draft: parents[{i}]={parents_arr[i]} does not precede node {i}")
    depth = node_depths(parents_arr)
    # falling probability, then shallower first, then original order: parents (prob >= child's) first
    order = np.lexsort((np.arange(n), depth, -probs_arr))
    new_index = np.empty(n, dtype=np.int64)
    new_index[order] = np.arange(n)
    new_parents = np.where(parents_arr[order] < 0, -1, new_index[np.maximum(parents_arr[order], 0)])
    if (new_parents >= np.arange(n)).any():  # a child scored above its parent: keep Arctic's order
        return DraftTree(np.asarray(token_ids), parents_arr, probs_arr)
    return DraftTree(np.asarray(token_ids)[order], new_parents, probs_arr[order])


class SuffixDrafter:
    """A :class:`~restspec.draft.base.Drafter` over one ``SuffixDecodingCache`` kept across requests."""

    def __init__(self, config: SuffixConfig | None = None) -> None:
        self.config = config or SuffixConfig()
        cache_cls = _import_cache()
        self.cache = cache_cls(
            max_tree_depth=self.config.max_tree_depth, max_cached_requests=self.config.max_cached_requests
        )
        self._ids = itertools.count()
        self._req: int | None = None  # the cache's id of the one request in flight

    @property
    def max_tokens(self) -> int:
        return self.config.max_spec_tokens

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        """One request at a time: Arctic's ``speculate`` needs the request, restspec's ``propose`` has
        only the context (a baseline for the one-request bench)."""
        if self._req is not None:
            raise ValueError(f"request {self._req} is still active; call stop_request first")
        self._req = next(self._ids)
        self.cache.start_request(self._req, _writable_int32(prompt))

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if self._req is None:
            raise ValueError("propose before start_request")
        limit = min(budget, self.config.max_spec_tokens)
        if limit <= 0:
            return DraftTree.empty()
        tail = _writable_int32(context[-self.config.max_tree_depth :])
        draft = self.cache.speculate(
            self._req,
            tail,
            max_spec_tokens=limit,
            max_spec_factor=self.config.max_spec_factor,
            max_spec_offset=self.config.max_spec_offset,
            min_token_prob=self.config.min_token_prob,
            use_tree_spec=self.config.use_tree_spec,
        )
        return suffix_draft_to_tree(list(draft.token_ids), list(draft.parents), list(draft.probs)).truncate(
            limit
        )

    def observe(self, step: Step) -> None:
        if self._req is None:
            raise ValueError("observe before start_request")
        if len(step.accepted):
            self.cache.add_active_response(self._req, _writable_int32(step.accepted))

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("Arctic's suffix cache cannot be exported; replay the outputs instead")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError("Arctic's suffix cache cannot be loaded from a state; replay the outputs instead")

    def stop_request(self, request: int = 0) -> None:
        if self._req is not None:
            self.cache.stop_request(self._req)
            self._req = None
