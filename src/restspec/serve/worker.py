"""One generator, one worker thread, one request at a time.

The generator (model, KV cache, drafter state) is not thread-safe, and torch's grad mode is
thread-local, so every call into it happens on a single worker thread. Requests queue in front of
that thread in arrival order; the event loop only moves chunks from the worker to the client::

    handler ──submit(job)──► worker thread: for chunk in generator.stream(...): job.put(chunk)
       ▲                                          │  (checks job.cancelled between chunks)
       └──────────── asyncio.Queue ◄──────────────┘

A client that goes away sets ``job.cancelled``: the worker stops after the step it is in, closes the
generator's stream (which ends the drafter's request) and takes the next job.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from restspec.decode import GenerationConfig, GenerationResult, StreamChunk
from restspec.errors import GenerationError

RECENT_JOBS_KEPT = 32
"""How many finished jobs :attr:`GenerationWorker.recent` remembers (for debugging and tests)."""


class ContextLengthError(GenerationError):
    """The prompt leaves no room for the completion in the model's context."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_context_length(prompt_tokens: int, generator: Any, param: str) -> None:
    """Raise :class:`ContextLengthError` if ``prompt_tokens`` leave no room for one generated token."""
    context = getattr(getattr(generator, "layout", None), "max_positions", None)
    if context is not None and prompt_tokens >= context:
        what = "prompt built from the messages" if param == "messages" else "prompt"
        raise ContextLengthError(
            f"this model's maximum context length is {context} tokens, but the {what} has {prompt_tokens} "
            f"tokens; shorten it to at most {context - 1} tokens (fewer leave more room for the completion)",
            param,
        )


@dataclass
class JobRecord:
    """What happened to one request on the worker thread."""

    job_id: str
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    chunks: int = 0
    tokens: int = 0
    completed: bool = False
    """The generator reached its end (eos, stop string or length) and produced its result."""
    cancelled: bool = False
    """The client left before the generation ended, and the worker stopped it."""
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One request on the worker: the event loop reads chunks, the worker thread writes them."""

    prompt: str | list[dict[str, str]] | Sequence[int]
    config: GenerationConfig
    chat: bool
    prompt_param: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    record: JobRecord
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False

    def put(self, item: Any) -> None:
        """(worker thread) Hand an item to the event loop; a closed loop means nobody listens."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop was closed
            self.cancelled.set()

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

    def cancel(self) -> None:
        """(any thread) Stop the generation after its current step; safe to call more than once."""
        self.cancelled.set()


class _End:
    """Marks the end of a job's items."""


_END = _End()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class GenerationWorker:
    """Runs ``generator.stream`` jobs one at a time on a dedicated worker thread."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="restspec-generate")
        self._lock = threading.Lock()
        self._pending = 0
        self._running: JobRecord | None = None
        self._live: set[Job] = set()
        self.recent: collections.deque[JobRecord] = collections.deque(maxlen=RECENT_JOBS_KEPT)

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet started."""
        return self._pending

    def cancel_all(self) -> None:
        """Stop the running job after its current step and drop the queued ones (server shutdown)."""
        with self._lock:
            live = list(self._live)
        for job in live:
            job.cancel()

    def submit(
        self,
        prompt: str | list[dict[str, str]] | Sequence[int],
        config: GenerationConfig,
        *,
        chat: bool,
        job_id: str,
        prompt_param: str = "prompt",
    ) -> Job:
        """Queue one request; read its chunks with :meth:`Job.next`, stop it with :meth:`Job.cancel`.
        Must be called from the event loop that will read the chunks."""
        job = Job(
            prompt,
            config,
            chat,
            prompt_param,
            asyncio.get_running_loop(),
            asyncio.Queue(),
            JobRecord(job_id, time.time()),
        )
        with self._lock:
            self._pending += 1
            self._live.add(job)
        self._executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        record = job.record
        with self._lock:
            self._pending -= 1
            self._running = record
        record.started_at = time.time()
        chunks = None
        last: Any = None  # the result chunk or the failure: handed over once the worker is free again
        try:
            if job.cancelled.is_set():
                return
            prompt, chat = job.prompt, job.chat
            encode = getattr(self.generator, "encode", None)
            if encode is not None:  # tokenize here, on the worker thread, to check the length first
                prompt, chat = encode(prompt, chat), False
                check_context_length(len(prompt), self.generator, job.prompt_param)
            chunks = self.generator.stream(prompt, job.config, chat=chat)
            for chunk in chunks:
                record.chunks += 1
                record.tokens += len(chunk.token_ids)
                record.completed = result_of(chunk) is not None
                if record.completed:
                    last = chunk
                    continue
                job.put(chunk)
                if job.cancelled.is_set():
                    break
        except Exception as error:  # handed to the request, which answers it (400 for RestspecError)
            record.error = f"{type(error).__name__}: {error}"
            last = _Failed(error)
        finally:
            if chunks is not None:
                chunks.close()  # ends the drafter's request when we stopped early
            record.cancelled = job.cancelled.is_set() and record.error is None and not record.completed
            record.finished_at = time.time()
            with self._lock:
                self._running = None
                self._live.discard(job)
                self.recent.append(record)
            # only now, so that a client answered from the last item finds the server idle
            if last is not None:
                job.put(last)
            job.put(_END)


def result_of(chunk: StreamChunk) -> GenerationResult | None:
    """The final result a stream's last chunk carries (``None`` on the others)."""
    return chunk.result
