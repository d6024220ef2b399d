"""The one generate loop: prefill -> step -> generate / stream.

Per request: the prompt minus its last token is prefilled into the KV cache; the last token is the
*root*. Each step asks the drafter for a tree, verifies ``[root] + tree`` in one forward pass,
accepts a path plus the model's own next token, compacts the cache to the accepted path and makes
the last emitted token the new root. Invariant between steps: the cache holds ``len(context) - 1``
tokens, everything but the root. The plain baseline is this loop with an :class:`EmptyDrafter`.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from restspec.decode.accept import Acceptance, accept
from restspec.decode.backends import ForwardBackend, ModelForward
from restspec.decode.budget import BudgetPolicy, FixedBudget
from restspec.decode.config import GenerationConfig, generation_config
from restspec.decode.prefix import DEFAULT_PREFIX_CACHE_MB, PrefixCache, check_prefix_cache_mb
from restspec.decode.text import IncrementalDecoder, StopStringMatcher
from restspec.decode.threads import release_openmp_pool
from restspec.decode.verify import (
    ModelLayout,
    compact_cache,
    new_cache,
    prefill,
    prefill_segment,
    tree_segment,
)
from restspec.draft.base import Drafter, EmptyDrafter, Step, TreeLogits
from restspec.draft.tree import DraftTree
from restspec.errors import GenerationError
from restspec.models import apply_chat_template

PREFILL_CHUNK = 32
"""Prompt tokens a joining request feeds per step while others decode (all joining requests together),
so the running requests' tokens are not held up by a whole long prompt. Such a chunk cost about one
more decoding step on an Intel Xeon with AMX (forwards bound by reading the weights) and costs about 9
on a 2-core AMD EPYC with AVX2 and the block decoder, whose plain step is short: there it sets the
p99 time between tokens under load (docs/serving-load.md)."""


@dataclass(frozen=True)
class StepStats:
    """One verification step, as a result reports it (the learners see its :class:`Step`)."""

    drafted: int
    """Draft nodes verified."""
    accepted: int
    """Draft tokens accepted (the model's own next token not counted)."""
    draft_s: float
    """Seconds in the drafter (propose + observe)."""
    forward_s: float
    """Seconds in the model's forward pass."""
    accept_s: float
    """Seconds in everything else: mask, acceptance, cache compaction, bookkeeping."""
    emitted: int = 0
    """Tokens this step added to the output (accepted + 1, fewer at the end)."""


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """A finished request."""

    prompt_ids: np.ndarray
    """int32[L]: the prompt as the model saw it."""
    output_ids: np.ndarray
    """int32[N]: generated tokens (an end-of-sequence token is included)."""
    text: str
    """The generated text (special tokens skipped, cut before a stop string)."""
    finish_reason: str
    """"eos", "stop" (a stop string) or "length" (max_new_tokens or the model's context)."""
    steps: list[StepStats]
    """Per verification step."""
    prefill_s: float
    """Seconds to prefill the prompt."""
    elapsed_s: float
    """Seconds for the whole request, from the call: waiting for a place in the batch and prefill
    included."""
    queued_s: float = 0.0
    """Seconds the request waited for a place in the batch (``max_batch`` others were running)."""
    cached_tokens: int = 0
    """Prompt tokens not prefilled: their cache rows were an earlier request's (prefix reuse)."""

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the whole request."""
        return len(self.output_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per step (1.0 for plain decoding)."""
        return len(self.output_ids) / len(self.steps) if self.steps else 0.0


@dataclass(frozen=True, eq=False)
class StreamChunk:
    """What one step added: token ids and the text they complete; the last chunk carries the result."""

    token_ids: np.ndarray
    """int32[k] tokens added by this step."""
    text: str
    """Text increment (may be empty while a character or a possible stop string is incomplete)."""
    result: GenerationResult | None = None
    """Set on the last chunk only."""


@dataclass(eq=False)
class _Request:
    """Mutable state of one request inside the loop (the loop thread's, but for ``cancelled``)."""

    id: int
    drafter: Drafter
    prompt: np.ndarray
    config: GenerationConfig
    max_total: int  # most tokens the context may reach
    context: np.ndarray  # int32 buffer, the first `length` entries are valid
    length: int
    cache: Any
    generator: torch.Generator | None
    decoder: IncrementalDecoder
    stops: StopStringMatcher
    submitted: float  # perf_counter when the caller handed it over
    scope: Hashable  # whose earlier requests' caches it may start from
    text: str = ""  # all decoded text so far
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    steps: list[StepStats] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the cache (the prompt but its last token, when done)
    cached: int = 0  # of those, taken from an earlier request's cache
    admitted: float = 0.0  # perf_counter when it joined the batch
    prefill_s: float = 0.0  # seconds from joining until the prompt was in the cache
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # chunks / an error, to the caller
    done: threading.Event = field(default_factory=threading.Event)  # the loop let go of it
    cancelled: bool = False  # set by the caller who stopped reading

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt) - 1

    def view(self) -> np.ndarray:
        ctx = self.context[: self.length]
        ctx.flags.writeable = False
        return ctx


def limit_depth(tree: DraftTree, max_depth: int) -> DraftTree:
    """The nodes of ``tree`` at depth <= ``max_depth`` (still prefix-closed, parents remapped)."""
    if len(tree) == 0 or int(tree.depths.max()) <= max_depth:
        return tree
    if max_depth <= 0:
        return DraftTree.empty()
    keep = np.flatnonzero(tree.depths <= max_depth)
    new_index = np.full(len(tree), -1, dtype=np.int32)
    new_index[keep] = np.arange(len(keep), dtype=np.int32)
    parents = tree.parents[keep]
    parents = np.where(parents >= 0, new_index[np.maximum(parents, 0)], -1)
    return DraftTree(tree.tokens[keep], parents, tree.weights[keep])


class SpeculativeGenerator:
    """Generates with a drafter and tree verification; output equals plain decoding's.

    ``generate`` and ``stream`` may be called from several threads at once: the requests run on one
    loop thread and, up to ``max_batch`` at a time, share each step's forward (continuous batching;
    a request joins or leaves between steps, the others wait in order). With ``max_batch=1`` they run
    one after the other. A request may bring its own ``drafter`` (e.g. one tenant's); the budget
    policy is shared, as is the forward it prices. Finished requests' caches are kept (up to
    ``prefix_cache_mb`` megabytes, 0: none) so that a later prompt of the same ``prefix_scope`` that
    starts with an earlier request's tokens prefills only the rest (:mod:`restspec.decode.prefix`)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        drafter: Drafter | None = None,
        budget: BudgetPolicy | int = 8,
        *,
        backend: ForwardBackend | None = None,
        max_batch: int = 1,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
    ) -> None:
        if backend is not None and backend.model is not model:
            raise GenerationError(
                f"backend {backend.name!r} wraps another model than the one given; build it for this model "
                "(restspec.decode.backends.choose_backend(model))"
            )
        if max_batch < 1:
            raise GenerationError(f"max_batch={max_batch} must be >= 1 (1 = one request at a time)")
        if prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk={prefill_chunk} must be >= 1")
        check_prefix_cache_mb(prefix_cache_mb)
        self.model = model
        # runs the verification forwards: the model's own forward unless a faster backend was chosen
        self.backend: ForwardBackend = backend if backend is not None else ModelForward(model)
        self.tokenizer = tokenizer
        self.drafter: Drafter = drafter if drafter is not None else EmptyDrafter()
        self.policy: BudgetPolicy = FixedBudget(budget) if isinstance(budget, int) else budget
        self.max_batch = int(max_batch)
        self.prefill_chunk = int(prefill_chunk)
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20))
        """Finished requests' caches (touched by the loop thread only)."""
        self.layout: ModelLayout = self.backend.layout
        eos = set(self.layout.eos_token_ids)
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiting: collections.deque[_Request] = collections.deque()  # submitted, not yet admitted
        self._looping = False  # a loop thread runs (it exits when no request is left)

    # ---- input ---------------------------------------------------------------------------------
    def encode(
        self, prompt: str | Sequence[dict[str, str]] | Sequence[int] | np.ndarray, chat: bool = False
    ) -> np.ndarray:
        """The prompt's token ids (int32[L]); ``chat`` (or a list of messages) applies the chat template."""
        if isinstance(prompt, str):
            ids = apply_chat_template(self.tokenizer, prompt) if chat else self.tokenizer(prompt)["input_ids"]
        elif not isinstance(prompt, (Sequence, np.ndarray)):
            raise GenerationError(
                f"the prompt is {type(prompt).__name__}; pass text, chat messages or token ids"
            )
        elif len(prompt) and isinstance(prompt[0], dict):
            ids = apply_chat_template(self.tokenizer, prompt)  # type: ignore[arg-type]
        elif chat:
            raise GenerationError("chat=True needs the prompt as text or messages, not token ids")
        else:
            ids = prompt
        arr = np.asarray(ids).reshape(-1)
        if arr.size == 0:
            raise GenerationError("the prompt is empty; pass at least one token of text")
        if arr.dtype.kind not in "iu":
            raise GenerationError(f"token ids must be integers, got {arr.dtype} values")
        vocab = self.vocab_size
        if arr.min() < 0 or arr.max() >= vocab:
            raise GenerationError(f"prompt token ids must lie in [0, {vocab}), got {arr.min()}..{arr.max()}")
        return arr.astype(np.int32)

    def new_token_limit(self, prompt_len: int, max_new_tokens: int) -> int:
        """How many tokens a request of ``prompt_len`` prompt tokens may generate: ``max_new_tokens``,
        and no further than the model's context."""
        max_pos = self.layout.max_positions
        return max_new_tokens if max_pos is None else min(max_new_tokens, max_pos - prompt_len)

    def _start(
        self, prompt_ids: np.ndarray, config: GenerationConfig, drafter: Drafter, scope: Hashable
    ) -> _Request:
        max_pos = self.layout.max_positions
        if max_pos is not None and len(prompt_ids) >= max_pos:
            raise GenerationError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {max_pos} tokens; "
                f"shorten the prompt to at most {max_pos - 1} tokens"
            )
        max_total = len(prompt_ids) + self.new_token_limit(len(prompt_ids), config.max_new_tokens)
        context = np.zeros(max_total, dtype=np.int32)
        context[: len(prompt_ids)] = prompt_ids
        seed = config.sampling.seed
        generator = None
        if not config.sampling.greedy:
            generator = torch.Generator()
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return _Request(
            id=next(self._ids),
            drafter=drafter,
            prompt=prompt_ids,
            config=config,
            max_total=max_total,
            context=context,
            length=len(prompt_ids),
            cache=new_cache(),
            generator=generator,
            decoder=IncrementalDecoder(self.tokenizer, prompt_ids.tolist()),
            stops=StopStringMatcher(config.stop_strings),
            submitted=time.perf_counter(),
            scope=scope,
        )

    # ---- the loop thread -----------------------------------------------------------------------
    def _submit(self, req: _Request) -> None:
        """Queue ``req``; start the loop thread unless one runs. The caller's thread only waits from
        now on, so it gives back its OpenMP workers (:mod:`restspec.decode.threads`): the forwards
        run at full speed on the loop thread only when no other thread holds a pool.

        The loop thread is no daemon: a process that exits first lets the requests under way finish
        (each within its ``max_new_tokens``), and the thread's OpenMP workers end before the
        interpreter does (a daemon loop thread that was still ending at exit made the C++ runtime
        abort: "terminate called without an active exception")."""
        release_openmp_pool()
        with self._lock:
            self._waiting.append(req)
            if self._looping:
                return
            self._looping = True
        threading.Thread(target=self._loop, name="restspec-generate").start()

    def _loop(self) -> None:
        """Admit waiting requests and step them until no request is left (the loop thread)."""
        active: list[_Request] | None = []
        with torch.inference_mode():
            while active is not None:
                active = self._iteration(active)

    def _iteration(self, active: list[_Request]) -> list[_Request] | None:
        """Admit waiting requests up to ``max_batch``, step the batch; the requests still active, or
        None (the loop stops) when no request is left."""
        try:
            with self._lock:
                joining = []
                while self._waiting and len(active) + len(joining) < self.max_batch:
                    joining.append(self._waiting.popleft())
                if not active and not joining:
                    self._looping = False
                    return None
            for req in joining:
                if self._guard(req, self._admit, req):
                    active.append(req)
            return self._step(active)
        except BaseException as error:  # pragma: no cover - a bug in the loop itself: no request hangs
            with self._lock:
                self._looping = False
                stranded = active + list(self._waiting)
                self._waiting.clear()
            for req in stranded:
                self._fail(req, error)
            raise

    def _admit(self, req: _Request) -> None:
        req.admitted = time.perf_counter()
        req.drafter.start_request(req.prompt, req.id)
        reused = self.prefixes.take(req.scope, req.prompt)
        if reused is not None:
            req.cache, req.prefilled = reused
            req.cached = req.prefilled
            req.prefill_s = time.perf_counter() - req.admitted

    def _guard(self, req: _Request, call: Callable[..., Any], *args: Any) -> bool:
        """``call(*args)`` for ``req``; on an error the request fails with it (the others go on)."""
        try:
            call(*args)
        except Exception as error:
            self._fail(req, error)
            return False
        return True

    def _fail(self, req: _Request, error: BaseException) -> None:
        if req.admitted:
            with contextlib.suppress(Exception):  # the error the caller gets is the first one
                req.drafter.stop_request(req.id)
        req.outbox.put(error)
        req.done.set()

    def _finish(self, req: _Request) -> None:
        """Let go of a request that ended or whose caller stopped reading; keep its cache rows."""
        try:
            # the cache holds the rows of context[:length - 1], or of context[:length] and a rejected
            # token more when the output ended inside an accepted path
            if not req.prefilling:
                kept = min(req.cache.get_seq_length(), req.length)
                self.prefixes.store(req.scope, req.context[:kept], req.cache)
            req.drafter.stop_request(req.id)
        finally:
            req.done.set()

    def _step(self, active: list[_Request]) -> list[_Request]:
        """One step of every active request: prefill (a chunk of) the prompts of those that joined,
        draft, verify all in one forward, accept. Returns the requests still active."""
        live = []
        for req in active:
            if req.cancelled:
                self._guard(req, self._finish, req)
            else:
                live.append(req)
        decoding = [req for req in live if not req.prefilling]
        joining = [req for req in live if req.prefilling]
        if decoding:
            return self._verify(decoding, joining, self.prefill_chunk)
        # nobody waits on the prompts: each in one piece (a fresh one with the model's own mask)
        rest = []
        for req in joining:
            if req.prefilled:
                rest.append(req)
            elif self._guard(req, self._prefill, req):
                decoding.append(req)
        return self._verify(decoding, rest, room=None)

    def _prefill(self, req: _Request) -> None:
        prefill(self.backend, req.cache, req.prompt[:-1])
        req.prefilled = len(req.prompt) - 1
        req.prefill_s = time.perf_counter() - req.admitted

    def _verify(
        self, decoding: list[_Request], joining: Sequence[_Request], room: int | None
    ) -> list[_Request]:
        """Draft for ``decoding``, verify their trees and the next prompt chunks of ``joining`` (at
        most ``room`` rows in all, first come first served; None: whole) in one forward, accept.
        The policy's :meth:`~restspec.decode.budget.BudgetPolicy.step_room` bounds the nodes a step
        adds to its roots and prompt rows, so that a batch's steps stay short enough for its requests'
        streams. It does not shorten the prompt chunks: those are the ones a batch without drafts
        runs, so drafts never slow the prompts of joining requests (bounding the chunks too starved a
        batch of 16 of prompts: 0.95x the tokens/s of batching without drafts, HumanEval, 2026-12-06).
        A step with no room left for drafts drafts nothing (16 clients on a 2-core AMD EPYC: 214 of 288
        steps, HumanEval, 2026-12-07, ``python -m benchmarks.batch_rooms``)."""
        t0 = time.perf_counter()
        chunks = self._chunks(joining, room)
        rows = sum(len(tokens) for _, tokens in chunks)
        # the step's time bound: prompt chunks first, as without drafts, then drafts in what is left;
        # with no room left (a wide batch), nothing is drafted either
        step_room = self.policy.step_room(len(decoding))
        node_room = None if step_room is None else max(step_room - rows, 0)
        budget = self.policy.max_budget if node_room != 0 else 0
        proposals: dict[int, DraftTree] = {}
        draft_s: dict[int, float] = {}
        for req in decoding:
            start = time.perf_counter()
            if budget <= 0 or self._guard(req, self._propose, req, budget, proposals):
                proposals.setdefault(req.id, DraftTree.empty())
            draft_s[req.id] = time.perf_counter() - start
        decoding = [req for req in decoding if req.id in proposals]
        t1 = time.perf_counter()
        trees_in = [proposals[req.id] for req in decoding]
        sizes = self.policy.choose_batch(trees_in, len(decoding) + rows, node_room)
        trees: dict[int, DraftTree] = {}
        for req, size in zip(decoding, sizes, strict=True):
            # tokens this step may still emit: accepted path + 1
            tree = limit_depth(proposals[req.id].truncate(size), req.max_total - req.length - 1)
            if len(tree) and int(tree.tokens.max()) >= self.vocab_size:
                self._fail(req, self._vocab_error(tree))
                continue
            trees[req.id] = tree
        decoding = [req for req in decoding if req.id in trees]
        backend = self.backend
        segments = [
            tree_segment(backend, req.cache, int(req.context[req.length - 1]), trees[req.id], req.length - 1)
            for req in decoding
        ]
        segments += [prefill_segment(backend, req.cache, tokens, req.prefilled) for req, tokens in chunks]
        width = sum(seg.width for seg in segments)
        t2 = time.perf_counter()
        try:
            outputs = self.backend.forward_batch(segments) if segments else []
        except Exception as error:  # the forward failed: every request in it fails, the loop goes on
            for req in [*decoding, *(req for req, _ in chunks)]:
                self._fail(req, error)
            return [req for req in joining if req not in {r for r, _ in chunks}]
        t3 = time.perf_counter()
        for req, tokens in chunks:
            req.prefilled += len(tokens)
            if not req.prefilling:
                req.prefill_s = t3 - req.admitted
        shared = (t1 - t0 - sum(draft_s.values()) + t2 - t1) / max(len(decoding), 1)  # choice, masks
        batch = len(decoding)
        still = list(joining)
        for req, logits in zip(decoding, outputs, strict=False):
            timing = (draft_s[req.id], t3 - t2, shared)
            step = (proposals[req.id], trees[req.id], logits, timing, batch, width)
            if self._guard(req, self._accept, req, *step) and req.finish_reason is None:
                still.append(req)
        return still

    def _propose(self, req: _Request, budget: int, proposals: dict[int, DraftTree]) -> None:
        proposals[req.id] = req.drafter.propose(req.view(), budget)

    @staticmethod
    def _chunks(joining: Sequence[_Request], room: int | None) -> list[tuple[_Request, np.ndarray]]:
        """The prompt chunks this step prefills: ``room`` rows in all (None: every prompt's rest), in
        order of arrival."""
        chunks = []
        for req in joining:
            end = len(req.prompt) - 1 if room is None else min(len(req.prompt) - 1, req.prefilled + room)
            if end <= req.prefilled:
                break
            chunks.append((req, req.prompt[req.prefilled : end]))
            if room is not None:
                room -= end - req.prefilled
        return chunks

    def _vocab_error(self, tree: DraftTree) -> GenerationError:
        return GenerationError(
            f"the drafter proposed token {int(tree.tokens.max())} but the model has {self.vocab_size} "
            "tokens; was its datastore built with another tokenizer?"
        )

    def _accept(
        self,
        req: _Request,
        proposal: DraftTree,
        tree: DraftTree,
        logits: torch.Tensor,
        timing: tuple[float, float, float],
        batch: int,
        width: int,
    ) -> None:
        """Accept a path of ``tree`` by ``logits``, compact the cache, emit, let the learners see the
        step, and hand the caller its chunk (the last one with the result)."""
        t3 = time.perf_counter()
        draft_s, forward_s, shared_s = timing
        context = req.view()
        past_len = req.length - 1
        logits = logits.to("cpu", torch.float32)  # as transformers' generate does before choosing
        result: Acceptance = accept(tree, logits, req.config.sampling, req.generator)
        compact_cache(req.cache, past_len, result.path, len(tree))
        emitted = self._emit(req, result.tokens)
        root_and_nodes = np.empty(len(tree) + 1, dtype=np.int32)
        root_and_nodes[0] = context[-1]
        root_and_nodes[1:] = tree.tokens
        t4 = time.perf_counter()
        accept_s = shared_s + (t4 - t3)
        step = Step(
            context=context,
            tree=tree,
            path=np.asarray(result.path, dtype=np.int32),
            accepted=emitted,
            logits=TreeLogits(root_and_nodes, logits.numpy()),
            draft_s=draft_s,
            forward_s=forward_s,
            accept_s=accept_s,
            proposal=proposal,
            request=req.id,
            batch_size=batch,
            batch_width=width,
        )
        req.drafter.observe(step)
        t5 = time.perf_counter()
        self.policy.observe(step)
        req.steps.append(
            StepStats(
                drafted=len(tree),
                accepted=len(result.path),
                draft_s=draft_s + (t5 - t4),
                forward_s=forward_s,
                accept_s=accept_s,
                emitted=len(emitted),
            )
        )
        text = req.text[req.sent :]
        if req.finish_reason is None and len(req.stops.stop_strings):
            text = text[: len(text) - req.stops.holdback(req.text[req.sent :])]
        req.sent += len(text)
        if req.finish_reason is None:
            req.outbox.put(StreamChunk(emitted, text))
            return
        result_ = GenerationResult(
            prompt_ids=req.prompt,
            output_ids=req.context[len(req.prompt) : req.length].copy(),
            text=req.text,
            finish_reason=req.finish_reason,
            steps=req.steps,
            prefill_s=req.prefill_s,
            elapsed_s=time.perf_counter() - req.submitted,
            queued_s=req.admitted - req.submitted,
            cached_tokens=req.cached,
        )
        self._finish(req)
        req.outbox.put(StreamChunk(emitted, text, result_))

    def _emit(self, req: _Request, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` up to the first EOS / stop string / limit; set ``finish_reason``."""
        room = req.max_total - req.length
        new = tokens[:room]
        for i, token in enumerate(new):
            if token in self.eos_token_ids:
                new = new[: i + 1]
                req.finish_reason = "eos"
                break
        if req.stops.stop_strings:
            for i, token in enumerate(new):
                start = len(req.text)
                req.text += req.decoder.push([token])
                hit = req.stops.find(req.text, start)
                if hit >= 0:
                    req.text = req.text[:hit]
                    new = new[: i + 1]
                    req.finish_reason = "stop"
                    break
        else:
            req.text += req.decoder.push(new)
        req.context[req.length : req.length + len(new)] = new
        req.length += len(new)
        if req.finish_reason is None and req.length >= req.max_total:
            req.finish_reason = "length"
        if req.finish_reason in ("eos", "length"):
            req.text += req.decoder.flush()
        return np.asarray(new, dtype=np.int32)

    # ---- the callers' side ---------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[dict[str, str]] | Sequence[int] | np.ndarray,
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
        drafter: Drafter | None = None,
        prefix_scope: Hashable = None,
        **settings: Any,
    ) -> Iterator[StreamChunk]:
        """Generate step by step; every chunk carries new token ids and text, the last the result.
        ``config``, or keyword ``settings`` (:func:`~restspec.decode.config.generation_config`).
        ``drafter``: this request's own (default: the generator's). ``prefix_scope``: whose finished
        requests' caches this one may start from (e.g. a tenant; requests of other scopes never share
        rows). Closing the iterator early stops the request (the drafter's request is over when
        ``close`` returns)."""
        config = generation_config(config, settings)
        prompt_ids = self.encode(prompt, chat)
        req = self._start(prompt_ids, config, self.drafter if drafter is None else drafter, prefix_scope)
        self._submit(req)
        try:
            while True:
                item = req.outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.result is not None:
                    return
        finally:
            if not req.done.is_set():
                with self._lock:
                    if req in self._waiting:  # never admitted: nobody else holds it
                        self._waiting.remove(req)
                        req.done.set()
                req.cancelled = True
                req.done.wait()

    def generate(
        self,
        prompt: str | Sequence[dict[str, str]] | Sequence[int] | np.ndarray,
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
        drafter: Drafter | None = None,
        prefix_scope: Hashable = None,
        **settings: Any,
    ) -> GenerationResult:
        """Generate to the end; see :meth:`stream`."""
        chunks = self.stream(
            prompt, config, chat=chat, drafter=drafter, prefix_scope=prefix_scope, **settings
        )
        for chunk in chunks:
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("stream ended without a result")  # pragma: no cover
