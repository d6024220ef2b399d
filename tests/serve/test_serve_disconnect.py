"""A real server on 127.0.0.1: a client that leaves mid-answer stops the generation, the server stays
healthy, and with max_batch=1 concurrent requests are answered one at a time with the same text as alone."""

from __future__ import annotations

import itertools
import json
import threading
import time

import httpx
import pytest
from serve_helpers import SlowDrafter, make_app, running_server

from restspec.serve.app import DISCONNECT_POLL_S

STEP_DELAY_S = 0.05
"""Sleep in every drafting step: 40 steps (the most a request below may take) last 2 s at least."""
LONG_MAX_TOKENS = 80
STOP_TIMEOUT_S = 3.0
"""How long a generation may go on after its client left (a few steps at most)."""
REQUEST_TIMEOUT_S = 30.0
POLL_S = 0.02
PROMPT = "import os\nimport sys\n\nfor name in"


@pytest.fixture(scope="module")
def slow_server(tiny_model):
    from restspec.decode import SpeculativeGenerator

    model, tokenizer = tiny_model
    drafter = SlowDrafter(STEP_DELAY_S)
    # budget 1: at most 2 tokens per step, so LONG_MAX_TOKENS tokens need >= 40 slow steps
    app = make_app(SpeculativeGenerator(model, tokenizer, drafter=drafter, budget=1))
    with running_server(app) as base_url:
        yield base_url, app.state.worker, drafter


def finished_jobs(worker) -> int:
    """How many jobs the worker finished, once it is idle (a response can reach the client a moment
    before its job's record is filed)."""
    start = time.monotonic()
    while worker.busy or worker.queued:
        assert time.monotonic() - start < STOP_TIMEOUT_S, "the worker stayed busy"
        time.sleep(POLL_S)
    return len(worker.recent)


def wait_until_idle(worker, jobs_before: int) -> float:
    """Seconds until the worker finished a new job and is idle; fails after STOP_TIMEOUT_S."""
    start = time.monotonic()
    while worker.busy or len(worker.recent) <= jobs_before:
        assert time.monotonic() - start < STOP_TIMEOUT_S, "generation went on after the client left"
        time.sleep(POLL_S)
    return time.monotonic() - start


def assert_next_request_succeeds(base_url: str) -> None:
    response = httpx.post(
        f"{base_url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=REQUEST_TIMEOUT_S
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{base_url}/health", timeout=REQUEST_TIMEOUT_S).json()["busy"] is False


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_closing_a_stream_after_the_first_chunk_stops_generation(slow_server, path):
    base_url, worker, drafter = slow_server
    jobs_before = finished_jobs(worker)
    body = {"max_tokens": LONG_MAX_TOKENS, "stream": True} | (
        {"messages": [{"role": "user", "content": PROMPT}]} if "chat" in path else {"prompt": PROMPT}
    )
    with (
        httpx.Client(timeout=REQUEST_TIMEOUT_S) as client,
        client.stream("POST", f"{base_url}{path}", json=body) as response,
    ):
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert "choices" in json.loads(first.removeprefix("data: "))
    # leaving the `with` closed the connection

    wait_until_idle(worker, jobs_before)
    record = worker.recent[-1]
    assert record.cancelled
    assert not record.completed
    assert record.tokens < LONG_MAX_TOKENS // 2
    assert drafter.requests_stopped == drafter.requests_started  # the drafter's request was ended
    assert not drafter.active
    assert_next_request_succeeds(base_url)


@pytest.mark.parametrize("n", [1, 2])
def test_a_non_streaming_client_that_gives_up_stops_generation(slow_server, n):
    """With n=2 on this one-at-a-time server the second choice waits in the queue: it never runs."""
    base_url, worker, drafter = slow_server
    jobs_before = finished_jobs(worker)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{base_url}/v1/completions",
            json={"prompt": PROMPT, "max_tokens": LONG_MAX_TOKENS, "n": n},
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=10 * STEP_DELAY_S),
        )
    wait_until_idle(worker, jobs_before + n - 1)
    records = list(worker.recent)[-n:]
    assert all(record.cancelled for record in records)
    assert all(record.tokens < LONG_MAX_TOKENS // 2 for record in records)
    assert not drafter.active
    assert_next_request_succeeds(base_url)


def test_concurrent_requests_are_served_one_at_a_time_with_their_own_answers(slow_server):
    base_url, worker, _ = slow_server
    prompts = ["def add(a, b):", "import os\n", "The quick brown fox"]
    max_tokens = 6

    def ask(prompt: str) -> str:
        response = httpx.post(
            f"{base_url}/v1/completions",
            json={"prompt": prompt, "max_tokens": max_tokens},
            timeout=REQUEST_TIMEOUT_S,
        )
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    alone = [ask(p) for p in prompts]
    jobs_before = finished_jobs(worker)
    together: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda i=i: together.__setitem__(i, ask(prompts[i]))) for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S)
    assert [together.get(i) for i in range(3)] == alone

    records = list(worker.recent)[jobs_before : finished_jobs(worker)]
    assert len(records) == len(prompts)
    for earlier, later in itertools.pairwise(records):
        assert later.started_at >= earlier.finished_at  # never two generations at once


def test_a_queued_request_whose_client_left_is_never_generated(slow_server):
    base_url, worker, _ = slow_server
    jobs_before = finished_jobs(worker)
    body = {"prompt": PROMPT, "max_tokens": LONG_MAX_TOKENS}
    with (
        httpx.Client(timeout=REQUEST_TIMEOUT_S) as client,
        client.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}) as running,
    ):
        lines = running.iter_lines()  # keep a reference: a collected line iterator closes the connection
        next(line for line in lines if line.startswith("data: "))  # it holds the worker now
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=0.5)
            )
        assert worker.queued == 1
        time.sleep(2 * DISCONNECT_POLL_S)  # the queued request's handler notices its client left
    wait_until_idle(worker, jobs_before + 1)
    streamed, queued = list(worker.recent)[jobs_before : finished_jobs(worker)]
    assert streamed.cancelled and 0 < streamed.tokens < LONG_MAX_TOKENS // 2
    assert queued.cancelled and queued.chunks == 0 and queued.tokens == 0
    assert_next_request_succeeds(base_url)


def test_stopping_the_server_stops_a_running_generation(tiny_model):
    from restspec.decode import SpeculativeGenerator

    model, tokenizer = tiny_model
    slower = 4 * STEP_DELAY_S  # LONG_MAX_TOKENS need >= 40 steps: 8 s, far past the 2 s graceful shutdown
    drafter = SlowDrafter(slower)
    app = make_app(SpeculativeGenerator(model, tokenizer, drafter=drafter, budget=1))
    worker = app.state.worker
    streaming = threading.Event()

    def read_stream(base_url: str) -> None:
        body = {"prompt": PROMPT, "max_tokens": LONG_MAX_TOKENS, "stream": True}
        with (
            httpx.Client(timeout=REQUEST_TIMEOUT_S) as client,
            client.stream("POST", f"{base_url}/v1/completions", json=body) as response,
        ):
            try:
                for _ in response.iter_lines():
                    streaming.set()
            except httpx.HTTPError:  # the server went away mid-stream
                pass

    start = time.monotonic()
    with running_server(app) as base_url:
        reader = threading.Thread(target=read_stream, args=(base_url,), daemon=True)
        reader.start()
        assert streaming.wait(REQUEST_TIMEOUT_S)
    reader.join(REQUEST_TIMEOUT_S)
    wait_until_idle(worker, 0)
    assert time.monotonic() - start < LONG_MAX_TOKENS // 2 * slower
    [record] = worker.recent
    assert record.stopped is not None and record.tokens < LONG_MAX_TOKENS // 2  # stopped by the shutdown
    assert drafter.requests_stopped == drafter.requests_started == 1
