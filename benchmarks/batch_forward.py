"""Batch-shaped forwards on two backends: what a step of many requests costs on each.

    python -m benchmarks.batch_forward [--backends direct-blocks,direct-packed] [--clients 1,4,8,16]
        [--rounds 7] [--out FILE.json]

A step of the batched loop verifies every request's root and draft nodes on its own cache, plus the
prompt chunk of a joining request (32 rows). This times such forwards (``forward_batch``) of the
embedded model: N requests with a 150-token cache and a tree of 2 nodes each (3 rows), with and
without a 32-row prompt chunk on a 64-token cache; the backends interleaved round by round, medians.
``benchmarks/latency.py`` times single requests' trees by width.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from restspec.bench.runner import machine_info
from restspec.decode.backends import backend_by_name
from restspec.decode.verify import compact_cache, new_cache, prefill, prefill_segment, tree_segment
from restspec.draft.tree import DraftTree
from restspec.models import load_model

REQUEST_PAST = 150
"""Cached tokens of each decoding request (a HumanEval prompt and part of its answer)."""
CHUNK_PAST, CHUNK_ROWS = 64, 32
"""The joining request's cached tokens and the rows of its prompt chunk (the loop's chunk size)."""
TREE = DraftTree(np.array([7, 9]), np.array([-1, 0]))
"""Each request's draft: a chain of two nodes."""


def _forward_s(backend, caches: list, chunk, rng: np.random.Generator) -> float:
    segments = [tree_segment(backend, cache, 5, TREE, REQUEST_PAST) for cache in caches]
    if chunk is not None:
        segments.append(prefill_segment(backend, chunk, rng.integers(0, 1000, size=CHUNK_ROWS), CHUNK_PAST))
    start = time.perf_counter()
    backend.forward_batch(segments)
    seconds = time.perf_counter() - start
    # back to the cached tokens, as the latency probe does: compaction keeps the last cached row as the
    # "root" and an empty path of the rows the forward added
    for cache in caches:
        compact_cache(cache, REQUEST_PAST - 1, [], 1 + len(TREE))
    if chunk is not None:
        compact_cache(chunk, CHUNK_PAST - 1, [], CHUNK_ROWS)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="direct-blocks,direct-packed")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    loaded = load_model("smollm2")
    backends = [backend_by_name(loaded.model, name) for name in args.backends.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    with torch.inference_mode():

        def cache(length: int):
            c = new_cache()
            prefill(backends[0], c, rng.integers(0, 1000, size=length))
            return c

        for clients in (int(c) for c in args.clients.split(",")):
            caches = [cache(REQUEST_PAST) for _ in range(clients)]
            for chunk in (None, cache(CHUNK_PAST)):
                for b in backends:  # warm-up
                    _forward_s(b, caches, chunk, rng)
                samples: dict[str, list[float]] = {b.key: [] for b in backends}
                for _ in range(args.rounds):
                    for b in backends:
                        samples[b.key].append(_forward_s(b, caches, chunk, rng))
                row = {
                    "clients": clients,
                    "prompt_chunk": chunk is not None,
                    "rows": clients * (1 + len(TREE)) + (CHUNK_ROWS if chunk is not None else 0),
                    "ms": {k: round(statistics.median(v) * 1e3, 1) for k, v in samples.items()},
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
