"""The one generate loop: prefill -> step -> generate / stream.

Per request: the prompt minus its last token is prefilled into the KV cache; the last token is the
*root*. Each step asks the drafter for a tree, verifies ``[root] + tree`` in one forward pass,
accepts a path plus the model's own next token, compacts the cache to the accepted path and makes
the last emitted token the new root. Invariant between steps: the cache holds ``len(context) - 1``
tokens, everything but the root. The plain baseline is this loop with an :class:`EmptyDrafter`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from restspec.decode.accept import Acceptance, accept
from restspec.decode.backends import ForwardBackend, ModelForward
from restspec.decode.budget import BudgetPolicy, FixedBudget
from restspec.decode.config import GenerationConfig
from restspec.decode.text import IncrementalDecoder, StopStringMatcher
from restspec.decode.verify import ModelLayout, compact_cache, forward_tree, new_cache, prefill
from restspec.draft.base import Drafter, EmptyDrafter, Step, TreeLogits
from restspec.draft.tree import DraftTree
from restspec.errors import GenerationError
from restspec.models import apply_chat_template


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
    """Seconds for the whole request, prefill included."""

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
    """Mutable state of one request inside the loop."""

    prompt: np.ndarray
    config: GenerationConfig
    max_total: int  # most tokens the context may reach
    context: np.ndarray  # int32 buffer, the first `length` entries are valid
    length: int
    cache: Any
    generator: torch.Generator | None
    decoder: IncrementalDecoder
    stops: StopStringMatcher
    text: str = ""  # all decoded text so far
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    steps: list[StepStats] = field(default_factory=list)

    @property
    def n_new(self) -> int:
        return self.length - len(self.prompt)

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
    """Generates with a drafter and tree verification; output equals plain decoding's."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        drafter: Drafter | None = None,
        budget: BudgetPolicy | int = 8,
        *,
        backend: ForwardBackend | None = None,
    ) -> None:
        if backend is not None and backend.model is not model:
            raise GenerationError(
                f"backend {backend.name!r} wraps another model than the one given; build it for this model "
                "(restspec.decode.backends.choose_backend(model))"
            )
        self.model = model
        # runs the verification forwards: the model's own forward unless a faster backend was chosen
        self.backend: ForwardBackend = backend if backend is not None else ModelForward(model)
        self.tokenizer = tokenizer
        self.drafter: Drafter = drafter if drafter is not None else EmptyDrafter()
        self.policy: BudgetPolicy = FixedBudget(budget) if isinstance(budget, int) else budget
        self.layout: ModelLayout = self.backend.layout
        eos = set(self.layout.eos_token_ids)
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)

    # ---- input ---------------------------------------------------------------------------------
    def encode(
        self, prompt: str | Sequence[dict[str, str]] | Sequence[int] | np.ndarray, chat: bool = False
    ) -> np.ndarray:
        """The prompt's token ids (int32[L]); ``chat`` (or a list of messages) applies the chat template."""
        if isinstance(prompt, str):
            ids = apply_chat_template(self.tokenizer, prompt) if chat else self.tokenizer(prompt)["input_ids"]
        elif len(prompt) and isinstance(prompt[0], dict):
            ids = apply_chat_template(self.tokenizer, prompt)  # type: ignore[arg-type]
        elif chat:
            raise GenerationError("chat=True needs the prompt as text or messages, not token ids")
        else:
            ids = prompt
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise GenerationError("the prompt is empty; pass at least one token of text")
        vocab = self.vocab_size
        if arr.min() < 0 or arr.max() >= vocab:
            raise GenerationError(f"prompt token ids must lie in [0, {vocab}), got {arr.min()}..{arr.max()}")
        return arr.astype(np.int32)

    # ---- the loop ------------------------------------------------------------------------------
    def _start(self, prompt_ids: np.ndarray, config: GenerationConfig) -> _Request:
        max_pos = self.layout.max_positions
        if max_pos is not None and len(prompt_ids) >= max_pos:
            raise GenerationError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {max_pos} tokens; "
                f"shorten the prompt to at most {max_pos - 1} tokens"
            )
        max_total = len(prompt_ids) + config.max_new_tokens
        if max_pos is not None:
            max_total = min(max_total, max_pos)
        context = np.zeros(max_total, dtype=np.int32)
        context[: len(prompt_ids)] = prompt_ids
        seed = config.sampling.seed
        generator = None
        if not config.sampling.greedy:
            generator = torch.Generator()
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return _Request(
            prompt=prompt_ids,
            config=config,
            max_total=max_total,
            context=context,
            length=len(prompt_ids),
            cache=new_cache(),
            generator=generator,
            decoder=IncrementalDecoder(self.tokenizer, prompt_ids.tolist()),
            stops=StopStringMatcher(config.stop_strings),
        )

    def prefill(self, req: _Request) -> None:
        """Feed every prompt token but the last (the first root) into the cache."""
        prefill(self.backend, req.cache, req.prompt[:-1])

    def step(self, req: _Request) -> tuple[np.ndarray, str]:
        """One draft-verify-accept step; returns the tokens it added and their text increment."""
        t0 = time.perf_counter()
        context = req.view()
        budget = self.policy.max_budget
        tree = self.drafter.propose(context, budget) if budget > 0 else DraftTree.empty()
        t1 = time.perf_counter()
        past_len = req.length - 1
        tree = tree.truncate(self.policy.choose(tree, past_len))
        # tokens this step may still emit: accepted path + 1
        tree = limit_depth(tree, req.max_total - req.length - 1)
        if len(tree) and int(tree.tokens.max()) >= self.vocab_size:
            raise GenerationError(
                f"the drafter proposed token {int(tree.tokens.max())} but the model has {self.vocab_size} "
                "tokens; was its datastore built with another tokenizer?"
            )
        t2 = time.perf_counter()
        logits = forward_tree(self.backend, req.cache, int(context[-1]), tree, past_len)
        t3 = time.perf_counter()
        logits = logits.to("cpu", torch.float32)  # as transformers' generate does before choosing
        result: Acceptance = accept(tree, logits, req.config.sampling, req.generator)
        compact_cache(req.cache, past_len, result.path, len(tree))
        emitted = self._emit(req, result.tokens)
        root_and_nodes = np.empty(len(tree) + 1, dtype=np.int32)
        root_and_nodes[0] = context[-1]
        root_and_nodes[1:] = tree.tokens
        path = np.asarray(result.path, dtype=np.int32)
        t4 = time.perf_counter()
        step = Step(
            context=context,
            tree=tree,
            path=path,
            accepted=emitted,
            logits=TreeLogits(root_and_nodes, logits.numpy()),
            draft_s=t1 - t0,
            forward_s=t3 - t2,
            accept_s=(t2 - t1) + (t4 - t3),
        )
        self.drafter.observe(step)
        t5 = time.perf_counter()
        self.policy.observe(step)
        req.steps.append(
            StepStats(
                drafted=len(tree),
                accepted=len(result.path),
                draft_s=(t1 - t0) + (t5 - t4),
                forward_s=t3 - t2,
                accept_s=(t2 - t1) + (t4 - t3),
                emitted=len(emitted),
            )
        )
        text = req.text[req.sent :]
        if req.finish_reason is None and len(req.stops.stop_strings):
            text = text[: len(text) - req.stops.holdback(req.text[req.sent :])]
        req.sent += len(text)
        return emitted, text

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

    def stream(
        self,
        prompt: str | Sequence[dict[str, str]] | Sequence[int] | np.ndarray,
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
    ) -> Iterator[StreamChunk]:
        """Generate step by step; every chunk carries new token ids and text, the last the result."""
        config = config or GenerationConfig()
        prompt_ids = self.encode(prompt, chat)
        req = self._start(prompt_ids, config)
        self.drafter.start_request(prompt_ids)
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                self.prefill(req)
            prefill_s = time.perf_counter() - start
            while True:
                with torch.inference_mode():
                    tokens, text = self.step(req)
                if req.finish_reason is not None:
                    result = GenerationResult(
                        prompt_ids=prompt_ids,
                        output_ids=req.context[len(prompt_ids) : req.length].copy(),
                        text=req.text,
                        finish_reason=req.finish_reason,
                        steps=req.steps,
                        prefill_s=prefill_s,
                        elapsed_s=time.perf_counter() - start,
                    )
                    yield StreamChunk(tokens, text, result)
                    return
                yield StreamChunk(tokens, text)
        finally:
            self.drafter.stop_request()

    def generate(
        self,
        prompt: str | Sequence[dict[str, str]] | Sequence[int] | np.ndarray,
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
    ) -> GenerationResult:
        """Generate to the end; see :meth:`stream`."""
        for chunk in self.stream(prompt, config, chat=chat):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("stream ended without a result")  # pragma: no cover
