"""The research methods of ``python -m benchmarks.bench``: published baselines and restspec's variants,
as builders for :func:`restspec.bench.main` (the same runner, report and comparison as ``restspec bench``).

- ``rest``: REST as published (datastore only, spans 16..2, 64-node trees every step).
- ``suffix``: Arctic Inference's SuffixDecoding (:mod:`benchmarks.suffix`; optional extra
  ``restspec[suffix]``), warmed like restspec; ``suffix-adaptive``: the same under restspec's
  adaptive budget.
- ``recycle``: Token Recycling as published (:mod:`benchmarks.recycling`: its 80-node static tree
  every step, the adjacency matrix fresh at the start of the run, no warm start).
- ``restspec-stock``: restspec on the model's own CPU kernels; ``restspec-split16``: on the stock
  kernels up to 15 inputs and the packed ones from 16 on (``direct-split@16``); ``restspec-curve``:
  the adaptive budget on the calibrated curve alone, not learning step costs from the loop;
  ``restspec-cap16``: the adaptive budget capped at 16 nodes; ``restspec-fixed4/8/16/32/64/128``:
  fixed tree sizes (the wide ones: what the drafts get right where width is nearly free, as on a
  GPU); ``restspec-nohistory``: the default mix whose history source (past outputs) proposes
  nothing, everything else warmed as in ``restspec`` (that source's marginal gain, timed);
  ``restspec-noprefix``: ``restspec`` keeping no finished request's cache (every prompt prefilled
  whole, as transformers' ``generate`` does: prefix reuse's gain on multi-turn chat, timed).
- ``plain-w8`` / ``restspec-w8``: every forward ``PAD_WIDTH + 1`` wide (:class:`PaddedDrafter`), the
  bfloat16 exactness experiment (compare with ``--reference plain-w8``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.recycling import TokenRecyclingDrafter
from restspec.bench.methods import (
    BenchMethod,
    LoopMethod,
    MethodBuilder,
    MethodContext,
)
from restspec.decode.budget import FixedBudget
from restspec.draft import DatastoreDrafter, DraftTree, HistoryDrafter
from restspec.draft.base import EmptyDrafter
from restspec.engine import model_vocab_size

REST_MAX_SPAN = 16
"""REST as published: longest suffix tried against the datastore."""
REST_MIN_SPAN = 2
"""REST as published: shortest suffix tried."""
REST_BUDGET = 64
"""REST as published: draft tree nodes verified every step."""
PAD_WIDTH = 8
"""Draft nodes of every step in the fixed-width variants (``plain-w8``, ``restspec-w8``)."""


class PaddedDrafter:
    """Every tree exactly ``width`` nodes: ``inner``'s best nodes, then zero-weight padding children of
    the root (ids the tree does not use there). Every verification forward then has the same shape,
    which makes reduced-precision (bfloat16) kernels round alike in the plain and speculative runs.
    A padding node the model happens to agree with is accepted like any draft (still exact greedy)."""

    def __init__(self, inner: Any, width: int) -> None:
        if width < 1:
            raise ValueError(f"width={width} must be >= 1")
        self.inner = inner
        self.width = width

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        self.inner.start_request(prompt, request)

    def stop_request(self, request: int = 0) -> None:
        self.inner.stop_request(request)

    def observe(self, step: Any) -> None:
        self.inner.observe(step)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def propose(self, context: np.ndarray, budget: int) -> Any:
        from restspec.draft.tree import DraftTree

        width = min(self.width, budget)
        tree = self.inner.propose(context, width).truncate(width)
        missing = width - len(tree)
        if missing <= 0:
            return tree
        used = set(tree.tokens[tree.parents < 0].tolist())
        pad = [t for t in range(missing + len(used)) if t not in used][:missing]
        return DraftTree(
            np.concatenate([tree.tokens, pad]).astype(np.int32),
            np.concatenate([tree.parents, np.full(missing, -1)]).astype(np.int32),
            np.concatenate([tree.weights, np.zeros(missing)]).astype(np.float32),
        )


class SilentHistory(HistoryDrafter):
    """A history source that never proposes: taken out of a mix after its warm start loaded, the mix's
    other sources and learned rates stay as they are."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        return DraftTree.empty()


def _restspec_no_history(ctx: MethodContext) -> BenchMethod:
    policy = ctx.adaptive_budget()
    drafter = ctx.engine.new_drafter(policy=policy)
    drafter.drafters = [SilentHistory() if isinstance(d, HistoryDrafter) else d for d in drafter.drafters]
    return LoopMethod("restspec-nohistory", ctx.engine.variant(drafter, policy))


def _restspec_no_prefix(ctx: MethodContext) -> BenchMethod:
    generator = ctx.default_generator(ctx.adaptive_budget())
    generator.prefixes.max_bytes = 0
    return LoopMethod("restspec-noprefix", generator)


def _rest(ctx: MethodContext) -> BenchMethod:
    drafter = DatastoreDrafter(ctx.engine.datastores[0], max_len=REST_MAX_SPAN, min_len=REST_MIN_SPAN)
    return LoopMethod("rest", ctx.engine.variant(drafter, FixedBudget(REST_BUDGET)))


def _recycle(ctx: MethodContext) -> BenchMethod:
    drafter = TokenRecyclingDrafter(model_vocab_size(ctx.model))
    return LoopMethod("recycle", ctx.engine.variant(drafter, FixedBudget(len(drafter.template))))


def _restspec_variant(
    name: str, backend: str | None = None, learn_costs: bool = True, max_budget: int | None = None
) -> MethodBuilder:
    def build(ctx: MethodContext) -> BenchMethod:
        policy = ctx.engine.adaptive_budget(max_budget, backend=backend, learn_costs=learn_costs)
        drafter = ctx.engine.new_drafter(policy=policy)
        return LoopMethod(name, ctx.engine.variant(drafter, policy, backend=backend))

    return build


def _suffix(ctx: MethodContext) -> BenchMethod:
    from benchmarks.suffix import SuffixDrafter

    drafter = ctx.warmed(SuffixDrafter())
    return LoopMethod("suffix", ctx.engine.variant(drafter, FixedBudget(drafter.max_tokens)))


FIXED_SIZES = (4, 8, 16, 32, 64, 128)
"""Tree sizes of the ``restspec-fixedN`` variants."""


def _restspec_fixed(size: int) -> MethodBuilder:
    def build(ctx: MethodContext) -> BenchMethod:
        return LoopMethod(
            f"restspec-fixed{size}", ctx.engine.variant(ctx.engine.new_drafter(), FixedBudget(size))
        )

    return build


def _padded(name: str, width: int, drafted: bool) -> MethodBuilder:
    def build(ctx: MethodContext) -> BenchMethod:
        inner = ctx.engine.new_drafter() if drafted else EmptyDrafter()
        return LoopMethod(name, ctx.engine.variant(PaddedDrafter(inner, width), FixedBudget(width)))

    return build


def _suffix_adaptive(ctx: MethodContext) -> BenchMethod:
    from benchmarks.suffix import SuffixDrafter

    drafter = ctx.warmed(SuffixDrafter())
    return LoopMethod(
        "suffix-adaptive", ctx.engine.variant(drafter, ctx.engine.adaptive_budget(drafter.max_tokens))
    )


LAB_METHODS: dict[str, MethodBuilder] = {
    "rest": _rest,
    "suffix": _suffix,
    "recycle": _recycle,
    "restspec-stock": _restspec_variant("restspec-stock", backend="model"),  # the model's own forward
    "restspec-split16": _restspec_variant("restspec-split16", backend="direct-split@16"),
    "restspec-curve": _restspec_variant("restspec-curve", learn_costs=False),
    "restspec-cap16": _restspec_variant("restspec-cap16", max_budget=16),
    "restspec-nohistory": _restspec_no_history,
    "restspec-noprefix": _restspec_no_prefix,
    **{f"restspec-fixed{size}": _restspec_fixed(size) for size in FIXED_SIZES},
    "suffix-adaptive": _suffix_adaptive,
    f"plain-w{PAD_WIDTH}": _padded(f"plain-w{PAD_WIDTH}", PAD_WIDTH, drafted=False),
    f"restspec-w{PAD_WIDTH}": _padded(f"restspec-w{PAD_WIDTH}", PAD_WIDTH, drafted=True),
}
"""The methods ``python -m benchmarks.bench --methods`` accepts besides ``restspec bench``'s own."""
