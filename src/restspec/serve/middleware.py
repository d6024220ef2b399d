"""ASGI middleware around the app: bearer-token authentication, the request body's size limit, and
JSON bodies whatever their ``Content-Type``.

Both answer in OpenAI's error shape. The key a request authenticated with is left in
``scope["state"]["api_key"]`` for the tenancy (:func:`restspec.serve.tenancy.tenant_of`)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from restspec.serve.errors import APIError

OPEN_PATHS = frozenset({"/health", "/ready"})
"""Routes a load balancer or orchestrator probes without a key."""

OnReject = Callable[[str, int, str | None], None]
"""Told ``(path, status, code)`` of each request a middleware answers itself."""


class BearerAuth:
    """Requests must carry ``Authorization: Bearer <key>`` with one of ``keys`` (constant-time compare);
    others get 401. CORS preflights (``OPTIONS``) and :data:`OPEN_PATHS` pass."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], on_reject: OnReject) -> None:
        if not keys:
            raise ValueError("BearerAuth needs at least one key")
        self.app = app
        self.on_reject = on_reject
        self._keys = tuple(key.encode() for key in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        key = self.matching_key(_header(scope, b"authorization"))
        if key is None:
            error = APIError(
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' with a key this "
                "server was started with (--api-key / --api-key-file)",
                status=401,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            self.on_reject(scope["path"], error.status, error.code)
            await error.response()(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)

    def matching_key(self, header: bytes | None) -> str | None:
        """The configured key ``header`` carries, else None; every key is compared, each in constant time."""
        if header is None or header[:7].lower() != b"bearer ":
            return None
        sent = header[7:].strip()
        found = None
        for key in self._keys:
            if hmac.compare_digest(sent, key):
                found = key.decode()
        return found


class PayloadTooLarge(HTTPException):
    """A body past the limit, found while reading it (a body sent without ``Content-Length``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_message(limit))


class BodyLimit:
    """Bodies over ``max_bytes`` get 413: at once when ``Content-Length`` says so, else as soon as
    that many bytes were read."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: OnReject) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = APIError(_too_large_message(self.max_bytes), status=413, code="request_too_large")
            self.on_reject(scope["path"], error.status, error.code)
            await error.response()(scope, receive, send)
            return
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class JSONBodies:
    """A ``POST`` body is read as JSON whatever its ``Content-Type`` says: every route that takes a body
    takes JSON, and ``curl -d`` without ``-H 'Content-Type: application/json'`` labels it a form."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def _too_large_message(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return None
