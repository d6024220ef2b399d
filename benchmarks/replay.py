"""Mean accepted tokens per step of each drafter, without running the model (see :mod:`benchmarks.simulate`).

python -m benchmarks.replay [--prompts 40] [--workload humaneval] [--budgets 4,8,16,32,64]
    [--drafters datastore,context,history,recycle,merged] [--latency CALIBRATION.json] [--calibration]
    [--markdown FILE]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from restspec.cli.common import cli_errors, stderr_console

app = typer.Typer(add_completion=False)


def _int_list(value: str, flag: str) -> list[int]:
    from restspec.errors import RestspecError

    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise RestspecError(f"{flag}={value!r} must be comma-separated integers, e.g. 4,8,16") from None
    if not values or min(values) < 1:
        raise RestspecError(f"{flag}={value!r} must list integers >= 1")
    return values


@app.command()
@cli_errors
def replay(
    prompts: Annotated[
        int, typer.Option("--prompts", help="Items to replay: the first N (per category: --per-category).")
    ] = 40,
    workload: Annotated[
        str,
        typer.Option(
            "--workload", help="'humaneval' or a prompt file (MT-Bench-style JSONL, ...), as for bench."
        ),
    ] = "humaneval",
    per_category: Annotated[
        bool, typer.Option("--per-category", help="--prompts counts items per category.")
    ] = False,
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", help="Greedy tokens recorded per prompt (at most).")
    ] = 128,
    budgets: Annotated[str, typer.Option("--budgets", help="Tree sizes, comma-separated.")] = "4,8,16,32,64",
    drafters: Annotated[
        str,
        typer.Option(
            "--drafters", help="Drafters, comma-separated: datastore,context,history,recycle,merged."
        ),
    ] = "datastore,context,history,recycle,merged",
    datastore: Annotated[
        list[Path] | None,
        typer.Option(
            "--datastore", "-d", help="Datastore(s) to draft from (default: the standard library's)."
        ),
    ] = None,
    references: Annotated[
        Path | None,
        typer.Option("--references", help="Reference cache (.npz); recorded there first if missing."),
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Also write the table as Markdown to this file.")
    ] = None,
    warm: Annotated[
        bool,
        typer.Option(
            "--warm/--cold",
            help="Start every drafter from the embedded model's warm start, as restspec's engine does "
            "(default: cold, nothing learned before the first reference).",
        ),
    ] = False,
    calibration: Annotated[
        bool,
        typer.Option(
            "--calibration",
            help="Also tabulate how often the default drafter's nodes were accepted by the weight it "
            "gave them, at the first of --budgets.",
        ),
    ] = False,
    latency: Annotated[
        Path | None,
        typer.Option(
            "--latency",
            help="A latency calibration (JSON under ~/.cache/restspec/latency): also replay the budget "
            "policies, each step timed with its curve.",
        ),
    ] = None,
) -> None:
    """Replay recorded greedy outputs of the embedded model through each drafter (no model run)
    and print the mean accepted tokens per step for each budget.

    The first run records the references (plain greedy decoding on the workload, every turn of a
    chat item, with the model's top candidates per position; about 10 s per 128 tokens) into the
    cache; later runs only replay."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks import simulate as sim
    from restspec.datastore import Datastore, ensure_default_datastore
    from restspec.errors import RestspecError
    from restspec.models import load_tokenizer

    budget_list = _int_list(budgets, "--budgets")
    names = [n.strip() for n in drafters.split(",") if n.strip()]
    unknown = [n for n in names if n not in sim.DRAFTER_NAMES]
    if unknown or not names:
        raise RestspecError(f"--drafters={drafters!r}: choose from {', '.join(sim.DRAFTER_NAMES)}")
    if prompts < 1 or new_tokens < 1:
        raise RestspecError(f"--prompts={prompts} and --new-tokens={new_tokens} must be >= 1")
    console = stderr_console()
    from restspec.bench.workloads import load_workload, select

    items = select(load_workload(workload), prompts, per_category=per_category)
    stem = Path(workload).stem.split(".")[0]
    count = f"{prompts}-per-category" if per_category else f"{prompts}"
    path = references or sim.cache_dir() / f"{stem}-{sim.MODEL_NAME}-{count}x{new_tokens}.npz"
    if path.exists():
        refs = sim.load_references(path)
    else:
        turns = sum(len(item.turns) for item in items)
        console.print(f"Recording {turns} greedy references of {new_tokens} tokens into {path}")
        refs = sim.record_references(path, items, new_tokens, progress=console.print)
    tokenizer = load_tokenizer("smollm2")
    paths = datastore or [ensure_default_datastore(tokenizer)]
    stores = [Datastore.open(p, tokenizer) for p in paths]
    vocab_size = max(len(tokenizer), *(ds.vocab_size for ds in stores))
    warm_start = None
    if warm:
        from restspec.decode.warm import find_warm_start

        warm_start = find_warm_start(sim.MODEL_NAME, "float32", tokenizer)
        if warm_start is None:
            raise RestspecError("--warm: no warm start of the embedded model (run `restspec generate` once)")
    tokens = sum(len(r.output) for r in refs)
    console.print(f"Replaying {len(refs)} references ({tokens:,} output tokens) from {path}")

    def report(result: sim.ReplayResult) -> None:
        console.print(
            f"  {result.drafter:>9} b={result.budget:<3} {result.mean_accepted:.3f} tokens/step "
            f"({result.propose_s / max(result.steps, 1) * 1e3:.2f} ms drafting per step)"
        )

    results = sim.simulate(refs, stores, vocab_size, names, budget_list, progress=report, warm=warm_start)
    table = sim.markdown_table(results)
    if latency is not None:
        from benchmarks.policy_sim import policy_table
        from restspec.decode.budget import read_calibration

        try:
            curve, _ = read_calibration(latency)
        except (OSError, ValueError) as exc:
            raise RestspecError(f"--latency={latency}: not a latency calibration file ({exc})") from exc
        table += "\n\n" + policy_table(refs, stores, vocab_size, curve, warm_start)
    if calibration:
        table += "\n\n" + sim.calibration_table(refs, stores, vocab_size, budget_list[0], warm_start)
    typer.echo(table)
    if markdown is not None:
        markdown.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    app()
