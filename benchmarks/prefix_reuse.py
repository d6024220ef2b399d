"""What prefix reuse saves a chat's second turn: time to its first token with and without the first
turn's kept cache (restspec.decode.prefix).

    python -m benchmarks.prefix_reuse [--workload PATH] [--limit 3] [--per-category]
        [--max-new-tokens 128] [--out FILE.json]

Loads the default engine (``Engine.from_pretrained``: adaptive budget, warm start). For every chat
item with two turns: restspec answers the first turn (its cache is kept), then the second turn's
prompt (first prompt, answer, second question, as ``restspec bench`` builds it) is started twice,
in alternating order: once with the kept caches (``reused``), once with none (``whole``: the prompt
prefilled from scratch, as transformers' ``generate`` does); each time until its first chunk (prefill
plus the first step), then closed. A ratio above 1 is time saved; the interval is a 95 % bootstrap
over items.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from restspec import Engine, GenerationConfig
from restspec.bench.runner import answer_text, machine_info, prompt_ids
from restspec.bench.workloads import load_workload, select
from restspec.decode.prefix import PrefixCache

MT_BENCH = "../shared/data/mt_bench_questions.jsonl"
"""MT-Bench's questions, beside the repository (as ``restspec bench`` is pointed at them)."""
RESAMPLES = 2000


def first_chunk_s(engine: Engine, ids: list[int]) -> tuple[float, int]:
    """Seconds to the first chunk of ``ids`` and the prompt tokens its cache was given."""
    start = time.perf_counter()
    stream = engine.generator.stream(ids, GenerationConfig(max_new_tokens=1))
    chunk = next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    assert chunk.result is not None  # one token: the first chunk is the last
    return seconds, chunk.result.cached_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default=MT_BENCH)
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--per-category", action="store_true")
    parser.add_argument("--max-new-tokens", "-n", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    engine = Engine.from_pretrained(progress=False)
    generator, tokenizer = engine.generator, engine.tokenizer
    chosen = select(load_workload(args.workload), args.limit, per_category=args.per_category)
    items = [i for i in chosen if i.chat and len(i.turns) >= 2]
    if not items:
        raise SystemExit(f"{args.workload}: no chat items with two turns")
    first_chunk_s(engine, prompt_ids(tokenizer, items[0], [{"role": "user", "content": "Hi"}]))  # warm-up
    rows = []
    for index, item in enumerate(items):
        messages = [{"role": "user", "content": item.turns[0]}]
        first = generator.generate(
            prompt_ids(tokenizer, item, messages), GenerationConfig(max_new_tokens=args.max_new_tokens)
        )
        messages += [
            {"role": "assistant", "content": answer_text(tokenizer, first.output_ids)},
            {"role": "user", "content": item.turns[1]},
        ]
        ids = prompt_ids(tokenizer, item, messages)
        kept, row = generator.prefixes, {"item_id": item.item_id, "prompt_tokens": len(ids)}
        for case in ("reused", "whole") if index % 2 == 0 else ("whole", "reused"):
            generator.prefixes = kept if case == "reused" else PrefixCache(0)
            row[f"{case}_s"], cached = first_chunk_s(engine, ids)
            if case == "reused":
                row["cached_tokens"] = cached
        generator.prefixes = kept
        rows.append(row)
        print(
            f"{item.item_id}: {row['prompt_tokens']} prompt tokens, {row['cached_tokens']} reused: "
            f"{row['whole_s'] * 1000:.0f} -> {row['reused_s'] * 1000:.0f} ms to the first token",
            flush=True,
        )
    whole = np.array([r["whole_s"] for r in rows])
    reused = np.array([r["reused_s"] for r in rows])
    draws = np.random.default_rng(0).integers(0, len(rows), size=(RESAMPLES, len(rows)))
    low, high = np.percentile(whole[draws].sum(1) / reused[draws].sum(1), [2.5, 97.5])
    summary = {
        "items": len(rows),
        "prompt_tokens": int(sum(r["prompt_tokens"] for r in rows)),
        "cached_tokens": int(sum(r["cached_tokens"] for r in rows)),
        "whole_ms_median": round(float(np.median(whole)) * 1000, 1),
        "reused_ms_median": round(float(np.median(reused)) * 1000, 1),
        "ratio": round(float(whole.sum() / reused.sum()), 3),
        "low": round(float(low), 3),
        "high": round(float(high), 3),
    }
    print(json.dumps(summary))
    if args.out:
        config = {"workload": args.workload, "limit": args.limit, "per_category": args.per_category}
        config |= {"max_new_tokens": args.max_new_tokens, "backend": engine.backend.key}
        payload = {"machine": machine_info(), "config": config, "summary": summary, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
