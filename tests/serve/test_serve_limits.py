"""What a deployment relies on: API keys, CORS, limits with OpenAI-shaped errors (body, prompt, stop
strings, max_tokens, queue, time), answer-changing fields refused, /metrics, liveness and readiness with a
wedged worker, and a graceful shutdown."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_helpers import (
    CONTEXT_LENGTH,
    WedgedGenerator,
    make_app,
    running_server,
    slow_generator,
    sse_events,
)
from test_serve_errors import COMPLETIONS, USER, assert_error

from restspec.serve import AccessConfig, ServerLimits

KEY = "k" * 24
OTHER_KEY = "o" * 24
STEP_DELAY_S = 0.05
LONG_MAX_TOKENS = 80
"""With budget 1 and STEP_DELAY_S, at least 40 steps: 2 s."""
WAIT_S = 30.0


def client_of(app):
    from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


# ---- access -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(generator):
    access = AccessConfig(api_keys=(KEY, OTHER_KEY), cors_origins=("https://app.example",))
    with client_of(make_app(generator, access=access)) as client:
        yield client


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key-of-24-chars!!"}, {"Authorization": KEY}, {"X-Api-Key": KEY}],
)
def test_a_request_without_the_right_key_is_a_401_in_openai_shape(keyed, headers):
    response = keyed.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}, headers=headers)
    assert_error(response, 401, None, "Authorization: Bearer", code="invalid_api_key")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert keyed.get("/v1/models", headers=headers).status_code == 401
    assert keyed.get("/metrics", headers=headers).status_code == 401


def test_each_configured_key_is_accepted_and_probes_stay_open(keyed):
    for key in (KEY, OTHER_KEY):
        response = keyed.post(
            COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}, headers={"Authorization": f"bearer {key}"}
        )
        assert response.status_code == 200, response.text
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/ready").status_code == 200


def test_cors_preflight_and_responses_name_the_allowed_origin_only(keyed):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    response = keyed.options(COMPLETIONS, headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    other = keyed.options(COMPLETIONS, headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    answer = keyed.get(
        "/v1/models", headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"}
    )
    assert answer.headers["access-control-allow-origin"] == "https://app.example"


def test_short_api_keys_are_refused_at_configuration():
    with pytest.raises(ValueError, match="at least 16"):
        AccessConfig(api_keys=("secret",))


# ---- limits on one request ------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(generator):
    limits = ServerLimits(max_body_bytes=4096, max_prompt_tokens=20, max_tokens_limit=16, max_stop_chars=8)
    with client_of(make_app(generator, limits=limits)) as client:
        yield client


def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(limited):
    response = limited.post(COMPLETIONS, json={"prompt": "x" * 5000})
    assert_error(response, 413, None, "4096 bytes", "--max-body-bytes", code="request_too_large")


def test_a_streamed_body_over_the_limit_is_a_413_on_a_real_server(generator):
    app = make_app(generator, limits=ServerLimits(max_body_bytes=4096))

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    with running_server(app) as base_url:
        response = httpx.post(
            f"{base_url}{COMPLETIONS}", content=chunks(), headers={"content-type": "application/json"}
        )
    assert_error(response, 413, None, "4096 bytes", code="request_too_large")


def test_limits_on_prompt_tokens_max_tokens_and_stop_strings_are_400s_naming_the_field(limited):
    long_prompt = "def add(a, b):\n    return a + b\n" * 3
    assert_error(
        limited.post(COMPLETIONS, json={"prompt": long_prompt}),
        400,
        "prompt",
        "at most 20",
        "--max-prompt-tokens",
        code="prompt_too_long",
    )
    chat = limited.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_prompt}]})
    assert_error(chat, 400, "messages", "at most 20", code="prompt_too_long")
    too_many = limited.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 17})
    assert_error(too_many, 400, "max_tokens", "max_tokens=17", "limit of 16", "--max-tokens-limit")
    newer = limited.post("/v1/chat/completions", json={"messages": USER, "max_completion_tokens": 99})
    assert_error(newer, 400, "max_completion_tokens", "limit of 16")
    long_stop = limited.post(COMPLETIONS, json={"prompt": "hi", "stop": ["ok", "x" * 9]})
    assert_error(long_stop, 400, "stop", "9 characters", "at most 8")
    five = limited.post(COMPLETIONS, json={"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]})
    assert_error(five, 400, "stop", "at most 4")
    assert (
        limited.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 16, "stop": "x" * 8}).status_code == 200
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_p", 0.1),
        ("repetition_penalty", 1.2),
        ("stop_token_ids", [5]),
        ("ignore_eos", True),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("guided_json", {"type": "object"}),
        ("chat_template_kwargs", {"enable_thinking": True}),
        ("min_tokens", 3),
    ],
)
def test_fields_that_would_change_the_answer_are_400s_naming_them(client, field, value):
    response = client.post("/v1/chat/completions", json={"messages": USER, field: value})
    assert_error(response, 400, field, f"{field}=", "would change the answer", code="unsupported_value")


def test_neutral_values_and_bookkeeping_fields_are_accepted(client):
    body = {
        "messages": USER,
        "max_tokens": 3,
        "min_p": 0.0,
        "repetition_penalty": 1,
        "ignore_eos": False,
        "stop_token_ids": [],
        "metadata": {"run": "7"},
        "store": False,
        "service_tier": "auto",
        "user": "someone",
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


def test_a_huge_prompt_is_refused_without_waiting_for_the_worker(tiny_model):
    """Admission tokenizes and measures off the worker: a too-long prompt is answered while another
    request holds the worker for seconds."""
    slower = 4 * STEP_DELAY_S  # the running request takes 8 s at least
    app = make_app(slow_generator(tiny_model, slower))
    huge = "def add(a, b):\n    return a + b\n" * (10 * CONTEXT_LENGTH)
    with running_server(app) as base_url, httpx.Client(timeout=WAIT_S) as http:
        body = {"prompt": "import os\n", "max_tokens": LONG_MAX_TOKENS, "stream": True}
        with http.stream("POST", f"{base_url}{COMPLETIONS}", json=body) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            start = time.monotonic()
            response = http.post(f"{base_url}{COMPLETIONS}", json={"prompt": huge})
            answered_s = time.monotonic() - start
            assert app.state.worker.busy, "the long request should still hold the worker"
        assert_error(response, 400, "prompt", str(CONTEXT_LENGTH), code="context_length_exceeded")
        assert answered_s < LONG_MAX_TOKENS // 2 * slower / 2


# ---- the queue and time limits --------------------------------------------------------------


def test_a_full_queue_is_a_503_with_retry_after(tiny_model):
    app = make_app(slow_generator(tiny_model, STEP_DELAY_S), limits=ServerLimits(max_queued=1))
    body = {"prompt": "import os\n", "max_tokens": LONG_MAX_TOKENS}
    with running_server(app) as base_url, httpx.Client(timeout=WAIT_S) as http:
        results: dict[str, httpx.Response] = {}
        running = threading.Thread(
            target=lambda: results.__setitem__("running", http.post(f"{base_url}{COMPLETIONS}", json=body))
        )
        running.start()
        wait_for(lambda: app.state.worker.busy)
        queued = threading.Thread(
            target=lambda: results.__setitem__("queued", http.post(f"{base_url}{COMPLETIONS}", json=body))
        )
        queued.start()
        wait_for(lambda: app.state.worker.queued == 1)
        assert http.get(f"{base_url}/ready").json()["status"] == "queue_full"
        refused = http.post(f"{base_url}{COMPLETIONS}", json=body)
        error = assert_error(refused, 503, None, "--max-queued", code="queue_full")
        assert error["type"] == "server_error"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        running.join(WAIT_S)
        queued.join(WAIT_S)
        assert results["running"].status_code == results["queued"].status_code == 200
        metrics = http.get(f"{base_url}/metrics").text
    assert 'restspec_requests_total{endpoint="completions",outcome="queue_full"} 1.0' in metrics
    assert 'restspec_requests_total{endpoint="completions",outcome="completed"} 2.0' in metrics


def test_more_completions_than_the_queue_holds_is_a_400_not_a_503(generator):
    """n above --max-queued could never be queued: a 503 with Retry-After would have the client retry
    forever."""
    app = make_app(generator, limits=ServerLimits(max_queued=1))
    with client_of(app) as client:
        refused = client.post(COMPLETIONS, json={"prompt": "import os\n", "max_tokens": 3, "n": 2})
        assert_error(refused, 400, "n", "--max-queued 1", code="invalid_value")
        assert (
            client.post(COMPLETIONS, json={"prompt": "import os\n", "max_tokens": 3, "n": 1}).status_code
            == 200
        )


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_time_is_ended_with_an_error(tiny_model, stream):
    app = make_app(slow_generator(tiny_model, STEP_DELAY_S), limits=ServerLimits(request_timeout_s=0.6))
    body = {"prompt": "import os\n", "max_tokens": LONG_MAX_TOKENS, "stream": stream}
    with client_of(app) as client:
        start = time.monotonic()
        if stream:
            with client.stream("POST", COMPLETIONS, json=body) as response:
                assert response.status_code == 200
                events = sse_events(response.iter_lines())
            assert events[-1] == "[DONE]"
            error = events[-2]["error"]
            assert error["code"] == "request_timeout" and "--request-timeout" in error["message"]
            assert any(e.get("choices") for e in events[:-2]), "some text came before the timeout"
        else:
            assert_error(client.post(COMPLETIONS, json=body), 504, None, "0.6 s", code="request_timeout")
        assert time.monotonic() - start < LONG_MAX_TOKENS // 2 * STEP_DELAY_S
        wait_for(lambda: not app.state.worker.busy)
        assert app.state.worker.recent[-1].stopped.value == "timeout"
        assert client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}).status_code == 200


# ---- liveness, readiness and metrics --------------------------------------------------------


def test_a_wedged_worker_fails_liveness_and_its_requests_time_out(generator):
    wedged = WedgedGenerator(generator)
    limits = ServerLimits(stall_after_s=0.3, request_timeout_s=1.0)
    with client_of(make_app(wedged, limits=limits)) as client:
        assert client.get("/health").status_code == 200
        response = client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 8})
        assert_error(response, 504, None, code="request_timeout")  # answered although the worker hangs
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "stalled"
        assert client.get("/ready").json()["status"] == "stalled"
        wedged.release()
        wait_for(lambda: not client.app.state.worker.busy)
        assert client.get("/health").status_code == client.get("/ready").status_code == 200


def test_metrics_count_requests_tokens_and_steps_in_prometheus_format(generator):
    with client_of(make_app(generator)) as client:
        answer = client.post(COMPLETIONS, json={"prompt": "import os\n", "max_tokens": 12}).json()
        client.post(COMPLETIONS, json={"prompt": "hi", "temperature": 9})
        again = client.post(COMPLETIONS, json={"prompt": "import os\n", "max_tokens": 2}).json()
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    tokens = answer["usage"]["completion_tokens"]
    assert 'restspec_requests_total{endpoint="completions",outcome="completed"} 2.0' in text
    assert 'restspec_requests_total{endpoint="completions",outcome="invalid"} 1.0' in text
    prompt_tokens = answer["usage"]["prompt_tokens"]
    assert f"restspec_generated_tokens_total {float(tokens + again['usage']['completion_tokens'])}" in text
    assert f"restspec_prompt_tokens_total {float(2 * prompt_tokens)}" in text
    # the repeat found all of the prompt but its last token cached (the generator is shared with other
    # tests: the first request may have found some too)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - 1
    cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"] + prompt_tokens - 1
    assert f"restspec_cached_prompt_tokens_total {float(cached)}" in text
    assert "restspec_queue_depth 0.0" in text
    assert "restspec_tokens_per_step_bucket" in text
    assert "restspec_step_seconds_count" in text
    assert "restspec_first_chunk_seconds_count 2.0" in text


# ---- shutdown -------------------------------------------------------------------------------


@pytest.mark.parametrize("grace_s", [0.3, 30.0])
def test_shutdown_refuses_new_and_queued_requests_and_ends_running_streams_after_the_grace(
    tiny_model, grace_s
):
    app = make_app(slow_generator(tiny_model, STEP_DELAY_S))
    body = {"prompt": "import os\n", "max_tokens": LONG_MAX_TOKENS // 4 if grace_s > 1 else LONG_MAX_TOKENS}
    with running_server(app) as base_url, httpx.Client(timeout=WAIT_S) as http:
        results: dict[str, httpx.Response] = {}
        queued = threading.Thread(
            target=lambda: results.__setitem__("queued", http.post(f"{base_url}{COMPLETIONS}", json=body))
        )
        with http.stream("POST", f"{base_url}{COMPLETIONS}", json={**body, "stream": True}) as running:
            lines = running.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            queued.start()
            wait_for(lambda: app.state.worker.queued == 1)
            app.state.lifecycle.begin_shutdown(grace_s)
            refused = http.post(f"{base_url}{COMPLETIONS}", json=body)
            assert http.get(f"{base_url}/ready").json()["status"] == "shutting_down"
            events = sse_events([first, *lines])
        queued.join(WAIT_S)
    assert_error(refused, 503, None, "shutting down", code="server_shutting_down")
    assert_error(results["queued"], 503, None, "shutting down", code="server_shutting_down")
    assert events[-1] == "[DONE]"
    if grace_s > 1:  # the stream finished within the grace period
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    else:
        assert events[-2]["error"]["code"] == "server_shutting_down"


def wait_for(condition, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
