"""Run several decoding methods side by side on one workload and one loaded model.

Methods are interleaved per prompt (item 1: every method, item 2: every method, ...), in an order
that changes from item to item so that machine noise and what the method before left behind hit
all methods alike (:func:`balanced_orders`).
Every method gets exactly the same prompt ids for an item's first turn; later turns of a chat item
follow the method's own earlier answers (as a user of that method would see them).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from restspec.bench.methods import BenchMethod, TurnOutput
from restspec.bench.workloads import BenchItem
from restspec.decode.budget import cpu_model_name
from restspec.errors import RestspecError

SEED_STRIDE = 1000
"""Seeds of one item's turns: ``SEED_STRIDE * item + turn``."""
WARMUP_PROMPT = "def fibonacci(n):\n    "
"""Warm-up prompt (not from any workload): its output is discarded and no drafter sees it."""
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class TurnRecord:
    """One method's answer to one turn of one item."""

    item_id: str
    category: str
    turn: int
    method: str
    prompt_tokens: int
    output: TurnOutput
    identical: bool | None
    """Output ids equal the reference method's (plain greedy) for this turn (None when it was not run)."""

    def to_json(self) -> dict[str, Any]:
        o = self.output
        return {
            "item_id": self.item_id,
            "category": self.category,
            "turn": self.turn,
            "method": self.method,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": o.cached_tokens,
            "new_tokens": len(o.output_ids),
            "seconds": round(o.elapsed_s, 4),
            "forwards": o.forwards,
            "finish_reason": o.finish_reason,
            "identical": self.identical,
        }


@dataclass
class BenchRun:
    """The raw outcome of a run: every turn of every method, and how the run was set up."""

    methods: list[str]
    temperature: float
    max_new_tokens: int
    reference: str = "plain"
    """The method whose outputs ``identical`` / ``exact`` compare against."""
    config: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    records: list[TurnRecord] = field(default_factory=list)

    def config_json(self) -> dict[str, Any]:
        return {
            "methods": self.methods,
            "temperature": self.temperature,
            "seeds": f"{SEED_STRIDE} x item + turn" if self.temperature > 0 else None,
            "max_new_tokens": self.max_new_tokens,
            "reference": self.reference,
            **self.config,
        }


def machine_info() -> dict[str, Any]:
    cpu = cpu_model_name()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_at_start": None if load is None else [round(x, 2) for x in load],
    }


def prompt_ids(tokenizer: Any, item: BenchItem, messages: list[dict[str, str]]) -> list[int]:
    """Token ids for the next turn: the chat template over ``messages`` (chat) or the raw prompt."""
    if item.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RestspecError(
                f"item {item.item_id!r} is a chat workload but the tokenizer has no chat template; "
                "use a chat model or a plain prompt file"
            )
        from restspec.models import apply_chat_template

        return [int(i) for i in apply_chat_template(tokenizer, messages)]
    return [int(i) for i in tokenizer(item.turns[0], add_special_tokens=True)["input_ids"]]


def answer_text(tokenizer: Any, output_ids: np.ndarray) -> str:
    return tokenizer.decode(output_ids.tolist(), skip_special_tokens=True)


def warm_up(methods: Sequence[BenchMethod], tokenizer: Any, *, max_new_tokens: int = WARMUP_TOKENS) -> None:
    """One short generate per method before any timing, so one-time costs (allocator, kernels, JIT
    compilation in drafters) are not measured. Pass throwaway instances: their drafters see the
    warm-up output, the measured instances never do."""
    ids = [int(i) for i in tokenizer(WARMUP_PROMPT)["input_ids"]]
    for method in methods:
        method.generate(ids, max_new_tokens, 0.0)


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` methods (a Williams design): over all rows every method takes every position
    equally often and follows every other method equally often (once for even ``n``, over ``2 n``
    rows twice for odd ``n``).

    A plain rotation keeps each method behind the same neighbour on every item, so anything a
    method leaves behind is charged to the same next method every time: in HumanEval runs where
    restspec always ran right after REST (64-node trees), its narrow forwards took 2-4 ms longer
    than SuffixDecoding's at the same widths, and not in runs without REST just before it
    (runs of 2026-11-22)."""
    if n < 1:
        return []
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(start + shift) % n for start in first] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def turn_seed(item: int, turn: int) -> int:
    """The sampling seed of turn ``turn`` of the ``item``-th item of a run, the same for every method."""
    return SEED_STRIDE * item + turn


def run_bench(
    items: Sequence[BenchItem],
    methods: Sequence[BenchMethod],
    tokenizer: Any,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    progress: Callable[[str], None] | None = None,
    balanced: bool = True,
    reference: str = "plain",
    on_item: Callable[[BenchRun], None] | None = None,
) -> BenchRun:
    """Run every method on every item, interleaved per item; returns every turn's record.

    ``balanced``: vary the method order by item (:func:`balanced_orders`), else always as given.
    At a temperature every method samples each turn with the same seed (:func:`turn_seed`): restspec's
    loops then give the same tokens whatever they draft, so their speeds compare on the same text.
    ``progress(description)`` is called after each (item, method) pair. ``identical`` compares every
    turn's output ids with the ``reference`` method's (plain greedy by default). ``on_item(run)`` is
    called after every item with the records so far (to save partial results of a long run).
    """
    if max_new_tokens < 1:
        raise RestspecError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise RestspecError(f"--temperature={temperature} must be >= 0")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise RestspecError(f"methods must have distinct names, got {names}")
    run = BenchRun(list(names), temperature, max_new_tokens, reference=reference)
    orders = balanced_orders(len(methods)) if balanced else [list(range(len(methods)))]
    for index, item in enumerate(items):
        order = [methods[i] for i in orders[index % len(orders)]]
        outputs: dict[str, list[tuple[int, TurnOutput]]] = {}
        for method in order:
            messages: list[dict[str, str]] = []
            turns = []
            for text in item.turns:
                messages.append({"role": "user", "content": text})
                ids = prompt_ids(tokenizer, item, messages)
                seed = turn_seed(index, len(turns)) if temperature > 0 else None
                out = method.generate(ids, max_new_tokens, temperature, seed)
                turns.append((len(ids), out))
                messages.append({"role": "assistant", "content": answer_text(tokenizer, out.output_ids)})
            outputs[method.name] = turns
            if progress is not None:
                progress(f"{item.item_id} · {method.name}")
        ref = outputs.get(reference)
        for name in names:  # records in the stable method order
            for turn, (n_prompt, out) in enumerate(outputs[name]):
                identical = None
                if ref is not None:
                    identical = bool(np.array_equal(out.output_ids, ref[turn][1].output_ids))
                run.records.append(
                    TurnRecord(item.item_id, item.category, turn, name, n_prompt, out, identical)
                )
        if on_item is not None:
            on_item(run)
    return run
