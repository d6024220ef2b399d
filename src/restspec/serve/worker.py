"""One generator, up to ``max_batch`` requests at a time, one worker thread each.

The generator verifies concurrent ``stream`` calls together, up to its ``max_batch`` requests per
forward (continuous batching), so the worker runs that many jobs at once, each on a thread of its own
that reads the job's stream; more jobs wait in arrival order. Requests are tokenized and checked before
they queue (see :mod:`restspec.serve.app`); the event loop only moves chunks from the worker to the
client::

    handler ──submit(job)──► job thread (one of max_batch): take the tenant's drafter;
       ▲                       for chunk in generator.stream(..., drafter=...): job.put(chunk)
       │                                  │  (checks job.stop_reason between chunks)
       └──────────── asyncio.Queue ◄──────┘

A job is stopped (:meth:`Job.stop`) when its client goes away, its time runs out or the server shuts
down: its thread stops after the step it is in and closes the generator's stream (which takes the request
out of the batch and ends the drafter's request); the other jobs go on, and the thread takes the next job.
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
from restspec.serve.tenancy import TenantDrafters

RECENT_JOBS_KEPT = 32
"""How many finished jobs :attr:`GenerationWorker.recent` remembers (for debugging and tests)."""

logger = logging.getLogger("restspec.serve")


class Generator(Protocol):
    """What the server needs of a generator (:class:`~restspec.decode.SpeculativeGenerator` has it)."""

    drafter: Any
    tokenizer: Any
    max_batch: int
    """Concurrent ``stream`` calls verified together (the worker runs that many jobs at once)."""

    def encode(self, prompt: Any, chat: bool = False) -> np.ndarray: ...

    def stream(
        self,
        prompt: Any,
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
        drafter: Any = None,
        prefix_scope: Any = None,
    ) -> Any: ...


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
    """What happened to one request on the worker."""

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
    """One request on the worker: the event loop reads chunks, the job's thread writes them."""

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
    progress_at: float = 0.0
    """(job thread) ``time.monotonic()`` of its start or its latest chunk."""

    def put(self, item: Any) -> None:
        """(job thread) Hand an item to the event loop; a closed loop means nobody listens."""
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
    """Runs ``generator.stream`` jobs, up to ``generator.max_batch`` at once (one thread each), so that
    they share the generator's steps; the others wait in arrival order."""

    def __init__(
        self,
        generator: Generator,
        drafters: TenantDrafters,
        metrics: ServerMetrics,
        max_queued: int,
        store: HistoryStore | None = None,
    ) -> None:
        self.generator = generator
        self.drafters = drafters
        self.store = store
        self.metrics = metrics
        self.max_queued = max_queued
        self.max_running = generator.max_batch
        """Jobs that run at once."""
        self._executor = ThreadPoolExecutor(max_workers=self.max_running, thread_name_prefix="restspec-job")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when a job ends
        self._saving = threading.Lock()
        self._queued: list[Job] = []
        self._running: list[Job] = []
        self.recent: collections.deque[JobRecord] = collections.deque(maxlen=RECENT_JOBS_KEPT)
        self._durations: collections.deque[float] = collections.deque(maxlen=RECENT_JOBS_KEPT)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def running(self) -> int:
        """Jobs generating now (at most :attr:`max_running`)."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet started."""
        return len(self._queued)

    def stalled_s(self) -> float:
        """Seconds the running job that has gone longest without a chunk has gone so (0 while idle):
        a wedged worker grows it."""
        with self._lock:
            oldest = min((job.progress_at for job in self._running), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def expected_wait_s(self) -> float:
        """A guess at how long a new request would wait for a place: recent jobs' mean duration for
        every ``max_running`` jobs that must end before it starts."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        ahead = self.queued + self.running - self.max_running + 1
        return mean * max(0, ahead) / self.max_running

    def save_history(self) -> Future[None]:
        """Save the tenants' drafting memory (if there is a store) once no job runs or waits (at
        shutdown, after :meth:`stop_all`); the future is done when it is written. On a thread of its
        own, which a wedged job keeps waiting (it does not keep the process alive)."""
        future: Future[None] = Future()

        def save_when_idle() -> None:
            try:
                with self._changed:
                    self._changed.wait_for(lambda: not self._running and not self._queued)
                self._save_history()
            finally:
                future.set_result(None)

        threading.Thread(target=save_when_idle, name="restspec-save-history", daemon=True).start()
        return future

    def _save_history(self) -> None:
        if self.store is None:
            return
        with self._saving:  # one save at a time (jobs end together)
            try:
                self.store.save(self.drafters.states())
            except Exception:  # a full disk must not stop the serving; the previous file stays intact
                logger.exception("could not save the drafting memory to %s", self.store.path)

    def stop_all(self, reason: StopReason, *, queued_only: bool = False) -> None:
        """Stop the queued jobs (and the running ones unless ``queued_only``) with ``reason``."""
        with self._lock:
            jobs = list(self._queued)
            if not queued_only:
                jobs += self._running
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
        job.progress_at = start = time.monotonic()
        with self._lock:
            self._queued.remove(job)
            self._running.append(job)
        record.started_at = time.time()
        job.started.set()
        last: Any = None  # the result chunk or the failure: handed over once the job has let go
        try:
            if job.stop_reason is None:
                last = self._generate(job)
        except Exception as error:  # handed to the request, which answers it (400 for RestspecError)
            record.error = f"{type(error).__name__}: {error}"
            last = _Failed(error)
        finally:
            if record.error is None and not record.completed:
                record.stopped = job.stop_reason
            record.finished_at = time.time()
            with self._changed:
                self._running.remove(job)
                self.recent.append(record)
                self._durations.append(time.monotonic() - start)
                self._changed.notify_all()
            # only now, so that a client answered from the last item finds its job ended
            if last is not None:
                job.put(last)
            job.put(_END)
        if self.store is not None and self.store.due():
            self._save_history()

    def _generate(self, job: Job) -> StreamChunk | None:
        """Stream the job's chunks to it (all but the last, which carries the result and is returned)
        until it ends or is stopped; the generator's stream is closed (the drafter's request ended)
        before the tenant's drafter is let go."""
        record = job.record
        with self.drafters.drafting(job.tenant) as drafter:
            # a tenant's requests start from its own earlier requests' caches only
            chunks = self.generator.stream(
                job.prompt_ids, job.config, drafter=drafter, prefix_scope=job.tenant
            )
            try:
                for chunk in chunks:
                    now = time.monotonic()
                    self.metrics.chunk(now - job.progress_at, len(chunk.token_ids), first=record.chunks == 0)
                    job.progress_at = now
                    record.chunks += 1
                    record.tokens += len(chunk.token_ids)
                    result = result_of(chunk)
                    record.completed = result is not None
                    if result is not None:
                        self.metrics.cached_prompt_tokens.inc(result.cached_tokens)
                        return chunk
                    job.put(chunk)
                    if job.stop_reason is not None:
                        break
            finally:
                chunks.close()  # ends the drafter's request when we stopped early
        return None


def result_of(chunk: StreamChunk) -> GenerationResult | None:
    """The final result a stream's last chunk carries (``None`` on the others)."""
    return chunk.result
