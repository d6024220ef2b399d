"""Bad input is a 400 in OpenAI's error shape that names the field; never a 500. Bugs are 500s in the
same shape, and the server keeps serving after either."""

from __future__ import annotations

import re

import pytest
from serve_helpers import (
    CONTEXT_LENGTH,
    IDLE_HEALTH,
    MODEL_ID,
    GeneratorWrapper,
    LookupDrafter,
    make_app,
    sse_events,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello"}]
ERROR_KEYS = {"message", "type", "param", "code"}


def assert_error(response, status: int, param: str | None, *fragments: str, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == ERROR_KEYS
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    if code is not None:
        assert error["code"] == code
    return error


BAD_CHAT_BODIES = [
    # (body, param, words the message must contain)
    ({}, "messages", ["Field required"]),
    ({"messages": []}, "messages", ["at least 1"]),
    ({"messages": "hello"}, "messages", ["list"]),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", ["Field required"]),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", ["wizard"]),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content", []),
    ({"messages": [{"role": "user"}]}, "messages[0].content", ["Field required"]),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", []),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
        ["'text'"],
    ),
    ({"messages": USER, "temperature": "hot"}, "temperature", ["'hot'"]),
    ({"messages": USER, "temperature": "0.5"}, "temperature", ["'0.5'"]),
    ({"messages": USER, "temperature": 2.5}, "temperature", ["less than or equal to 2"]),
    ({"messages": USER, "temperature": -0.1}, "temperature", ["greater than or equal to 0"]),
    ({"messages": USER, "top_p": 0}, "top_p", ["greater than 0"]),
    ({"messages": USER, "top_p": 1.5}, "top_p", ["less than or equal to 1"]),
    ({"messages": USER, "top_k": -1}, "top_k", ["greater than or equal to 0"]),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", ["greater than or equal to 1"]),
    ({"messages": USER, "max_tokens": "5"}, "max_tokens", ["'5'"]),
    ({"messages": USER, "max_tokens": 5.5}, "max_tokens", []),
    ({"messages": USER, "max_completion_tokens": -3}, "max_completion_tokens", []),
    ({"messages": USER, "stream": "yes"}, "stream", []),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", ["at most 4"]),
    ({"messages": USER, "stop": ""}, "stop", ["empty"]),
    ({"messages": USER, "stop": 3}, "stop", []),
    ({"messages": USER, "n": 2, "stream": True}, "n", ["n=2", "stream=false"]),
    ({"messages": USER, "n": 17}, "n", ["less than or equal to 16"]),
    ({"messages": USER, "seed": -1}, "seed", ["greater than or equal to 0"]),
    ({"messages": USER, "seed": "abc"}, "seed", []),
    ({"messages": USER, "seed": 2**64}, "seed", ["less than or equal to"]),
    ({"messages": USER, "temperature": True}, "temperature", []),
    ({"messages": USER, "logprobs": True}, "logprobs", ["not supported"]),
    ({"messages": USER, "presence_penalty": 0.5}, "presence_penalty", ["not supported"]),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools", ["tool calling"]),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format", ["text"]),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", ["stream=true"]),
]


@pytest.mark.parametrize(("body", "param", "fragments"), BAD_CHAT_BODIES)
def test_malformed_chat_requests_are_400s_naming_the_field(client, body, param, fragments):
    assert_error(client.post(CHAT, json=body), 400, param, *fragments)


BAD_COMPLETION_BODIES = [
    ({}, "prompt", ["Field required"]),
    ({"prompt": []}, "prompt", ["empty"]),
    ({"prompt": ["one", "two"]}, "prompt", ["2 prompts"]),
    ({"prompt": [1, -2]}, "prompt", ["-2"]),
    ({"prompt": {"text": "hi"}}, "prompt", []),
    ({"prompt": "hi", "best_of": 3}, "best_of", ["best_of=3"]),
    ({"prompt": "hi", "logprobs": 2}, "logprobs", ["not supported"]),
    ({"prompt": "hi", "logprobs": 0}, "logprobs", ["not supported"]),  # OpenAI: the chosen tokens' logprobs
    ({"prompt": "hi", "suffix": "end"}, "suffix", ["not supported"]),
    ({"prompt": "hi", "n": 0}, "n", ["greater than or equal to 1"]),
    ({"prompt": "hi", "echo": "true"}, "echo", []),
]


@pytest.mark.parametrize(("body", "param", "fragments"), BAD_COMPLETION_BODIES)
def test_malformed_completion_requests_are_400s_naming_the_field(client, body, param, fragments):
    assert_error(client.post(COMPLETIONS, json=body), 400, param, *fragments)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_an_unknown_model_is_a_400_naming_the_served_one(client, path):
    body = {"model": "gpt-4o", "messages": USER} if path == CHAT else {"model": "gpt-4o", "prompt": "hi"}
    assert_error(client.post(path, json=body), 400, "model", "'gpt-4o'", MODEL_ID, code="model_not_found")


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_context_is_a_400_naming_both_lengths(client, generator, stream):
    prompt = "def add(a, b):\n    return a + b\n" * CONTEXT_LENGTH
    n_tokens = len(generator.encode(prompt))
    assert n_tokens > CONTEXT_LENGTH
    response = client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 4, "stream": stream})
    assert_error(response, 400, "prompt", str(n_tokens), str(CONTEXT_LENGTH), code="context_length_exceeded")
    chat = client.post(CHAT, json={"messages": [{"role": "user", "content": prompt}], "stream": stream})
    assert_error(chat, 400, "messages", str(CONTEXT_LENGTH), code="context_length_exceeded")


def test_a_prompt_that_just_fits_gets_a_completion_cut_at_the_context(client, generator):
    ids = generator.encode("def add(a, b):\n    return a + b\n" * CONTEXT_LENGTH).tolist()
    body = client.post(COMPLETIONS, json={"prompt": ids[: CONTEXT_LENGTH - 3], "max_tokens": 50}).json()
    del body["usage"]["prompt_tokens_details"]  # what earlier tests' requests left cached
    assert body["usage"] == {
        "prompt_tokens": CONTEXT_LENGTH - 3,
        "completion_tokens": 3,
        "total_tokens": CONTEXT_LENGTH,
    }
    assert body["choices"][0]["finish_reason"] == "length"
    too_long = client.post(COMPLETIONS, json={"prompt": ids[:CONTEXT_LENGTH]})
    assert_error(too_long, 400, "prompt", code="context_length_exceeded")


def test_token_ids_outside_the_vocabulary_are_a_400(client, generator):
    vocab = generator.model.get_input_embeddings().num_embeddings
    refused = client.post(COMPLETIONS, json={"prompt": [1, vocab + 5]})
    assert_error(refused, 400, "prompt", str(vocab), code="invalid_value")


def test_an_empty_prompt_is_a_400(client):
    assert_error(client.post(COMPLETIONS, json={"prompt": ""}), 400, "prompt", "empty", code="invalid_value")


def test_a_body_that_is_not_json_is_a_400(client):
    response = client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_error(response, 400, None, "not valid JSON", code="invalid_json")
    assert_error(client.post(CHAT, json=["not", "an", "object"]), 400, None)
    json = {"content-type": "application/json"}
    assert_error(
        client.post(CHAT, content=b'{"x": "\xff"}', headers=json), 400, None, "UTF-8", code="invalid_json"
    )
    assert_error(client.post(CHAT, content=b"", headers=json), 400, None, "empty", code="invalid_json")


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_content_type(client, content_type):
    """curl -d without -H 'Content-Type: application/json' sends a form's type: the body is still JSON."""
    headers = {} if content_type is None else {"content-type": content_type}
    body = b'{"prompt": "import os\\n", "max_tokens": 2}'
    response = client.post(COMPLETIONS, content=body, headers=headers)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1


def test_unknown_routes_and_methods_answer_in_the_error_shape(client):
    assert_error(client.get("/v1/nothing"), 404, None, "/v1/nothing", code="not_found")
    assert_error(client.get(CHAT), 405, None, code="method_not_allowed")


@pytest.fixture(scope="module")
def strict_template_client(tiny_model, model_folder):
    """A server whose tokenizer's chat template refuses system messages."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from restspec.decode import SpeculativeGenerator

    model, _ = tiny_model
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}\n{% endfor %}"
    )
    with TestClient(make_app(SpeculativeGenerator(model, tokenizer, drafter=LookupDrafter()))) as test_client:
        yield test_client


def test_messages_the_chat_template_rejects_are_a_400(strict_template_client):
    ok = strict_template_client.post(CHAT, json={"messages": USER, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    messages = [{"role": "system", "content": "be brief"}, *USER]
    response = strict_template_client.post(CHAT, json={"messages": messages})
    assert_error(response, 400, "messages", "System role not supported")


def test_a_model_without_chat_template_answers_chat_with_a_400(tiny_model, model_folder):
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from restspec.decode import SpeculativeGenerator

    model, _ = tiny_model
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    tokenizer.chat_template = None
    with TestClient(make_app(SpeculativeGenerator(model, tokenizer, drafter=LookupDrafter()))) as test_client:
        no_template = test_client.post(CHAT, json={"messages": USER})
        assert_error(no_template, 400, "messages", "chat template", code="invalid_value")
        assert test_client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}).status_code == 200


class BrokenGenerator(GeneratorWrapper):
    """A generator with a bug: its stream fails after the first chunk, or before it."""

    def __init__(self, real, fail_after_first: bool) -> None:
        super().__init__(real)
        self.fail_after_first = fail_after_first

    def stream(self, prompt, config, *, chat=False, drafter=None, prefix_scope=None):
        if not self.fail_after_first:
            raise RuntimeError("boom before the first chunk")
        chunks = super().stream(prompt, config, chat=chat, drafter=drafter, prefix_scope=prefix_scope)
        try:
            yield next(chunks)
            raise RuntimeError("boom after the first chunk")
        finally:
            chunks.close()


def logged_error_id(message: str, caplog) -> str:
    """The id a 500 names, checked to be in the log next to the exception's text."""
    [error_id] = re.findall(r"err-[0-9a-f]{12}", message)
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None, f"{error_id} is not in the log with its traceback"
    assert "boom" in str(logged[0].exc_info[1])
    return error_id


def test_a_bug_is_a_500_with_an_error_id_and_no_internal_text(generator, caplog):
    from fastapi.testclient import TestClient

    broken = make_app(BrokenGenerator(generator, fail_after_first=False))
    with TestClient(broken, raise_server_exceptions=False) as test_client:
        response = test_client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 4})
        error = assert_error(response, 500, None, "internal error err-", code="internal_error")
        assert "boom" not in error["message"] and "RuntimeError" not in error["message"]
        logged_error_id(error["message"], caplog)
        assert test_client.get("/health").json()["busy"] is False
        assert test_client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}).status_code == 500


def test_a_bug_mid_stream_is_reported_in_band_with_an_id_then_done(generator, caplog):
    from fastapi.testclient import TestClient

    broken = make_app(BrokenGenerator(generator, fail_after_first=True))
    with TestClient(broken, raise_server_exceptions=False) as test_client:
        with test_client.stream(
            "POST", COMPLETIONS, json={"prompt": "hi", "max_tokens": 8, "stream": True}
        ) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert set(error) == ERROR_KEYS
        assert error["type"] == "server_error"
        assert "boom" not in error["message"]
        logged_error_id(error["message"], caplog)
        assert test_client.get("/health").json()["busy"] is False


def test_the_server_still_answers_after_every_kind_of_bad_request(client):
    for body, _, _ in BAD_CHAT_BODIES:
        client.post(CHAT, json=body)
    response = client.post(CHAT, json={"messages": USER, "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").json() == IDLE_HEALTH
