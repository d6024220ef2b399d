"""What prefix reuse saves a chat's next turn: time to its first token with and without the earlier
turns' kept cache (restspec.decode.prefix).

    python -m benchmarks.prefix_reuse [--workload PATH] [--limit 3] [--per-category]
        [--max-new-tokens 128] [--chain] [--out FILE.json] [--plot FILE.png]

Loads the default engine (``Engine.from_pretrained``: adaptive budget, warm start). For every chat
item with two turns: restspec answers the first turn (its cache is kept), then the second turn's
prompt (first prompt, answer, second question, as ``restspec bench`` builds it) is started twice,
in alternating order: once with the kept caches (``reused``), once with none (``whole``: the prompt
prefilled from scratch, as transformers' ``generate`` does); each time until its first chunk (prefill
plus the first step), then closed. A ratio above 1 is time saved; the interval is a 95 % bootstrap
over the turns measured.

``--chain``: one long conversation instead, its turns the chosen items' first questions one after
the other; every turn is measured the same way before restspec answers it, so the prompt grows
with each turn (``--plot``: time to the first token against the prompt's length).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from restspec import Engine, GenerationConfig
from restspec.bench.report import TurnFigures, compare_turns
from restspec.bench.runner import answer_text, machine_info, prompt_ids
from restspec.bench.workloads import BenchItem, load_workload, select
from restspec.decode.prefix import PrefixCache

MT_BENCH = "../shared/data/mt_bench_questions.jsonl"
"""MT-Bench's questions, beside the repository (as ``restspec bench`` is pointed at them)."""


def first_chunk_s(engine: Engine, ids: list[int]) -> tuple[float, int]:
    """Seconds to the first chunk of ``ids`` and the prompt tokens its cache was given."""
    start = time.perf_counter()
    stream = engine.generator.stream(ids, GenerationConfig(max_new_tokens=1))
    chunk = next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    assert chunk.result is not None  # one token: the first chunk is the last
    return seconds, chunk.result.cached_tokens


def paired(engine: Engine, ids: list[int], whole_first: bool) -> dict:
    """Time to the first token of ``ids`` with the kept caches (``reused``) and with none (``whole``)."""
    generator = engine.generator
    kept, row = generator.prefixes, {"prompt_tokens": len(ids)}
    for case in ("whole", "reused") if whole_first else ("reused", "whole"):
        generator.prefixes = kept if case == "reused" else PrefixCache(0)
        try:
            row[f"{case}_s"], cached = first_chunk_s(engine, ids)
        finally:
            generator.prefixes = kept
        if case == "reused":
            row["cached_tokens"] = cached
    return row


def second_turns(engine: Engine, items: list[BenchItem], max_new_tokens: int) -> list[dict]:
    """Per two-turn chat item: restspec answers turn 1, then turn 2's first token is timed both ways."""
    rows = []
    for index, item in enumerate(items):
        messages = [{"role": "user", "content": item.turns[0]}]
        answer = engine.generate(prompt_ids(engine.tokenizer, item, messages), max_new_tokens=max_new_tokens)
        messages += [
            {"role": "assistant", "content": answer.text},
            {"role": "user", "content": item.turns[1]},
        ]
        ids = prompt_ids(engine.tokenizer, item, messages)
        rows.append({"item_id": item.item_id, **paired(engine, ids, whole_first=index % 2 == 1)})
        report(rows[-1])
    return rows


def one_conversation(engine: Engine, items: list[BenchItem], max_new_tokens: int) -> list[dict]:
    """One conversation whose turns are the items' first questions; every turn timed both ways, then
    answered."""
    rows: list[dict] = []
    messages: list[dict[str, str]] = []
    for index, item in enumerate(items):
        messages.append({"role": "user", "content": item.turns[0]})
        ids = prompt_ids(engine.tokenizer, item, messages)
        rows.append(
            {"item_id": item.item_id, "turn": index, **paired(engine, ids, whole_first=index % 2 == 1)}
        )
        report(rows[-1])
        answer = engine.generate(ids, max_new_tokens=max_new_tokens)
        messages.append({"role": "assistant", "content": answer_text(engine.tokenizer, answer.output_ids)})
    return rows


def report(row: dict) -> None:
    print(
        f"{row['item_id']}: {row['prompt_tokens']} prompt tokens, {row['cached_tokens']} reused: "
        f"{row['whole_s'] * 1000:.0f} -> {row['reused_s'] * 1000:.0f} ms to the first token",
        flush=True,
    )


def summarize(rows: list[dict]) -> dict:
    """Medians, and the ratio of summed times (whole over reused) with its 95 % bootstrap interval
    (``restspec bench``'s paired comparison, each turn one item of one token)."""
    whole = np.array([r["whole_s"] for r in rows])
    reused = np.array([r["reused_s"] for r in rows])
    turns = [
        TurnFigures(str(index), "", case, 1, r[f"{case}_s"])
        for index, r in enumerate(rows)
        for case in ("reused", "whole")
    ]
    (comparison,) = compare_turns(turns, ["reused", "whole"], "reused")  # tokens/s: whole / reused time
    return {
        "items": len(rows),
        "prompt_tokens": int(sum(r["prompt_tokens"] for r in rows)),
        "cached_tokens": int(sum(r["cached_tokens"] for r in rows)),
        "whole_ms_median": round(float(np.median(whole)) * 1000, 1),
        "reused_ms_median": round(float(np.median(reused)) * 1000, 1),
        "ratio": round(comparison.ratio, 3),
        "low": round(comparison.low, 3),
        "high": round(comparison.high, 3),
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Time to the first token against the prompt's length, with and without the kept caches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["prompt_tokens"])
    tokens = [r["prompt_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(tokens, [r["whole_s"] * 1000 for r in rows], "o-", label="whole prompt prefilled (as generate)")
    ax.plot(tokens, [r["reused_s"] * 1000 for r in rows], "o-", label="earlier turns' kept cache")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default=MT_BENCH)
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--per-category", action="store_true")
    parser.add_argument("--max-new-tokens", "-n", type=int, default=128)
    parser.add_argument("--chain", action="store_true", help="one conversation of the items' first questions")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)

    engine = Engine.from_pretrained(progress=False)
    chosen = select(load_workload(args.workload), args.limit, per_category=args.per_category)
    items = [i for i in chosen if i.chat and (args.chain or len(i.turns) >= 2)]
    if not items:
        raise SystemExit(f"{args.workload}: no chat items" + ("" if args.chain else " with two turns"))
    first_chunk_s(
        engine, prompt_ids(engine.tokenizer, items[0], [{"role": "user", "content": "Hi"}])
    )  # warm-up
    rows = (one_conversation if args.chain else second_turns)(engine, items, args.max_new_tokens)
    summary = summarize(rows)
    print(json.dumps(summary))
    machine = machine_info()
    if args.out:
        config = {"workload": args.workload, "limit": args.limit, "per_category": args.per_category}
        config |= {"chain": args.chain, "max_new_tokens": args.max_new_tokens, "backend": engine.backend.key}
        payload = {"machine": machine, "config": config, "summary": summary, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot:
        kind = "one conversation, turn by turn" if args.chain else "second turns of two-turn chats"
        plot(rows, args.plot, f"Prefix reuse: {kind} ({machine['cpu']}, {machine['cores']} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
