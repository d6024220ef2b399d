"""Two versions of restspec on the same prompts: each method's tokens/s in the NEW run over the OLD run's,
paired by prompt, with the 95 % bootstrap interval of ``restspec bench``'s own comparison.

    python -m benchmarks.versions OLD.json NEW.json [--method restspec --method restspec-plain]

Both files are ``restspec bench --json`` runs of the same workload (run one checkout after the other
on a quiet machine). A ratio whose interval holds 1.0 is a tie.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from restspec.bench.report import TurnFigures, compare_turns, render_compare_table
from restspec.errors import RestspecError

app = typer.Typer(add_completion=False)


def version_turns(path: Path, version: str) -> list[TurnFigures]:
    """The turns of a ``restspec bench --json`` run, each method named ``<method>@<version>``."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["turns"]
        return [
            TurnFigures(
                r["item_id"], r["category"], f"{r['method']}@{version}", r["new_tokens"], r["seconds"]
            )
            for r in records
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RestspecError(
            f"{path} is not a `restspec bench --json` run ({type(exc).__name__}: {exc})"
        ) from None


def compare_versions(old: Path, new: Path, methods: list[str], *, seed: int = 0) -> list:
    """For each of ``methods``: its new run over its old run on the prompts both ran (all categories
    together and each one)."""
    turns = version_turns(old, "old") + version_turns(new, "new")
    out = []
    for method in methods:
        pair = [f"{method}@new", f"{method}@old"]
        mine = [t for t in turns if t.method in pair]
        if {t.method for t in mine} != set(pair):
            raise RestspecError(f"method {method!r} is not in both runs")
        out += compare_turns(mine, pair, pair[0], seed=seed)
    return out


@app.command()
def main(
    old: Annotated[Path, typer.Argument(help="The older version's `restspec bench --json` run.")],
    new: Annotated[Path, typer.Argument(help="The newer version's run of the same workload.")],
    method: Annotated[
        list[str] | None, typer.Option("--method", "-m", help="Methods to compare (default: restspec).")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the comparisons here.")] = None,
) -> None:
    """Each method's tokens/s, new version over old, paired by prompt, with a 95 % interval."""
    comparisons = compare_versions(old, new, method or ["restspec"])
    Console().print(render_compare_table(comparisons, title=f"{new.name} over {old.name}"))
    if json_path is not None:
        json_path.write_text(
            json.dumps([c.to_json() for c in comparisons], indent=2) + "\n", encoding="utf-8"
        )


if __name__ == "__main__":
    app()
