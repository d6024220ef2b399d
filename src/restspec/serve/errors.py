"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Bad input is a 400 (``invalid_request_error``) whose message says what was wrong and, where it helps,
what to send instead; only bugs are 500s (``server_error``). A bug's text never reaches the client: it is
logged with its traceback under an id, and the client gets the id to quote.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from restspec.errors import RestspecError
from restspec.serve.schemas import UnsupportedValue

logger = logging.getLogger("restspec.serve")

INVALID_REQUEST = "invalid_request_error"
BODY_PARSE_ERROR = "There was an error parsing the body"
"""FastAPI's answer to a body it could not read as JSON other than a syntax error (bytes not UTF-8)."""
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error answered in OpenAI's shape with the given HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def internal_error(context: str) -> APIError:
    """Log the exception being handled (with its traceback) under a new id; the 500 that names only the id."""
    error_id = "err-" + uuid.uuid4().hex[:12]
    logger.exception("internal error %s (%s)", error_id, context)
    return APIError(
        f"internal error {error_id}; the server's log has the details under that id",
        status=500,
        type=SERVER_ERROR,
        code="internal_error",
    )


_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|list|dict|[\w-]+\[.*\])$")
"""pydantic names the member of a union it tried inside ``loc`` (``"str"``, ``"list[TextPart]"``);
our fields never have such names, so they are dropped from ``param``."""


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages[0].content"``."""
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and _UNION_BRANCH.match(p))]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        else:
            out += f".{part}"
    return out or None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """One 400 that lists every problem pydantic found (one clause per field), ``param`` naming the first."""
    by_param: dict[str | None, list[str]] = {}
    inputs: dict[str | None, Any] = {}
    code = None
    for err in errors:
        cause = err.get("ctx", {}).get("error")
        kind = err.get("type")
        if isinstance(cause, UnsupportedValue):
            param, msg, kind = cause.param, str(cause), "unsupported_value"
        elif kind == "json_invalid":
            param, msg = (
                None,
                f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}",
            )
        elif kind == "missing" and tuple(err.get("loc", ())) == ("body",):
            param, msg, kind = None, "the body is empty: send a JSON object", "json_invalid"
        else:
            param = _param(tuple(err.get("loc", ())))
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if kind not in ("missing", "value_error") and "input" in err:
                inputs.setdefault(param, err["input"])
        if code is None:
            code = _CODES.get(kind, "invalid_value")
        messages = by_param.setdefault(param, [])
        if msg not in messages:
            messages.append(msg)
    clauses = []
    for param, messages in by_param.items():
        text = "; or ".join(messages)
        if param in inputs:
            text += f" (got {_short(inputs[param])})"
        clauses.append(text if param is None or text.startswith(f"{param}=") else f"{param}: {text}")
    return APIError("; ".join(clauses) or "invalid request", param=next(iter(by_param), None), code=code)


_CODES = {
    "missing": "missing_required_parameter",
    "json_invalid": "invalid_json",
    "unsupported_value": "unsupported_value",
}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def install_error_handlers(app: FastAPI, on_error: Callable[[str, int, str | None], None]) -> None:
    """Answer every error in OpenAI's shape; ``on_error(path, status, code)`` is told of each."""

    def answer(request: Request, error: APIError) -> JSONResponse:
        on_error(request.url.path, error.status, error.code)
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, validation_error(list(exc.errors())))

    @app.exception_handler(RestspecError)
    async def _restspec(request: Request, exc: RestspecError) -> JSONResponse:
        return answer(request, APIError(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 400 and message == BODY_PARSE_ERROR:  # FastAPI's, e.g. for bytes not UTF-8
            code, message = "invalid_json", "the body is not valid JSON (UTF-8 text)"
        if exc.status_code == 404:
            message = (
                f"no route {request.method} {request.url.path}; "
                "see GET /v1/models, POST /v1/chat/completions, POST /v1/completions"
            )
        headers = dict(exc.headers) if exc.headers else None
        return answer(
            request, APIError(message, status=exc.status_code, type=kind, code=code, headers=headers)
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return answer(request, internal_error(f"{request.method} {request.url.path}"))
