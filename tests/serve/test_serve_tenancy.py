"""Tenancy: one client's past outputs never draft for another, so neither the opt-in figures nor the
number of steps (what the answer's time follows) tell a client what another was answered.

The attack: tenant A is given an answer; tenant B sends the same question and reads, from the accepted
draft tokens or the speed, whether the drafter already knew the answer (membership inference, the class of
vLLM's prefix-cache CVE-2025-46570). The drafter here drafts from past outputs only, so what it accepts is
exactly the signal; with --shared-history (the negative control) the attack works."""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import HistoryOnlyDrafter, LookupDrafter, make_app

from restspec.serve import AccessConfig, HistoryMode
from restspec.serve.tenancy import ANONYMOUS, DrafterMemory, tenant_of

KEY_A = "a" * 24
KEY_B = "b" * 24
QUESTION = {"prompt": "import os\nimport sys\n\nfor name in", "max_tokens": 40}
STATS = {"restspec_stats": True}


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def server(tiny_model, request):
    """A fresh server (cold drafter) with two keys, in the history mode the test is parametrized with."""
    from fastapi.testclient import TestClient

    from restspec.decode import SpeculativeGenerator

    model, tokenizer = tiny_model
    generator = SpeculativeGenerator(model, tokenizer, drafter=HistoryOnlyDrafter(), budget=4)
    app = make_app(generator, access=AccessConfig(api_keys=(KEY_A, KEY_B)), history=request.param)
    with TestClient(app) as client:
        yield client


def ask(client, key: str, **extra) -> dict:
    response = client.post("/v1/completions", json={**QUESTION, **extra}, headers=headers(key))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("server", [HistoryMode.tenant], indirect=True)
def test_another_tenants_answer_does_not_draft_for_you(server):
    cold = ask(server, KEY_B, user="probe-0", **STATS)["restspec"]  # B before anyone asked anything
    assert cold["accepted_draft_tokens"] == 0
    answer = ask(server, KEY_A)
    assert "restspec" not in answer, "figures are opt-in"
    again = ask(server, KEY_A, **STATS)
    assert again["restspec"]["accepted_draft_tokens"] > 0, "A's own history drafts for A"
    assert again["choices"] == answer["choices"]

    probe = ask(server, KEY_B, **STATS)
    assert probe["choices"] == answer["choices"]  # the same greedy answer...
    figures = probe["restspec"]
    assert figures["accepted_draft_tokens"] == cold["accepted_draft_tokens"] == 0  # ...learned nothing
    assert figures["steps"] == cold["steps"] == probe["usage"]["completion_tokens"]  # nor from its speed

    # within one key, the `user` field separates tenants too
    assert ask(server, KEY_A, user="someone-else", **STATS)["restspec"]["accepted_draft_tokens"] == 0


@pytest.mark.parametrize("server", [HistoryMode.shared], indirect=True)
def test_with_shared_history_the_attack_works(server):
    """The negative control: the same probe reads A's answer out of the figures and the step count."""
    ask(server, KEY_A)
    figures = ask(server, KEY_B, **STATS)["restspec"]
    assert figures["accepted_draft_tokens"] > 0
    assert figures["steps"] < QUESTION["max_tokens"]


@pytest.mark.parametrize("server", [HistoryMode.off], indirect=True)
def test_with_history_off_not_even_your_own_answers_draft(server):
    ask(server, KEY_A)
    assert ask(server, KEY_A, **STATS)["restspec"]["accepted_draft_tokens"] == 0


def remember(drafter: HistoryOnlyDrafter, tokens: list[int]) -> None:
    drafter.start_request(np.array([1], np.int32))
    drafter.remember(np.array(tokens, np.int32))
    drafter.stop_request()


def test_memory_keeps_each_tenants_state_and_forgets_the_least_recent_first():
    drafter = HistoryOnlyDrafter()
    remember(drafter, [9])  # the startup state (a warm start, say)
    memory = DrafterMemory(drafter, HistoryMode.tenant, tenants=2)
    for tenant, tokens in (("a", [1, 2]), ("b", [3, 4])):
        memory.enter(tenant)
        remember(drafter, tokens)
    memory.enter("a")
    assert drafter.history.tolist() == [9, 1, 2]
    memory.enter("c")  # a third tenant: b, the least recently served, is forgotten
    assert drafter.history.tolist() == [9]
    assert memory.tenants_kept == 2
    memory.enter("b")
    assert drafter.history.tolist() == [9]
    memory.enter("c")
    assert drafter.history.tolist() == [9]


def test_tenant_ids_are_digests_of_key_and_user():
    assert tenant_of(None, None) == ANONYMOUS
    ids = {tenant_of(KEY_A, None), tenant_of(KEY_B, None), tenant_of(KEY_A, "u"), tenant_of(None, "u")}
    assert len(ids) == 4
    assert all(KEY_A not in t and len(t) == 16 for t in ids)


def test_a_drafter_without_state_needs_shared_history():
    class NoState(LookupDrafter):
        state_dict = None
        load_state_dict = None

    with pytest.raises(TypeError, match="--shared-history"):
        DrafterMemory(NoState(), HistoryMode.tenant, tenants=4)
    DrafterMemory(NoState(), HistoryMode.shared, tenants=4)
