"""How much room a batch's steps leave for drafts: concurrent HumanEval clients on one engine.

    python -m benchmarks.batch_rooms [--clients 16] [--duration 40] [--out FILE.json]

Runs ``--clients`` threads against the embedded model's batched loop (restspec's default drafter and
adaptive budget, as ``restspec load``'s ``batched`` configuration) for ``--duration`` seconds and
records, for every step, the room the step's time bound left for draft nodes once the prompt chunks
were in (``choose_batch``'s ``room``) and the nodes it verified. Steps with no room draft nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time
from pathlib import Path

import numpy as np

from restspec import Engine
from restspec.bench.load import BATCHED, build_generator
from restspec.bench.methods import MethodContext
from restspec.bench.runner import machine_info
from restspec.bench.workloads import load_workload, select
from restspec.decode import GenerationConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    engine = Engine.from_pretrained("smollm2")
    prompts = [
        np.asarray(engine.tokenizer(it.turns[0])["input_ids"])
        for it in select(load_workload("humaneval"), 48)
    ]
    generator = build_generator(BATCHED, MethodContext(engine), args.clients)
    policy, steps = generator.policy, []
    choose_batch = policy.choose_batch

    def recording(trees, fixed_inputs=None, room=None):
        sizes = choose_batch(trees, fixed_inputs, room)
        steps.append((room, sum(sizes)))
        return sizes

    policy.choose_batch = recording
    stop = time.perf_counter() + args.duration

    def client(first: int) -> None:
        i = first
        while time.perf_counter() < stop:
            generator.generate(prompts[i % len(prompts)], GenerationConfig(max_new_tokens=64))
            i += args.clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = {
        "machine": machine_info(),
        "backend": engine.backend.key,
        "clients": args.clients,
        "steps": len(steps),
        "steps_without_room": sum(1 for room, _ in steps if room == 0),
        "room": {str(k): v for k, v in sorted(collections.Counter(r for r, _ in steps).items(), key=str)},
        "nodes_verified": {str(k): v for k, v in sorted(collections.Counter(n for _, n in steps).items())},
    }
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
