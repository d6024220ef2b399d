"""Per draft source: tokens per step alone and its marginal gain in the default mix, replayed.

python -m benchmarks.sources --references A.npz [--references B.npz ...] [--latency CURVE.json]
    [--budget 12] [--markdown FILE] [--json FILE]

Replays recorded greedy references (``python -m benchmarks.replay`` records them) through each
source alone, the default mix, and the default mix without each source (:mod:`benchmarks.simulate`:
exact for greedy decoding; no model run). Every drafter starts cold and learns across the
references in order, as one process serving them would. Two columns per workload: tokens per step
with a fixed tree of ``--budget`` nodes, and under the adaptive budget timed with the latency curve
(tokens per step and the predicted speedup over plain decoding, :mod:`benchmarks.policy_sim`). The
recycling extender's two refinements are ablated as sources of their own: the rows of pairs of
tokens, and the rates that depend on the row of the token before (LogitSpec's next-next token).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from restspec.cli.common import cli_errors, stderr_console
from restspec.draft import (
    DEFAULT_MERGE,
    DEFAULT_SCALES,
    ContextDrafter,
    DatastoreDrafter,
    Drafter,
    HistoryDrafter,
    MergedDrafter,
    RecycleDrafter,
    Step,
)

app = typer.Typer(add_completion=False)

SOURCES = ("datastore", "context", "history")
"""The default mix's sources, in :func:`restspec.draft.default_drafter`'s order."""


class RecycleWithoutPairs(RecycleDrafter):
    """Recycling from each token's own row only: the pair rows are forgotten after every step."""

    def observe(self, step: Step) -> None:
        super().observe(step)
        self.rows.pair_keys[:] = -1


class RecycleByRankOnly(RecycleDrafter):
    """Recycling whose rates depend on the rank alone (pooled over the row kind and the rank in the
    row of the token before), as Token Recycling has them."""

    @property
    def rates(self) -> np.ndarray:
        hits, trials = self.hits.sum(axis=(0, 2)), self.trials.sum(axis=(0, 2))
        prior = self._prior[0, :, self.k]
        rank = (hits + RANK_ONLY_STRENGTH * prior) / (trials + RANK_ONLY_STRENGTH)
        return np.broadcast_to(rank[None, :, None], self.hits.shape).copy()


class TokenRecycling(RecycleWithoutPairs, RecycleByRankOnly):
    """Neither refinement: each token's own row, rates by rank alone (Token Recycling as published)."""


RANK_ONLY_STRENGTH = 20.0
"""Pseudo-observations behind :class:`RecycleByRankOnly`'s prior (Token Recycling's before this)."""


def mix(
    datastores: Sequence,
    vocab_size: int,
    sources: Sequence[str] = SOURCES,
    extender: type[RecycleDrafter] | None = RecycleDrafter,
) -> MergedDrafter:
    """The default mix (:func:`restspec.draft.default_drafter`) of ``sources`` and ``extender``."""
    factories: dict[str, Callable[[], Drafter]] = {
        "datastore": lambda: DatastoreDrafter(datastores),
        "context": ContextDrafter,
        "history": HistoryDrafter,
    }
    names = [name for name in sources if name != "datastore" or datastores]
    return MergedDrafter(
        [factories[name]() for name in names],
        scales=[DEFAULT_SCALES[name] for name in names],
        config=DEFAULT_MERGE,
        extender=None if extender is None else extender(vocab_size),
    )


def variants(datastores: Sequence, vocab_size: int) -> dict[str, tuple[str, Callable[[], Drafter]]]:
    """name -> (what it is, a factory of fresh drafters)."""
    rows: dict[str, tuple[str, Callable[[], Drafter]]] = {
        "default": ("the default mix", lambda: mix(datastores, vocab_size)),
        "datastore": ("alone", lambda: DatastoreDrafter(datastores)),
        "context": ("alone", ContextDrafter),
        "history": ("alone", HistoryDrafter),
        "recycle": ("alone", lambda: RecycleDrafter(vocab_size)),
        "recycle-plain": ("alone, without pairs and agreement", lambda: TokenRecycling(vocab_size)),
    }
    for name in SOURCES:
        rest = [s for s in SOURCES if s != name]
        rows[f"-{name}"] = ("the mix without it", lambda rest=rest: mix(datastores, vocab_size, rest))
    rows["-recycle"] = ("the mix without it", lambda: mix(datastores, vocab_size, extender=None))
    rows["-pairs"] = ("the mix without it", lambda: mix(datastores, vocab_size, extender=RecycleWithoutPairs))
    rows["-agreement"] = (
        "the mix without it",
        lambda: mix(datastores, vocab_size, extender=RecycleByRankOnly),
    )
    rows["-both"] = (
        "the mix without pairs and agreement (Token Recycling's own rows and rates)",
        lambda: mix(datastores, vocab_size, extender=TokenRecycling),
    )
    return rows


@dataclass(frozen=True)
class Cell:
    """One drafter on one workload."""

    fixed: float
    """Tokens per step with a fixed budget."""
    adaptive: float
    """Tokens per step under the adaptive budget."""
    nodes: float
    """Nodes verified per step under the adaptive budget."""
    speedup: float
    """Predicted speedup over plain decoding under the adaptive budget."""


def measure(refs: Sequence, factory: Callable[[], Drafter], vocab_size: int, budget: int, curve) -> Cell:
    from benchmarks.policy_sim import replay_policy
    from benchmarks.simulate import replay
    from restspec.decode.budget import AdaptiveBudget

    fixed = replay(refs, factory(), budget, vocab_size)
    adaptive = replay_policy(refs, factory(), AdaptiveBudget(curve), curve, vocab_size)
    return Cell(fixed.mean_accepted, adaptive.mean_accepted, adaptive.mean_nodes, adaptive.speedup)


def markdown(cells: dict[str, dict[str, Cell]], notes: dict[str, str], budget: int) -> str:
    """One row per drafter, per workload: fixed-budget and adaptive tokens per step, predicted
    speedup; rows "-X" also the change against the default mix (the marginal gain of X is its
    negative)."""
    workloads = list(cells)
    head = "| drafter | what |" + "".join(
        f" {w}: b={budget} | {w}: adaptive (nodes) | {w}: speedup |" for w in workloads
    )
    lines = [head, "|---|---|" + "---:|---:|---:|" * len(workloads)]
    for name in next(iter(cells.values())):
        row = f"| {name} | {notes[name]} |"
        for w in workloads:
            c, base = cells[w][name], cells[w]["default"]
            if name.startswith("-"):
                row += (
                    f" {c.fixed:.3f} ({c.fixed - base.fixed:+.3f}) |"
                    f" {c.adaptive:.3f} ({c.adaptive - base.adaptive:+.3f}) |"
                    f" {c.speedup:.3f}x ({(c.speedup / base.speedup - 1) * 100:+.1f} %) |"
                )
            else:
                row += f" {c.fixed:.3f} | {c.adaptive:.3f} ({c.nodes:.1f}) | {c.speedup:.3f}x |"
        lines.append(row)
    return "\n".join(lines)


@app.command()
@cli_errors
def sources(
    references: Annotated[
        list[Path], typer.Option("--references", help="Recorded references (.npz), one per workload.")
    ],
    latency: Annotated[
        Path | None,
        typer.Option("--latency", help="Latency calibration JSON (default: the reference curve)."),
    ] = None,
    budget: Annotated[int, typer.Option("--budget", help="Fixed tree size of the first column.")] = 12,
    only: Annotated[
        str | None, typer.Option("--only", help="Drafters to replay, comma-separated (default: all).")
    ] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write the table here too.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every cell as JSON here.")] = None,
) -> None:
    """Tokens per step of each draft source alone and of the default mix without it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.simulate import load_references
    from restspec.datastore import Datastore, ensure_default_datastore
    from restspec.decode.budget import LatencyCurve, read_calibration
    from restspec.errors import RestspecError
    from restspec.models import load_tokenizer

    console = stderr_console()
    tokenizer = load_tokenizer("smollm2")
    stores = [Datastore.open(ensure_default_datastore(tokenizer), tokenizer)]
    vocab_size = max(len(tokenizer), *(ds.vocab_size for ds in stores))
    curve = LatencyCurve.reference() if latency is None else read_calibration(latency)[0]
    table = variants(stores, vocab_size)
    names = list(table) if only is None else ["default", *(n for n in only.split(",") if n != "default")]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise RestspecError(f"--only: unknown drafters {unknown}; choose from {', '.join(table)}")
    cells: dict[str, dict[str, Cell]] = {}
    for path in references:
        refs = load_references(path)
        workload = path.stem.split("-smollm2")[0]
        cells[workload] = {}
        for name in names:
            cells[workload][name] = cell = measure(refs, table[name][1], vocab_size, budget, curve)
            console.print(f"{workload} {name}: {cell}")
    text = markdown(cells, {n: table[n][0] for n in names}, budget)
    typer.echo(text)
    if markdown_out is not None:
        markdown_out.write_text(text + "\n", encoding="utf-8")
    if json_out is not None:
        record = {
            "references": [str(p) for p in references],
            "budget": budget,
            "latency": curve.to_json(),
            "cells": {w: {n: asdict(c) for n, c in row.items()} for w, row in cells.items()},
        }
        json_out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    app()
