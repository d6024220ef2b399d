"""The load benchmark: N concurrent clients against one engine, in three configurations side by side.

- ``serial``: restspec one request at a time (``max_batch=1``), as a one-at-a-time server runs;
- ``batched-plain``: up to N requests per forward, no drafts;
- ``batched``: up to N requests per forward, each with its own draft tree, one budget for the batch.

Every client is a closed loop: it sends a request, reads its stream to the end and sends the next one
(a multi-turn item's later turns follow the model's own answers). Clients take items from one queue in
workload order, so every configuration at a concurrency answers the same first requests. A *cell*
(configuration x concurrency) hands out no new item after ``duration_s`` seconds; items under way
finish. Each cell gets a fresh drafter and policy, so nothing learned in one cell helps another, and the
configurations run in an order that changes from one concurrency to the next
(:func:`~restspec.bench.runner.balanced_orders`), so drift of the machine favours none of them.

Afterwards every answer is compared with the same prompt decoded alone (greedy): the ``serial``
configuration's answer to that prompt, or, where it has none, plain decoding one request at a time.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from restspec.bench.methods import MethodContext
from restspec.bench.runner import WARMUP_PROMPT, WARMUP_TOKENS, answer_text, balanced_orders, prompt_ids
from restspec.bench.workloads import BenchItem
from restspec.errors import RestspecError

SERIAL = "serial"
BATCHED_PLAIN = "batched-plain"
BATCHED = "batched"
CONFIGS = (SERIAL, BATCHED_PLAIN, BATCHED)
"""The configurations every load run measures, side by side."""

Progress = Callable[[str, int, int, bool], None]
"""``progress(config, concurrency, requests answered in the cell, cell finished)``."""


def build_generator(name: str, ctx: MethodContext, concurrency: int) -> Any:
    """A fresh :class:`~restspec.decode.SpeculativeGenerator` of configuration ``name`` for
    ``concurrency`` clients: new drafter and policy (the engine's warm start applied), nothing shared
    with another cell."""
    if name == BATCHED_PLAIN:
        return ctx.engine.plain(max_batch=concurrency)
    if name not in CONFIGS:
        raise RestspecError(f"unknown load configuration {name!r}; choose from {', '.join(CONFIGS)}")
    return ctx.default_generator(ctx.adaptive_budget(), max_batch=1 if name == SERIAL else concurrency)


@dataclass(frozen=True, eq=False)
class LoadRequest:
    """One answered request of a cell, with when each of its chunks reached the client."""

    item_id: str
    category: str
    turn: int
    config: str
    concurrency: int
    prompt_ids: np.ndarray
    """int32[L]"""
    output_ids: np.ndarray
    """int32[N]"""
    sent_s: float
    """When the client sent it, seconds since the cell started."""
    chunk_s: np.ndarray
    """float64[k]: when each chunk with tokens reached the client (seconds since the cell started)."""
    chunk_tokens: np.ndarray
    """int32[k]: tokens of each of those chunks (a step emits its accepted drafts and one more)."""
    steps: int
    """Verification steps of the request (tokens per step = N / steps)."""
    queued_s: float
    """Seconds it waited for a place in the batch."""
    finish_reason: str
    identical: bool | None = None
    """Output ids equal the same prompt's decoded alone (None until checked)."""

    @property
    def ttft_s(self) -> float:
        """Time to first token: from sending to the first chunk."""
        return float(self.chunk_s[0] - self.sent_s)

    @property
    def latency_s(self) -> float:
        """From sending to the last chunk."""
        return float(self.chunk_s[-1] - self.sent_s)

    def itl_s(self) -> np.ndarray:
        """Inter-token latencies, one per token after the first chunk: the gap between a chunk and the
        one before it, divided evenly over the chunk's tokens (float64[N - tokens of the first chunk])."""
        gaps = np.diff(self.chunk_s)
        counts = self.chunk_tokens[1:]
        return np.repeat(gaps / counts, counts)

    def key(self) -> bytes:
        """What identifies the request across cells: its prompt ids."""
        return self.prompt_ids.tobytes()

    def to_json(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "category": self.category,
            "turn": self.turn,
            "config": self.config,
            "concurrency": self.concurrency,
            "prompt_tokens": len(self.prompt_ids),
            "new_tokens": len(self.output_ids),
            "sent_s": round(self.sent_s, 4),
            "ttft_s": round(self.ttft_s, 4),
            "latency_s": round(self.latency_s, 4),
            "queued_s": round(self.queued_s, 4),
            "steps": self.steps,
            "finish_reason": self.finish_reason,
            "identical": self.identical,
            "chunk_ms": [round(1000 * (t - self.sent_s), 1) for t in self.chunk_s.tolist()],
            "chunk_tokens": self.chunk_tokens.tolist(),
        }


@dataclass(frozen=True)
class LoadCell:
    """One configuration at one concurrency: every request it answered."""

    config: str
    concurrency: int
    wall_s: float
    """From the first request sent to the last answer."""
    steady_s: float
    """Until the first client found no item to take (the workload's end or ``duration_s``): the span
    during which every client had a request under way."""
    requests: tuple[LoadRequest, ...]
    """In the order the clients took them."""

    def tokens_by(self, seconds: float) -> dict[tuple[bytes, int], int]:
        """Tokens of each request that reached the client by ``seconds``, by (:meth:`LoadRequest.key`,
        how many requests of the cell had the same prompt before it)."""
        seen: dict[bytes, int] = {}
        out = {}
        for r in self.requests:
            key = r.key()
            seen[key] = seen.get(key, -1) + 1
            out[key, seen[key]] = int(r.chunk_tokens[r.chunk_s <= seconds].sum())
        return out


@dataclass
class LoadRun:
    """A whole load run: every cell, and how the outputs compared with lone decoding."""

    configs: list[str]
    concurrencies: list[int]
    max_new_tokens: int
    duration_s: float | None
    cells: list[LoadCell] = field(default_factory=list)
    references: dict[str, int] = field(default_factory=dict)
    """Prompts whose lone answer came from the ``serial`` cells / from plain decoding alone."""
    config: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def mismatches(self) -> int:
        """Requests whose output differs from the same prompt decoded alone."""
        return sum(r.identical is False for cell in self.cells for r in cell.requests)

    def config_json(self) -> dict[str, Any]:
        return {
            "configs": self.configs,
            "concurrencies": self.concurrencies,
            "max_new_tokens": self.max_new_tokens,
            "duration_s": self.duration_s,
            **self.config,
        }


def run_cell(
    generator: Any,
    items: Sequence[BenchItem],
    tokenizer: Any,
    *,
    config: str,
    concurrency: int,
    max_new_tokens: int,
    duration_s: float | None = None,
    on_request: Callable[[int], None] | None = None,
) -> LoadCell:
    """``concurrency`` closed-loop clients send ``items`` (in order, each client its next item when its
    last one is answered) to ``generator`` until none is left or ``duration_s`` has passed (greedy,
    ``max_new_tokens``). ``on_request(answered)`` after every answer."""
    from restspec.decode import GenerationConfig

    if concurrency < 1:
        raise RestspecError(f"concurrency={concurrency} must be >= 1")
    generation = GenerationConfig(max_new_tokens=max_new_tokens)
    pending = iter(enumerate(items))
    lock = threading.Lock()
    answered: list[tuple[int, int, LoadRequest]] = []  # (item index, turn, request)
    errors: list[BaseException] = []
    exits: list[float] = []  # when clients found no item to take
    start = time.perf_counter()

    def next_item() -> tuple[int, BenchItem] | None:
        with lock:
            now = time.perf_counter() - start
            taken = None if duration_s is not None and now >= duration_s else next(pending, None)
            if taken is None:
                exits.append(now)
            return taken

    def ask(index: int, item: BenchItem) -> None:
        messages: list[dict[str, str]] = []
        for turn, text in enumerate(item.turns):
            messages.append({"role": "user", "content": text})
            ids = np.asarray(prompt_ids(tokenizer, item, messages), dtype=np.int32)
            times: list[float] = []
            tokens: list[int] = []
            sent = time.perf_counter() - start
            for chunk in generator.stream(ids, generation):
                if len(chunk.token_ids):
                    times.append(time.perf_counter() - start)
                    tokens.append(len(chunk.token_ids))
                result = chunk.result
            assert result is not None  # the last chunk carries it
            request = LoadRequest(
                item.item_id,
                item.category,
                turn,
                config,
                concurrency,
                ids,
                np.asarray(result.output_ids, dtype=np.int32),
                sent,
                np.asarray(times, dtype=np.float64),
                np.asarray(tokens, dtype=np.int32),
                len(result.steps),
                float(result.queued_s),
                result.finish_reason,
            )
            with lock:
                answered.append((index, turn, request))
                done = len(answered)
            if on_request is not None:
                on_request(done)
            messages.append({"role": "assistant", "content": answer_text(tokenizer, request.output_ids)})

    def client() -> None:
        try:
            while (taken := next_item()) is not None:
                ask(*taken)
        except BaseException as error:  # handed to the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=client, name=f"load-client-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    answered.sort(key=lambda entry: entry[:2])
    requests = tuple(request for _, _, request in answered)
    wall = max((r.chunk_s[-1] for r in requests), default=0.0)
    return LoadCell(config, concurrency, float(wall), min(min(exits, default=0.0), float(wall)), requests)


def warm_up(ctx: MethodContext, configs: Sequence[str]) -> None:
    """Two short concurrent requests per configuration on throwaway generators, before any timing
    (one-time costs of the batched forward's shapes are not measured; no measured drafter sees them)."""
    item = BenchItem("warm-up", "warm-up", (WARMUP_PROMPT,), chat=False)
    for name in configs:
        generator = build_generator(name, ctx, 2)
        run_cell(
            generator, [item, item], ctx.tokenizer, config=name, concurrency=2, max_new_tokens=WARMUP_TOKENS
        )


def check_outputs(
    cells: Sequence[LoadCell], decode_alone: Callable[[np.ndarray], np.ndarray]
) -> tuple[list[LoadCell], dict[str, int]]:
    """``cells`` with every request's ``identical`` set: its output ids against the same prompt's
    answer by a ``serial`` cell (the first one), or ``decode_alone(prompt_ids)`` where no serial cell
    answered that prompt. Returns the cells and how many references came from each."""
    reference: dict[bytes, np.ndarray] = {}
    for cell in cells:
        if cell.config == SERIAL:
            for r in cell.requests:
                reference.setdefault(r.key(), r.output_ids)
    counts = {SERIAL: len(reference), "alone": 0}
    for cell in cells:
        for r in cell.requests:
            if r.key() not in reference:
                reference[r.key()] = decode_alone(r.prompt_ids)
                counts["alone"] += 1
    checked = [
        dataclasses.replace(
            cell,
            requests=tuple(
                dataclasses.replace(r, identical=bool(np.array_equal(r.output_ids, reference[r.key()])))
                for r in cell.requests
            ),
        )
        for cell in cells
    ]
    return checked, counts


def check_duration(duration_s: float | None) -> None:
    """``--duration`` is left out or a positive number of seconds."""
    if duration_s is not None and not duration_s > 0:  # also NaN
        raise RestspecError(f"--duration={duration_s} must be > 0 seconds")


def run_load(
    items: Sequence[BenchItem],
    ctx: MethodContext,
    *,
    concurrencies: Sequence[int],
    max_new_tokens: int,
    duration_s: float | None = None,
    configs: Sequence[str] = CONFIGS,
    progress: Progress | None = None,
) -> LoadRun:
    """Every configuration at every concurrency (:func:`run_cell`, a fresh generator per cell), then
    every answer checked against lone decoding (:func:`check_outputs`)."""
    from restspec.decode import GenerationConfig

    if max_new_tokens < 1:
        raise RestspecError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    check_duration(duration_s)
    if not items:
        raise RestspecError("the workload has no items")
    run = LoadRun(list(configs), [int(c) for c in concurrencies], max_new_tokens, duration_s)
    orders = balanced_orders(len(configs))
    for index, concurrency in enumerate(run.concurrencies):
        for name in (configs[i] for i in orders[index % len(orders)]):
            generator = build_generator(name, ctx, concurrency)

            def answered(done: int, name: str = name, concurrency: int = concurrency) -> None:
                if progress is not None:
                    progress(name, concurrency, done, False)

            cell = run_cell(
                generator,
                items,
                ctx.tokenizer,
                config=name,
                concurrency=concurrency,
                max_new_tokens=max_new_tokens,
                duration_s=duration_s,
                on_request=answered,
            )
            run.cells.append(cell)
            if progress is not None:
                progress(name, concurrency, len(cell.requests), True)
    alone = ctx.engine.plain(max_batch=1)
    generation = GenerationConfig(max_new_tokens=max_new_tokens)
    run.cells, run.references = check_outputs(
        run.cells, lambda ids: np.asarray(alone.generate(ids, generation).output_ids, dtype=np.int32)
    )
    return run


def parse_concurrencies(spec: str) -> list[int]:
    """``"1,2,4,8,16"`` -> [1, 2, 4, 8, 16] (each >= 1, duplicates dropped, order kept)."""
    values: list[int] = []
    for raw in spec.split(","):
        text = raw.strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise RestspecError(f"--concurrency={spec!r}: {text!r} is not a whole number >= 1")
        if value not in values:
            values.append(value)
    if not values:
        raise RestspecError(f"--concurrency={spec!r} names no client count; e.g. 1,2,4,8,16")
    return values
