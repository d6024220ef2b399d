"""One generator, one worker thread, one request at a time.

The generator (model, KV cache, drafter state) is not thread-safe, and torch's grad mode is
thread-local, so every call into it happens on a single worker thread. Requests are tokenized and
checked before they queue (see :mod:`restspec.serve.app`), then wait in front of that thread in arrival
order; the event loop only moves chunks from the worker to the client::

    handler ──submit(job)──► worker thread: enter tenant; for chunk in generator.stream(...): job.put(chunk)
       ▲                                          │  (checks job.stop_reason between chunks)
       └──────────── asyncio.Queue ◄──────────────┘

A job is stopped (:meth:`Job.stop`) when its client goes away, its time runs out or the server shuts
down: the worker stops after the step it is in, closes the generator's stream (which ends the drafter's
request) and takes the next job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np

from restspec.decode import GenerationConfig, GenerationResult, StreamChunk
from restspec.serve.metrics import ServerMetrics
from restspec.serve.persist import HistoryStore
from restspec.serve.tenancy import DrafterMemory

RECENT_JOBS_KEPT = 32
"""How many finished jobs :attr:`GenerationWorker.recent` remembers (for debugging and tests)."""

logger = logging.getLogger("restspec.serve")


class Generator(Protocol):
    """What the server needs of a generator (:class:`~restspec.decode.SpeculativeGenerator` has it)."""

    drafter: Any
    tokenizer: Any

    def encode(self, prompt: Any, chat: bool = False) -> np.ndarray: ...

    def stream(self, prompt: Any, config: GenerationConfig | None = None, *, chat: bool = False) -> Any: ...


class StopReason(str, Enum):
    """Why a job was stopped before its generation ended."""

    client = "client"
    """The client disconnected."""
    timeout = "timeout"
    """It ran past the request timeout."""
    shutdown = "shutdown"
    """The server is shutting down."""


class QueueFull(Exception):
    """More requests are waiting than the server admits."""


@dataclass
class JobRecord:
    """What happened to one request on the worker thread."""

    job_id: str
    tenant: str
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    chunks: int = 0
    tokens: int = 0
    completed: bool = False
    """The generator reached its end (eos, stop string or length) and produced its result."""
    stopped: StopReason | None = None
    """Why the worker stopped it early (None: it ran to its end, or failed)."""
    error: str | None = None

    @property
    def cancelled(self) -> bool:
        """Stopped early because its client left."""
        return self.stopped is StopReason.client


@dataclass(eq=False)
class Job:
    """One request on the worker: the event loop reads chunks, the worker thread writes them."""

    prompt_ids: np.ndarray
    """int32[L] the prompt's token ids, checked at admission."""
    config: GenerationConfig
    tenant: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    record: JobRecord
    stop_reason: StopReason | None = None
    started: threading.Event = field(default_factory=threading.Event)
    done: bool = False

    def put(self, item: Any) -> None:
        """(worker thread) Hand an item to the event loop; a closed loop means nobody listens."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop was closed
            self.stop(StopReason.client)

    async def next(self) -> StreamChunk | None:
        """(event loop) The next chunk, ``None`` after the last one; re-raises the generator's error."""
        if self.done:
            return None
        item = await self.queue.get()
        if item is _END:
            self.done = True
            return None
        if isinstance(item, _Failed):
            self.done = True
            raise item.error
        return item

    def stop(self, reason: StopReason) -> None:
        """(any thread) Stop the generation after its current step; the first reason given sticks."""
        if self.stop_reason is None:
            self.stop_reason = reason


class _End:
    """Marks the end of a job's items."""


_END = _End()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class GenerationWorker:
    """Runs ``generator.stream`` jobs one at a time on a dedicated worker thread."""

    def __init__(
        self,
        generator: Generator,
        memory: DrafterMemory,
        metrics: ServerMetrics,
        max_queued: int,
        store: HistoryStore | None = None,
    ) -> None:
        self.generator = generator
        self.memory = memory
        self.store = store
        self.metrics = metrics
        self.max_queued = max_queued
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="restspec-generate")
        self._lock = threading.Lock()
        self._queued: list[Job] = []
        self._running: Job | None = None
        self._progress_at = time.monotonic()
        self.recent: collections.deque[JobRecord] = collections.deque(maxlen=RECENT_JOBS_KEPT)
        self._durations: collections.deque[float] = collections.deque(maxlen=RECENT_JOBS_KEPT)

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet started."""
        return len(self._queued)

    def stalled_s(self) -> float:
        """Seconds the running job has gone without a chunk (0 while idle): a wedged worker grows it."""
        return time.monotonic() - self._progress_at if self.busy else 0.0

    def expected_wait_s(self) -> float:
        """A guess at how long a new request would wait: recent jobs' mean duration times those ahead."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return mean * (self.queued + self.busy)

    def save_history(self) -> Future[None]:
        """Save the tenants' drafting memory (if there is a store) on the worker thread, after the
        jobs submitted before; the future is done when it is written."""
        return self._executor.submit(self._save_history)

    def _save_history(self) -> None:
        if self.store is None:
            return
        try:
            self.store.save(self.memory.states())
        except Exception:  # a full disk must not stop the serving; the previous file stays intact
            logger.exception("could not save the drafting memory to %s", self.store.path)

    def stop_all(self, reason: StopReason, *, queued_only: bool = False) -> None:
        """Stop the queued jobs (and the running one unless ``queued_only``) with ``reason``."""
        with self._lock:
            jobs = list(self._queued)
            if self._running is not None and not queued_only:
                jobs.append(self._running)
        for job in jobs:
            job.stop(reason)

    def submit(self, prompt_ids: np.ndarray, config: GenerationConfig, *, tenant: str, job_id: str) -> Job:
        """Queue one request (raises :class:`QueueFull` when ``max_queued`` wait already); read its
        chunks with :meth:`Job.next`, stop it with :meth:`Job.stop`. Call from the event loop that reads."""
        job = Job(
            prompt_ids,
            config,
            tenant,
            asyncio.get_running_loop(),
            asyncio.Queue(),
            JobRecord(job_id, tenant, time.time()),
        )
        with self._lock:
            if len(self._queued) >= self.max_queued:
                raise QueueFull
            self._queued.append(job)
        self._executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        record = job.record
        with self._lock:
            self._queued.remove(job)
            self._running = job
        self._progress_at = start = time.monotonic()
        record.started_at = time.time()
        job.started.set()
        chunks = None
        last: Any = None  # the result chunk or the failure: handed over once the worker is free again
        try:
            if job.stop_reason is not None:
                return
            self.memory.enter(job.tenant)
            chunks = self.generator.stream(job.prompt_ids, job.config)
            for chunk in chunks:
                now = time.monotonic()
                self.metrics.chunk(now - self._progress_at, len(chunk.token_ids), first=record.chunks == 0)
                self._progress_at = now
                record.chunks += 1
                record.tokens += len(chunk.token_ids)
                record.completed = result_of(chunk) is not None
                if record.completed:
                    last = chunk
                    continue
                job.put(chunk)
                if job.stop_reason is not None:
                    break
        except Exception as error:  # handed to the request, which answers it (400 for RestspecError)
            record.error = f"{type(error).__name__}: {error}"
            last = _Failed(error)
        finally:
            if chunks is not None:
                chunks.close()  # ends the drafter's request when we stopped early
            if record.error is None and not record.completed:
                record.stopped = job.stop_reason
            record.finished_at = time.time()
            with self._lock:
                self._running = None
                self.recent.append(record)
                self._durations.append(time.monotonic() - start)
            self._progress_at = time.monotonic()
            # only now, so that a client answered from the last item finds the server idle
            if last is not None:
                job.put(last)
            job.put(_END)
        if self.store is not None and self.store.due():
            self._save_history()


def result_of(chunk: StreamChunk) -> GenerationResult | None:
    """The final result a stream's last chunk carries (``None`` on the others)."""
    return chunk.result
