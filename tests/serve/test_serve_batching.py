"""Concurrent requests share the batched loop (``--max-batch``), on a real server on 127.0.0.1: they are
verified in the same forwards, each answer is the one its request gets alone, two tenants in one batch
keep their histories apart, a client that leaves takes only its own request out of the batch, a full
queue is still answered 503 while ``max_batch`` requests run, and a request's ``n`` choices run in one
batch or, when the queue cannot take them all, not at all.

Requests overlap by construction, not by timing: a gated generator holds each stream until all of the
batch's streams have begun (a worker that ran fewer jobs at once would never let them all begin)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
from serve_helpers import (
    BatchLog,
    GatedGenerator,
    HistoryOnlyDrafter,
    LookupDrafter,
    SlowDrafter,
    WedgedGenerator,
    make_app,
    running_server,
    sse_events,
)

from restspec.serve import AccessConfig, HistoryMode, ServerLimits

MAX_BATCH = 3
PROMPTS = ["def add(a, b):", "The quick brown fox", "import os\nimport sys\n\nfor name in"]
MAX_TOKENS = [10, 6, 14]
"""Mixed lengths: the shorter requests finish while the others go on."""
STEP_DELAY_S = 0.02
"""Sleep in every request's step, so that a request lasts several steps of the others' time."""
REQUEST_TIMEOUT_S = 30.0
KEY_A = "a" * 24
KEY_B = "b" * 24


@contextmanager
def batched_server(tiny_model, drafter, *, delay_s: float = 0.0, budget: int = 2, **config) -> Iterator:
    """A real server over a gated generator with ``max_batch=MAX_BATCH``; yields (base URL, app,
    the gated generator, the budget that logs batch sizes)."""
    from restspec.decode import SpeculativeGenerator

    model, tokenizer = tiny_model
    log = BatchLog(budget, delay_s=delay_s)
    real = SpeculativeGenerator(model, tokenizer, drafter=drafter, budget=log, max_batch=MAX_BATCH)
    gated = GatedGenerator(real)
    app = make_app(gated, **config)
    with running_server(app) as base_url:
        yield base_url, app, gated, log


def complete(base_url: str, prompt: str, max_tokens: int, key: str | None = None, **extra) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(
        f"{base_url}/v1/completions",
        json={"prompt": prompt, "max_tokens": max_tokens, **extra},
        headers=headers,
        timeout=REQUEST_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    return response.json()


def together(calls: list[Callable[[], object]]) -> list:
    """Run the calls at once, each on a thread of its own; their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def text_of(answer: dict) -> str:
    return answer["choices"][0]["text"]


def test_concurrent_requests_share_forwards_and_each_gets_its_answer_alone(tiny_model):
    with batched_server(tiny_model, LookupDrafter(), delay_s=STEP_DELAY_S) as (url, app, gated, log):
        alone = [text_of(complete(url, p, n)) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
        assert set(log.batch_sizes) == {1}
        log.batch_sizes.clear()

        gated.gate(MAX_BATCH)
        calls = [lambda p=p, n=n: complete(url, p, n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
        # greedy: token for token what each got alone
        assert [text_of(answer) for answer in together(calls)] == alone
        assert max(log.batch_sizes) == MAX_BATCH  # all three were verified in one forward
        records = list(app.state.worker.recent)[-MAX_BATCH:]
        assert all(r.completed for r in records)
        assert max(r.started_at for r in records) < min(r.finished_at for r in records)


def test_n_choices_share_forwards_each_the_answer_of_its_seed(tiny_model):
    seeded = {"temperature": 1.3, "top_k": 50}
    with batched_server(tiny_model, LookupDrafter(), delay_s=STEP_DELAY_S) as (url, app, gated, log):
        alone = [text_of(complete(url, PROMPTS[2], 12, seed=5 + i, **seeded)) for i in range(MAX_BATCH)]
        log.batch_sizes.clear()
        gated.gate(MAX_BATCH)
        answer = complete(url, PROMPTS[2], 12, n=MAX_BATCH, seed=5, **seeded)
        assert [choice["text"] for choice in answer["choices"]] == alone
        assert max(log.batch_sizes) == MAX_BATCH  # the choices were verified in one forward
        records = list(app.state.worker.recent)[-MAX_BATCH:]
        assert sorted(r.job_id.rsplit("-", 1)[1] for r in records) == ["0", "1", "2"]
        assert all(r.completed for r in records)


@contextmanager
def full_batch(tiny_model, max_queued: int) -> Iterator:
    """A real server with MAX_BATCH requests running, each held after its first chunk, and one more
    queued; yields (base URL, worker, the held generator, the four requests' futures)."""
    from restspec.decode import SpeculativeGenerator

    model, tokenizer = tiny_model
    real = SpeculativeGenerator(model, tokenizer, drafter=LookupDrafter(), budget=2, max_batch=MAX_BATCH)
    wedged = WedgedGenerator(real)  # every running request holds after its first chunk
    app = make_app(wedged, limits=ServerLimits(max_queued=max_queued))
    worker = app.state.worker
    with running_server(app) as url, ThreadPoolExecutor(MAX_BATCH + 1) as pool:
        held = [pool.submit(complete, url, p, 4) for p in [*PROMPTS, PROMPTS[0]]]
        wait_for(lambda: worker.running == MAX_BATCH and worker.queued == 1)
        yield url, worker, wedged, held


def test_choices_that_do_not_all_fit_the_queue_are_a_503_and_none_runs(tiny_model):
    with full_batch(tiny_model, max_queued=2) as (url, worker, wedged, held):
        body = {"prompt": "hi", "max_tokens": 4, "n": 2}  # room for one of its two choices
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"
        wedged.release()
        assert all(future.result(REQUEST_TIMEOUT_S)["choices"] for future in held)
        wait_for(lambda: not worker.busy and worker.queued == 0)
    refused = [r for r in worker.recent if r.job_id.endswith("-0")]
    assert len(refused) == 1 and refused[0].cancelled and refused[0].tokens == 0


QUESTION = {"prompt": PROMPTS[2], "max_tokens": 40, "restspec_stats": True}


def a_and_b_together(url: str, gated: GatedGenerator) -> list[dict]:
    """Tenants A and B ask QUESTION in one batch."""
    gated.gate(2)
    return together([lambda key=key: complete(url, key=key, **QUESTION) for key in (KEY_A, KEY_B)])


def test_two_tenants_in_one_batch_keep_their_histories_apart(tiny_model):
    """Tenant A was answered; A and B then ask the same question in one batch: A's own history
    drafts for A, and B, drafting with a drafter of its own, learns nothing from A's answer."""
    access = AccessConfig(api_keys=(KEY_A, KEY_B))
    drafter = HistoryOnlyDrafter()
    with batched_server(
        tiny_model, drafter, delay_s=STEP_DELAY_S, budget=4, access=access, new_drafter=HistoryOnlyDrafter
    ) as (url, app, gated, log):
        first = complete(url, key=KEY_A, **QUESTION)
        answer_a, answer_b = a_and_b_together(url, gated)
        assert 2 in log.batch_sizes  # the two requests shared forwards
        assert text_of(answer_a) == text_of(answer_b) == text_of(first)
        assert answer_a["restspec"]["accepted_draft_tokens"] > 0  # A's own answer drafts for A...
        figures_b = answer_b["restspec"]
        assert figures_b["accepted_draft_tokens"] == 0  # ...and not for B, in the same batch
        assert figures_b["steps"] == answer_b["usage"]["completion_tokens"]
        assert app.state.drafters.drafters == 2  # one drafter per tenant running at once


def test_shared_history_drafts_with_one_drafter_for_everyone(tiny_model):
    """The negative control of the test above: with --shared-history B's request in the same batch
    learns from A's earlier answer."""
    access = AccessConfig(api_keys=(KEY_A, KEY_B))
    with batched_server(
        tiny_model, HistoryOnlyDrafter(), budget=4, access=access, history=HistoryMode.shared
    ) as (url, app, gated, _):
        complete(url, key=KEY_A, **QUESTION)
        _, answer_b = a_and_b_together(url, gated)
        assert answer_b["restspec"]["accepted_draft_tokens"] > 0
        assert app.state.drafters.drafters == 1


def test_a_client_leaving_takes_only_its_request_out_of_the_batch(tiny_model):
    drafter = SlowDrafter(STEP_DELAY_S)
    with batched_server(tiny_model, drafter, budget=1) as (url, app, gated, log):
        long_tokens = 60
        alone = [text_of(complete(url, p, long_tokens)) for p in PROMPTS[1:]]
        gated.gate(MAX_BATCH)

        def leave_after_first_chunk() -> None:
            body = {"prompt": PROMPTS[0], "max_tokens": long_tokens, "stream": True}
            with (
                httpx.Client(timeout=REQUEST_TIMEOUT_S) as client,
                client.stream("POST", f"{url}/v1/completions", json=body) as response,
            ):
                first = next(line for line in response.iter_lines() if line.startswith("data: "))
                assert "choices" in json.loads(first.removeprefix("data: "))

        def stream_to_the_end(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": long_tokens, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
                *events, done = sse_events(r.iter_lines())
            assert done == "[DONE]"
            return "".join(event["choices"][0]["text"] for event in events if event["choices"])

        calls = [leave_after_first_chunk, *(lambda p=p: stream_to_the_end(p) for p in PROMPTS[1:])]
        assert together(calls)[1:] == alone
        worker = app.state.worker
        wait_for(lambda: not worker.busy)  # the leaving request ends a step after its client is seen gone
        left, *stayed = sorted(list(worker.recent)[-MAX_BATCH:], key=lambda r: r.completed)
        assert left.cancelled and left.tokens < long_tokens // 2
        assert all(r.completed and r.tokens == long_tokens for r in stayed)
        assert max(log.batch_sizes) == MAX_BATCH
        assert drafter.requests_stopped == drafter.requests_started and not drafter.active


def test_a_full_queue_is_answered_503_while_max_batch_requests_run(tiny_model):
    with full_batch(tiny_model, max_queued=1) as (url, worker, wedged, held):
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"
        assert int(response.headers["Retry-After"]) >= 1
        assert httpx.get(f"{url}/ready").json()["status"] == "queue_full"
        health = httpx.get(f"{url}/health").json()
        assert (health["status"], health["running"], health["queued"]) == ("ok", MAX_BATCH, 1)
        metrics = httpx.get(f"{url}/metrics").text
        assert f"restspec_running {MAX_BATCH}.0" in metrics and f"restspec_max_batch {MAX_BATCH}.0" in metrics
        wedged.release()
        assert all(future.result()["usage"]["completion_tokens"] == 4 for future in held)
    assert worker.running == 0 and worker.stalled_s() == 0.0


def wait_for(condition: Callable[[], bool], timeout_s: float = REQUEST_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
