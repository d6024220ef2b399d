"""Which thread runs the forward, and what a second OpenMP pool costs (restspec.decode.threads).

    python -m benchmarks.openmp_threads [--rounds 3] [--repeats 40] [--out FILE.json]

Loads the embedded model through ``Engine.from_pretrained`` (as every front end does) and times a
one-input forward (through the engine's chosen backend, on a 64-token cache; median of
``--repeats``) three ways,
interleaved over ``--rounds``:

- ``main``: on the thread that loaded the model;
- ``second, main holds its pool``: on a new thread right after the main thread ran parallel work;
- ``second, main gave its pool back``: the same, after the main thread called ``release_openmp_pool``.

It also reports the forward time the generate loop's own thread measured (``restspec-plain`` steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from pathlib import Path

import torch

from restspec import Engine, GenerationConfig
from restspec.bench.runner import machine_info
from restspec.decode.budget import ForwardLatencyProbe
from restspec.decode.threads import release_openmp_pool

PAST_LEN = 64
"""Tokens in the cache the timed forwards run on."""
CASES = ("main", "second, main holds its pool", "second, main gave its pool back")


def forward_ms(probe: ForwardLatencyProbe, repeats: int) -> float:
    """Median ms of a one-input forward (the engine's backend, its own cache), on the calling thread."""
    with torch.inference_mode():
        return statistics.median(probe(1) for _ in range(repeats)) * 1000


def on_new_thread(probe: ForwardLatencyProbe, repeats: int) -> float:
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(forward_ms(probe, repeats)))
    thread.start()
    thread.join()
    return result[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    engine = Engine.from_pretrained(budget=0, progress=False)
    probe = ForwardLatencyProbe(engine.backend, past_len=PAST_LEN)
    measured: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        measured[CASES[0]].append(forward_ms(probe, args.repeats))  # the main thread now holds a pool
        measured[CASES[1]].append(on_new_thread(probe, args.repeats))
        forward_ms(probe, 2)
        release_openmp_pool()
        measured[CASES[2]].append(on_new_thread(probe, args.repeats))
    result = engine.plain().generate("def fibonacci(n):", GenerationConfig(max_new_tokens=args.repeats))
    loop_ms = statistics.median(step.forward_s for step in result.steps) * 1000

    report = {
        "machine": machine_info(),
        "backend": engine.backend.name,
        "forward_ms": {case: [round(v, 2) for v in values] for case, values in measured.items()},
        "loop_thread_forward_ms": round(loop_ms, 2),
    }
    for case, values in measured.items():
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(f"{case:34s} {statistics.median(values):7.1f} ms  (rounds: {rounds})")
    print(f"{'generate loop thread (' + engine.backend.name + ')':34s} {loop_ms:7.1f} ms")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
