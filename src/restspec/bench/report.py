"""Benchmark figures: aggregation per method and category, the terminal table, JSON and the plot.

Figures aggregate over turns as ratios of sums (so long outputs weigh more, as they do for a user):
``tokens_per_s`` = generated tokens / wall seconds, ``speedup`` = tokens_per_s / plain's (over the
same turns), ``mean_accepted`` = generated tokens / model forward passes (plain greedy: 1.0),
``exact`` = fraction of turns whose output ids equal the reference method's (plain greedy unless
``--reference`` names another method of the run).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from restspec.bench.runner import BenchRun, TurnRecord
from restspec.errors import RestspecError

BASELINE = "plain"
TRANSFORMERS_SAMPLERS = ("plain", "pld")
"""Methods that sample as transformers' ``generate`` does: at a temperature their tokens are not
restspec's for the same seed, so nothing is compared against them as a reference."""
TIME_PARTS = ("draft", "forward", "accept", "other")
OURS = "restspec"
"""The method the paired comparison (:func:`compare`) sets against every other method of a run."""
COMPARE_RESAMPLES = 2000
"""Bootstrap resamples behind each paired comparison's interval."""
WIDTH_EDGES: tuple[int, ...] = (1, 2, 4, 7, 10, 14, 18, 26, 34, 66)
"""Lowest forward width (root + verified nodes) of each group the per-width figures collect steps in:
1, 2-3, 4-6, ..., 34-65, 66 and wider."""


@dataclass(frozen=True)
class Figures:
    tokens_per_s: float
    speedup: float | None
    """tokens_per_s over plain's on the same turns; None when plain was not run."""
    mean_accepted: float
    """Generated tokens per model forward pass (prefill included)."""
    exact: float | None
    """Fraction of turns identical to plain greedy; None without plain or when sampling."""
    tokens: int
    seconds: float
    turns: int
    time_split: dict[str, float]
    """Fraction of wall time in drafting, forward passes, acceptance, and everything else."""

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens_per_s": round(self.tokens_per_s, 3),
            "speedup": None if self.speedup is None else round(self.speedup, 3),
            "mean_accepted": round(self.mean_accepted, 3),
            "exact": None if self.exact is None else round(self.exact, 4),
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "turns": self.turns,
            "time_split": {k: round(v, 4) for k, v in self.time_split.items()},
        }


@dataclass(frozen=True)
class WidthRow:
    """The steps of one method whose forward was ``inputs`` wide: what they cost and what they gained.
    Set beside the calibrated latency curve, this shows whether a method is limited by acceptance
    (few tokens per step) or by cost (steps dearer than planned)."""

    inputs: str
    """Width range, e.g. "7-9" (root + verified nodes)."""
    steps: int
    share: float
    """Fraction of the method's steps."""
    mean_inputs: float
    forward_ms: float
    """Mean forward time of these steps."""
    step_ms: float
    """Mean time of the whole step: drafting, forward and acceptance."""
    tokens_per_step: float
    """Tokens emitted per step (accepted drafts + the model's own token)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "steps": self.steps,
            "share": round(self.share, 4),
            "mean_inputs": round(self.mean_inputs, 2),
            "forward_ms": round(self.forward_ms, 2),
            "step_ms": round(self.step_ms, 2),
            "tokens_per_step": round(self.tokens_per_step, 3),
        }


@dataclass(frozen=True)
class MethodSummary:
    method: str
    overall: Figures
    categories: dict[str, Figures] = field(default_factory=dict)
    by_width: list[WidthRow] = field(default_factory=list)
    """Steps grouped by forward width (restspec's loop only; empty for transformers' generate)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, **self.overall.to_json()}
        out["categories"] = {name: fig.to_json() for name, fig in self.categories.items()}
        out["by_width"] = [row.to_json() for row in self.by_width]
        return out


def _figures(records: Sequence[TurnRecord], plain: Sequence[TurnRecord] | None, exact_known: bool) -> Figures:
    tokens = sum(len(r.output.output_ids) for r in records)
    seconds = sum(r.output.elapsed_s for r in records)
    forwards = sum(r.output.forwards for r in records)
    tps = tokens / seconds if seconds > 0 else 0.0
    speedup = None
    if plain:
        p_tokens = sum(len(r.output.output_ids) for r in plain)
        p_seconds = sum(r.output.elapsed_s for r in plain)
        if p_seconds > 0 and p_tokens > 0 and tps > 0:
            speedup = tps / (p_tokens / p_seconds)
    exact = None
    if exact_known and records and all(r.identical is not None for r in records):
        exact = sum(bool(r.identical) for r in records) / len(records)
    parts = {
        "draft": sum(r.output.draft_s for r in records),
        "forward": sum(r.output.forward_s for r in records),
        "accept": sum(r.output.accept_s for r in records),
        "other": sum(r.output.other_s for r in records),
    }
    split = {k: (v / seconds if seconds > 0 else 0.0) for k, v in parts.items()}
    return Figures(
        tokens_per_s=tps,
        speedup=speedup,
        mean_accepted=tokens / forwards if forwards else 0.0,
        exact=exact,
        tokens=tokens,
        seconds=seconds,
        turns=len(records),
        time_split=split,
    )


def _width_label(group: int) -> str:
    lo = WIDTH_EDGES[group]
    if group == len(WIDTH_EDGES) - 1:
        return f"{lo}+"
    hi = WIDTH_EDGES[group + 1] - 1
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _by_width(records: Sequence[TurnRecord]) -> list[WidthRow]:
    steps = [s for r in records for s in r.output.steps]
    groups: dict[int, list] = {}
    for s in steps:
        groups.setdefault(bisect.bisect_right(WIDTH_EDGES, s.drafted + 1) - 1, []).append(s)
    rows = []
    for group, mine in sorted(groups.items()):
        n = len(mine)
        rows.append(
            WidthRow(
                inputs=_width_label(group),
                steps=n,
                share=n / len(steps),
                mean_inputs=sum(s.drafted + 1 for s in mine) / n,
                forward_ms=1000 * sum(s.forward_s for s in mine) / n,
                step_ms=1000 * sum(s.draft_s + s.forward_s + s.accept_s for s in mine) / n,
                tokens_per_step=sum(s.emitted for s in mine) / n,
            )
        )
    return rows


def summarize(run: BenchRun) -> list[MethodSummary]:
    """Per method (in run order): overall figures and figures per category (in workload order)."""
    exact_known = run.reference in run.methods and (
        run.temperature == 0.0 or run.reference not in TRANSFORMERS_SAMPLERS
    )
    by_method: dict[str, list[TurnRecord]] = {m: [] for m in run.methods}
    for r in run.records:
        by_method[r.method].append(r)
    plain_all = by_method.get(BASELINE)
    categories = list(dict.fromkeys(r.category for r in run.records))
    out = []
    for method, records in by_method.items():
        overall = _figures(records, plain_all, exact_known)
        cats = {}
        for cat in categories:
            mine = [r for r in records if r.category == cat]
            plain = [r for r in plain_all if r.category == cat] if plain_all else None
            if mine:
                cats[cat] = _figures(mine, plain, exact_known)
        out.append(MethodSummary(method, overall, cats, _by_width(records)))
    return out


@dataclass(frozen=True)
class Comparison:
    """One method's speed over another's on the same items, with the spread a different draw of items
    would give: is a lead larger than what the choice of prompts explains?"""

    method: str
    against: str
    category: str
    """A workload category, or "all"."""
    ratio: float
    """tokens/s of ``method`` over ``against``'s on the same turns (ratios of sums, as the table)."""
    low: float
    high: float
    """95 % bootstrap interval of ``ratio``: items drawn with replacement (an item's turns stay
    together, both methods keep the same draw), :data:`COMPARE_RESAMPLES` times."""
    items: int
    faster: int
    """Items on which ``method`` was faster (tokens/s of the item's turns together)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "against": self.against,
            "category": self.category,
            "ratio": round(self.ratio, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            "items": self.items,
            "faster": self.faster,
        }


class TurnFigures(NamedTuple):
    """What a paired comparison needs of one turn."""

    item_id: str
    category: str
    method: str
    tokens: int
    seconds: float


def compare(run: BenchRun, method: str = OURS, *, seed: int = 0) -> list[Comparison]:
    """``method`` against every other method of ``run``, overall and per category (empty when
    ``method`` was not run). The interval covers the choice of items, not the machine's drift
    between runs: run-to-run spread comes on top (:func:`pooled_compare` pools several runs)."""
    turns = [
        TurnFigures(r.item_id, r.category, r.method, len(r.output.output_ids), r.output.elapsed_s)
        for r in run.records
    ]
    return compare_turns(turns, run.methods, method, seed=seed)


def compare_turns(
    turns: Sequence[TurnFigures], methods: Sequence[str], method: str = OURS, *, seed: int = 0
) -> list[Comparison]:
    """:func:`compare` over turns from anywhere: ``method`` against each of ``methods`` on the items
    both ran."""
    if method not in methods:
        return []
    # per (method, item): [tokens, seconds], items in run order
    sums: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    category: dict[str, str] = {}
    for t in turns:
        cell = sums[t.method].setdefault(t.item_id, [0.0, 0.0])
        cell[0] += t.tokens
        cell[1] += t.seconds
        category[t.item_id] = t.category
    rng = np.random.default_rng(seed)
    groups = {"all": list(category)}
    if len(set(category.values())) > 1:
        for item, cat in category.items():
            groups.setdefault(cat, []).append(item)
    out = []
    for other in methods:
        if other == method:
            continue
        for name, items in groups.items():
            items = [i for i in items if i in sums[method] and i in sums[other]]
            if not items:
                continue
            a = np.asarray([sums[method][i] for i in items])  # (items, [tokens, seconds])
            b = np.asarray([sums[other][i] for i in items])
            draws = rng.integers(0, len(items), size=(COMPARE_RESAMPLES, len(items)))
            a_draw, b_draw = a[draws].sum(axis=1), b[draws].sum(axis=1)  # (resamples, 2)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = (a_draw[:, 0] / a_draw[:, 1]) / (b_draw[:, 0] / b_draw[:, 1])
                per_item = (a[:, 0] / a[:, 1]) / (b[:, 0] / b[:, 1])
            total_a, total_b = a.sum(axis=0), b.sum(axis=0)
            low, high = np.nanpercentile(ratios, [2.5, 97.5])
            out.append(
                Comparison(
                    method,
                    other,
                    name,
                    float((total_a[0] / total_a[1]) / (total_b[0] / total_b[1])),
                    float(low),
                    float(high),
                    len(items),
                    int((per_item > 1).sum()),
                )
            )
    return out


def pooled_compare(paths: Sequence[str | Path], method: str = OURS, *, seed: int = 0) -> list[Comparison]:
    """:func:`compare` over several runs' ``--json`` files together: an item of each run counts as an
    item of its own (so the interval covers the choice of items and the spread between the runs'
    measurements of them), methods are those of any run. ``RestspecError`` for a file that is not
    such a record, or when no run has ``method``."""
    turns: list[TurnFigures] = []
    methods: list[str] = []
    for index, path in enumerate(paths, 1):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            records = data["turns"]
            turns += [
                TurnFigures(
                    f"{index}/{r['item_id']}", r["category"], r["method"], r["new_tokens"], r["seconds"]
                )
                for r in records
            ]
        except FileNotFoundError:
            raise RestspecError(f"{path}: no such file") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RestspecError(
                f"{path} is not a file written by `restspec bench --json` ({type(exc).__name__}: {exc})"
            ) from None
        methods += [m for m in dict.fromkeys(r["method"] for r in records) if m not in methods]
    if method not in methods:
        raise RestspecError(
            f"method {method!r} is in none of the runs; they hold {', '.join(methods) or 'no turns'}"
        )
    return compare_turns(turns, methods, method, seed=seed)


def to_json(
    run: BenchRun, summaries: Sequence[MethodSummary], comparisons: Sequence[Comparison] | None = None
) -> dict[str, Any]:
    """``{"methods": [{"method", "tokens_per_s", "speedup", "mean_accepted", "exact", "categories"}]}``
    plus ``comparisons`` (:func:`compare`, computed here unless given), ``config``, ``machine`` and
    one record per turn."""
    comparisons = compare(run) if comparisons is None else comparisons
    return {
        "methods": [s.to_json() for s in summaries],
        "comparisons": [c.to_json() for c in comparisons],
        "config": run.config_json(),
        "machine": run.machine,
        "turns": [r.to_json() for r in run.records],
    }


def write_json(
    path: str | Path,
    run: BenchRun,
    summaries: Sequence[MethodSummary],
    comparisons: Sequence[Comparison] | None = None,
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(run, summaries, comparisons), indent=2) + "\n", encoding="utf-8")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_table(summaries: Sequence[MethodSummary], *, title: str = "restspec bench") -> Any:
    """A rich Table: one block of rows per method (overall, then each category)."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    longest = max((len(s.method) for s in summaries), default=6)
    table.add_column("method", justify="left", no_wrap=True, min_width=longest)
    for col, justify in [
        ("category", "left"),
        ("tok/s", "right"),
        ("speedup", "right"),
        ("tok/step", "right"),
        ("exact", "right"),
        ("draft/fwd/acc/other %", "right"),
    ]:
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    multi = any(len(s.categories) > 1 for s in summaries)
    for s in summaries:
        rows = [("all", s.overall)]
        if multi:
            rows += list(s.categories.items())
        for i, (cat, fig) in enumerate(rows):
            split = "/".join(f"{100 * fig.time_split[p]:.0f}" for p in TIME_PARTS)
            table.add_row(
                s.method if i == 0 else "",
                cat,
                f"{fig.tokens_per_s:.2f}",
                _fmt(fig.speedup, ".2f", "x"),
                f"{fig.mean_accepted:.2f}",
                _fmt(None if fig.exact is None else 100 * fig.exact, ".0f", "%"),
                split,
                end_section=(i == len(rows) - 1),
            )
    return table


def write_plot(path: str | Path, summaries: Sequence[MethodSummary], *, title: str = "") -> None:
    """Grouped bars: speedup over plain greedy (or tokens/s without plain) per category and method,
    and mean tokens per forward pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    have_speedup = all(s.overall.speedup is not None for s in summaries)
    categories = list(dict.fromkeys(c for s in summaries for c in s.categories))
    groups = ["all", *categories] if len(categories) > 1 else ["all"]

    def value(s: MethodSummary, group: str, metric: str) -> float:
        fig = s.overall if group == "all" else s.categories.get(group)
        if fig is None:
            return 0.0
        if metric == "speed":
            return float(fig.speedup if have_speedup else fig.tokens_per_s)
        return float(fig.mean_accepted)

    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.3 * len(groups) + 3), 7.5), constrained_layout=True)
    x = np.arange(len(groups))
    width = 0.8 / max(len(summaries), 1)
    for ax, metric, label in [
        (axes[0], "speed", "speedup over plain greedy" if have_speedup else "tokens/s"),
        (axes[1], "accepted", "tokens per forward pass"),
    ]:
        for i, s in enumerate(summaries):
            ax.bar(
                x + (i - (len(summaries) - 1) / 2) * width,
                [value(s, g, metric) for g in groups],
                width,
                label=s.method,
            )
        ax.set_xticks(x, groups, rotation=20 if len(groups) > 4 else 0)
        ax.set_ylabel(label)
        if metric == "speed" and have_speedup:
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncols=min(len(summaries), 3), fontsize="small", loc="best")
    if title:
        axes[0].set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


COMPARE_COLUMNS = ("method", "against", "category", "ratio", "95 % interval", "faster on")


def _compare_cells(comparisons: Sequence[Comparison]) -> list[list[str]]:
    return [
        [
            c.method,
            c.against,
            c.category,
            f"{c.ratio:.3f}",
            f"{c.low:.3f}-{c.high:.3f}",
            f"{c.faster}/{c.items}",
        ]
        for c in comparisons
    ]


def render_compare_table(
    comparisons: Sequence[Comparison], *, title: str = "paired: tokens/s ratio on the same items"
) -> Any:
    """A rich Table of :func:`compare`'s rows: a ratio whose interval holds 1.0 is no lead."""
    from rich.table import Table

    table = Table(title=f"{title}, 95 % interval over items")
    for i, col in enumerate(COMPARE_COLUMNS):
        table.add_column(col, justify="left" if i < 3 else "right", no_wrap=i < 2)
    rows = _compare_cells(comparisons)
    for i, cells in enumerate(rows):
        last = i == len(rows) - 1 or rows[i + 1][1] != cells[1]
        table.add_row(*cells, end_section=last)
    return table


WIDTH_COLUMNS = ("method", "inputs", "steps %", "mean inputs", "forward ms", "step ms", "tok/step")


def _width_cells(summaries: Sequence[MethodSummary]) -> list[list[str]]:
    """One row of :data:`WIDTH_COLUMNS` cells per (method, width range)."""
    return [
        [
            s.method,
            row.inputs,
            f"{100 * row.share:.0f}",
            f"{row.mean_inputs:.1f}",
            f"{row.forward_ms:.1f}",
            f"{row.step_ms:.1f}",
            f"{row.tokens_per_step:.2f}",
        ]
        for s in summaries
        for row in s.by_width
    ]


def render_width_table(summaries: Sequence[MethodSummary], *, title: str = "steps by forward width") -> Any:
    """A rich Table of every loop method's steps grouped by forward width (see :class:`WidthRow`)."""
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(WIDTH_COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right", no_wrap=i == 0)
    for summary in summaries:
        rows = _width_cells([summary])
        for i, cells in enumerate(rows):
            table.add_row(cells[0] if i == 0 else "", *cells[1:], end_section=i == len(rows) - 1)
    return table


def render_markdown(summaries: Sequence[MethodSummary], comparisons: Sequence[Comparison] = ()) -> str:
    """The figures as Markdown tables, for docs/benchmarks.md: one row per method and category, then
    (if any method ran restspec's loop) the steps by forward width, then the paired comparisons."""
    multi = any(len(s.categories) > 1 for s in summaries)
    lines = [
        "| method | category | tok/s | speedup | tok/step | exact | draft/fwd/acc/other % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        rows = [("all", s.overall)] + (list(s.categories.items()) if multi else [])
        for cat, fig in rows:
            split = "/".join(f"{100 * fig.time_split[p]:.0f}" for p in TIME_PARTS)
            exact = _fmt(None if fig.exact is None else 100 * fig.exact, ".0f", "%")
            lines.append(
                f"| {s.method} | {cat} | {fig.tokens_per_s:.2f} | {_fmt(fig.speedup, '.2f', 'x')} | "
                f"{fig.mean_accepted:.2f} | {exact} | {split} |"
            )
    widths = _width_cells(summaries)
    if widths:
        lines += ["", "| " + " | ".join(WIDTH_COLUMNS) + " |"]
        lines.append("|---|---|" + "---:|" * (len(WIDTH_COLUMNS) - 2))
        lines += ["| " + " | ".join(cells) + " |" for cells in widths]
    if comparisons:
        lines += ["", "| " + " | ".join(COMPARE_COLUMNS) + " |"]
        lines.append("|---|---|---|" + "---:|" * (len(COMPARE_COLUMNS) - 3))
        lines += ["| " + " | ".join(cells) + " |" for cells in _compare_cells(comparisons)]
    return "\n".join(lines) + "\n"
