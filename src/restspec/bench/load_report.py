"""Figures of a load run (:mod:`restspec.bench.load`): per cell, paired ratios, the table, JSON, the plot.

Per cell (configuration x concurrency): aggregate tokens/s = tokens that reached the clients while
every client had a request under way (until the first client found no item left to take, the
workload's end or ``--duration``), over that span; ``overall`` tokens/s = every answer's tokens over
the seconds from the first request to the last answer (the drain, with fewer clients, included);
time to first token (TTFT) = from sending a request to its
first chunk; inter-token latency (ITL) = the gap between a chunk and the one before it of the same
request, divided evenly over the chunk's tokens (one value per token after the first chunk: a step
that emits 3 tokens 90 ms after the last one gives three ITLs of 30 ms); ``gap`` = the chunk gaps
themselves (what a reader of the stream waits between updates). Percentiles interpolate linearly
(numpy's default). Tokens per step = tokens / verification steps of the cell's requests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from restspec.bench.load import BATCHED, BATCHED_PLAIN, SERIAL, LoadCell, LoadRequest, LoadRun
from restspec.bench.report import COMPARE_RESAMPLES

ITL_DEFINITION = (
    "per token: the gap between a chunk and the request's previous chunk, divided evenly over the "
    "chunk's tokens (the first chunk's tokens count in TTFT, not ITL)"
)
GAP_DEFINITION = "per chunk: seconds between a chunk and the request's previous chunk"
TOKENS_PER_S_DEFINITION = (
    "tokens that reached the clients while every client had a request under way (until the first "
    "client found no item left, the workload's end or --duration) / that span (steady_s)"
)
OVERALL_DEFINITION = "tokens of every answer / seconds from the first request sent to the last answer"
RATIO_DEFINITION = (
    "tokens/s: ratio of the cells' aggregate tokens/s; 95 % interval by bootstrap over requests, paired "
    "(a request one cell never reached counts 0 tokens there). p99 ITL: ratio of the cells' p99 ITL, "
    "95 % interval by bootstrap over each cell's requests (unpaired)"
)


def percentile(values: np.ndarray | Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation), None for no values."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.percentile(values, q)) if values.size else None


def pooled_itl(requests: Sequence[LoadRequest]) -> np.ndarray:
    """Every ITL of ``requests`` (float64)."""
    return np.concatenate([r.itl_s() for r in requests]) if requests else np.zeros(0)


@dataclass(frozen=True)
class CellFigures:
    """What one cell measured (seconds; None where it has no value, e.g. ITL of one-chunk answers)."""

    config: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    steady_s: float
    tokens_per_s: float
    """Aggregate, while every client had a request under way (see the module's docstring)."""
    overall_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    gap_p50_s: float | None
    gap_p99_s: float | None
    tokens_per_step: float
    mismatches: int
    """Answers that differ from the same prompt decoded alone."""

    def to_json(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(1000 * value, 2)

        return {
            "config": self.config,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "steady_s": round(self.steady_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "overall_tokens_per_s": round(self.overall_tokens_per_s, 3),
            "ttft_p50_ms": ms(self.ttft_p50_s),
            "ttft_p99_ms": ms(self.ttft_p99_s),
            "itl_p50_ms": ms(self.itl_p50_s),
            "itl_p99_ms": ms(self.itl_p99_s),
            "gap_p50_ms": ms(self.gap_p50_s),
            "gap_p99_ms": ms(self.gap_p99_s),
            "tokens_per_step": round(self.tokens_per_step, 3),
            "mismatches": self.mismatches,
        }


def steady_tokens_per_s(cell: LoadCell) -> float:
    """Tokens that reached the clients by ``cell.steady_s``, per second of it."""
    if cell.steady_s <= 0:
        return 0.0
    return sum(cell.tokens_by(cell.steady_s).values()) / cell.steady_s


def cell_figures(cell: LoadCell) -> CellFigures:
    requests = cell.requests
    tokens = sum(len(r.output_ids) for r in requests)
    steps = sum(r.steps for r in requests)
    ttft = [r.ttft_s for r in requests]
    itl = pooled_itl(requests)
    gaps = np.concatenate([np.diff(r.chunk_s) for r in requests]) if requests else np.zeros(0)
    return CellFigures(
        config=cell.config,
        concurrency=cell.concurrency,
        requests=len(requests),
        tokens=tokens,
        wall_s=cell.wall_s,
        steady_s=cell.steady_s,
        tokens_per_s=steady_tokens_per_s(cell),
        overall_tokens_per_s=tokens / cell.wall_s if cell.wall_s > 0 else 0.0,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        itl_p50_s=percentile(itl, 50),
        itl_p99_s=percentile(itl, 99),
        gap_p50_s=percentile(gaps, 50),
        gap_p99_s=percentile(gaps, 99),
        tokens_per_step=tokens / steps if steps else 0.0,
        mismatches=sum(r.identical is False for r in requests),
    )


def summarize_load(run: LoadRun) -> list[CellFigures]:
    """One row per cell, by concurrency, then in the run's configuration order."""
    order = {name: i for i, name in enumerate(run.configs)}
    cells = sorted(run.cells, key=lambda c: (c.concurrency, order.get(c.config, len(order))))
    return [cell_figures(cell) for cell in cells]


@dataclass(frozen=True)
class LoadComparison:
    """``figure`` of ``config`` at ``concurrency`` clients over ``against`` at ``against_concurrency``."""

    figure: str
    """"tokens/s" or "p99 ITL"."""
    config: str
    concurrency: int
    against: str
    against_concurrency: int
    ratio: float
    low: float
    high: float
    """95 % bootstrap interval of ``ratio``."""
    requests: int
    against_requests: int
    """Requests behind each side (the same ones for tokens/s)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "config": self.config,
            "concurrency": self.concurrency,
            "against": self.against,
            "against_concurrency": self.against_concurrency,
            "ratio": round(self.ratio, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            "requests": self.requests,
            "against_requests": self.against_requests,
        }


def _cell(run: LoadRun, config: str, concurrency: int) -> LoadCell | None:
    return next((c for c in run.cells if c.config == config and c.concurrency == concurrency), None)


def _throughput_ratio(a: LoadCell, b: LoadCell, seed: int) -> LoadComparison | None:
    """``a``'s aggregate tokens/s over ``b``'s; the interval resamples requests, paired by prompt."""
    a_tokens, b_tokens = a.tokens_by(a.steady_s), b.tokens_by(b.steady_s)
    keys = list(dict.fromkeys([*a_tokens, *b_tokens]))
    if not keys or a.steady_s <= 0 or b.steady_s <= 0:
        return None
    pairs = np.asarray([[a_tokens.get(k, 0), b_tokens.get(k, 0)] for k in keys], dtype=np.float64)  # (n, 2)
    scale = b.steady_s / a.steady_s
    total = pairs.sum(axis=0)
    if total[1] <= 0:
        return None
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(COMPARE_RESAMPLES, len(keys)))
    sums = pairs[draws].sum(axis=1)  # (resamples, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = scale * sums[:, 0] / sums[:, 1]
    finite = ratios[np.isfinite(ratios)]  # draws where b had no token are left out
    ratio = float(scale * total[0] / total[1])
    low, high = np.percentile(finite, [2.5, 97.5]) if finite.size else (ratio, ratio)
    return LoadComparison(
        "tokens/s",
        a.config,
        a.concurrency,
        b.config,
        b.concurrency,
        ratio,
        float(low),
        float(high),
        int((pairs[:, 0] > 0).sum()),
        int((pairs[:, 1] > 0).sum()),
    )


def _itl_ratio(a: LoadCell, b: LoadCell, seed: int) -> LoadComparison | None:
    """p99 ITL of ``a`` over ``b``'s, each cell's requests drawn with replacement on their own."""
    a_itl, b_itl = [r.itl_s() for r in a.requests], [r.itl_s() for r in b.requests]
    a_p99, b_p99 = percentile(pooled_itl(a.requests), 99), percentile(pooled_itl(b.requests), 99)
    if a_p99 is None or not b_p99:
        return None
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(COMPARE_RESAMPLES):
        a_draw = np.concatenate([a_itl[i] for i in rng.integers(0, len(a_itl), len(a_itl))])
        b_draw = np.concatenate([b_itl[i] for i in rng.integers(0, len(b_itl), len(b_itl))])
        if a_draw.size and b_draw.size:
            ratios.append(np.percentile(a_draw, 99) / np.percentile(b_draw, 99))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return LoadComparison(
        "p99 ITL",
        a.config,
        a.concurrency,
        b.config,
        b.concurrency,
        a_p99 / b_p99,
        float(low),
        float(high),
        len(a.requests),
        len(b.requests),
    )


def compare_load(run: LoadRun, *, seed: int = 0) -> list[LoadComparison]:
    """At every concurrency: batched restspec's tokens/s over batched-plain's and over serial's (paired
    on the same requests); at every concurrency above the lowest: batched restspec's p99 ITL over a
    lone client's (batched restspec at the lowest concurrency, normally 1)."""
    out: list[LoadComparison] = []
    lone = min(run.concurrencies)
    for concurrency in run.concurrencies:
        ours = _cell(run, BATCHED, concurrency)
        if ours is None:
            continue
        for against in (BATCHED_PLAIN, SERIAL):
            other = _cell(run, against, concurrency)
            row = None if other is None else _throughput_ratio(ours, other, seed)
            if row is not None:
                out.append(row)
    base = _cell(run, BATCHED, lone)
    for concurrency in run.concurrencies:
        ours = _cell(run, BATCHED, concurrency)
        if base is not None and ours is not None and concurrency != lone:
            row = _itl_ratio(ours, base, seed)
            if row is not None:
                out.append(row)
    return out


def load_json(
    run: LoadRun, figures: Sequence[CellFigures], comparisons: Sequence[LoadComparison]
) -> dict[str, Any]:
    """``{"cells", "comparisons", "mismatches", "references", "definitions", "config", "machine",
    "requests"}`` (every request with its chunks' arrival times in ms after it was sent)."""
    return {
        "cells": [f.to_json() for f in figures],
        "comparisons": [c.to_json() for c in comparisons],
        "mismatches": run.mismatches,
        "references": run.references,
        "definitions": {
            "tokens_per_s": TOKENS_PER_S_DEFINITION,
            "overall_tokens_per_s": OVERALL_DEFINITION,
            "ttft": "seconds from sending a request to its first chunk",
            "itl": ITL_DEFINITION,
            "gap": GAP_DEFINITION,
            "percentiles": "linear interpolation (numpy.percentile)",
            "ratios": RATIO_DEFINITION,
            "mismatches": "answers whose token ids differ from the same prompt decoded alone (greedy)",
        },
        "config": run.config_json(),
        "machine": run.machine,
        "requests": [r.to_json() for cell in run.cells for r in cell.requests],
    }


def write_load_json(
    path: str | Path, run: LoadRun, figures: Sequence[CellFigures], comparisons: Sequence[LoadComparison]
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(load_json(run, figures, comparisons), indent=2) + "\n", encoding="utf-8")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_load_table(figures: Sequence[CellFigures], *, title: str) -> Any:
    """A rich Table: one section per concurrency, one row per configuration (tokens/s while every client
    was busy, and over the whole cell; mismatches are counted below it)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"{title}; TTFT in s, ITL in ms", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False
    )
    columns = (
        "clients",
        "config",
        "req",
        "tok/s\nsteady",
        "TTFT\np50",
        "TTFT\np99",
        "ITL\np50",
        "ITL\np99",
        "tok/\nstep",
        "tok/s\nall",
    )
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 1 else "right", no_wrap=i == 1)
    for i, f in enumerate(figures):
        first = i == 0 or figures[i - 1].concurrency != f.concurrency
        last = i == len(figures) - 1 or figures[i + 1].concurrency != f.concurrency
        table.add_row(
            str(f.concurrency) if first else "",
            f.config,
            str(f.requests),
            f"{f.tokens_per_s:.1f}",
            _seconds(f.ttft_p50_s),
            _seconds(f.ttft_p99_s),
            _ms(f.itl_p50_s),
            _ms(f.itl_p99_s),
            f"{f.tokens_per_step:.2f}",
            f"{f.overall_tokens_per_s:.1f}",
            end_section=last,
        )
    return table


def render_load_comparisons(comparisons: Sequence[LoadComparison]) -> Any:
    """A rich Table of :func:`compare_load`'s rows: a ratio whose interval holds 1.0 is no lead."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="paired ratios, 95 % interval", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False
    )
    for i, col in enumerate(("figure", "config", "against", "ratio", "95 %\ninterval", "requests")):
        table.add_column(col, justify="left" if i < 3 else "right", no_wrap=i in (1, 2))
    for c in comparisons:
        table.add_row(
            c.figure,
            f"{c.config} c={c.concurrency}",
            f"{c.against} c={c.against_concurrency}",
            f"{c.ratio:.2f}",
            f"{c.low:.2f}-{c.high:.2f}",
            str(c.requests) if c.requests == c.against_requests else f"{c.requests}/{c.against_requests}",
        )
    return table


def write_load_plot(path: str | Path, figures: Sequence[CellFigures], *, title: str = "") -> None:
    """Aggregate tokens/s, TTFT, ITL (p50 solid, p99 dashed) and tokens per step against the number of
    clients, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = list(dict.fromkeys(f.config for f in figures))
    concurrencies = sorted({f.concurrency for f in figures})
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
    panels = [
        (axes[0, 0], "aggregate tokens/s", [("tokens_per_s", "-", 1.0)], False),
        (
            axes[0, 1],
            "time to first token (ms)",
            [("ttft_p50_s", "-", 1000.0), ("ttft_p99_s", "--", 1000.0)],
            True,
        ),
        (
            axes[1, 0],
            "inter-token latency (ms)",
            [("itl_p50_s", "-", 1000.0), ("itl_p99_s", "--", 1000.0)],
            False,
        ),
        (axes[1, 1], "tokens per step", [("tokens_per_step", "-", 1.0)], False),
    ]
    for ax, label, series, log in panels:
        for index, config in enumerate(configs):
            mine = sorted((f for f in figures if f.config == config), key=lambda f: f.concurrency)
            for attribute, style, scale in series:
                points = [
                    (f.concurrency, getattr(f, attribute)) for f in mine if getattr(f, attribute) is not None
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(
                        xs,
                        [scale * y for y in ys],
                        style,
                        marker="o",
                        color=f"C{index}",
                        label=config if style == "-" else None,
                    )
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    axes[0, 1].text(
        0.02, 0.97, "p50 solid, p99 dashed", transform=axes[0, 1].transAxes, va="top", fontsize="small"
    )
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
