"""``GET /metrics``: the server's counters in Prometheus' text format (prometheus-client).

One registry per app, so several apps in one process (tests) count apart."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TOKENS_PER_STEP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
FIRST_CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

OUTCOMES = (
    "completed",  # answered in full
    "cancelled",  # the client left first
    "invalid",  # a 4xx about the request itself (400, 413)
    "unauthorized",  # 401
    "queue_full",  # 503 at admission
    "timeout",  # ended by --request-timeout
    "shutdown",  # refused or ended by a shutdown
    "error",  # a bug: 500 or an in-band server_error
)
"""``outcome`` label values of ``restspec_requests_total``."""


class ServerMetrics:
    """The server's Prometheus metrics; ``queue_depth`` and ``running`` are read when scraped."""

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int], max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "restspec_requests",
            "Requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "restspec_prompt_tokens", "Prompt tokens of admitted requests", registry=self.registry
        )
        self.cached_prompt_tokens = Counter(
            "restspec_cached_prompt_tokens",
            "Prompt tokens not prefilled: an earlier request of the tenant had them in its cache",
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "restspec_generated_tokens", "Tokens generated (all requests)", registry=self.registry
        )
        Gauge("restspec_queue_depth", "Requests waiting for the worker", registry=self.registry).set_function(
            queue_depth
        )
        Gauge("restspec_busy", "1 while any request generates", registry=self.registry).set_function(
            lambda: float(running() > 0)
        )
        Gauge(
            "restspec_running", "Requests generating now, sharing each step's forward", registry=self.registry
        ).set_function(running)
        Gauge(
            "restspec_max_batch", "Requests that may generate at once (--max-batch)", registry=self.registry
        ).set(max_batch)
        self.step_seconds = Histogram(
            "restspec_step_seconds",
            "Time of one decoding step (draft, verify, accept) after the first",
            buckets=STEP_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.first_chunk_seconds = Histogram(
            "restspec_first_chunk_seconds",
            "From a request's start on the worker to its first chunk (tokenization, prefill, first step)",
            buckets=FIRST_CHUNK_BUCKETS,
            registry=self.registry,
        )
        self.tokens_per_step = Histogram(
            "restspec_tokens_per_step",
            "Tokens one step added (accepted draft tokens + 1); 1 is plain decoding",
            buckets=TOKENS_PER_STEP_BUCKETS,
            registry=self.registry,
        )

    def request(self, endpoint: str, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome={outcome!r} must be one of {OUTCOMES}")
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def rejected(self, endpoint: str, status: int, code: str | None) -> None:
        """An error answer (HTTP ``status`` with OpenAI's ``code``), counted by its outcome."""
        outcome = {401: "unauthorized", 504: "timeout", 500: "error"}.get(status, "invalid")
        if status == 503:
            outcome = "shutdown" if code == "server_shutting_down" else "queue_full"
        self.request(endpoint, outcome)

    def chunk(self, seconds: float, tokens: int, *, first: bool) -> None:
        """(job thread) One chunk of a generation: ``seconds`` since the previous (or the start)."""
        (self.first_chunk_seconds if first else self.step_seconds).observe(seconds)
        self.tokens_per_step.observe(tokens)
        self.generated_tokens.inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
