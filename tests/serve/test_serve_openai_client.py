"""The official ``openai`` client against a real server on 127.0.0.1: what users will actually run."""

from __future__ import annotations

import pytest
from serve_helpers import MODEL_ID, running_server

openai = pytest.importorskip("openai")

REQUEST_TIMEOUT_S = 30.0
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def openai_client(app):
    with running_server(app) as base_url:
        yield openai.OpenAI(
            base_url=f"{base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
        )


def test_the_openai_client_lists_the_model(openai_client):
    assert [m.id for m in openai_client.models.list()] == [MODEL_ID]


def test_the_openai_client_chats_with_and_without_streaming(openai_client):
    messages = [{"role": "user", "content": "def add(a, b):"}]
    answer = openai_client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=MAX_TOKENS, extra_body={"restspec_stats": True}
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= MAX_TOKENS
    assert answer.model_extra["restspec"]["steps"] >= 1

    chunks = list(
        openai_client.chat.completions.create(
            model=MODEL_ID,
            messages=messages,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_the_openai_client_completes_text(openai_client):
    answer = openai_client.completions.create(model=MODEL_ID, prompt="import os\n", max_tokens=MAX_TOKENS)
    streamed = openai_client.completions.create(
        model=MODEL_ID, prompt="import os\n", max_tokens=MAX_TOKENS, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text


def test_the_openai_client_reads_n_choices(openai_client):
    answer = openai_client.completions.create(
        model=MODEL_ID, prompt="import os\n", max_tokens=MAX_TOKENS, n=3, temperature=1.5, seed=11
    )
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    again = openai_client.completions.create(
        model=MODEL_ID, prompt="import os\n", max_tokens=MAX_TOKENS, temperature=1.5, seed=12
    )
    assert answer.choices[1].text == again.choices[0].text  # choice 1 is seed + 1's answer


def test_the_openai_client_raises_bad_request_with_the_message(openai_client):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], n=2, stream=True
        )
    assert caught.value.status_code == 400
    assert caught.value.param == "n"
    assert "stream=false" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
