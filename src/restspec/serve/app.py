"""The OpenAI-compatible HTTP API over one :class:`~restspec.decode.SpeculativeGenerator`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /metrics`` (Prometheus), ``GET /health`` (liveness),
``GET /ready`` (readiness). Responses have OpenAI's shape; a request that sends ``restspec_stats: true``
also gets the extension field ``restspec`` with its speculative-decoding figures.

A request is admitted in the event loop and a tokenizing thread, never on the generation worker: the
model and the limits are checked, the prompt is tokenized and measured, and only then does it queue
(a full queue is a 503). From then on it is ended by its client leaving, by ``request_timeout_s`` or by
a shutdown (:meth:`Lifecycle.begin_shutdown`), each answered in OpenAI's error shape: in-band and
followed by ``[DONE]`` once a stream has started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from restspec.decode import GenerationConfig, GenerationResult, SamplingConfig, StreamChunk
from restspec.errors import RestspecError
from restspec.serve.config import AccessConfig, HistoryMode, ServerLimits
from restspec.serve.errors import SERVER_ERROR, APIError, install_error_handlers, internal_error, logger
from restspec.serve.metrics import ServerMetrics
from restspec.serve.middleware import BearerAuth, BodyLimit, JSONBodies
from restspec.serve.persist import HistoryFileError, HistoryStore, load_states
from restspec.serve.schemas import MAX_SEED, ChatCompletionRequest, CompletionRequest, SamplingRequest
from restspec.serve.tenancy import TenantDrafters, tenant_of
from restspec.serve.worker import GenerationWorker, Generator, Job, QueueFull, StopReason, result_of

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""restspec's finish reasons -> OpenAI's (an end-of-sequence token is a natural stop)."""

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.25
"""While waiting for the generator, look this often whether the client is still there (and the
request's time and the server's shutdown)."""
CLIENT_CLOSED_REQUEST = 499
"""Status logged for a non-streaming request whose client left before the answer (nginx's code)."""
MAX_RETRY_AFTER_S = 60
"""Cap of the ``Retry-After`` a full queue answers with (the wait is estimated from recent requests)."""
SAVE_AT_EXIT_TIMEOUT_S = 30.0
"""At shutdown, how long to wait for the worker to save the drafting memory (a wedged one never does)."""


@dataclass(frozen=True)
class ServerConfig:
    """What the server says about its one model, its defaults for omitted fields, and its deployment."""

    model_id: str
    """The id clients send as ``model`` and ``GET /v1/models`` lists."""
    aliases: tuple[str, ...] = ()
    """Other names accepted as ``model`` (e.g. the ``--model`` spec the server was started with)."""
    defaults: GenerationConfig = field(default_factory=GenerationConfig)
    """``max_new_tokens`` for a request without ``max_tokens``; sampling for omitted sampling fields."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    """Queue, timeout, size and length limits."""
    access: AccessConfig = field(default_factory=AccessConfig)
    """API keys and CORS origins."""
    history: HistoryMode = HistoryMode.tenant
    """Whose past outputs draft for whom."""
    history_file: Path | None = None
    """Where the drafting memory is saved (periodically and at shutdown) and read at startup; None = kept
    in memory only."""
    history_save_s: float = 300.0
    """How often the drafting memory is saved to ``history_file`` (between requests)."""

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id='' must name the served model")
        if self.history_file is not None and self.history is HistoryMode.off:
            raise ValueError("a history file with history 'off' would save nothing; leave out one of them")
        if not self.history_save_s > 0:
            raise ValueError(f"history_save_s={self.history_save_s} must be > 0 seconds")
        if self.defaults.max_new_tokens > self.limits.max_tokens_limit:
            raise ValueError(
                f"the default max_new_tokens={self.defaults.max_new_tokens} is above "
                f"max_tokens_limit={self.limits.max_tokens_limit}; lower one or raise the other"
            )

    @property
    def model_ids(self) -> tuple[str, ...]:
        return (self.model_id, *self.aliases)


def context_length_of(generator: Any) -> int | None:
    """The most tokens (prompt + completion) the generator's model takes, if it says."""
    return getattr(getattr(generator, "layout", None), "max_positions", None)


class Lifecycle:
    """Admitting, or shutting down: :meth:`begin_shutdown` (any thread) stops admitting, refuses the
    queued requests and, after the grace period, ends the running ones."""

    def __init__(self, worker: GenerationWorker) -> None:
        self.worker = worker
        self.draining = False
        self._timer: threading.Timer | None = None

    def begin_shutdown(self, grace_s: float) -> None:
        if self.draining:
            return
        self.draining = True
        self.worker.stop_all(StopReason.shutdown, queued_only=True)
        self._timer = threading.Timer(grace_s, self.worker.stop_all, args=(StopReason.shutdown,))
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.worker.stop_all(StopReason.shutdown)


ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
"""``endpoint`` label of the request metrics (other paths count as ``other``)."""


def endpoint_of(path: str) -> str:
    return ENDPOINTS.get(path, "other")


def create_app(
    generator: Generator, config: ServerConfig, *, new_drafter: Callable[[], Any] | None = None
) -> FastAPI:
    """The FastAPI app serving ``generator``: up to ``generator.max_batch`` requests at once, each
    drafting with its tenant's drafter. ``generator.drafter`` is the first; ``new_drafter`` builds one
    more (of the same kind: each is loaded with a tenant's state) for every other tenant running at the
    same time, needed unless ``max_batch`` is 1 or the history is shared."""
    limits = config.limits
    metrics = ServerMetrics(
        queue_depth=lambda: worker.queued, running=lambda: worker.running, max_batch=generator.max_batch
    )
    drafters = TenantDrafters(
        generator.drafter,
        config.history,
        limits.tenants,
        slots=generator.max_batch,
        new_drafter=new_drafter,
    )
    store = None
    if config.history_file is not None:
        store = HistoryStore(config.history_file, config.history_save_s)
        if store.path.exists():
            restore_history(drafters, store.path)
    worker = GenerationWorker(generator, drafters, metrics, limits.max_queued, store)
    lifecycle = Lifecycle(worker)
    admission = ThreadPoolExecutor(max_workers=1, thread_name_prefix="restspec-admit")
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        lifecycle.close()
        if store is not None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(worker.save_history()), SAVE_AT_EXIT_TIMEOUT_S)
            except asyncio.TimeoutError:  # Python 3.10: not yet the builtin one
                logger.error(
                    "the worker did not save the drafting memory within %s s", SAVE_AT_EXIT_TIMEOUT_S
                )

    app = FastAPI(
        lifespan=lifespan,
        title="restspec",
        summary="OpenAI-compatible server with retrieval-based speculative decoding",
    )
    app.state.worker = worker
    app.state.config = config
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.drafters = drafters

    def count_rejection(path: str, status: int, code: str | None) -> None:
        metrics.rejected(endpoint_of(path), status, code)

    install_error_handlers(app, on_error=count_rejection)
    # the last added runs first: CORS answers preflights, then the size limit, then the key
    app.add_middleware(JSONBodies)
    if config.access.api_keys:
        app.add_middleware(BearerAuth, keys=config.access.api_keys, on_reject=count_rejection)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, on_reject=count_rejection)
    if config.access.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.access.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )

    max_model_len = context_length_of(generator)
    server = _Server(generator, worker, lifecycle, metrics, config, admission, max_model_len)

    def model_card(model_id: str) -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "restspec"}
        if max_model_len is not None:
            card["max_model_len"] = max_model_len
        return card

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: every running request made progress within ``stall_after_s``."""
        stalled = worker.stalled_s()
        body = {
            "status": "ok",
            "model": config.model_id,
            "busy": worker.busy,
            "running": worker.running,
            "queued": worker.queued,
        }
        if stalled > limits.stall_after_s:
            body |= {"status": "stalled", "stalled_seconds": round(stalled, 1)}
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded (this app exists), and it admits requests now."""
        if lifecycle.draining:
            status = "shutting_down"
        elif worker.stalled_s() > limits.stall_after_s:
            status = "stalled"
        elif worker.queued >= limits.max_queued:
            status = "queue_full"
        else:
            return JSONResponse({"status": "ready", "model": config.model_id})
        return JSONResponse({"status": status, "model": config.model_id}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(config.model_id)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in config.model_ids:
            raise APIError(
                f"model {model_id!r} is not served here; this server has {config.model_id!r}",
                status=404,
                param="model",
                code="model_not_found",
            )
        return model_card(config.model_id)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.serve(request, body, body.template_messages(), chat=True, kind=_CHAT)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt_input()
        kind = _Completion(_echo_text(prompt, generator) if body.echo else None)
        return await server.serve(request, body, prompt, chat=False, kind=kind)

    return app


def restore_history(drafters: TenantDrafters, path: Path) -> None:
    """Continue from the drafting memory saved in ``path``; :class:`HistoryFileError` if it does not fit."""
    try:
        drafters.restore(load_states(path))
    except ValueError as error:
        raise HistoryFileError(
            f"history file {str(path)!r} does not fit this drafter ({error}); it was saved with another "
            "model, datastores or drafter: delete it or give another --history-file"
        ) from None


def _echo_text(prompt: str | list[int], generator: Generator) -> Callable[[], str]:
    if isinstance(prompt, str):
        return lambda: prompt
    return lambda: generator.tokenizer.decode(prompt, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------------
# Response shapes


class _Chat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, text: str, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    def opening_chunk_choice(self) -> dict[str, Any] | None:
        return {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def delta_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


_CHAT = _Chat()


class _Completion:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, echo: Callable[[], str] | None) -> None:
        self._echo = echo

    @functools.cached_property
    def echo(self) -> str:
        """The prompt's text for ``echo``; computed after the prompt was accepted (ids are valid)."""
        return self._echo() if self._echo is not None else ""

    def choice(self, text: str, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
        return {"index": index, "text": self.echo + text, "logprobs": None, "finish_reason": finish_reason}

    def opening_chunk_choice(self) -> dict[str, Any] | None:
        return self.delta_choice(self.echo, None) if self.echo else None

    def delta_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def usage(results: Sequence[GenerationResult]) -> dict[str, Any]:
    """Tokens of one request: its prompt once (and how many of them an earlier request's cache held,
    as OpenAI reports ``cached_tokens``), the completions of all its choices."""
    prompt_tokens = len(results[0].prompt_ids)
    completion_tokens = sum(len(result.output_ids) for result in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens},
    }


def speculative_stats(result: GenerationResult) -> dict[str, Any]:
    """The ``restspec`` extension field: how speculation went for this request."""
    return {
        "mean_accepted_tokens_per_step": float(result.mean_accepted),
        "tokens_per_second": float(result.tokens_per_s),
        "steps": len(result.steps),
        "draft_tokens": int(sum(s.drafted for s in result.steps)),
        "accepted_draft_tokens": int(sum(s.accepted for s in result.steps)),
        "prefill_seconds": float(result.prefill_s),
        "elapsed_seconds": float(result.elapsed_s),
    }


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


# ---------------------------------------------------------------------------------------------------
# Serving one request


class _Ended(Exception):
    """The job was stopped before its end (``reason``): the client left, its time ran out, or shutdown."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


ENDED_ERRORS = {
    StopReason.timeout: (
        504,
        "request_timeout",
        "the request ran longer than this server's limit of {timeout} s (--request-timeout); "
        "ask for fewer tokens or retry later",
    ),
    StopReason.shutdown: (
        503,
        "server_shutting_down",
        "the server is shutting down and ended this request; retry (on another replica)",
    ),
}
"""Status, code and message of a request ended by the server (``{timeout}`` is the limit)."""


class _Server:
    """Admission, generation and answers of the completion endpoints."""

    def __init__(
        self,
        generator: Generator,
        worker: GenerationWorker,
        lifecycle: Lifecycle,
        metrics: ServerMetrics,
        config: ServerConfig,
        admission: ThreadPoolExecutor,
        context_length: int | None,
    ) -> None:
        self.generator = generator
        self.worker = worker
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.config = config
        self.admission = admission
        self.context_length = context_length

    def ended_error(self, reason: StopReason) -> APIError:
        status, code, message = ENDED_ERRORS[reason]
        return APIError(
            message.format(timeout=self.config.limits.request_timeout_s),
            status=status,
            type=SERVER_ERROR,
            code=code,
        )

    async def serve(
        self, request: Request, body: SamplingRequest, prompt: Any, *, chat: bool, kind: _Chat | _Completion
    ) -> Response:
        arrived = time.monotonic()
        endpoint = endpoint_of(request.url.path)
        if self.lifecycle.draining:
            raise self.ended_error(StopReason.shutdown)
        gen_config = self.generation_config(body)
        prompt_param = "messages" if chat else "prompt"
        prompt_ids = await asyncio.get_running_loop().run_in_executor(
            self.admission, self.admit, prompt, chat, prompt_param
        )
        tenant = tenant_of(getattr(request.state, "api_key", None), body.user)
        request_id = kind.id_prefix + uuid.uuid4().hex
        jobs = self.submit(prompt_ids, gen_config, tenant, request_id, body.choices())
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        timeout = self.config.limits.request_timeout_s
        deadline = None if timeout is None else arrived + timeout
        watches = [_Watch(request, job, deadline) for job in jobs]
        created = int(time.time())
        stats = body.restspec_stats
        streaming = False
        try:
            if body.stream:  # one job (the schema allows no more)
                first = await watches[0].first()
                streaming = True
            else:
                results = await _all_results(watches)
        except _Ended as ended:
            if ended.reason is StopReason.client:  # nobody reads this
                self.metrics.request(endpoint, "cancelled")
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            raise self.ended_error(ended.reason) from None
        except RestspecError as error:
            raise APIError(str(error), code="invalid_request") from error
        finally:
            if not streaming:  # the stream's own events stop its job when they end
                for job in jobs:
                    job.stop(StopReason.client)  # a no-op once it ended

        if body.stream:
            envelope = {"id": request_id, "object": kind.chunk_object, "created": created}
            envelope["model"] = self.config.model_id
            events = self.stream_events(
                watches[0], first, envelope, kind, endpoint, include_usage=body.include_usage(), stats=stats
            )
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

        self.metrics.request(endpoint, "completed")
        answer = {
            "id": request_id,
            "object": kind.object,
            "created": created,
            "model": self.config.model_id,
            "choices": [
                kind.choice(result.text, FINISH_REASONS[result.finish_reason], index)
                for index, result in enumerate(results)
            ],
            "usage": usage(results),
        }
        if stats:
            figures = [speculative_stats(result) for result in results]
            answer["restspec"] = figures[0] if len(figures) == 1 else figures
        return JSONResponse(answer)

    def submit(
        self, prompt_ids: np.ndarray, config: GenerationConfig, tenant: str, request_id: str, n: int
    ) -> list[Job]:
        """Queue ``n`` jobs for one request (with a seed, job i samples with seed + i); a full queue
        stops those already queued and is a 503; more than the queue ever holds is a 400."""
        if n > self.worker.max_queued:  # would be queue_full however long the client waited
            raise APIError(
                f"n={n} completions are more than this server queues at once (--max-queued "
                f"{self.worker.max_queued}); ask for at most {self.worker.max_queued}",
                param="n",
                code="invalid_value",
            )
        jobs: list[Job] = []
        seed = config.sampling.seed
        for index in range(n):
            if index and seed is not None:
                sampling = replace(config.sampling, seed=(seed + index) % (MAX_SEED + 1))
                config = replace(config, sampling=sampling)
            job_id = request_id if n == 1 else f"{request_id}-{index}"
            try:
                jobs.append(self.worker.submit(prompt_ids, config, tenant=tenant, job_id=job_id))
            except QueueFull:
                for job in jobs:
                    job.stop(StopReason.client)
                retry_after = min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.worker.expected_wait_s())))
                raise APIError(
                    f"the server is busy: {self.worker.queued} requests are waiting (--max-queued); "
                    f"retry in about {retry_after} s",
                    status=503,
                    type=SERVER_ERROR,
                    code="queue_full",
                    headers={"Retry-After": str(retry_after)},
                ) from None
        return jobs

    def generation_config(self, body: SamplingRequest) -> GenerationConfig:
        """The request's fields over the server's defaults; invalid combinations and values past the
        server's limits are 400s."""
        self.check_model(body.model)
        limits = self.config.limits
        defaults = self.config.defaults
        max_tokens = body.requested_max_tokens()
        if max_tokens is not None and max_tokens > limits.max_tokens_limit:
            raise APIError(
                f"max_tokens={max_tokens} is above this server's limit of {limits.max_tokens_limit} "
                "(--max-tokens-limit); ask for fewer",
                param=body.max_tokens_param(),
                code="invalid_value",
            )
        for stop in body.stop_strings():
            if len(stop) > limits.max_stop_chars:
                raise APIError(
                    f"a stop string of {len(stop)} characters: this server takes at most "
                    f"{limits.max_stop_chars} per stop string",
                    param="stop",
                    code="invalid_value",
                )
        sampling = defaults.sampling
        try:
            sampling = SamplingConfig(
                temperature=sampling.temperature if body.temperature is None else body.temperature,
                top_p=sampling.top_p if body.top_p is None else body.top_p,
                top_k=sampling.top_k if body.top_k is None else body.top_k,
                seed=sampling.seed if body.seed is None else body.seed,
            )
            return replace(
                defaults,
                max_new_tokens=defaults.max_new_tokens if max_tokens is None else max_tokens,
                sampling=sampling,
                stop_strings=body.stop_strings(),
            )
        except (ValueError, RestspecError) as error:
            raise APIError(str(error), code="invalid_value") from error

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested not in self.config.model_ids:
            raise APIError(
                f"model {requested!r} is not served here; this server has {self.config.model_id!r} "
                "(see GET /v1/models), or leave out model",
                param="model",
                code="model_not_found",
            )

    def admit(self, prompt: Any, chat: bool, param: str) -> np.ndarray:
        """(admission thread) The prompt's token ids, checked against the context and the prompt limit."""
        try:
            ids = self.generator.encode(prompt, chat)
        except RestspecError as error:  # an empty prompt, a token id past the vocabulary
            raise APIError(str(error), param=param, code="invalid_value") from error
        except Exception as error:
            if _is_template_error(error):
                raise APIError(
                    f"the chat template rejected the messages: {error}", param=param, code="invalid_value"
                ) from error
            raise
        what = "prompt built from the messages" if chat else "prompt"
        context = self.context_length
        if context is not None and len(ids) >= context:
            raise APIError(
                f"this model's maximum context length is {context} tokens, but the {what} has {len(ids)} "
                f"tokens; shorten it to at most {context - 1} tokens (fewer leave more room for the "
                "completion)",
                param=param,
                code="context_length_exceeded",
            )
        limit = self.config.limits.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise APIError(
                f"the {what} has {len(ids)} tokens; this server takes at most {limit} (--max-prompt-tokens)",
                param=param,
                code="prompt_too_long",
            )
        return ids

    async def stream_events(
        self,
        watch: _Watch,
        first: StreamChunk,
        envelope: dict[str, Any],
        kind: _Chat | _Completion,
        endpoint: str,
        *,
        include_usage: bool,
        stats: bool,
    ) -> AsyncIterator[str]:
        """SSE ``data:`` lines: an opening chunk, one per text delta, a closing chunk with
        ``finish_reason`` (+ ``restspec`` figures if asked), optionally a usage chunk, then ``[DONE]``.

        A client that leaves (starlette cancels us, or ``is_disconnected`` says so between chunks) stops
        the job after its current step. A stream the server ends (timeout, shutdown, a bug) gets an
        ``error`` event, then ``[DONE]``."""

        def event(choice: dict[str, Any] | None, **extra: Any) -> str:
            payload = {**envelope, "choices": [] if choice is None else [choice]}
            if include_usage:
                payload["usage"] = None
            payload.update(extra)
            return _sse(payload)

        outcome = "cancelled"
        try:
            opening = kind.opening_chunk_choice()
            if opening is not None:
                yield event(opening)
            chunk: StreamChunk | None = first
            result = None
            while chunk is not None:
                if chunk.text:
                    yield event(kind.delta_choice(chunk.text, None))
                result = result_of(chunk)
                if result is not None:
                    break
                chunk = await watch.next_chunk()
            if result is None:
                raise _Ended(watch.stopped())
            await watch.finish()
            extra = {"restspec": speculative_stats(result)} if stats else {}
            yield event(kind.delta_choice("", FINISH_REASONS[result.finish_reason]), **extra)
            if include_usage:
                yield event(None, usage=usage([result]))
            outcome = "completed"
        except _Ended as ended:
            if ended.reason is StopReason.client:
                return
            outcome = ended.reason.value
            yield _sse(self.ended_error(ended.reason).body())
        except Exception as error:  # the status line is sent: report in-band, as OpenAI does
            if isinstance(error, RestspecError):
                outcome = "invalid"
                failure = APIError(str(error), code="invalid_request")
            else:
                outcome = "error"
                failure = internal_error(f"streaming {envelope['id']}")
            yield _sse(failure.body())
        finally:
            watch.job.stop(StopReason.client)  # a no-op once it ended
            self.metrics.request(endpoint, outcome)
        yield _sse("[DONE]")


class _Watch:
    """Reads a job's chunks while watching its client, its deadline and the server's shutdown."""

    def __init__(self, request: Request, job: Job, deadline: float | None) -> None:
        self.request = request
        self.job = job
        self.deadline = deadline

    def stopped(self) -> StopReason:
        """Why the job ended without a result (its stop reason; a job stopped by nobody lost its loop)."""
        return self.job.stop_reason or StopReason.client

    async def next_chunk(self) -> StreamChunk | None:
        """``job.next()``; raises :class:`_Ended` (the job stopped) when the client leaves, the deadline
        passes or the server ends the job while waiting, without waiting for a wedged worker."""
        pending = asyncio.ensure_future(self.job.next())
        try:
            while True:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.job.stop(StopReason.timeout)
                if self.job.stop_reason in (StopReason.timeout, StopReason.shutdown):
                    raise _Ended(self.job.stop_reason)
                wait_s = DISCONNECT_POLL_S
                if self.deadline is not None:
                    wait_s = max(0.0, min(wait_s, self.deadline - time.monotonic()))
                done, _ = await asyncio.wait({pending}, timeout=wait_s)
                if done:
                    return pending.result()
                if await self.request.is_disconnected():
                    self.job.stop(StopReason.client)
                    raise _Ended(StopReason.client)
        finally:
            if not pending.done():
                pending.cancel()

    async def first(self) -> StreamChunk:
        """The job's first chunk, which comes after the prefill (raises :class:`_Ended` if it stops
        first)."""
        chunk = await self.next_chunk()
        if chunk is None:
            raise _Ended(self.stopped())
        return chunk

    async def result(self) -> GenerationResult:
        """Read the job from its first chunk to its result (raises :class:`_Ended` if it stops first)."""
        return await self.drain(await self.first())

    async def drain(self, first: StreamChunk) -> GenerationResult:
        """Read the job to its result (raises :class:`_Ended` if it stops first)."""
        chunk: StreamChunk | None = first
        while chunk is not None:
            result = result_of(chunk)
            if result is not None:
                await self.finish()
                return result
            if await self.request.is_disconnected():
                self.job.stop(StopReason.client)
                raise _Ended(StopReason.client)
            chunk = await self.next_chunk()
        raise _Ended(self.stopped())

    async def finish(self) -> None:
        """Wait for the job's end after its result (the generator's own clean-up, e.g. the drafter's
        ``stop_request``), so that a client that got its answer finds the server idle."""
        with contextlib.suppress(_Ended):
            while await self.next_chunk() is not None:
                pass


async def _all_results(watches: Sequence[_Watch]) -> list[GenerationResult]:
    """Every job's result, read side by side; the first to stop without one raises, and the others'
    reading is cancelled (the caller stops their jobs)."""
    tasks = [asyncio.ensure_future(watch.result()) for watch in watches]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved, so a second failure is not logged as never retrieved


def _is_template_error(error: BaseException) -> bool:
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - transformers depends on jinja2 for chat templates
        return False
    return isinstance(error, TemplateError)


def app_for_engine(
    engine: Any,
    defaults: GenerationConfig,
    *,
    model_name: str | None = None,
    aliases: Sequence[str] = (),
    limits: ServerLimits | None = None,
    access: AccessConfig | None = None,
    history: HistoryMode = HistoryMode.tenant,
    history_file: Path | None = None,
) -> FastAPI:
    """The app for a :class:`restspec.Engine`: its generator (up to the engine's ``max_batch`` requests
    at once; tenants' drafters built by ``engine.new_drafter``), ``defaults`` for omitted request fields,
    the engine's model name (or ``model_name``) as id and ``aliases`` (e.g. the name it was loaded by)."""
    model_id = model_name or engine.name
    config = ServerConfig(
        model_id=model_id,
        aliases=tuple(dict.fromkeys(a for a in (engine.name, *aliases) if a != model_id)),
        defaults=defaults,
        limits=limits or ServerLimits(),
        access=access or AccessConfig(),
        history=history,
        history_file=history_file,
    )
    return create_app(engine.generator, config, new_drafter=engine.new_drafter)
