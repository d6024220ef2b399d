"""``restspec demo``, ``restspec generate`` and ``restspec chat``: the front door.

All three load the model through :func:`restspec.cli.common.load_engine`, so flags mean the same in each.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, TextIO

import numpy as np
import typer
from rich import box
from rich.table import Table

from restspec.cli.app import app
from restspec.cli.common import (
    AUTO_BACKEND,
    AUTO_BUDGET,
    AUTO_DEVICE,
    EMBEDDED_MODEL,
    BackendOption,
    BudgetOption,
    DatastoreOption,
    DeviceOption,
    Dtype,
    DtypeOption,
    EngineOptions,
    MaxNewTokensOption,
    ModelOption,
    SeedOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
    WarmStartOption,
    cli_errors,
    load_engine,
    print_user_error,
    stderr_console,
)
from restspec.errors import GenerationError, RestspecError
from restspec.progress import ConsoleProgress

if TYPE_CHECKING:
    from restspec.bench.methods import TurnOutput
    from restspec.decode import GenerationConfig, GenerationResult, SpeculativeGenerator

DEFAULT_MAX_NEW_TOKENS = 256
DEMO_MAX_NEW_TOKENS = 128
WARMUP_TOKENS = 4
"""Tokens generated once before the demo's timed runs, so one-off start-up costs are not timed."""
WARMUP_PROMPT = "The capital of France is"
"""Unrelated to every demo prompt, so the drafter's memory of past outputs learns nothing useful from it."""
EXIT_COMMANDS = frozenset({"/exit", "/quit"})
RESET_COMMAND = "/reset"
HELP_COMMAND = "/help"
CHAT_COMMANDS = "/reset forgets, /exit or Ctrl-D quits, /help shows this."


@dataclass(frozen=True)
class DemoPrompt:
    """A built-in demo prompt: raw text to continue (code) or a user message (chat template)."""

    label: str
    text: str
    chat: bool


DEMO_PROMPTS: tuple[DemoPrompt, ...] = (
    DemoPrompt(
        "code: os.walk",
        'import os\n\n\ndef find_files(root, suffix):\n    """Return the paths of all files below root whose '
        'name ends with suffix."""\n',
        chat=False,
    ),
    DemoPrompt(
        "code: argparse",
        "import argparse\n\n\ndef parse_args():\n"
        '    parser = argparse.ArgumentParser(description="Copy files.")\n'
        '    parser.add_argument("source", help="the file to copy")\n',
        chat=False,
    ),
    DemoPrompt("chat: explain", "Explain what a Python dictionary is, with a short example.", chat=True),
    DemoPrompt(
        "chat: palindrome", "Write a Python function that checks whether a string is a palindrome.", chat=True
    ),
)


# --------------------------------------------------------------------------------------------- demo


@app.command()
@cli_errors
def demo(
    model: ModelOption = EMBEDDED_MODEL,
    datastore: DatastoreOption = None,
    max_new_tokens: MaxNewTokensOption = DEMO_MAX_NEW_TOKENS,
    budget: BudgetOption = AUTO_BUDGET,
    warm_start: WarmStartOption = True,
    dtype: DtypeOption = Dtype.float32,
    device: DeviceOption = AUTO_DEVICE,
    show_text: Annotated[
        bool, typer.Option("--show-text", help="Also print what restspec generated for each prompt.")
    ] = False,
) -> None:
    """transformers' generate vs restspec, side by side, on a few built-in prompts (code completion
    and chat).

    Greedy decoding on both sides, so the outputs must be identical: restspec only makes them sooner.
    The first run builds the default datastore (the Python standard library's sources and docs).
    """
    options = EngineOptions(
        model=model,
        datastores=tuple(datastore or ()),
        max_new_tokens=max_new_tokens,
        budget=budget,
        warm_start=warm_start,
        dtype=dtype.value,
        device=device,
    )
    engine = load_engine(options)
    from restspec.bench.methods import HFGenerateMethod
    from restspec.decode import GenerationConfig

    err = stderr_console()
    progress = ConsoleProgress(err)
    config = options.generation()
    baseline = HFGenerateMethod("generate", engine.model, engine.tokenizer)
    err.print(
        f"[dim]model {engine.name} · {len(engine.datastores)} datastore(s), "
        f"{sum(ds.num_tokens for ds in engine.datastores):,} tokens · budget {options.budget} · "
        f"{max_new_tokens} new tokens per prompt, greedy[/]",
        soft_wrap=True,
    )
    warmup = GenerationConfig(max_new_tokens=WARMUP_TOKENS, sampling=options.sampling())
    baseline.generate(engine.generator.encode(WARMUP_PROMPT, False), WARMUP_TOKENS, 0.0)
    engine.generator.generate(WARMUP_PROMPT, warmup)

    rows: list[tuple[DemoPrompt, TurnOutput, GenerationResult]] = []
    for i, prompt in enumerate(DEMO_PROMPTS, start=1):
        with progress.phase(f"prompt {i}/{len(DEMO_PROMPTS)} ({prompt.label}): transformers' generate"):
            prompt_ids = engine.generator.encode(prompt.text, prompt.chat)
            limit = engine.generator.new_token_limit(len(prompt_ids), config.max_new_tokens)
            base = baseline.generate(prompt_ids, limit, 0.0)  # both stop at the model's context
        with progress.phase(f"prompt {i}/{len(DEMO_PROMPTS)} ({prompt.label}): restspec"):
            fast = engine.generator.generate(prompt.text, config, chat=prompt.chat)
        rows.append((prompt, base, fast))

    out = _stdout_console()
    out.print(_demo_table(rows))
    identical = sum(_same_output(base, fast) for _, base, fast in rows)
    out.print(
        f"{identical}/{len(rows)} outputs identical to transformers' greedy generate. Tokens/s include "
        "prefill; timings on a busy machine are noisy."
    )
    if show_text:
        for prompt, _, fast in rows:
            out.rule(prompt.label)
            out.print(fast.text, markup=False, highlight=False)


def _demo_table(rows: Sequence[tuple[DemoPrompt, TurnOutput, GenerationResult]]) -> Table:
    table = Table(
        title="transformers' greedy generate vs restspec",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("prompt", no_wrap=True)
    table.add_column("tokens", justify="right")
    table.add_column("generate\ntok/s", justify="right")
    table.add_column("restspec\ntok/s", justify="right")
    table.add_column("speedup", justify="right")
    table.add_column("accepted\nper step", justify="right")
    table.add_column("identical", justify="center", min_width=len("identical"))
    for prompt, base, fast in rows:
        table.add_row(
            prompt.label,
            str(len(fast.output_ids)),
            f"{len(base.output_ids) / base.elapsed_s:.1f}" if base.elapsed_s else "-",
            f"{fast.tokens_per_s:.1f}",
            _speedup(base.elapsed_s, len(base.output_ids), fast.elapsed_s, len(fast.output_ids)),
            f"{fast.mean_accepted:.2f}",
            "[green]yes[/]" if _same_output(base, fast) else "[red]no[/]",
        )
    base_tokens = sum(len(b.output_ids) for _, b, _ in rows)
    fast_tokens = sum(len(f.output_ids) for _, _, f in rows)
    base_s = sum(b.elapsed_s for _, b, _ in rows)
    fast_s = sum(f.elapsed_s for _, _, f in rows)
    steps = sum(len(f.steps) for _, _, f in rows)
    accepted = sum(f.mean_accepted * len(f.steps) for _, _, f in rows)
    table.add_section()
    table.add_row(
        "all",
        str(fast_tokens),
        f"{base_tokens / base_s:.1f}" if base_s else "-",
        f"{fast_tokens / fast_s:.1f}" if fast_s else "-",
        _speedup(base_s, base_tokens, fast_s, fast_tokens),
        f"{accepted / steps:.2f}" if steps else "-",
        f"{sum(_same_output(b, f) for _, b, f in rows)}/{len(rows)}",
        style="bold",
    )
    return table


def _speedup(base_s: float, base_tokens: int, fast_s: float, fast_tokens: int) -> str:
    """Ratio of tokens/s (restspec over transformers' generate), as 'x.xx×'."""
    if not (base_s and fast_s and base_tokens):
        return "-"
    return f"{(fast_tokens / fast_s) / (base_tokens / base_s):.2f}×"


def _same_output(a: TurnOutput, b: GenerationResult) -> bool:
    return np.array_equal(np.asarray(a.output_ids), np.asarray(b.output_ids))


# ----------------------------------------------------------------------------------------- generate


@app.command()
@cli_errors
def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="The prompt. Leave it out (or give '-') to read the prompt from stdin.", show_default=False
        ),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Treat the prompt as a user message and apply the chat template.")
    ] = False,
    system: Annotated[
        str | None,
        typer.Option(
            "--system", help="System message put before the prompt (implies --chat).", show_default=False
        ),
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option(
            "--stop", help="Stop when the output contains this text; repeatable.", show_default=False
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object (text, token ids, statistics) instead of streaming."
        ),
    ] = False,
    model: ModelOption = EMBEDDED_MODEL,
    datastore: DatastoreOption = None,
    max_new_tokens: MaxNewTokensOption = DEFAULT_MAX_NEW_TOKENS,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = None,
    budget: BudgetOption = AUTO_BUDGET,
    warm_start: WarmStartOption = True,
    dtype: DtypeOption = Dtype.float32,
    device: DeviceOption = AUTO_DEVICE,
    backend: BackendOption = AUTO_BACKEND,
) -> None:
    """Generate a continuation of PROMPT (or of stdin), streamed to stdout; statistics go to stderr."""
    options = EngineOptions(
        model=model,
        datastores=tuple(datastore or ()),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        budget=budget,
        warm_start=warm_start,
        dtype=dtype.value,
        device=device,
        backend=backend,
    )
    text = _read_prompt(prompt, sys.stdin)
    request: str | list[dict[str, str]] = text
    if system is not None:
        request = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        chat = True
    engine = load_engine(options)
    config = options.generation(stop_strings=stop or ())
    if as_json:
        result = engine.generator.generate(request, config, chat=chat)
        sys.stdout.write(json.dumps(result_json(result, engine.name), ensure_ascii=False) + "\n")
        return
    result = _stream_to(sys.stdout, engine.generator, request, config, chat=chat)
    sys.stdout.write("\n")
    sys.stdout.flush()
    stderr_console().print(f"[dim]{stats_line(result)}[/]", soft_wrap=True)


def _read_prompt(prompt: str | None, stdin: TextIO) -> str:
    """The prompt argument, or all of stdin when it is missing or '-'. Empty prompts are user errors."""
    if prompt is None or prompt == "-":
        if stdin.isatty():
            raise GenerationError("no prompt: give it as an argument or pipe it on stdin")
        prompt = stdin.read()
        source = "stdin"
    else:
        source = "the prompt argument"
    if not prompt.strip():
        raise GenerationError(f"the prompt from {source} is empty; give some text to continue")
    return prompt


def _stream_to(
    out: TextIO, generator: SpeculativeGenerator, request, config: GenerationConfig, *, chat: bool
) -> GenerationResult:
    """Write text as it is generated; return the final result (carried by the last chunk)."""
    result = None
    for chunk in generator.stream(request, config, chat=chat):
        if chunk.text:
            out.write(chunk.text)
            out.flush()
        if chunk.result is not None:
            result = chunk.result
    if result is None:
        raise RuntimeError("stream() ended without a final chunk carrying the result")
    return result


def stats_line(result: GenerationResult) -> str:
    """``64 tokens in 2.1 s · 30.5 tokens/s · 2.31 accepted tokens/step · finish: length`` (and
    ``· 212 prompt tokens reused`` when an earlier request's kept cache held some)."""
    reused = f" · {result.cached_tokens} prompt tokens reused" if result.cached_tokens else ""
    return (
        f"{len(result.output_ids)} tokens in {result.elapsed_s:.1f} s · {result.tokens_per_s:.1f} tokens/s · "
        f"{result.mean_accepted:.2f} accepted tokens/step · finish: {result.finish_reason}{reused}"
    )


def result_json(result: GenerationResult, model_name: str) -> dict:
    """The ``--json`` document: text, token ids and statistics of one generation."""
    steps = result.steps
    return {
        "model": model_name,
        "text": result.text,
        "prompt_ids": np.asarray(result.prompt_ids).tolist(),
        "output_ids": np.asarray(result.output_ids).tolist(),
        "finish_reason": result.finish_reason,
        "stats": {
            "prompt_tokens": len(result.prompt_ids),
            "cached_tokens": result.cached_tokens,
            "new_tokens": len(result.output_ids),
            "steps": len(steps),
            "tokens_per_s": result.tokens_per_s,
            "mean_accepted": result.mean_accepted,
            "mean_drafted": float(np.mean([s.drafted for s in steps])) if steps else 0.0,
            "prefill_s": result.prefill_s,
            "elapsed_s": result.elapsed_s,
            "draft_s": sum(s.draft_s for s in steps),
            "forward_s": sum(s.forward_s for s in steps),
            "accept_s": sum(s.accept_s for s in steps),
        },
    }


# --------------------------------------------------------------------------------------------- chat


@app.command()
@cli_errors
def chat(
    system: Annotated[
        str | None,
        typer.Option("--system", help="System message that starts the conversation.", show_default=False),
    ] = None,
    model: ModelOption = EMBEDDED_MODEL,
    datastore: DatastoreOption = None,
    max_new_tokens: MaxNewTokensOption = DEFAULT_MAX_NEW_TOKENS,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = None,
    budget: BudgetOption = AUTO_BUDGET,
    warm_start: WarmStartOption = True,
    dtype: DtypeOption = Dtype.float32,
    device: DeviceOption = AUTO_DEVICE,
    backend: BackendOption = AUTO_BACKEND,
) -> None:
    """Talk to the model: answers stream as they are generated, with tokens/s and accepted tokens per step.

    One message per line. /reset forgets the conversation; /exit, /quit or end of input (Ctrl-D) leave.
    Works with piped input too: each line is one user message.
    """
    options = EngineOptions(
        model=model,
        datastores=tuple(datastore or ()),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        budget=budget,
        warm_start=warm_start,
        dtype=dtype.value,
        device=device,
        backend=backend,
    )
    engine = load_engine(options)
    config = options.generation()
    interactive = sys.stdin.isatty()
    err = stderr_console()
    if interactive:
        err.print(f"[dim]Chatting with {engine.name}. {CHAT_COMMANDS}[/]")
    start: list[dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]
    history = list(start)
    for line in _user_lines(sys.stdin, interactive):
        message = line.strip()
        if not message:
            continue
        if message in EXIT_COMMANDS:
            break
        if message == HELP_COMMAND:
            err.print(f"[dim]{CHAT_COMMANDS}[/]")
            continue
        if message == RESET_COMMAND:
            history = list(start)
            err.print("[dim]conversation reset[/]")
            continue
        turn = [*history, {"role": "user", "content": message}]
        try:
            result = _stream_to(sys.stdout, engine.generator, turn, config, chat=True)
        except RestspecError as error:  # e.g. the conversation outgrew the context: keep the REPL alive
            sys.stdout.write("\n")
            print_user_error(error)
            err.print(f"[dim]this message was dropped; {RESET_COMMAND} starts a new conversation[/]")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.print(f"[dim]{stats_line(result)}[/]", soft_wrap=True)
        history = [*turn, {"role": "assistant", "content": result.text}]


def _user_lines(stdin: TextIO, interactive: bool) -> Iterable[str]:
    """Lines the user enters until end of input; at a terminal with a ``you> `` prompt and line editing."""
    if not interactive:
        yield from iter(stdin.readline, "")
        return
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (gives input() line editing and history)
    while True:
        try:
            yield input("you> ")
        except EOFError:
            sys.stdout.write("\n")
            return


def _stdout_console():
    from rich.console import Console

    return Console(highlight=False)


__all__ = ["DEMO_PROMPTS", "chat", "demo", "generate", "result_json", "stats_line"]
