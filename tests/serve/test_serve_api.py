"""Non-streaming answers: OpenAI's shape, the same text as the generator, usage and the extension."""

from __future__ import annotations

import pytest
from serve_helpers import (
    DEFAULT_MAX_TOKENS,
    DRAFT_BUDGET,
    IDLE_HEALTH,
    MODEL_ALIAS,
    MODEL_ID,
    LookupDrafter,
    make_app,
)

from restspec.decode import GenerationConfig, SamplingConfig

MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def add(a, b):"},
]
CODE_PROMPT = "import os\nimport sys\n\nfor name in"


def direct(generator, prompt, max_new_tokens, *, chat=False, **kwargs):
    """What the generator itself answers, to compare the server's answer with."""
    return generator.generate(prompt, GenerationConfig(max_new_tokens=max_new_tokens, **kwargs), chat=chat)


def test_chat_completion_has_openai_shape_and_the_generators_text(client, generator):
    max_tokens = 10
    response = client.post(
        "/v1/chat/completions", json={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": max_tokens}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = direct(generator, MESSAGES, max_tokens, chat=True)

    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL_ID
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert (
        choice["finish_reason"] == {"eos": "stop", "stop": "stop", "length": "length"}[expected.finish_reason]
    )
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]  # what earlier tests left
    assert 0 <= cached < len(expected.prompt_ids)
    assert body["usage"] == {
        "prompt_tokens": len(expected.prompt_ids),
        "completion_tokens": len(expected.output_ids),
        "total_tokens": len(expected.prompt_ids) + len(expected.output_ids),
    }


def test_completion_accepts_a_string_a_list_of_one_string_and_token_ids(client, generator):
    max_tokens = 8
    expected = direct(generator, CODE_PROMPT, max_tokens)
    ids = generator.encode(CODE_PROMPT).tolist()
    for prompt in (CODE_PROMPT, [CODE_PROMPT], ids):
        response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion"
        assert body["id"].startswith("cmpl-")
        [choice] = body["choices"]
        assert choice["text"] == expected.text
        assert choice["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert body["usage"]["completion_tokens"] == max_tokens


def test_echo_puts_the_prompt_in_front(client):
    plain = client.post("/v1/completions", json={"prompt": CODE_PROMPT, "max_tokens": 4}).json()
    echoed = client.post(
        "/v1/completions", json={"prompt": CODE_PROMPT, "max_tokens": 4, "echo": True}
    ).json()
    assert echoed["choices"][0]["text"] == CODE_PROMPT + plain["choices"][0]["text"]


def test_max_completion_tokens_wins_over_max_tokens(client):
    body = {"messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 3}
    usage = client.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["completion_tokens"] == 3


def test_a_request_without_max_tokens_gets_the_servers_default(client, generator):
    body = client.post("/v1/completions", json={"prompt": CODE_PROMPT}).json()
    expected = direct(generator, CODE_PROMPT, DEFAULT_MAX_TOKENS)
    assert body["choices"][0]["text"] == expected.text
    assert body["usage"]["completion_tokens"] == len(expected.output_ids) == DEFAULT_MAX_TOKENS


def test_a_stop_string_cuts_the_text_before_it(client, generator):
    full = direct(generator, CODE_PROMPT, DEFAULT_MAX_TOKENS).text
    assert len(full) > 4, "the tiny model should produce some text"
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    for stop_field in (stop, [stop, "never in the output \u2603"]):
        body = client.post(
            "/v1/completions",
            json={"prompt": CODE_PROMPT, "max_tokens": DEFAULT_MAX_TOKENS, "stop": stop_field},
        ).json()
        [choice] = body["choices"]
        assert choice["finish_reason"] == "stop"
        assert choice["text"] == full[: full.index(stop)]


def test_an_end_of_sequence_token_finishes_with_stop(tiny_model, generator):
    """Make the first token the tiny model picks its end-of-sequence token: the answer ends there."""
    from fastapi.testclient import TestClient

    from restspec.decode import SpeculativeGenerator

    model, tokenizer = tiny_model
    first_token = int(direct(generator, CODE_PROMPT, 1).output_ids[0])
    eos_generator = SpeculativeGenerator(model, tokenizer, drafter=LookupDrafter())
    eos_generator.eos_token_ids = frozenset({first_token})
    with TestClient(make_app(eos_generator)) as eos_client:
        body = eos_client.post("/v1/completions", json={"prompt": CODE_PROMPT, "max_tokens": 5}).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 1


def test_seeded_sampling_is_repeatable_and_follows_the_generator(client, generator):
    sampling = {"temperature": 1.3, "top_p": 0.9, "top_k": 50, "seed": 1234}
    body = {"prompt": CODE_PROMPT, "max_tokens": 10, **sampling}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    again = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    expected = direct(generator, CODE_PROMPT, 10, sampling=SamplingConfig(**sampling)).text
    assert first == again == expected
    greedy = client.post("/v1/completions", json={"prompt": CODE_PROMPT, "max_tokens": 10}).json()
    assert greedy["choices"][0]["text"] != first, "sampling at temperature 1.3 should leave the greedy path"


def test_n_choices_are_the_answers_of_seeds_seed_plus_0_to_n_minus_1(client, generator):
    sampling = {"temperature": 1.3, "top_k": 50, "seed": 77}
    body = {"prompt": CODE_PROMPT, "max_tokens": 8, "n": 3, "restspec_stats": True, **sampling}
    answer = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in answer["choices"]]
    for index, text in enumerate(texts):
        seeded = SamplingConfig(**{**sampling, "seed": 77 + index})
        assert text == direct(generator, CODE_PROMPT, 8, sampling=seeded).text
    assert len(set(texts)) > 1, "three samples at temperature 1.3 should not all agree"
    usage, per_choice = answer["usage"], answer["restspec"]  # the prompt once, every choice's tokens
    assert usage["completion_tokens"] == sum(s["steps"] + s["accepted_draft_tokens"] for s in per_choice)
    single = client.post("/v1/completions", json={**body, "n": 1}).json()
    assert usage["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(single["restspec"], dict)
    chat = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, "n": 2}).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["choices"][0]["message"] == chat["choices"][1]["message"]  # greedy: one answer, twice


def test_the_restspec_extension_reports_speculation_only_when_asked(client):
    # The tiny model loops under greedy decoding, so the lookup drafter's drafts get accepted.
    body = {"prompt": CODE_PROMPT, "max_tokens": 60}
    assert "restspec" not in client.post("/v1/completions", json=body).json()
    body = client.post("/v1/completions", json={**body, "restspec_stats": True}).json()
    stats = body["restspec"]
    completion_tokens = body["usage"]["completion_tokens"]
    assert stats["steps"] >= 1
    assert stats["mean_accepted_tokens_per_step"] == pytest.approx(completion_tokens / stats["steps"])
    assert stats["accepted_draft_tokens"] == completion_tokens - stats["steps"]
    assert 0 < stats["accepted_draft_tokens"] <= stats["draft_tokens"] <= DRAFT_BUDGET * stats["steps"]
    assert stats["mean_accepted_tokens_per_step"] > 1.0
    assert stats["tokens_per_second"] > 0
    assert 0 <= stats["prefill_seconds"] <= stats["elapsed_seconds"]


def test_message_content_may_be_a_list_of_text_parts(client):
    parts = [{"type": "text", "text": "def add"}, {"type": "text", "text": "(a, b):"}]
    as_parts = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 6}
    ).json()
    as_text = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 6},
    ).json()
    assert as_parts["choices"] == as_text["choices"]
    # the same prompt tokens: the second request found all of them but the last cached
    details = as_text["usage"].pop("prompt_tokens_details")
    assert details == {"cached_tokens": as_text["usage"]["prompt_tokens"] - 1}
    as_parts["usage"].pop("prompt_tokens_details")
    assert as_parts["usage"] == as_text["usage"]


def test_model_may_be_the_id_an_alias_or_left_out(client):
    answers = []
    for model in (MODEL_ID, MODEL_ALIAS, None):
        body = {"prompt": CODE_PROMPT, "max_tokens": 3} | ({"model": model} if model else {})
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == MODEL_ID
        answers.append(response.json()["choices"])
    assert answers[0] == answers[1] == answers[2]


def test_models_lists_the_one_model(client, generator):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL_ID
    assert card["object"] == "model"
    assert card["max_model_len"] == generator.layout.max_positions
    assert client.get(f"/v1/models/{MODEL_ID}").json() == card
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_health_reports_an_idle_server(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == IDLE_HEALTH


def test_the_largest_seed_is_served(client):
    from restspec.serve.schemas import MAX_SEED

    body = {"prompt": CODE_PROMPT, "max_tokens": 2, "temperature": 1.0, "seed": MAX_SEED}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
