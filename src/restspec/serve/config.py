"""What a deployment sets: who may call (:class:`AccessConfig`), how much one request and the queue
may take (:class:`ServerLimits`), and whose past outputs draft for whom (:class:`HistoryMode`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

MIN_API_KEY_CHARS = 16
"""Shorter keys are guessable; ``openssl rand -hex 32`` gives 64 characters."""


class HistoryMode(str, Enum):
    """Whose past outputs the drafter learns from (see docs/server.md, "Tenancy")."""

    tenant = "tenant"
    """Each tenant (API key, or key + ``user``) drafts from its own past requests only."""
    shared = "shared"
    """Every request learns from every earlier one (fastest; leaks acceptance across clients)."""
    off = "off"
    """Nothing carries over between requests: each starts from the drafter's state at startup."""


@dataclass(frozen=True)
class AccessConfig:
    """Who may call the API."""

    api_keys: tuple[str, ...] = ()
    """Bearer tokens accepted on every route but ``/health`` and ``/ready``; empty = no authentication."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call (``*`` = any); empty = no CORS headers."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        for key in self.api_keys:
            if len(key) < MIN_API_KEY_CHARS or key != key.strip() or not key.isprintable():
                raise ValueError(
                    f"an API key of {len(key)} characters: keys must be at least {MIN_API_KEY_CHARS} "
                    "printable characters without surrounding spaces (e.g. `openssl rand -hex 32`)"
                )


@dataclass(frozen=True)
class ServerLimits:
    """How much one request and the queue may take; exceeding one is an error that names the limit."""

    max_queued: int = 64
    """Requests waiting for the worker beyond this are answered 503 with ``Retry-After``."""
    request_timeout_s: float | None = 600.0
    """A request running (queue wait included) longer than this is ended; None = no limit."""
    max_tokens_limit: int = 4096
    """Largest ``max_tokens`` a request may ask for (400 above it)."""
    max_body_bytes: int = 1 << 20
    """Largest request body (413 above it)."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens (400 above it), checked before queueing; None = the model's context."""
    max_stop_chars: int = 256
    """Longest ``stop`` string in characters (each request may send at most 4)."""
    stall_after_s: float = 120.0
    """``/health`` is 503 when a running request has gone this long without a step (a wedged worker)."""
    tenants: int = 64
    """Tenants whose drafting memory is kept (least recently used are forgotten first)."""

    def __post_init__(self) -> None:
        for name in ("max_queued", "max_tokens_limit", "max_body_bytes", "max_stop_chars", "tenants"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1 (or None)")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s={self.request_timeout_s} must be > 0 (or None)")
        if not self.stall_after_s > 0:
            raise ValueError(f"stall_after_s={self.stall_after_s} must be > 0")
