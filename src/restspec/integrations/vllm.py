"""restspec's drafter inside vLLM: the drafting any vLLM interface can call (:class:`BatchDrafting`,
:class:`ProposerConfig`) and the proposer of vLLM 0.32.x and 0.33.x (``custom_class``). vLLM 0.34+
calls :class:`~restspec.integrations.vllm_speculator.RestspecSpeculator` instead (``"method":
"restspec"``, registered by the entry point :mod:`restspec_vllm_plugin`).

Use on 0.32/0.33::

    LLM(model=..., speculative_config={"method": "custom_class",
        "model": "restspec.integrations.vllm.RestspecProposer", "num_speculative_tokens": 8})

with ``RESTSPEC_VLLM_CONFIG=/path/restspec-vllm.json`` naming the datastores and options
(:class:`ProposerConfig`; vLLM's speculative config forbids extra keys, so they cannot go there).
docs/vllm.md has the whole recipe.

vLLM builds ``RestspecProposer(vllm_config)``, calls ``load_model(model)`` once and ``propose(...)``
after every engine step with its persistent batch: row ``i`` of ``token_ids_cpu`` holds request i's
tokens (``num_tokens_no_spec[i]`` of them, this step's sampled tokens included) and
``sampled_token_ids[i]`` what the step added to it (accepted drafts + the model's own next token; empty
when the row was not decoded this step, e.g. a prefill chunk). vLLM gives no request ids, and rows
move when requests finish, so requests are recognised by content (:func:`row_key`): a row continues a
known request when its first tokens, its length before this step's tokens and its last token before
them are the request's. A known request that no row continues has finished (or was preempted): its
output joins the past outputs that every later request drafts from.

Per request and step (:class:`BatchDrafting`, shared with the 0.34 speculator): the merged tree of
restspec's sources (datastores, the request's own context, past outputs; see
:func:`restspec.draft.default_drafter`, minus token recycling, which needs logits that vLLM does not
hand out) under per-request calibration, and its most probable path (:func:`best_path`). The path's
probabilities are calibrated once more by what vLLM accepted of all requests' chains
(:class:`~restspec.draft.merge.WeightCalibration`). Here they are cut to lengths chosen for the whole
batch (:func:`~restspec.integrations.step_cost.chain_lengths`) by the cost of vLLM's step, learned
from the wall time between two ``propose`` calls (:class:`~restspec.integrations.step_cost.StepCost`):
drafts shrink as the batch grows, down to none, and when no draft could pay, the drafting itself is
skipped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from restspec.datastore import Datastore
from restspec.draft import DEFAULT_MERGE, DEFAULT_SCALES, ContextDrafter, DatastoreDrafter, HistoryDrafter
from restspec.draft.base import Drafter, StatelessDrafter, Step
from restspec.draft.merge import MergedDrafter, WeightCalibration
from restspec.draft.tree import DraftTree
from restspec.errors import RestspecError
from restspec.integrations.step_cost import StepCost, chain_lengths

CONFIG_ENV = "RESTSPEC_VLLM_CONFIG"
"""Environment variable naming the proposer's config file (JSON, or TOML on Python 3.11+)."""
ROW_KEY_TOKENS = 32
"""Leading tokens of a row that identify its request (with its length and last token)."""
TREE_BUDGET_PER_TOKEN = 4
"""Merged-tree nodes per drafted token: the best path is taken from a tree this much wider, so that a
sibling subtree ranked above the path's deeper nodes cannot cut it short."""


class ProposerConfigError(RestspecError):
    """The proposer's config file is missing, unreadable, or has unknown or invalid fields."""


@dataclass(frozen=True)
class ProposerConfig:
    """What :class:`RestspecProposer` drafts from and how much (the file ``RESTSPEC_VLLM_CONFIG`` names)."""

    datastores: tuple[str, ...] = ()
    """Datastore folders (``restspec build`` output) built with the served model's tokenizer."""
    knee_tokens: float = 64.0
    """The prior of vLLM's step cost, before measured steps replace it (:class:`StepCost`): the
    inputs (rows + draft tokens) at which a step takes twice its one-input time. Small on CPUs (about
    20-30 for a 135M model on 2 cores), hundreds on GPUs (decoding is bound by reading the weights)."""
    learn_step_cost: bool = True
    """Learn vLLM's step cost from the time between ``propose`` calls; False prices every step by
    ``knee_tokens`` alone (chain lengths then depend on the drafts only, not on the machine's load)."""
    history_tokens: int = 200_000
    """Most tokens of past outputs kept for drafting (the oldest outputs are evicted first)."""
    tokenizer: str | None = None
    """Tokenizer (HF folder or .gguf) the datastores are checked against; default: vLLM's."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "datastores", tuple(str(p) for p in self.datastores))
        if not self.knee_tokens > 0:
            raise ProposerConfigError(f"knee_tokens={self.knee_tokens} must be > 0")
        if self.history_tokens < 1:
            raise ProposerConfigError(f"history_tokens={self.history_tokens} must be >= 1")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ProposerConfig:
        """Read a JSON (``.json``) or TOML (``.toml``) file whose keys are this class's fields."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProposerConfigError(
                f"cannot read the proposer config {str(path)!r} ({CONFIG_ENV}): {exc}"
            ) from exc
        try:
            if path.suffix == ".toml":
                if sys.version_info < (3, 11):
                    raise ProposerConfigError(f"{str(path)!r}: TOML needs Python 3.11+; write it as JSON")
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ValueError as exc:
            raise ProposerConfigError(f"the proposer config {str(path)!r} does not parse: {exc}") from exc
        return cls.from_mapping(data, f"the proposer config {str(path)!r}")

    @classmethod
    def from_mapping(cls, data: Any, origin: str) -> ProposerConfig:
        """A dict whose keys are this class's fields; ``origin`` names it in errors (a file, or vLLM
        0.34's ``speculator_options``)."""
        known = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, Mapping) else type(data).__name__
            raise ProposerConfigError(f"{origin} has unknown keys {extra}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_env(cls) -> ProposerConfig:
        """The file named by ``RESTSPEC_VLLM_CONFIG``; the defaults (no datastores) when it is unset."""
        path = os.environ.get(CONFIG_ENV)
        return cls.from_file(path) if path else cls()


def best_path(tree: DraftTree) -> tuple[np.ndarray, np.ndarray]:
    """The most probable path of ``tree``: (tokens int32[d], probabilities float64[d]) from the root.

    A tree's nodes are ranked by falling probability (parents first), so the first child of a node in
    node order is its most probable one; one pass follows those children down."""
    tokens, probs = [], []
    current = -1
    for i in range(len(tree)):
        if tree.parents[i] == current:
            tokens.append(int(tree.tokens[i]))
            probs.append(float(tree.weights[i]))
            current = i
    return np.asarray(tokens, np.int32), np.asarray(probs, np.float64)


def row_key(row: np.ndarray, length: int) -> tuple[bytes, int, int]:
    """What identifies the request in a batch row of ``length`` tokens: its first tokens, the length
    and the last token."""
    return row[: min(ROW_KEY_TOKENS, length)].tobytes(), length, int(row[length - 1])


def frozen_tokens(tokens: np.ndarray) -> np.ndarray:
    """A read-only int32 copy of ``tokens`` (vLLM's own arrays change under a drafter that keeps them)."""
    copy = np.array(tokens, np.int32)
    copy.setflags(write=False)
    return copy


def feed_step(
    drafter: Drafter,
    context: np.ndarray,
    chain: DraftTree,
    accepted: np.ndarray,
    proposal: DraftTree | None = None,
) -> None:
    """The one place that hands a verified step to a drafter: ``chain`` was drafted after ``context``
    (cut from the drafter's ``proposal``) and vLLM verified it (or a prefix) and added ``accepted``
    (accepted drafts + its own next token). vLLM gives no logits."""
    accepted = np.asarray(accepted, np.int32)
    hits = min(max(len(accepted) - 1, 0), len(chain))  # a chain's accepted nodes are its first ones
    drafter.observe(Step(context, chain, np.arange(hits, dtype=np.int32), accepted, None, proposal=proposal))


class SharedSource(StatelessDrafter):
    """One request's view of a source that all requests share (datastores, context lookup, past
    outputs): it drafts through the source and counts the proposals that found something; the
    lifecycle is the proposer's."""

    def __init__(self, source: Any, counts: dict[str, int], name: str) -> None:
        self.source = source
        self.counts = counts
        self.name = name

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        tree = self.source.propose(context, budget)
        if len(tree):
            self.counts[self.name] += 1
        return tree


@dataclass
class Request:
    """What the drafting holds about one live request (bounded by vLLM's max model length)."""

    drafter: MergedDrafter
    output: list[np.ndarray] = field(default_factory=list)
    """Tokens vLLM added since the request was first seen (its output, when first seen after prefill)."""
    chain: DraftTree = field(default_factory=DraftTree.empty)
    """The chain last proposed, which the next step verifies."""
    proposal: DraftTree | None = None
    """The merged tree ``chain`` was cut from (its sources calibrate the drafter)."""


@dataclass(frozen=True)
class PathProposal:
    """One request's draft for a step before its length is chosen."""

    tree: DraftTree
    """The merged tree of the request's sources."""
    tokens: np.ndarray
    """int32[d]: the tree's most probable path (:func:`best_path`)."""
    weights: np.ndarray
    """float64[d]: the tree's probabilities along the path."""
    accept: np.ndarray
    """float64[d]: calibrated probability that vLLM accepts the path up to each depth (non-increasing)."""


@dataclass
class ProposerStats:
    """Counters since the drafting was built (or, on vLLM 0.34+, since its warm-up)."""

    steps: int = 0
    requests_started: int = 0
    requests_finished: int = 0
    steps_not_drafted: int = 0
    """Steps on which nothing was drafted (0.32/0.33: no draft could pay for its verification; 0.34+:
    vLLM scheduled no draft tokens)."""
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    propose_seconds: float = 0.0
    """Wall time spent inside ``propose`` (bookkeeping, learning and drafting)."""
    step_cost: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """The learned cost of vLLM's step: (fixed, per row, per draft token) seconds (0.32/0.33)."""
    source_matches: dict[str, int] = field(default_factory=dict)
    """Proposals in which a source ("datastore", "context", "history") found a match."""


class BatchDrafting:
    """restspec's drafting for the requests of vLLM's batch, whichever vLLM interface calls it.

    Shared sources (datastores, context lookup, past outputs), one merged drafter per live request
    (:meth:`start` / :meth:`finish`), learning from what vLLM verified (:meth:`verified`), and each
    request's most probable path with calibrated acceptance probabilities (:meth:`propose`), of which
    the caller keeps a prefix (:meth:`commit`). How long a prefix is the caller's choice: vLLM 0.32
    verifies exactly the chain it is given, 0.34 a fixed width per step."""

    def __init__(
        self, config: ProposerConfig, num_speculative_tokens: int, max_model_len: int, model_tokenizer: str
    ) -> None:
        self.config = config
        self.num_speculative_tokens = int(num_speculative_tokens)
        self.max_model_len = int(max_model_len)
        self.datastores = self._open_datastores(model_tokenizer)
        self.reset()

    def _open_datastores(self, model_tokenizer: str) -> list[Datastore]:
        if not self.config.datastores:
            return []
        from restspec.models import load_tokenizer

        tokenizer = load_tokenizer(self.config.tokenizer or model_tokenizer)
        return [Datastore.open(path, tokenizer=tokenizer) for path in self.config.datastores]

    def reset(self) -> None:
        """Forget everything learned across requests (past outputs, calibration, counters); the
        datastores stay open. Requests in flight must be finished first."""
        self.stats = ProposerStats(source_matches={"datastore": 0, "context": 0, "history": 0})
        self.history = HistoryDrafter(max_tokens=self.config.history_tokens)
        self._sources: list[tuple[str, Any]] = [("context", ContextDrafter()), ("history", self.history)]
        if self.datastores:
            self._sources.insert(0, ("datastore", DatastoreDrafter(self.datastores)))
        self.calibration = WeightCalibration()
        """Path probability -> acceptance, learned from every request's verified chains."""

    def start(self, context: np.ndarray) -> Request:
        """A request vLLM has just decoded for the first time after ``context`` (int32[T])."""
        views = [SharedSource(source, self.stats.source_matches, name) for name, source in self._sources]
        scales = [DEFAULT_SCALES[name] for name, _ in self._sources]
        # the default merge without its map per depth: a request's drafter would learn it afresh from
        # one request's chains; the shared calibration here learns it from all of them
        drafter = MergedDrafter(views, scales=scales, config=replace(DEFAULT_MERGE, correct=False))
        drafter.start_request(np.array(context, np.int32))
        self.stats.requests_started += 1
        return Request(drafter)

    def finish(self, request: Request) -> None:
        """The request is over (finished, or preempted): its output joins the past outputs."""
        request.drafter.stop_request()
        if request.output:
            self.history.add(np.concatenate(request.output))
        self.stats.requests_finished += 1

    def verified(
        self, request: Request, context: np.ndarray, accepted: np.ndarray, verified: int | None = None
    ) -> int:
        """vLLM verified the first ``verified`` tokens of the request's pending chain (all of them when
        None) after ``context`` (read-only int32[T] that nobody changes later, see
        :func:`frozen_tokens`) and added ``accepted`` (accepted drafts + its own next token). Feeds the
        request's drafter and the shared calibration; returns the chain tokens verified."""
        chain = request.chain if verified is None else request.chain.truncate(verified)
        accepted = np.asarray(accepted, np.int32)
        hits = min(len(accepted) - 1, len(chain))
        if len(chain):
            if hits > 0 and np.array_equal(chain.tokens[:hits], accepted[:hits]):
                self.stats.accepted_tokens += hits
            self.calibration.observe(chain.weights, chain.depths, hits)
        feed_step(request.drafter, context, chain, accepted, request.proposal)
        request.output.append(accepted)
        request.chain = DraftTree.empty()
        request.proposal = None
        return len(chain)

    def surest(self) -> float:
        """The calibrated acceptance of a first token the drafter is certain of (weight 1)."""
        return float(self.calibration(np.ones(1), np.ones(1, np.int64))[0])

    def propose(self, live: Sequence[tuple[Request, np.ndarray]]) -> list[PathProposal]:
        """Each live request's path after its context (read-only int32[T]), from a merged tree
        :data:`TREE_BUDGET_PER_TOKEN` times wider than ``num_speculative_tokens``."""
        budget = self.num_speculative_tokens * TREE_BUDGET_PER_TOKEN
        proposals = []
        for request, context in live:
            tree = request.drafter.propose(context, budget)
            tokens, weights = best_path(tree)
            accept = self.calibration(weights, np.arange(1, len(weights) + 1))
            proposals.append(PathProposal(tree, tokens, weights, np.minimum.accumulate(accept)))
        return proposals

    def commit(self, request: Request, proposal: PathProposal, size: int) -> np.ndarray:
        """The request drafts the first ``size`` tokens of its path this step; returns them (int32)."""
        tokens = proposal.tokens[:size]
        request.chain = DraftTree.chain(tokens, proposal.weights[:size])
        request.proposal = proposal.tree
        self.stats.drafted_tokens += len(tokens)
        return tokens


class RestspecProposer:
    """restspec's drafter for vLLM 0.32/0.33's ``custom_class`` speculative method (see the module)."""

    def __init__(
        self,
        vllm_config: Any,
        config: ProposerConfig | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config or ProposerConfig.from_env()
        self.clock = clock
        """Seconds, for the step times the cost is learned from (tests pass a fake one)."""
        self.drafting = BatchDrafting(
            self.config,
            vllm_config.speculative_config.num_speculative_tokens,
            vllm_config.model_config.max_model_len,
            vllm_config.model_config.tokenizer,
        )
        self._requests: dict[tuple[bytes, int, int], list[Request]] = {}  # by row_key, as last seen
        self.step_cost = StepCost(self.config.knee_tokens)
        self._returned: float | None = None  # when the last propose returned

    @property
    def stats(self) -> ProposerStats:
        return self.drafting.stats

    @property
    def history(self) -> HistoryDrafter:
        return self.drafting.history

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM hands over the target model; restspec drafts without it."""

    def _take(self, key: tuple[bytes, int, int]) -> Request | None:
        waiting = self._requests.get(key)
        if not waiting:
            return None
        request = waiting.pop()
        if not waiting:
            del self._requests[key]
        return request

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """Draft token ids for every row of vLLM's batch (``[]`` = no draft).

        ``sampled_token_ids``: per row, the tokens this step added (may be empty);
        ``num_tokens_no_spec``: int[>= rows], tokens per row, this step's included;
        ``token_ids_cpu``: int[>= rows, max_model_len], the rows' tokens; ``slot_mappings``: unused."""
        start = self.clock()
        self.stats.steps += 1
        live: list[tuple[int, Request, np.ndarray]] = []  # (row, request, context) of rows to draft for
        waiting: list[tuple[int, Request]] = []  # rows not decoded this step: their chain still stands
        seen: list[tuple[tuple[bytes, int, int], Request]] = []  # with each request's key as now seen
        decode_only = True  # the step decoded known requests only (no prefill): its time is a cost
        verified = 0  # draft tokens the step verified
        for i, sampled in enumerate(sampled_token_ids):
            length = int(num_tokens_no_spec[i])
            before = length - len(sampled)
            if before < 1:
                continue
            row = np.asarray(token_ids_cpu[i])
            key = row_key(row, before)
            request = self._take(key)
            if request is None or not sampled:
                decode_only = False
            if request is None and not sampled:
                continue  # a prefill chunk: nothing decoded yet
            if request is None:
                request = self.drafting.start(row[:before])
            if not sampled:
                seen.append((key, request))
                waiting.append((i, request))
                continue
            accepted = np.asarray(sampled, np.int32)
            verified += self.drafting.verified(request, frozen_tokens(row[:before]), accepted)
            seen.append((row_key(row, length), request))
            if length < self.drafting.max_model_len:
                live.append((i, request, frozen_tokens(row[:length])))
        if self.config.learn_step_cost and decode_only and seen and self._returned is not None:
            self.step_cost.observe(len(seen), verified, start - self._returned)
        for gone in self._requests.values():
            for request in gone:
                self.drafting.finish(request)
        self._requests = {}
        for key, request in seen:
            self._requests.setdefault(key, []).append(request)
        drafts = self._draft(len(sampled_token_ids), live)
        for i, request in waiting:
            drafts[i] = request.chain.tokens.tolist()
        self._returned = self.clock()
        self.stats.propose_seconds += self._returned - start
        self.stats.step_cost = tuple(self.step_cost.coefficients.tolist())
        return drafts

    def _draft(self, rows: int, live: list[tuple[int, Request, np.ndarray]]) -> list[list[int]]:
        """Chains for the ``live`` rows: each request's best path, calibrated, cut to the lengths that
        maximize the batch's expected tokens per second under the learned step cost. When even a
        certain first token (the calibrated acceptance of a path of weight 1) would not pay for its
        verification, nothing is drafted at all."""
        drafts: list[list[int]] = [[] for _ in range(rows)]
        if not live:
            return drafts
        base = self.step_cost.base_tokens(len(live))
        if self.drafting.surest() <= len(live) / base:
            self.stats.steps_not_drafted += 1
            return drafts
        proposals = self.drafting.propose([(request, context) for _, request, context in live])
        limits = [
            min(self.drafting.num_speculative_tokens, self.drafting.max_model_len - len(context))
            for _, _, context in live
        ]
        lengths = chain_lengths([p.accept for p in proposals], base, limits)
        for (i, request, _), proposal, size in zip(live, proposals, lengths, strict=True):
            drafts[i] = self.drafting.commit(request, proposal, size).tolist()
        return drafts


def proposer_stats(worker: Any) -> dict[str, Any]:
    """The proposer's :class:`ProposerStats` as a dict, read inside vLLM's worker process:
    ``llm.collective_rpc(proposer_stats)`` (vLLM sends functions pickled only with
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``). Reaches vLLM internals (``worker.model_runner.drafter``),
    so it is meant for tests and debugging."""
    return asdict(worker.model_runner.drafter.stats)
