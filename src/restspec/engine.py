"""The one composition root: a model with its drafter, budget policy and warm start, in one object.

:meth:`Engine.from_pretrained` is the only place where restspec's pieces are put together::

    model + tokenizer (restspec.models) ──► forward backend (measured per machine)
    datastores (opened, or the default one built on first use) ──► default drafter
    budget policy ('auto': calibrated on this machine) ──► warm start (learned once per model)
    ──► SpeculativeGenerator: generate / stream

The CLI, the server, ``restspec bench`` and the integrations all build through it, so a library user
gets exactly the engine the CLI runs, with the same defaults.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from restspec.errors import GenerationError, ModelError
from restspec.models import DEFAULT_MODEL
from restspec.progress import Progress, progress_from

if TYPE_CHECKING:
    from restspec.datastore import Datastore
    from restspec.decode import GenerationConfig, GenerationResult, SpeculativeGenerator, StreamChunk
    from restspec.decode.backends import ForwardBackend
    from restspec.decode.budget import AdaptiveBudget, BudgetPolicy
    from restspec.decode.warm import WarmStart
    from restspec.draft.base import Drafter
    from restspec.models import LoadedModel

AUTO = "auto"
DEFAULT_MAX_BATCH = 8
"""Requests verified together in one forward by default (more wait their turn)."""
WARM_START_PHASE = "Warm start: the model answers questions it writes (once per model)"

Prompt = Any
"""Text, a list of chat messages ({"role", "content"}), or token ids."""


def parse_budget(value: str | int) -> int | None:
    """'auto' -> None (adaptive); a whole number >= 0 -> that many draft tokens per step."""
    text = str(value).strip().lower()
    if text == AUTO:
        return None
    try:
        size = int(text)
    except ValueError:
        size = -1
    if size < 0:
        raise GenerationError(f"budget={value!r} must be 'auto' or a whole number >= 0 (0 = plain decoding)")
    return size


def check_datastore_paths(paths: Sequence[Path]) -> None:
    """Fail fast, before the model loads, on a datastore path that does not exist or is not a folder."""
    from restspec.datastore.format import check_folder

    for path in paths:
        check_folder(Path(path))


def model_vocab_size(model: Any) -> int:
    """Rows of the model's output layer (can exceed the tokenizer's vocabulary, never fall short)."""
    return int(model.get_output_embeddings().weight.shape[0])


class Engine:
    """A loaded model, its forward backend, drafter and budget policy, and the generate loop over them.

    Build it with :meth:`from_pretrained`. ``generate`` and ``stream`` take a prompt (text, chat
    messages or token ids) and either a :class:`~restspec.decode.GenerationConfig` or its fields as
    keywords (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``)."""

    def __init__(
        self,
        loaded: LoadedModel,
        backend: ForwardBackend,
        datastores: Sequence[Datastore],
        drafter: Drafter,
        policy: BudgetPolicy,
        warm: WarmStart | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        step_factor: float | None = None,
        prefix_cache_mb: float | None = None,
    ) -> None:
        from restspec.decode.prefix import DEFAULT_PREFIX_CACHE_MB

        self.loaded = loaded
        self.backend = backend
        self.datastores = list(datastores)
        self.drafter = drafter
        self.policy = policy
        self.warm = warm
        """What the warm start taught the drafter (None when started cold)."""
        self.max_batch = max_batch
        """Concurrent ``generate`` / ``stream`` calls verified together in one forward (more wait)."""
        from restspec.decode.budget import STEP_LATENCY_FACTOR

        self.step_factor = STEP_LATENCY_FACTOR if step_factor is None else step_factor
        """A batch's step verifies drafts only up to this multiple of a lone request's longest step, in
        the adaptive budgets this engine builds."""
        self.prefix_cache_mb = DEFAULT_PREFIX_CACHE_MB if prefix_cache_mb is None else prefix_cache_mb
        """Megabytes of finished requests' caches each generator keeps for prompts that extend them."""
        self.generator = self.variant(drafter, policy)
        from restspec.decode.threads import release_openmp_pool

        # the forwards run on the generator's loop thread: the thread that loaded and measured the
        # model gives back its OpenMP workers, which would otherwise slow every forward there
        release_openmp_pool()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        datastores: Sequence[str | os.PathLike[str]] | None = None,
        device: str = AUTO,
        dtype: str = "float32",
        budget: str | int = AUTO,
        warm_start: bool = True,
        backend: str = AUTO,
        recalibrate: bool = False,
        progress: bool | Progress = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        step_factor: float | None = None,
        prefix_cache_mb: float | None = None,
    ) -> Engine:
        """Load ``model`` ('smollm2' = the embedded SmolLM2-135M-Instruct, a Hugging Face folder or a
        .gguf file; nothing is downloaded) and build the engine around it.

        ``datastores``: folders made by ``restspec build``; None or empty = the default datastore (the
        Python standard library, built into the cache on first use). ``device``: 'auto' (CUDA when
        available, else MPS, else the CPU), 'cpu', 'cuda' or 'mps'. ``budget``: 'auto' (verify what pays
        off on this machine, calibrated once per machine and model) or a fixed number of draft tokens per
        step (0 = plain decoding: no datastore is opened). ``warm_start``: start the drafter from what
        the model's answers to questions it wrote itself taught it (shipped for the embedded model,
        otherwise learned once per model and cached). ``backend``: how verification forwards run;
        'auto' keeps the fastest that passes an exactness probe on this machine (measured once and
        cached), or one of :data:`~restspec.decode.backends.BACKEND_NAMES` (``direct-split@N``,
        ``direct-blocks-split@N``: the split at ``N`` inputs). ``recalibrate`` measures the backends and
        the latency curve again.
        ``progress``: True shows each phase on stderr, False nothing, or a
        :class:`~restspec.progress.Progress`. ``max_batch``: how many concurrent
        ``generate`` / ``stream`` calls (threads, server requests) share each step's forward; the
        budget then prices every request's draft against that forward, so drafts shrink as the batch
        grows (1: one request at a time). ``step_factor``: a step shared by several requests verifies
        drafts only up to this multiple of a lone request's longest step (>= 1; None: 1.5, the policy's
        default; lower: less time between tokens under load, less throughput). ``prefix_cache_mb``:
        megabytes of finished requests' KV caches kept, so that a prompt starting with an earlier
        request's prompt and output (a chat's next turn) prefills only what is new (None: 256; 0: off;
        :mod:`restspec.decode.prefix`)."""
        from restspec.datastore import Datastore, ensure_default_datastore
        from restspec.decode.backends import parse_backend
        from restspec.decode.budget import FixedBudget, check_step_factor
        from restspec.decode.prefix import check_prefix_cache_mb
        from restspec.draft.base import EmptyDrafter
        from restspec.models import check_model, load_model, resolve_device

        fixed = parse_budget(budget)
        if max_batch < 1:
            raise GenerationError(f"max_batch={max_batch} must be >= 1 (1 = one request at a time)")
        if prefix_cache_mb is not None:
            check_prefix_cache_mb(prefix_cache_mb)
        if step_factor is not None:
            try:
                check_step_factor(step_factor)
            except ValueError as exc:
                raise GenerationError(str(exc)) from None
        if backend != AUTO:
            try:
                parse_backend(backend)
            except ModelError as exc:
                raise GenerationError(str(exc)) from None
        paths = [Path(p) for p in datastores or ()]
        check_datastore_paths(paths)
        check_model(model)
        resolve_device(device)  # an unavailable device fails now, before anything loads
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        report = progress_from(progress)
        with report.phase(f"Loading model {model} ({dtype})"), _without_transformers_progress_bars():
            loaded = load_model(model, dtype=dtype, device=device)
        forward = _backend(loaded, backend, recalibrate, report)
        if fixed == 0:  # plain decoding: nothing to draft from
            return cls(
                loaded,
                forward,
                [],
                EmptyDrafter(),
                FixedBudget(0),
                max_batch=max_batch,
                prefix_cache_mb=prefix_cache_mb,
            )
        if not paths:
            paths = [ensure_default_datastore(loaded.tokenizer, progress=progress is not False)]
        opened = [Datastore.open(path, loaded.tokenizer) for path in paths]
        engine = cls(
            loaded,
            forward,
            opened,
            EmptyDrafter(),
            FixedBudget(0),
            max_batch=max_batch,
            step_factor=step_factor,
            prefix_cache_mb=prefix_cache_mb,
        )
        if fixed is None:
            with report.phase(_latency_phase(loaded, forward, recalibrate)):
                policy: BudgetPolicy = engine.adaptive_budget(recalibrate=recalibrate)
        else:
            policy = FixedBudget(fixed)
        warm = None
        if warm_start:
            from restspec.decode.warm import WARM_CONVERSATIONS, cached_warm_start, learn_and_cache_warm_start

            warm = cached_warm_start(loaded)
            if warm is None:  # learned once per model, with a fresh drafter and policy
                learner = engine.variant(engine.new_drafter(), engine.adaptive_budget())
                with report.steps(WARM_START_PHASE, WARM_CONVERSATIONS) as done:
                    warm = learn_and_cache_warm_start(
                        loaded, engine.plain(), learner, on_conversation=lambda i: done(i + 1)
                    )
        return cls(
            loaded,
            forward,
            opened,
            engine.new_drafter(warm, policy),
            policy,
            warm,
            max_batch,
            step_factor,
            prefix_cache_mb,
        )

    # ---- what it holds ---------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def name(self) -> str:
        """A stable id of the model and dtype, as caches name it."""
        return self.loaded.name

    @property
    def device(self) -> Any:
        """The ``torch.device`` the model runs on."""
        return self.backend.device

    # ---- generation ------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
        prefix_scope: Hashable = None,
        **settings: Any,
    ) -> GenerationResult:
        """Generate to the end (see :meth:`stream`)."""
        return self.generator.generate(prompt, config, chat=chat, prefix_scope=prefix_scope, **settings)

    def stream(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
        prefix_scope: Hashable = None,
        **settings: Any,
    ) -> Iterator[StreamChunk]:
        """Generate step by step: every chunk carries new token ids and text, the last one the result.
        ``chat`` applies the model's chat template to a text prompt (messages always get it). Safe to
        call from several threads: up to :attr:`max_batch` requests share each step's forward. A prompt
        that starts with an earlier request's prompt and output (a chat's next turn) is prefilled
        only past them, from that request's kept cache, if both have the same ``prefix_scope``
        (e.g. a user id: requests of other scopes never share cached rows). ``config``, or keyword
        settings: max_new_tokens, temperature, top_p, top_k, seed, stop
        (:func:`~restspec.decode.generation_config`)."""
        return self.generator.stream(prompt, config, chat=chat, prefix_scope=prefix_scope, **settings)

    # ---- more of the same pieces -------------------------------------------------------------------
    def plain(self, *, max_batch: int | None = None) -> SpeculativeGenerator:
        """The same loop on the same forward with no drafts: the baseline restspec is compared against."""
        from restspec.decode.budget import FixedBudget
        from restspec.draft.base import EmptyDrafter

        return self.variant(EmptyDrafter(), FixedBudget(0), max_batch=max_batch)

    def variant(
        self,
        drafter: Drafter,
        budget: BudgetPolicy,
        *,
        backend: str | None = None,
        max_batch: int | None = None,
    ) -> SpeculativeGenerator:
        """A generator on this engine's model with another drafter and budget policy (to compare drafters
        on one loaded model), through this engine's forward backend or the one named ``backend``, up to
        ``max_batch`` concurrent requests per forward (None: the engine's)."""
        from restspec.decode import SpeculativeGenerator

        return SpeculativeGenerator(
            self.model,
            self.tokenizer,
            drafter=drafter,
            budget=budget,
            backend=self._forward(backend),
            max_batch=self.max_batch if max_batch is None else max_batch,
            prefix_cache_mb=self.prefix_cache_mb,
        )

    def new_drafter(self, warm: WarmStart | None = None, policy: BudgetPolicy | None = None) -> Drafter:
        """A fresh default drafter over this engine's datastores, given the warm start (this engine's,
        or ``warm``), as is ``policy`` when given."""
        from restspec.draft import default_drafter

        drafter = default_drafter(self.datastores, vocab_size=model_vocab_size(self.model))
        warm = warm or self.warm
        if warm is not None:
            warm.apply(drafter, policy)
        return drafter

    def adaptive_budget(
        self,
        max_budget: int | None = None,
        *,
        backend: str | None = None,
        learn_costs: bool = True,
        recalibrate: bool = False,
    ) -> AdaptiveBudget:
        """A fresh adaptive budget policy (no warm start) up to ``max_budget`` nodes (None: the curve's
        :func:`~restspec.decode.budget.default_max_budget`), on the latency curve
        of this engine's forward backend (or the one named ``backend``), measured once per machine and
        cached; ``learn_costs``: refine it from the loop's own steps."""
        from restspec.decode.budget import AdaptiveBudget

        return AdaptiveBudget.for_model(
            self.loaded,
            max_budget,
            recalibrate=recalibrate,
            backend=self._forward(backend),
            max_batch=self.max_batch,
            learn_costs=learn_costs,
            step_factor=self.step_factor,
        )

    def _forward(self, name: str | None) -> ForwardBackend:
        """This engine's forward backend, or the one named ``name`` on the same model."""
        from restspec.decode.backends import backend_by_name

        return (
            self.backend
            if name in (None, self.backend.name, self.backend.key)
            else backend_by_name(self.model, name)
        )


def _latency_phase(loaded: LoadedModel, forward: ForwardBackend, recalibrate: bool) -> str:
    """The progress line of the adaptive budget's latency curve: loaded, or measured (once)."""
    from restspec.decode.budget import calibration_path
    from restspec.models import dtype_name

    path = calibration_path(
        loaded.name, dtype_name(loaded.model), backend=forward.key, device=str(forward.device)
    )
    if not recalibrate and path.is_file():
        return "Loading the forward latency curve measured on this machine"
    return "Measuring forward latency for --budget auto (once per machine and model)"


def _backend(loaded: LoadedModel, name: str, refresh: bool, report: Progress) -> ForwardBackend:
    """The forward backend ``name`` of the loaded model, or for 'auto' the one this machine measured
    fastest among those that pass the exactness probe (measured once, then cached)."""
    from restspec.decode.backends import backend_by_name, choice_path, choose_backend

    if name != AUTO:
        return backend_by_name(loaded.model, name)
    if not refresh and choice_path(loaded.model, loaded.name).is_file():
        phase = "Preparing the forward chosen on this machine (checking it is exact)"
    else:
        phase = "Choosing the fastest exact forward for this machine (once per machine and model)"
    with report.phase(phase):
        return choose_backend(loaded.model, name=loaded.name, refresh=refresh)


@contextmanager
def _without_transformers_progress_bars() -> Iterator[None]:
    """The engine's progress says what is loading; transformers' own bars would print over it (its GGUF
    de-quantizer calls tqdm directly, past ``disable_progress_bar``, so that one is silenced here)."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support: nothing more to silence
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            transformers_logging.enable_progress_bar()
