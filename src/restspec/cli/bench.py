"""``restspec bench``: decoding methods side by side on one workload and one loaded model."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from restspec.cli.app import app
from restspec.cli.common import (
    AUTO_BACKEND,
    AUTO_DEVICE,
    EMBEDDED_MODEL,
    BackendOption,
    DatastoreOption,
    DeviceOption,
    Dtype,
    DtypeOption,
    ModelOption,
    TemperatureOption,
    cli_errors,
    stderr_console,
)
from restspec.engine import Engine
from restspec.progress import ConsoleProgress

UNDRAFTED_METHODS = ("plain", "pld", "restspec-plain")
"""Methods that draft nothing from a datastore: a run of only these needs none and no warm start."""
DEFAULT_BENCH_TOKENS = 128
"""--max-new-tokens of a benchmark answer (long enough for drafting to matter, short enough to run)."""

WorkloadOption = Annotated[
    str,
    typer.Option(
        "--workload",
        "-w",
        help="'humaneval' (raw completion of the HumanEval prompts), or a file: MT-Bench-style JSONL "
        '({"question_id", "category", "turns": [...]}, chat, later turns follow the model\'s own '
        'answers), JSONL with "prompt", or plain text with one prompt per line.',
    ),
]
LimitOption = Annotated[
    int | None,
    typer.Option(
        "--limit",
        "-l",
        help="Only the first N prompts (N per category with --per-category).",
        show_default=False,
    ),
]
PerCategoryOption = Annotated[bool, typer.Option("--per-category", help="Apply --limit to every category.")]
MaxNewTokensOption = Annotated[
    int, typer.Option("--max-new-tokens", "-n", help="Most tokens per answer (>= 1).")
]
RecalibrateOption = Annotated[
    bool,
    typer.Option(
        "--recalibrate",
        help="Measure the forward backends and the latency curve of the adaptive budget again, "
        "replacing the cached measurements.",
    ),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="torch intra-op threads (default: torch's choice, the core count).",
        show_default=False,
    ),
]
WarmStartOption = Annotated[
    bool,
    typer.Option(
        "--warm-start/--cold-start",
        help="Start restspec's drafters from the model's answers to questions it "
        "wrote itself (learned once per model, cached), as restspec's generate, chat and serve do; "
        "--cold-start: from nothing.",
    ),
]


@app.command()
@cli_errors
def bench(
    workload: WorkloadOption = "humaneval",
    limit: LimitOption = None,
    per_category: PerCategoryOption = False,
    max_new_tokens: MaxNewTokensOption = DEFAULT_BENCH_TOKENS,
    temperature: TemperatureOption = 0.0,
    samples: Annotated[
        int,
        typer.Option(
            "--samples",
            help="Answer every prompt this many times in a row: samples at a temperature, as pass@k "
            "and self-consistency runs ask for; at temperature 0 the same request again, as repeated "
            "traffic. Each method learns from its own earlier answers.",
        ),
    ] = 1,
    datastore: DatastoreOption = None,
    model: ModelOption = EMBEDDED_MODEL,
    dtype: DtypeOption = Dtype.float32,
    device: DeviceOption = AUTO_DEVICE,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma-separated methods: plain (transformers greedy generate), pld (transformers prompt "
            "lookup, 10 tokens), restspec (our default), restspec-plain (our loop, no drafts).",
        ),
    ] = "plain,pld,restspec,restspec-plain",
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            help="Method whose outputs 'exact' compares against (must be in --methods). At a "
            "temperature every method samples each turn with the same seed; restspec's methods then "
            "give the same tokens (--reference restspec checks it), transformers' (plain, pld) others.",
        ),
    ] = "plain",
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Apply the chat template to a plain prompt file "
            "(MT-Bench files always use it; HumanEval defaults to raw completion).",
            show_default=False,
        ),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Write figures per method and category to this JSON file.", show_default=False
        ),
    ] = None,
    plot_path: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a bar chart (PNG) of speedups per category.", show_default=False),
    ] = None,
    markdown_path: Annotated[
        Path | None,
        typer.Option("--markdown", help="Write the table as Markdown to this file.", show_default=False),
    ] = None,
    recalibrate: RecalibrateOption = False,
    threads: ThreadsOption = None,
    warmup: Annotated[
        bool, typer.Option("--warmup/--no-warmup", help="One untimed short generate per method first.")
    ] = True,
    warm_start: WarmStartOption = True,
    backend: BackendOption = AUTO_BACKEND,
) -> None:
    """Measure decoding methods side by side: tokens/s, speedup over plain greedy, tokens per step,
    time split, and whether outputs are token-identical to plain greedy."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from restspec.bench.methods import MethodContext, build_methods, parse_methods
    from restspec.bench.report import (
        compare,
        render_compare_table,
        render_markdown,
        render_table,
        render_width_table,
        summarize,
        write_json,
        write_plot,
    )
    from restspec.bench.runner import BenchRun, machine_info, run_bench, warm_up
    from restspec.bench.workloads import load_workload, repeated, select
    from restspec.errors import GenerationError

    check_run_options(max_new_tokens, threads)
    if not temperature >= 0.0:
        raise GenerationError(f"--temperature={temperature} must be >= 0 (0 = greedy)")
    names = parse_methods(methods)
    if reference not in names and reference != "plain":  # without plain there is just no exact figure
        raise GenerationError(f"--reference={reference!r} must be one of --methods ({', '.join(names)})")
    items = repeated(select(load_workload(workload, chat=chat), limit, per_category=per_category), samples)
    err = stderr_console()
    dtype_name = Dtype(dtype).value
    machine = machine_info()
    drafting = any(n not in UNDRAFTED_METHODS for n in names)  # they draft from datastores, warmed from them
    t0 = time.perf_counter()
    engine = bench_engine(
        model, datastore, device, dtype_name, drafting, warm_start, recalibrate, backend=backend
    )
    load_s = time.perf_counter() - t0
    ctx = MethodContext(engine)
    if warmup:
        with ConsoleProgress(err).phase("Warming up"):
            warm_up(build_methods(names, ctx), engine.tokenizer)
    measured = build_methods(names, ctx)
    turns = sum(len(i.turns) for i in items)
    err.print(
        f"{len(items)} prompts ({turns} turns) × {len(names)} methods, max {max_new_tokens} new tokens, "
        f"{dtype_name} on {engine.device} ({engine.backend.key} forward), engine ready in {load_s:.0f} s"
    )
    run_config = {
        **run_settings(engine, ctx, workload, limit, per_category, dtype_name, len(items)),
        "turns": turns,
        "samples": samples,
    }

    def record_setup(partial: BenchRun) -> None:
        partial.machine = machine
        partial.config = {**run_config, "items_done": len({r.item_id for r in partial.records})}

    def save_partial(partial: BenchRun) -> None:
        """After each item but the last (the finished run is written once, below)."""
        record_setup(partial)
        if json_path is not None and partial.config["items_done"] < len(items):
            write_json(json_path, partial, summarize(partial))

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("bench", total=len(items) * len(names))

        started = time.perf_counter()

        def advance(description: str) -> None:
            progress.update(task, advance=1, description=description)
            if not err.is_terminal:  # a log file: one line per (prompt, method)
                err.print(f"[{time.perf_counter() - started:7.0f} s] done {description}")

        run = run_bench(
            items,
            measured,
            engine.tokenizer,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            progress=advance,
            reference=reference,
            on_item=save_partial,
        )
    record_setup(run)
    summaries = summarize(run)
    comparisons = compare(run)
    if json_path is not None:
        write_json(json_path, run, summaries, comparisons)
    title = f"restspec bench: {Path(workload).name if workload != 'humaneval' else workload}, {dtype_name}"
    console = Console()
    console.print(render_table(summaries, title=title))
    if any(summary.by_width for summary in summaries):
        console.print(render_width_table(summaries))
    if comparisons:
        console.print(render_compare_table(comparisons))
    if json_path is not None:
        err.print(f"wrote {json_path}")
    if markdown_path is not None:
        _write_markdown(markdown_path, render_markdown(summaries, comparisons))
    if plot_path is not None:
        write_plot(plot_path, summaries, title=title)
        err.print(f"wrote {plot_path}")


def check_run_options(max_new_tokens: int, threads: int | None) -> None:
    """Validate the options every benchmark command shares; set torch's threads."""
    from restspec.errors import GenerationError

    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    if threads is not None:
        if threads < 1:
            raise GenerationError(f"--threads={threads} must be >= 1")
        import torch

        torch.set_num_threads(threads)


def bench_engine(
    model: str,
    datastore: list[Path] | None,
    device: str,
    dtype: str,
    drafting: bool,
    warm_start: bool,
    recalibrate: bool,
    step_factor: float | None = None,
    backend: str = AUTO_BACKEND,
) -> Engine:
    """The engine a benchmark measures: adaptive budget and warm start when a method drafts, else plain."""
    return Engine.from_pretrained(
        model,
        datastores=datastore,
        device=device,
        dtype=dtype,
        budget="auto" if drafting else 0,
        warm_start=warm_start and drafting,
        recalibrate=recalibrate,
        progress=ConsoleProgress(stderr_console()),
        step_factor=step_factor,
        backend=backend,
    )


def run_settings(
    engine: Engine, ctx: Any, workload: str, limit: int | None, per_category: bool, dtype: str, items: int
) -> dict[str, Any]:
    """What a benchmark run's JSON records about its setup (``ctx``: its ``MethodContext``)."""
    return {
        "workload": workload,
        "limit": limit,
        "per_category": per_category,
        "model": engine.name,
        "dtype": dtype,
        "datastores": [str(ds.path) for ds in engine.datastores],
        "device": str(engine.device),
        "backend": engine.backend.key,
        "step_factor": engine.step_factor,
        "items": items,
        "latency_curve": None if ctx.latency_curve is None else ctx.latency_curve.to_json(),
        "warm_start": None if engine.warm is None else engine.warm.summary(),
    }


@app.command("compare")
@cli_errors
def compare_runs(
    runs: Annotated[
        list[Path], typer.Argument(help="JSON files written by `restspec bench --json`.", show_default=False)
    ],
    method: Annotated[
        str, typer.Option("--method", help="The method set against every other method of the runs.")
    ] = "restspec",
    markdown_path: Annotated[
        Path | None,
        typer.Option("--markdown", help="Write the table as Markdown to this file.", show_default=False),
    ] = None,
) -> None:
    """Pool the paired comparisons of several benchmark runs: a lead that one noisy run cannot
    settle may show over several. Every run's item counts as an item of its own."""
    from rich.console import Console

    from restspec.bench.report import pooled_compare, render_compare_table, render_markdown

    comparisons = pooled_compare(runs, method)
    title = f"paired over {len(runs)} run{'s' if len(runs) > 1 else ''}: tokens/s ratio on the same items"
    Console().print(render_compare_table(comparisons, title=title))
    if markdown_path is not None:
        _write_markdown(markdown_path, render_markdown([], comparisons))


def _write_markdown(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    stderr_console().print(f"wrote {path}")
