"""restspec's per-step bookkeeping, timed apart from the model: record a run once, replay it exactly.

    python -m benchmarks.overhead [--workload humaneval] [--limit 10] [--per-category]
        [--max-new-tokens 128] [--repeats 5] [--record]

1. Record (once per workload; cached under ``$RESTSPEC_CACHE/overhead``): restspec's default drafter
   and adaptive budget generate greedily for the workload's items (first turns) on the embedded
   model, and every call they receive is kept (contexts, budgets, the trees the policy chose, the
   accepted tokens, the verification logits, the step times).
2. Replay, no model: a fresh default drafter and adaptive policy (on the recorded latency curve) get
   the same calls in the same order. Each part is timed (best of ``--repeats`` replays), and the
   tree the policy chooses at every step is compared with the recorded one and hashed.

Two versions of the drafting code thus meet identical inputs: equal digests mean they chose the
same trees at every step, the times say what the bookkeeping costs. The replay runs with warm CPU
caches; inside the generate loop every forward pass evicts them, so ``restspec bench``'s draft and
accept shares are higher. A recording holds every verified row's logits (about 40 MB per HumanEval
prompt of 128 tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from restspec.draft.base import Drafter, Step, TreeLogits
from restspec.draft.tree import DraftTree

PARTS = ("propose", "choose", "observe", "observe_policy")
"""The timed calls: the drafter's propose and observe, the policy's choose and observe."""
TRACE_VERSION = 3
"""Part of a recording's file name: recordings of another layout are recorded again (2: steps)."""


@dataclass
class Trace:
    """A recorded run: ``events`` in call order, each a tuple whose first item names the call."""

    events: list[tuple]
    latency: dict
    """The adaptive policy's latency curve (``LatencyCurve.to_json``)."""
    vocab_size: int
    datastores: list[str]


class RecordingDrafter:
    """A drafter that passes every call to ``inner`` and appends it to ``events``."""

    def __init__(self, inner: Drafter, events: list[tuple]) -> None:
        self.inner = inner
        self.events = events

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        self.events.append(("start", np.array(prompt)))
        self.inner.start_request(prompt, request)

    def stop_request(self, request: int = 0) -> None:
        self.events.append(("stop",))
        self.inner.stop_request(request)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        self.events.append(("propose", np.array(context), budget))
        return self.inner.propose(context, budget)

    def observe(self, step: Step) -> None:
        logits = step.logits
        rows = None if logits is None else (np.array(logits.input_ids), np.array(logits.logits))
        tree = step.tree
        self.events.append(
            (
                "observe",
                np.array(step.context),
                np.array(step.accepted),
                rows,
                (np.array(tree.tokens), np.array(tree.parents), np.array(tree.weights), tree.match_length),
                np.array(step.path),
                (step.draft_s, step.forward_s, step.accept_s),
            )
        )
        self.inner.observe(step)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def recorded_step(event: tuple) -> Step:
    """The :class:`Step` an ``"observe"`` event recorded."""
    _, context, accepted, rows, (tokens, parents, weights, match_length), path, timings = event
    logits = None if rows is None else TreeLogits(*rows)
    return Step(context, DraftTree(tokens, parents, weights, match_length), path, accepted, logits, *timings)


class RecordingPolicy:
    """A budget policy that passes every call to ``inner`` (an ``AdaptiveBudget``) and records it."""

    def __init__(self, inner: Any, events: list[tuple]) -> None:
        self.inner = inner
        self.events = events

    @property
    def max_budget(self) -> int:
        return self.inner.max_budget

    def choose(self, tree: DraftTree, past_len: int) -> int:
        return self.choose_batch([tree], 1)[0]

    def choose_batch(
        self, trees: Sequence[DraftTree], fixed_inputs: int | None = None, room: int | None = None
    ) -> list[int]:
        """One request at a time is recorded (the overhead bench runs requests one by one)."""
        chosen = self.inner.choose_batch(trees, fixed_inputs, room)
        for tree, size in zip(trees, chosen, strict=True):
            self.events.append(("choose", fixed_inputs, np.array(tree.tokens[:size])))
        return chosen

    def step_room(self, fixed_inputs: int) -> int | None:
        return self.inner.step_room(fixed_inputs)

    def observe(self, step: Step) -> None:
        self.events.append(("observe_policy",))  # the step is the drafter's "observe" event before it
        self.inner.observe(step)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def record_calls(
    model: Any, tokenizer: Any, drafter: Drafter, policy: Any, prompts: list[list[int]], max_new_tokens: int
) -> list[tuple]:
    """Greedy generation of every prompt through restspec's loop with ``drafter`` and ``policy`` (an
    ``AdaptiveBudget``); returns every call they received, in order."""
    from restspec.decode import GenerationConfig, SpeculativeGenerator

    events: list[tuple] = []
    generator = SpeculativeGenerator(
        model, tokenizer, drafter=RecordingDrafter(drafter, events), budget=RecordingPolicy(policy, events)
    )
    for prompt in prompts:
        generator.generate(prompt, GenerationConfig(max_new_tokens=max_new_tokens))
    return events


def record(workload: str, limit: int, per_category: bool, max_new_tokens: int) -> Trace:
    """Run restspec's default drafter and policy on the workload's first turns (the embedded model)
    and record their calls."""
    from restspec.bench.methods import MethodContext, build_methods
    from restspec.bench.runner import prompt_ids, warm_up
    from restspec.bench.workloads import load_workload, select
    from restspec.datastore import ensure_default_datastore
    from restspec.draft import default_drafter
    from restspec.models import load_model

    items = select(load_workload(workload), limit, per_category=per_category)
    loaded = load_model()
    datastore = ensure_default_datastore(loaded.tokenizer)
    ctx = MethodContext(loaded, [datastore])
    warm_up(build_methods(["restspec"], ctx), loaded.tokenizer)
    policy = ctx.adaptive_budget()
    prompts = [
        prompt_ids(loaded.tokenizer, item, [{"role": "user", "content": item.turns[0]}]) for item in items
    ]
    drafter = default_drafter(ctx.datastores(), ctx.vocab_size)
    events = record_calls(ctx.model, ctx.tokenizer, drafter, policy, prompts, max_new_tokens)
    return Trace(events, policy.latency.to_json(), ctx.vocab_size, [str(datastore)])


@dataclass(frozen=True)
class Replay:
    steps: int
    seconds: dict[str, float]
    """Seconds per part over the whole replay."""
    digest: str
    """Hash of the chosen trees (tokens and weights) of every step."""
    mismatches: int
    """Steps whose chosen tree differs from the recorded one."""


def replay(trace: Trace, datastores: list[Any]) -> Replay:
    """Feed ``trace`` to a fresh default drafter and adaptive policy; time each part."""
    from restspec.decode.budget import AdaptiveBudget, LatencyCurve
    from restspec.draft import default_drafter

    drafter = default_drafter(datastores, trace.vocab_size)
    policy = AdaptiveBudget(LatencyCurve.from_json(trace.latency))
    seconds: Counter[str] = Counter()
    digest = hashlib.sha256()
    steps = mismatches = 0
    tree = DraftTree.empty()
    step: Step | None = None
    clock = time.perf_counter
    for event in trace.events:
        kind = event[0]
        if kind == "observe":
            step = recorded_step(event)  # not timed: the loop builds its step outside the drafter
        start = clock()
        if kind == "start":
            drafter.start_request(event[1])
        elif kind == "stop":
            drafter.stop_request()
        elif kind == "propose":
            tree = drafter.propose(event[1], event[2])
            steps += 1
        elif kind == "choose":
            chosen = policy.choose_batch([tree], event[1])[0]
        elif kind == "observe" and step is not None:
            drafter.observe(replace(step, proposal=tree))
        elif kind == "observe_policy" and step is not None:
            policy.observe(step)
        seconds[kind] += clock() - start
        if kind == "choose":
            digest.update(tree.tokens[:chosen].tobytes() + tree.weights[:chosen].tobytes())
            mismatches += not np.array_equal(tree.tokens[:chosen], event[2])
    return Replay(steps, {part: seconds[part] for part in PARTS}, digest.hexdigest()[:16], mismatches)


def trace_path(workload: str, limit: int, per_category: bool, max_new_tokens: int) -> Path:
    from restspec.datastore.default import cache_dir

    name = Path(workload).stem if workload != "humaneval" else workload
    per = "-per-category" if per_category else ""
    return cache_dir() / "overhead" / f"{name}-{limit}{per}x{max_new_tokens}-v{TRACE_VERSION}.pkl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="humaneval", help="'humaneval' or a prompt file, as for bench")
    parser.add_argument("--limit", type=int, default=10, help="the first N items (per category)")
    parser.add_argument("--per-category", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="replays; the fastest is reported")
    parser.add_argument("--record", action="store_true", help="record again even if a recording exists")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    from restspec.datastore import Datastore

    path = trace_path(args.workload, args.limit, args.per_category, args.max_new_tokens)
    if args.record or not path.is_file():
        print(f"recording {path} (runs the model) ...", file=sys.stderr)
        trace = record(args.workload, args.limit, args.per_category, args.max_new_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(vars(trace), f, protocol=5)  # plain data: older code can replay it too
    with open(path, "rb") as f:
        trace = Trace(**pickle.load(f))  # our own cache file, written above
    datastores = [Datastore.open(p) for p in trace.datastores]
    replay(trace, datastores)  # warm-up: compiled kernels, page cache
    runs = [replay(trace, datastores) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: sum(r.seconds.values()))
    per_step = {part: 1e3 * s / best.steps for part, s in best.seconds.items()}
    print(f"{path.name}: {best.steps} steps, chosen trees {best.digest}, {best.mismatches} not as recorded")
    print("| " + " | ".join(PARTS) + " | total |")
    print("|" + "---:|" * (len(PARTS) + 1))
    print("| " + " | ".join(f"{per_step[p]:.3f}" for p in PARTS) + f" | {sum(per_step.values()):.3f} |")
    print("(ms per step, best of", args.repeats, "replays)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
