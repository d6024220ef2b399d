"""Acceptance: which draft nodes the model agrees with, and the model's own next token.

Both rules walk the tree from the root, one logits row per visited node (row 0 = root, row i+1 =
node i), and emit exactly one token per visited row:

- greedy: the row's argmax; move to the child carrying it, else stop;
- sampling: a token drawn from the row's warped distribution (temperature, then top-k, then top-p,
  as ``transformers`` does); move to the child carrying it, else stop.

Each emitted token is thus drawn from the model's own distribution given everything before it, so
the output is distributed exactly as plain decoding (and with greedy, token-identical to it). A
sampled step consumes one uniform number per emitted token, the same as a plain step does: with the
same seed, speculative and plain sampling produce the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from restspec.decode.config import SamplingConfig
from restspec.draft.tree import DraftTree


@dataclass(frozen=True, eq=False)
class Acceptance:
    """The outcome of one step."""

    path: np.ndarray
    """int64[k]: accepted node indices, root to leaf (a path of the tree)."""
    tokens: list[int]
    """The k accepted draft tokens, then the model's own next token (k + 1 tokens)."""


def child_lookup(tree: DraftTree) -> dict[tuple[int, int], int]:
    """{(parent node, token): child node}; parent -1 is the root."""
    return {
        (p, t): i for i, (p, t) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist(), strict=True))
    }


def greedy_accept(tree: DraftTree, logits: torch.Tensor) -> Acceptance:
    """Follow the argmax of ``logits`` (n+1, V) while a child carries it: a row's first largest score,
    as ``torch.argmax`` and transformers' greedy search take it (numpy's argmax, the same rule, took
    5 us a row of 49,152 scores where torch's took 77 us on a 2-core AMD EPYC)."""
    scores = logits.detach().to("cpu", torch.float32).numpy()
    children = child_lookup(tree) if len(tree) else {}
    path: list[int] = []
    tokens: list[int] = []
    node = -1
    while True:
        token = int(scores[node + 1].argmax())
        tokens.append(token)
        child = children.get((node, token))
        if child is None:
            return Acceptance(np.asarray(path, dtype=np.int64), tokens)
        path.append(child)
        node = child


def warp_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Warped float32 scores (..., V), filtered tokens at -inf, exactly as ``transformers``'
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper applied in that order."""
    scores = logits.to(torch.float32)
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.shape[-1])
        top, top_ids = torch.topk(scores, k)  # (..., k) descending
        kth = top[..., -1, None]
        below = scores < kth
        if sampling.top_p < 1.0 and bool((below.sum(-1) == scores.shape[-1] - k).all()):
            # no ties at the k-th score: top-p only needs the k survivors, not a sort of all V
            return _top_p_of_top_k(scores.shape, top, top_ids, sampling.top_p)
        scores = scores.masked_fill(below, -float("inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - sampling.top_p)  # drop the low tail whose mass is <= 1 - top_p
        remove[..., -1:] = False  # keep at least the best token
        scores = scores.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
    return scores


def _top_p_of_top_k(
    shape: torch.Size, top: torch.Tensor, top_ids: torch.Tensor, top_p: float
) -> torch.Tensor:
    """TopPLogitsWarper applied to a vector whose only finite scores are ``top`` (descending) at
    ``top_ids``: the -inf entries sort first with probability 0, so they change no cumulative sum."""
    ascending, ids = top.flip(-1), top_ids.flip(-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    out = torch.full(shape, -float("inf"), dtype=top.dtype)
    return out.scatter(-1, ids, ascending.masked_fill(remove, -float("inf")))


def warped_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The sampling distribution (..., V) in float32: softmax of :func:`warp_logits`."""
    return warp_logits(logits, sampling).softmax(dim=-1)


def warped_cdf(logits: torch.Tensor, sampling: SamplingConfig) -> np.ndarray:
    """float64 cumulative sums (..., V) of :func:`warped_probs`, as numpy (what the draws read)."""
    return warped_probs(logits, sampling).to(torch.float64).cumsum(-1).numpy()


def draw_from_cdf(cdf: np.ndarray, generator: torch.Generator | None) -> int:
    """One token by inverse CDF from one uniform number of ``generator``; ``cdf``: float64[V]."""
    u = torch.rand(1, generator=generator, dtype=torch.float64).item() * cdf[-1]
    return int(np.searchsorted(cdf, u, side="right"))  # first token with cdf > u, so p > 0


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs`` (V,) with one uniform number from ``generator``."""
    return draw_from_cdf(probs.to(torch.float64).cumsum(0).numpy(), generator)


_BATCH_WARP_ELEMENTS = 1 << 16
"""Trees whose logits have at most this many entries are warped in one batch, larger ones row by row
(only the rows on the accepted path are needed, typically 2-4 of them)."""


def sample_accept(
    tree: DraftTree,
    logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    *,
    batch_rows: bool | None = None,
) -> Acceptance:
    """Draw from each visited row's warped distribution; follow the child carrying the draw.

    ``batch_rows`` forces warping all rows at once (True) or only the visited rows (False); by
    default small logits are warped at once. Both give the same tokens.
    """
    if batch_rows is None:
        batch_rows = logits.numel() <= _BATCH_WARP_ELEMENTS
    if batch_rows:
        return walk_cdfs(tree, warped_cdf(logits, sampling), generator)
    return walk_cdfs(tree, _LazyCdfs(logits, sampling), generator)


class _LazyCdfs:
    """Row r of the warped CDF table, computed on first use."""

    def __init__(self, logits: torch.Tensor, sampling: SamplingConfig) -> None:
        self._logits = logits
        self._sampling = sampling

    def __getitem__(self, row: int) -> np.ndarray:
        return warped_cdf(self._logits[row], self._sampling)


def walk_cdfs(tree: DraftTree, cdfs: np.ndarray | _LazyCdfs, generator: torch.Generator | None) -> Acceptance:
    """The sampling walk over warped CDF rows (n+1, V): one draw per visited row (row 0 = root)."""
    children = child_lookup(tree) if len(tree) else {}
    path: list[int] = []
    tokens: list[int] = []
    node = -1
    while True:
        token = draw_from_cdf(cdfs[node + 1], generator)
        tokens.append(token)
        child = children.get((node, token))
        if child is None:
            return Acceptance(np.asarray(path, dtype=np.int64), tokens)
        path.append(child)
        node = child


def accept(
    tree: DraftTree, logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> Acceptance:
    """Greedy when ``sampling.temperature == 0``, else exact sampling. ``logits``: (n+1, V)."""
    if sampling.greedy:
        return greedy_accept(tree, logits)
    return sample_accept(tree, logits, sampling, generator)
