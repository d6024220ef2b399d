"""``restspec load``: N concurrent clients against one engine, serial vs batched vs batched restspec."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from restspec.cli.app import app
from restspec.cli.bench import (
    LimitOption,
    MaxNewTokensOption,
    PerCategoryOption,
    RecalibrateOption,
    ThreadsOption,
    WarmStartOption,
    WorkloadOption,
    bench_engine,
    check_run_options,
    run_settings,
)
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
    StepFactorOption,
    check_step_factor_flag,
    cli_errors,
    stderr_console,
)
from restspec.progress import ConsoleProgress

DEFAULT_LOAD_TOKENS = 64
"""--max-new-tokens of a load benchmark's answers (many requests per cell, so shorter than bench's)."""


@app.command()
@cli_errors
def load(
    workload: WorkloadOption = "humaneval",
    concurrency: Annotated[
        str,
        typer.Option(
            "--concurrency",
            "-c",
            help="Comma-separated numbers of concurrent clients; each sends its next request when its "
            "last one is answered.",
        ),
    ] = "1,2,4,8,16",
    limit: LimitOption = None,
    per_category: PerCategoryOption = False,
    duration: Annotated[
        float | None,
        typer.Option(
            "--duration",
            help="Seconds per configuration and concurrency after which clients take no new item "
            "(items under way finish). Default: until the workload is done.",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: MaxNewTokensOption = DEFAULT_LOAD_TOKENS,
    datastore: DatastoreOption = None,
    model: ModelOption = EMBEDDED_MODEL,
    dtype: DtypeOption = Dtype.float32,
    device: DeviceOption = AUTO_DEVICE,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Write every cell's figures, the ratios and every request's chunk times to this file.",
            show_default=False,
        ),
    ] = None,
    plot_path: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Write throughput and latency against concurrency (PNG) here. Default with --json: "
            "next to it, the same name ending in .png.",
            show_default=False,
        ),
    ] = None,
    recalibrate: RecalibrateOption = False,
    threads: ThreadsOption = None,
    warmup: Annotated[
        bool,
        typer.Option(
            "--warmup/--no-warmup", help="Two untimed short concurrent requests per configuration first."
        ),
    ] = True,
    warm_start: WarmStartOption = True,
    step_factor: StepFactorOption = None,
    backend: BackendOption = AUTO_BACKEND,
) -> None:
    """Load benchmark: concurrent clients against one engine, for restspec one request at a time
    (serial), batched decoding without drafts (batched-plain) and batched restspec (batched). Reports
    aggregate tokens/s, time to first token and inter-token latency (p50, p99) per concurrency, paired
    ratios with 95 % intervals, and checks every answer against the same prompt decoded alone."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from restspec.bench.load import CONFIGS, check_duration, parse_concurrencies, run_load, warm_up
    from restspec.bench.load_report import (
        compare_load,
        render_load_comparisons,
        render_load_table,
        summarize_load,
        write_load_json,
        write_load_plot,
    )
    from restspec.bench.methods import MethodContext
    from restspec.bench.runner import machine_info
    from restspec.bench.workloads import load_workload, select

    check_run_options(max_new_tokens, threads)
    check_step_factor_flag(step_factor)
    check_duration(duration)
    concurrencies = parse_concurrencies(concurrency)
    items = select(load_workload(workload), limit, per_category=per_category)
    err = stderr_console()
    dtype_name = Dtype(dtype).value
    machine = machine_info()
    t0 = time.perf_counter()
    engine = bench_engine(
        model, datastore, device, dtype_name, True, warm_start, recalibrate, step_factor, backend
    )
    load_s = time.perf_counter() - t0
    ctx = MethodContext(engine)
    if warmup:
        with ConsoleProgress(err).phase("Warming up"):
            warm_up(ctx, CONFIGS)
    err.print(
        f"{len(items)} items × {len(CONFIGS)} configurations × clients {concurrency}, "
        f"max {max_new_tokens} new tokens, {dtype_name} on {engine.device} ({engine.backend.key} forward), "
        f"engine ready in {load_s:.0f} s"
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("load", total=len(concurrencies) * len(CONFIGS))
        started = time.perf_counter()

        def report(config: str, clients: int, answered: int, finished: bool) -> None:
            description = f"{clients} clients · {config}: {answered} answered"
            progress.update(task, advance=int(finished), description=description)
            if finished and not err.is_terminal:  # a log file: one line per cell
                err.print(f"[{time.perf_counter() - started:7.0f} s] done {description}")

        run = run_load(
            items,
            ctx,
            concurrencies=concurrencies,
            max_new_tokens=max_new_tokens,
            duration_s=duration,
            progress=report,
        )
    run.machine = machine
    run.config = {
        **run_settings(engine, ctx, workload, limit, per_category, dtype_name, len(items)),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    figures = summarize_load(run)
    comparisons = compare_load(run)
    name = Path(workload).name if workload != "humaneval" else workload
    title = f"restspec load: {name}, {dtype_name}, {machine['cores']} cores"
    console = Console()
    console.print(render_load_table(figures, title=title))
    console.print(render_load_comparisons(comparisons))
    console.print(
        f"mismatches: {run.mismatches} of {sum(f.requests for f in figures)} answers differ from the same "
        f"prompt decoded alone (references: {run.references})"
    )
    if json_path is not None:
        write_load_json(json_path, run, figures, comparisons)
        err.print(f"wrote {json_path}")
    plot_path = plot_path or (None if json_path is None else json_path.with_suffix(".png"))
    if plot_path is not None:
        write_load_plot(plot_path, figures, title=title)
        err.print(f"wrote {plot_path}")
