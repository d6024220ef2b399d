"""``stream: true``: server-sent events in OpenAI's chunk shape, ending with ``data: [DONE]``; the
deltas add up to the non-streaming answer."""

from __future__ import annotations

import pytest
from serve_helpers import MODEL_ID, sse_events

MESSAGES = [{"role": "user", "content": "Write a loop over the files in a folder."}]
CODE_PROMPT = "for name in os.listdir('.'):\n"
MAX_TOKENS = 24


def stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.iter_lines())


def test_chat_stream_has_openai_chunks_that_add_up_to_the_answer(client):
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "restspec_stats": True}
    whole = client.post("/v1/chat/completions", json=body).json()
    events = stream(client, "/v1/chat/completions", body)

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["model"] == MODEL_ID and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    middle = chunks[1:-1]
    assert middle, "the answer should come in several chunks"
    assert all(
        c["choices"][0]["finish_reason"] is None and c["choices"][0]["delta"]["content"] for c in middle
    )
    text = "".join(c["choices"][0]["delta"]["content"] for c in middle)
    assert text == whole["choices"][0]["message"]["content"]

    last = chunks[-1]
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    stats, expected = last["restspec"], whole["restspec"]
    assert stats["steps"] == expected["steps"]
    assert stats["accepted_draft_tokens"] == expected["accepted_draft_tokens"]


def test_completion_stream_adds_up_to_the_answer(client):
    body = {"prompt": CODE_PROMPT, "max_tokens": MAX_TOKENS}
    whole = client.post("/v1/completions", json=body).json()
    chunks = stream(client, "/v1/completions", body)[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[0]["id"].startswith("cmpl-")
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"


def test_echo_streams_the_prompt_first(client):
    chunks = stream(client, "/v1/completions", {"prompt": CODE_PROMPT, "max_tokens": 4, "echo": True})[:-1]
    assert chunks[0]["choices"][0]["text"] == CODE_PROMPT


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_include_usage_adds_a_usage_chunk_before_done(client, path):
    body = {"max_tokens": MAX_TOKENS} | (
        {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": CODE_PROMPT}
    )
    whole = client.post(path, json=body).json()
    events = stream(client, path, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    # the same prompt again: all of it but its last token is still cached from the whole request
    prompt_tokens = whole["usage"]["prompt_tokens"]
    assert usage_chunk["usage"] == whole["usage"] | {
        "prompt_tokens_details": {"cached_tokens": prompt_tokens - 1}
    }
    assert all(c["usage"] is None for c in events[:-2])


def test_a_streamed_stop_string_never_reaches_the_client(client):
    full = client.post("/v1/completions", json={"prompt": CODE_PROMPT, "max_tokens": MAX_TOKENS}).json()
    full_text = full["choices"][0]["text"]
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    chunks = stream(
        client, "/v1/completions", {"prompt": CODE_PROMPT, "max_tokens": MAX_TOKENS, "stop": stop}
    )[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == full_text[: full_text.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_streams_the_same_text_as_it_answers(client):
    body = {"prompt": CODE_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.9, "seed": 99}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    chunks = stream(client, "/v1/completions", body)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
