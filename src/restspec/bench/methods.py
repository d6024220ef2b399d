"""The decoding methods a benchmark compares, behind one small interface.

Every method turns prompt token ids into output token ids and reports where its time went. Two
families:

- :class:`HFGenerateMethod`: transformers' own ``model.generate`` (``plain`` greedy, ``pld`` prompt
  lookup). Forward passes are timed with module hooks; everything else is "other".
- :class:`LoopMethod`: restspec's :class:`~restspec.decode.SpeculativeGenerator` with some drafter and
  budget policy (``restspec``, ``restspec-plain``).

All methods of a run share one loaded model; each keeps its own drafter across prompts, so drafters
that learn from past outputs (our history drafter) only ever see the outputs of earlier prompts of the
same run, and with a warm start (``MethodContext.warm_start``) the model's answers to questions it
wrote itself (:mod:`restspec.decode.warm`). Research baselines and variants (REST, SuffixDecoding,
fixed budgets, ...) are not installed: the repository's ``benchmarks/`` adds them through
:func:`extra_methods`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch

from restspec.decode.generate import StepStats
from restspec.errors import RestspecError

PLD_NUM_TOKENS = 10
"""``prompt_lookup_num_tokens`` for transformers' prompt lookup (the issue's baseline)."""


@dataclass(frozen=True)
class TurnOutput:
    """What one method produced for one prompt, and where the time went (seconds)."""

    output_ids: np.ndarray
    """int32[n]: generated tokens (a final end-of-sequence token included if the method emitted it)."""
    elapsed_s: float
    """Wall time of the whole call, prefill included."""
    forwards: int
    """Model forward passes that emitted tokens (plain greedy: one per token; restspec's prefill of
    all prompt tokens but the last emits none and is not counted)."""
    draft_s: float
    forward_s: float
    """Seconds in model forwards: prefill plus every step."""
    accept_s: float
    finish_reason: str = ""
    steps: tuple[StepStats, ...] = ()
    """Every verification step, for methods that run restspec's loop (empty for transformers')."""
    cached_tokens: int = 0
    """Prompt tokens not prefilled: an earlier request's cache had them (restspec's prefix reuse)."""

    @property
    def other_s(self) -> float:
        return max(self.elapsed_s - self.draft_s - self.forward_s - self.accept_s, 0.0)


class BenchMethod(Protocol):
    name: str

    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float, seed: int | None = None
    ) -> TurnOutput:
        """Generate for ``prompt_ids`` (the same ids every method gets); at a temperature, sample
        with ``seed`` (None: unseeded)."""


class _ForwardTimer:
    """Counts and times a module's forward calls with hooks (for ``model.generate`` baselines)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.count = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> _ForwardTimer:
        self._handles = [
            self.module.register_forward_pre_hook(self._pre),
            self.module.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, *args: object) -> None:
        self._t0 = time.perf_counter()

    def _post(self, *args: object) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.count += 1


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids as transformers' ``generate`` uses them (generation config, else tokenizer)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class HFGenerateMethod:
    """transformers' ``model.generate``: ``plain`` greedy or ``pld`` prompt lookup."""

    def __init__(self, name: str, model: Any, tokenizer: Any, *, prompt_lookup_num_tokens: int | None = None):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_lookup_num_tokens = prompt_lookup_num_tokens
        self.eos = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)

    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float, seed: int | None = None
    ) -> TurnOutput:
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "attention_mask": torch.ones_like(input_ids),
            "pad_token_id": self.pad,
            "eos_token_id": self.eos or None,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            if seed is not None:
                torch.manual_seed(seed)  # transformers samples from torch's global generator
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.prompt_lookup_num_tokens:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup_num_tokens
        with torch.inference_mode(), _ForwardTimer(self.model) as timer:
            t0 = time.perf_counter()
            out = self.model.generate(input_ids, **kwargs)
            elapsed = time.perf_counter() - t0
        new = out[0, input_ids.shape[1] :].cpu().numpy().astype(np.int32)
        finish = "length"
        if len(new) and int(new[-1]) in self.eos:
            finish = "eos"
        return TurnOutput(new, elapsed, timer.count, 0.0, timer.seconds, 0.0, finish)


class LoopMethod:
    """restspec's generate loop (a :class:`~restspec.decode.SpeculativeGenerator` the run's engine
    built) with its drafter and budget policy."""

    def __init__(self, name: str, generator: Any) -> None:
        self.name = name
        self.generator = generator

    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float, seed: int | None = None
    ) -> TurnOutput:
        from restspec.decode import GenerationConfig, SamplingConfig

        sampling = SamplingConfig(temperature=temperature, seed=seed if temperature > 0 else None)
        config = GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling)
        ids = [int(i) for i in prompt_ids]
        t0 = time.perf_counter()
        result = self.generator.generate(ids, config)
        elapsed = time.perf_counter() - t0
        steps = result.steps
        draft_s = sum(s.draft_s for s in steps)
        forward_s = float(result.prefill_s) + sum(s.forward_s for s in steps)
        accept_s = sum(s.accept_s for s in steps)
        output = np.asarray(result.output_ids, dtype=np.int32)
        # the prefill emits no token here (it feeds all but the last prompt token): steps = forwards that emit
        return TurnOutput(
            output,
            elapsed,
            len(steps),
            draft_s,
            forward_s,
            accept_s,
            result.finish_reason,
            tuple(steps),
            result.cached_tokens,
        )


# ---------------------------------------------------------------------------------------------------
# Method registry: name -> builder(context) -> BenchMethod


@dataclass
class MethodContext:
    """What builders need: the run's one :class:`restspec.Engine` (model, forward backend, datastores,
    budget policy, warm start). Every method gets fresh drafters and policies from it, so no method
    learns from another's outputs (or from the warm-up)."""

    engine: Any
    """The :class:`restspec.Engine` of the run."""

    @property
    def model(self) -> Any:
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def latency_curve(self) -> Any:
        """The calibrated forward latency curve of the engine's adaptive budget (None for a fixed one)."""
        from restspec.decode.budget import AdaptiveBudget

        policy = self.engine.policy
        return policy.latency if isinstance(policy, AdaptiveBudget) else None

    def warmed(self, drafter: Any) -> Any:
        """``drafter`` given the engine's warm start (its conversations, for a drafter of another kind),
        if it has one; returns ``drafter``."""
        if self.engine.warm is not None:
            self.engine.warm.apply(drafter)
        return drafter

    def adaptive_budget(self) -> Any:
        """A fresh adaptive budget policy on the latency curve the engine measured for this run (the
        engine's own when it is adaptive: on a busy machine a new measurement is not cached, so each
        ``engine.adaptive_budget()`` would measure again, and every method would price its forwards
        on another curve)."""
        from restspec.decode.budget import AdaptiveBudget

        policy = self.engine.policy
        return policy.fresh() if isinstance(policy, AdaptiveBudget) else self.engine.adaptive_budget()

    def default_generator(self, policy: Any, *, max_batch: int | None = None) -> Any:
        """The engine's default drafter, fresh and warmed, under ``policy`` (warmed too), up to
        ``max_batch`` requests per forward (None: the engine's)."""
        return self.engine.variant(self.engine.new_drafter(policy=policy), policy, max_batch=max_batch)


def _plain(ctx: MethodContext) -> BenchMethod:
    return HFGenerateMethod("plain", ctx.model, ctx.tokenizer)


def _pld(ctx: MethodContext) -> BenchMethod:
    return HFGenerateMethod("pld", ctx.model, ctx.tokenizer, prompt_lookup_num_tokens=PLD_NUM_TOKENS)


def _restspec(ctx: MethodContext) -> BenchMethod:
    return LoopMethod("restspec", ctx.default_generator(ctx.adaptive_budget()))


def _restspec_plain(ctx: MethodContext) -> BenchMethod:
    return LoopMethod("restspec-plain", ctx.engine.plain())


MethodBuilder = Callable[[MethodContext], BenchMethod]
"""Builds one method of a run from the run's shared :class:`MethodContext`."""

METHODS: dict[str, MethodBuilder] = {
    "plain": _plain,
    "pld": _pld,
    "restspec": _restspec,
    "restspec-plain": _restspec_plain,
}
"""The methods ``restspec bench --methods`` accepts."""

_extra_methods: ContextVar[Mapping[str, MethodBuilder]] = ContextVar(
    "extra_methods", default=MappingProxyType({})
)


@contextmanager
def extra_methods(builders: Mapping[str, MethodBuilder]) -> Iterator[None]:
    """Inside the block, :func:`parse_methods` and :func:`build_methods` also know ``builders`` (name ->
    builder): how a research harness runs its own methods through ``restspec bench``'s runner."""
    taken = sorted(set(builders) & set(available_methods()))
    if taken:
        raise RestspecError(f"methods {', '.join(taken)} are already defined; give the new ones other names")
    token = _extra_methods.set({**_extra_methods.get(), **builders})
    try:
        yield
    finally:
        _extra_methods.reset(token)


def available_methods() -> dict[str, MethodBuilder]:
    """Every method name that can be run now: :data:`METHODS` and those of :func:`extra_methods`."""
    return {**METHODS, **_extra_methods.get()}


def parse_methods(spec: str) -> list[str]:
    """``"plain,pld,restspec"`` -> validated list (order kept, duplicates dropped)."""
    methods = available_methods()
    names = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in methods:
            raise RestspecError(f"unknown method {name!r}; choose from {', '.join(methods)}")
        if name not in names:
            names.append(name)
    if not names:
        raise RestspecError(f"--methods={spec!r} names no method; choose from {', '.join(methods)}")
    return names


def build_methods(names: Sequence[str], ctx: MethodContext) -> list[BenchMethod]:
    methods = available_methods()
    return [methods[name](ctx) for name in names]
