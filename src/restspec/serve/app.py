"""The OpenAI-compatible HTTP API over one :class:`~restspec.decode.SpeculativeGenerator`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``. Responses have OpenAI's shape plus one
extension field, ``restspec``, with the request's speculative-decoding statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from restspec.decode import GenerationConfig, GenerationResult, SamplingConfig, StreamChunk
from restspec.errors import RestspecError
from restspec.serve.errors import APIError, install_error_handlers, logger
from restspec.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from restspec.serve.worker import ContextLengthError, GenerationWorker, Job, result_of

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""restspec's finish reasons -> OpenAI's (an end-of-sequence token is a natural stop)."""

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.25
"""While waiting for the generator, look this often whether the client is still there."""
CLIENT_CLOSED_REQUEST = 499
"""Status logged for a non-streaming request whose client left before the answer (nginx's code)."""


@dataclass(frozen=True)
class ServerConfig:
    """What the server says about its one model and what it uses for fields a request leaves out."""

    model_id: str
    """The id clients send as ``model`` and ``GET /v1/models`` lists."""
    aliases: tuple[str, ...] = ()
    """Other names accepted as ``model`` (e.g. the ``--model`` spec the server was started with)."""
    defaults: GenerationConfig = field(default_factory=GenerationConfig)
    """``max_new_tokens`` for a request without ``max_tokens``; sampling for omitted sampling fields."""

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id='' must name the served model")

    @property
    def model_ids(self) -> tuple[str, ...]:
        return (self.model_id, *self.aliases)


def context_length_of(generator: Any) -> int | None:
    """The most tokens (prompt + completion) the generator's model takes, if it says."""
    return getattr(getattr(generator, "layout", None), "max_positions", None)


def create_app(generator: Any, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``generator`` (used from one worker thread only)."""
    worker = GenerationWorker(generator)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.cancel_all()

    app = FastAPI(
        lifespan=lifespan,
        title="restspec",
        summary="OpenAI-compatible server with retrieval-based speculative decoding",
    )
    app.state.worker = worker
    app.state.config = config
    install_error_handlers(app)

    max_model_len = context_length_of(generator)

    def model_card(model_id: str) -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "restspec"}
        if max_model_len is not None:
            card["max_model_len"] = max_model_len
        return card

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_id, "busy": worker.busy, "queued": worker.queued}

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
        gen_config = _generation_config(body, config)
        return await _serve(
            request,
            worker,
            config,
            body,
            prompt=body.template_messages(),
            chat=True,
            gen_config=gen_config,
            kind=_CHAT,
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gen_config = _generation_config(body, config)
        prompt = body.prompt_input()
        return await _serve(
            request,
            worker,
            config,
            body,
            prompt=prompt,
            chat=False,
            gen_config=gen_config,
            kind=_Completion(_echo_text(prompt, generator) if body.echo else None),
        )

    return app


def _check_model(requested: str | None, config: ServerConfig) -> None:
    if requested is not None and requested not in config.model_ids:
        raise APIError(
            f"model {requested!r} is not served here; this server has {config.model_id!r} "
            "(see GET /v1/models), or leave out model",
            param="model",
            code="model_not_found",
        )


def _echo_text(prompt: str | list[int], generator: Any) -> Callable[[], str]:
    if isinstance(prompt, str):
        return lambda: prompt
    return lambda: generator.tokenizer.decode(prompt, skip_special_tokens=False)


def _generation_config(body: SamplingRequest, config: ServerConfig) -> GenerationConfig:
    """The request's fields over the server's defaults; invalid combinations are 400s."""
    _check_model(body.model, config)
    defaults = config.defaults
    max_tokens = body.requested_max_tokens()
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


# ---------------------------------------------------------------------------------------------------
# Response shapes


class _Chat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {
            "index": 0,
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

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": self.echo + text, "logprobs": None, "finish_reason": finish_reason}

    def opening_chunk_choice(self) -> dict[str, Any] | None:
        return self.delta_choice(self.echo, None) if self.echo else None

    def delta_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def usage(result: GenerationResult) -> dict[str, int]:
    prompt_tokens = len(result.prompt_ids)
    completion_tokens = len(result.output_ids)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
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


async def _serve(
    request: Request,
    worker: GenerationWorker,
    config: ServerConfig,
    body: SamplingRequest,
    *,
    prompt: Any,
    chat: bool,
    gen_config: GenerationConfig,
    kind: _Chat | _Completion,
) -> Response:
    request_id = kind.id_prefix + uuid.uuid4().hex
    created = int(time.time())
    job = worker.submit(
        prompt, gen_config, chat=chat, job_id=request_id, prompt_param="messages" if chat else "prompt"
    )
    # The first chunk comes after the prompt was checked and prefilled: a bad request is still a 400.
    try:
        first = await _next_chunk(request, job)
    except ContextLengthError as error:
        raise APIError(str(error), param=error.param, code="context_length_exceeded") from error
    except RestspecError as error:
        raise APIError(str(error), code="invalid_request") from error
    except _ClientGone:  # it left while the request was queued or prefilling; nobody reads this
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as error:
        if _is_template_error(error):
            raise APIError(f"the chat template rejected the messages: {error}", param="messages") from error
        raise
    if first is None:  # the server is shutting down
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    if body.stream:
        envelope = {
            "id": request_id,
            "object": kind.chunk_object,
            "created": created,
            "model": config.model_id,
        }
        events = _stream_events(request, first, job, envelope, kind, include_usage=body.include_usage())
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    result = await _drain(request, first, job)
    if result is None:  # the client disconnected; nobody reads this
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(
        {
            "id": request_id,
            "object": kind.object,
            "created": created,
            "model": config.model_id,
            "choices": [kind.choice(result.text, FINISH_REASONS[result.finish_reason])],
            "usage": usage(result),
            "restspec": speculative_stats(result),
        }
    )


async def _drain(request: Request, first: StreamChunk, job: Job) -> GenerationResult | None:
    """Read a job to its result; ``None`` if the client disconnected first (the job is then stopped)."""
    try:
        chunk: StreamChunk | None = first
        while chunk is not None:
            result = result_of(chunk)
            if result is not None:
                await _finish(request, job)
                return result
            if await request.is_disconnected():
                return None
            chunk = await _next_chunk(request, job)
        return None
    except _ClientGone:
        return None
    finally:
        job.cancel()


async def _finish(request: Request, job: Job) -> None:
    """Wait for the job's end after its result (the generator's own clean-up, e.g. the drafter's
    ``stop_request``), so that a client that got its answer finds the server idle."""
    while await _next_chunk(request, job) is not None:
        pass


class _ClientGone(Exception):
    """The client disconnected while we waited for the generator."""


async def _next_chunk(request: Request, job: Job) -> StreamChunk | None:
    """``job.next()``, watching the client while waiting (a queued request or a long prefill can take
    many seconds): raises :class:`_ClientGone`, with the job cancelled, if it disconnects."""
    pending = asyncio.ensure_future(job.next())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if done:
                return pending.result()
            if await request.is_disconnected():
                raise _ClientGone
    finally:
        if not pending.done():
            pending.cancel()
            job.cancel()


async def _stream_events(
    request: Request,
    first: StreamChunk,
    job: Job,
    envelope: dict[str, Any],
    kind: _Chat | _Completion,
    *,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE ``data:`` lines: an opening chunk, one per text delta, a closing chunk with
    ``finish_reason`` (+ ``restspec`` stats), optionally a usage chunk, then ``[DONE]``.

    Leaving early (the client disconnected: starlette cancels us, or ``is_disconnected`` says so
    between chunks) cancels the job, which stops the generation after its current step."""

    def event(choice: dict[str, Any] | None, **extra: Any) -> str:
        payload = {**envelope, "choices": [] if choice is None else [choice]}
        if include_usage:
            payload["usage"] = None
        payload.update(extra)
        return _sse(payload)

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
            if result is not None or await request.is_disconnected():
                break
            chunk = await _next_chunk(request, job)
        if result is None:  # the client disconnected
            return
        await _finish(request, job)
        yield event(
            kind.delta_choice("", FINISH_REASONS[result.finish_reason]), restspec=speculative_stats(result)
        )
        if include_usage:
            yield event(None, usage=usage(result))
    except _ClientGone:
        return
    except Exception as error:  # the status line is sent: report in-band, as OpenAI does
        if isinstance(error, RestspecError):
            message, kind_name = str(error), "invalid_request_error"
        else:
            logger.exception("internal error while streaming %s", envelope["id"])
            message, kind_name = f"internal error: {type(error).__name__}: {error}", "server_error"
        yield _sse({"error": {"message": message, "type": kind_name, "param": None, "code": None}})
    finally:
        job.cancel()
    yield _sse("[DONE]")


def _is_template_error(error: BaseException) -> bool:
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - transformers depends on jinja2 for chat templates
        return False
    return isinstance(error, TemplateError)


def app_for_engine(
    engine: Any, defaults: GenerationConfig, *, model_name: str | None = None, aliases: Sequence[str] = ()
) -> FastAPI:
    """The app for a :class:`restspec.Engine`: its generator, ``defaults`` for omitted request fields,
    the engine's model name (or ``model_name``) as id and ``aliases`` (e.g. the name it was loaded by)."""
    model_id = model_name or engine.name
    config = ServerConfig(
        model_id=model_id,
        aliases=tuple(dict.fromkeys(a for a in (engine.name, *aliases) if a != model_id)),
        defaults=defaults,
    )
    return create_app(engine.generator, config)
