"""The decoding methods a benchmark compares, behind one small interface.

Every method turns prompt token ids into output token ids and reports where its time went. Two
families:

- :class:`HFGenerateMethod`: transformers' own ``model.generate`` (``plain`` greedy, ``pld`` prompt
  lookup). Forward passes are timed with module hooks; everything else is "other".
- :class:`LoopMethod`: restspec's :class:`~restspec.decode.SpeculativeGenerator` with some drafter and
  budget policy (``rest``, ``restspec``, ``restspec-plain``, ``suffix`` and variants).

All methods of a run share one loaded model; each keeps its own drafter across prompts, so drafters
that learn from past outputs (our history drafter, Arctic's global suffix cache) only ever see the
outputs of earlier prompts of the same run, and with a warm start (``MethodContext.warm_start``) the
model's answers to questions it wrote itself (:mod:`restspec.decode.warm`), the same for restspec and
SuffixDecoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from restspec.decode.budget import DEFAULT_MAX_BUDGET
from restspec.decode.generate import StepStats
from restspec.errors import RestspecError

PLD_NUM_TOKENS = 10
"""``prompt_lookup_num_tokens`` for transformers' prompt lookup (the issue's baseline)."""

REST_MAX_SPAN = 16
"""REST as published: longest suffix tried against the datastore."""
REST_MIN_SPAN = 2
"""REST as published: shortest suffix tried."""
REST_BUDGET = 64
"""REST as published: draft tree nodes verified every step."""
PAD_WIDTH = 8
"""Draft nodes of every step in the fixed-width variants (``plain-w8``, ``restspec-w8``)."""


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

    @property
    def other_s(self) -> float:
        return max(self.elapsed_s - self.draft_s - self.forward_s - self.accept_s, 0.0)


class BenchMethod(Protocol):
    name: str

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float) -> TurnOutput:
        """Generate for ``prompt_ids`` (the same ids every method gets)."""


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

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float) -> TurnOutput:
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
    """restspec's generate loop with a drafter and a budget policy."""

    def __init__(
        self, name: str, model: Any, tokenizer: Any, drafter: Any, budget: Any, *, backend: Any = None
    ):
        from restspec.decode import SpeculativeGenerator

        self.name = name
        self.drafter = drafter
        self.budget = budget
        self.generator = SpeculativeGenerator(
            model, tokenizer, drafter=drafter, budget=budget, backend=backend
        )

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float) -> TurnOutput:
        from restspec.decode import GenerationConfig, SamplingConfig

        config = GenerationConfig(
            max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature=temperature)
        )
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
            output, elapsed, len(steps), draft_s, forward_s, accept_s, result.finish_reason, tuple(steps)
        )


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

    def start_request(self, prompt: np.ndarray) -> None:
        self.inner.start_request(prompt)

    def stop_request(self) -> None:
        self.inner.stop_request()

    def observe(self, context: np.ndarray, accepted: np.ndarray, logits: Any = None) -> None:
        self.inner.observe(context, accepted, logits)

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


# ---------------------------------------------------------------------------------------------------
# Method registry: name -> builder(context) -> BenchMethod


@dataclass
class MethodContext:
    """What builders need: the shared model and tokenizer, and lazily opened shared resources."""

    loaded: Any
    """restspec.models.LoadedModel (model, tokenizer, name)."""
    datastore_paths: Sequence[Any] = ()
    """Datastore folders (opened once, on first use); ``rest`` uses the first."""
    recalibrate: bool = False
    """Measure forward latency again instead of reading the cached calibration."""
    warm_start: bool = False
    """Start restspec's and SuffixDecoding's drafters warm (:mod:`restspec.decode.warm`)."""
    _datastores: list[Any] | None = None
    _warm: Any = None
    _adaptive: dict[str, Any] = field(default_factory=dict)
    """Calibrated adaptive policies by forward backend name."""
    _backends: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def backend(self, name: str = "auto") -> Any:
        """The model's forward backend ``name`` (:mod:`restspec.decode.backends`), built once; "auto" is
        the one :func:`~restspec.decode.backends.choose_backend` keeps on this machine."""
        if name not in self._backends:
            from restspec.decode.backends import backend_by_name, choose_backend

            self._backends[name] = (
                choose_backend(self.model, name=self.loaded.name)
                if name == "auto"
                else backend_by_name(self.model, name)
            )
        return self._backends[name]

    @property
    def latency_curve(self) -> Any:
        """The calibrated forward latency curve (chosen backend), once an adaptive method asked for it."""
        policy = self._adaptive.get("auto")
        return None if policy is None else policy.latency

    def datastores(self) -> list[Any]:
        if self._datastores is None:
            from restspec.datastore import Datastore

            if not self.datastore_paths:
                raise RestspecError("this method drafts from a datastore; pass --datastore")
            self._datastores = [Datastore.open(p, self.tokenizer) for p in self.datastore_paths]
        return self._datastores

    def adaptive_budget(
        self, max_budget: int = DEFAULT_MAX_BUDGET, *, backend: str = "auto", learn_costs: bool = True
    ) -> Any:
        """A fresh adaptive budget policy on the (once) calibrated latency curve of this model, measured
        through :meth:`backend` ``backend``; ``learn_costs``: from the loop's own steps too."""
        from restspec.decode.budget import AdaptiveBudget

        policy = self._adaptive.get(backend)
        if policy is None or policy.max_budget < max_budget:
            policy = self._adaptive[backend] = AdaptiveBudget.for_model(
                self.loaded,
                max_budget=max(max_budget, REST_BUDGET),
                recalibrate=self.recalibrate,
                backend=self.backend(backend),
            )
        return AdaptiveBudget(policy.latency, max_budget, learn_costs=learn_costs)

    def warm(self, on_conversation: Callable[[int], None] | None = None) -> Any:
        """The model's cached warm start (:func:`~restspec.decode.warm.load_or_learn_warm_start`),
        learned first if missing, or None without ``warm_start``."""
        if self.warm_start and self._warm is None:
            from restspec.decode.warm import load_or_learn_warm_start
            from restspec.draft import default_drafter

            self._warm = load_or_learn_warm_start(
                self.loaded,
                lambda: (default_drafter(self.datastores(), self.vocab_size), self.adaptive_budget()),
                on_conversation=on_conversation,
            )
        return self._warm

    def warmed(self, drafter: Any, policy: Any = None) -> Any:
        """``drafter`` (and ``policy``) given the warm start, if there is one; returns ``drafter``."""
        warm = self.warm()
        if warm is not None:
            warm.apply(drafter, policy)
        return drafter

    def default_drafter(self, policy: Any = None) -> Any:
        """restspec's default drafter over the datastores, warmed."""
        from restspec.draft import default_drafter

        return self.warmed(default_drafter(self.datastores(), self.vocab_size), policy)


def _plain(ctx: MethodContext) -> BenchMethod:
    return HFGenerateMethod("plain", ctx.model, ctx.tokenizer)


def _pld(ctx: MethodContext) -> BenchMethod:
    return HFGenerateMethod("pld", ctx.model, ctx.tokenizer, prompt_lookup_num_tokens=PLD_NUM_TOKENS)


def _rest(ctx: MethodContext) -> BenchMethod:
    from restspec.decode.budget import FixedBudget
    from restspec.draft import DatastoreDrafter

    drafter = DatastoreDrafter(ctx.datastores()[0], max_len=REST_MAX_SPAN, min_len=REST_MIN_SPAN)
    return LoopMethod(
        "rest", ctx.model, ctx.tokenizer, drafter, FixedBudget(REST_BUDGET), backend=ctx.backend()
    )


def _restspec_kernels(
    name: str, backend: str, learn_costs: bool = True, max_budget: int = DEFAULT_MAX_BUDGET
) -> Callable[[MethodContext], BenchMethod]:
    def build(ctx: MethodContext) -> BenchMethod:
        budget = ctx.adaptive_budget(max_budget, backend=backend, learn_costs=learn_costs)
        drafter = ctx.default_drafter(budget)
        return LoopMethod(name, ctx.model, ctx.tokenizer, drafter, budget, backend=ctx.backend(backend))

    return build


def _restspec_plain(ctx: MethodContext) -> BenchMethod:
    from restspec.decode.budget import FixedBudget
    from restspec.draft.base import EmptyDrafter

    return LoopMethod(
        "restspec-plain", ctx.model, ctx.tokenizer, EmptyDrafter(), FixedBudget(0), backend=ctx.backend()
    )


def _suffix(ctx: MethodContext) -> BenchMethod:
    from restspec.bench.suffix import SuffixDrafter
    from restspec.decode.budget import FixedBudget

    drafter = ctx.warmed(SuffixDrafter())
    return LoopMethod(
        "suffix", ctx.model, ctx.tokenizer, drafter, FixedBudget(drafter.max_tokens), backend=ctx.backend()
    )


def _restspec_fixed(size: int) -> Callable[[MethodContext], BenchMethod]:
    def build(ctx: MethodContext) -> BenchMethod:
        from restspec.decode.budget import FixedBudget

        drafter = ctx.default_drafter()
        return LoopMethod(
            f"restspec-fixed{size}",
            ctx.model,
            ctx.tokenizer,
            drafter,
            FixedBudget(size),
            backend=ctx.backend(),
        )

    return build


def _padded(name: str, width: int, drafted: bool) -> Callable[[MethodContext], BenchMethod]:
    def build(ctx: MethodContext) -> BenchMethod:
        from restspec.decode.budget import FixedBudget
        from restspec.draft.base import EmptyDrafter

        inner = ctx.default_drafter() if drafted else EmptyDrafter()
        return LoopMethod(
            name,
            ctx.model,
            ctx.tokenizer,
            PaddedDrafter(inner, width),
            FixedBudget(width),
            backend=ctx.backend(),
        )

    return build


def _suffix_adaptive(ctx: MethodContext) -> BenchMethod:
    from restspec.bench.suffix import SuffixDrafter

    drafter = SuffixDrafter()
    budget = ctx.adaptive_budget(drafter.max_tokens)
    return LoopMethod(
        "suffix-adaptive", ctx.model, ctx.tokenizer, ctx.warmed(drafter), budget, backend=ctx.backend()
    )


METHODS: dict[str, Callable[[MethodContext], BenchMethod]] = {
    "plain": _plain,
    "pld": _pld,
    "rest": _rest,
    "restspec": _restspec_kernels("restspec", backend="auto"),
    "restspec-plain": _restspec_plain,
    "suffix": _suffix,
    # named variants
    "restspec-stock": _restspec_kernels("restspec-stock", backend="model"),  # the model's own forward
    # the adaptive budget on the calibrated curve alone, not learning step costs from the loop
    "restspec-curve": _restspec_kernels("restspec-curve", backend="auto", learn_costs=False),
    # the adaptive budget with a cap of 16 nodes instead of DEFAULT_MAX_BUDGET
    "restspec-cap16": _restspec_kernels("restspec-cap16", backend="auto", max_budget=16),
    "restspec-fixed4": _restspec_fixed(4),
    "restspec-fixed8": _restspec_fixed(8),
    "restspec-fixed16": _restspec_fixed(16),
    "suffix-adaptive": _suffix_adaptive,
    # every forward PAD_WIDTH + 1 wide: the bfloat16 exactness experiment (compare with --reference plain-w8)
    f"plain-w{PAD_WIDTH}": _padded(f"plain-w{PAD_WIDTH}", PAD_WIDTH, drafted=False),
    f"restspec-w{PAD_WIDTH}": _padded(f"restspec-w{PAD_WIDTH}", PAD_WIDTH, drafted=True),
}
"""Every method name ``--methods`` accepts."""

DEFAULT_METHODS = ("plain", "pld", "rest", "restspec", "restspec-plain", "suffix")


def parse_methods(spec: str) -> list[str]:
    """``"plain,pld,restspec"`` -> validated list (order kept, duplicates dropped)."""
    names = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in METHODS:
            raise RestspecError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise RestspecError(f"--methods={spec!r} names no method; choose from {', '.join(METHODS)}")
    return names


def build_methods(names: Sequence[str], ctx: MethodContext) -> list[BenchMethod]:
    return [METHODS[name](ctx) for name in names]
