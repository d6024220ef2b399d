"""Tenancy: one client's past outputs never draft for another, so neither the opt-in figures nor the
number of steps (what the answer's time follows) tell a client what another was answered.

The attack: tenant A is given an answer; tenant B sends the same question and reads, from the accepted
draft tokens or the speed, whether the drafter already knew the answer (membership inference, the class of
vLLM's prefix-cache CVE-2025-46570). The drafter here drafts from past outputs only, so what it accepts is
exactly the signal; with --shared-history (the negative control) the attack works. Kept prefixes
(prefix reuse) are a tenant's own in every mode: B's prompt is never prefilled from A's cache."""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import HistoryOnlyDrafter, LookupDrafter, make_app

from restspec.serve import AccessConfig, HistoryMode
from restspec.serve.tenancy import ANONYMOUS, TenantDrafters, tenant_of

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
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == again["usage"]["prompt_tokens"] - 1, "A's own earlier cache serves A"

    probe = ask(server, KEY_B, **STATS)
    assert probe["choices"] == answer["choices"]  # the same greedy answer...
    figures = probe["restspec"]
    assert figures["accepted_draft_tokens"] == cold["accepted_draft_tokens"] == 0  # ...learned nothing
    assert figures["steps"] == cold["steps"] == probe["usage"]["completion_tokens"]  # nor from its speed
    assert probe["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # nor from A's cached prefill

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


def serve_one(drafters: TenantDrafters, tenant: str, tokens: list[int] = ()) -> list[int]:
    """A request of ``tenant`` that outputs ``tokens``; returns the history its drafter held before."""
    with drafters.drafting(tenant) as drafter:
        held = drafter.history.tolist()
        remember(drafter, list(tokens))
    return held


def test_one_drafter_keeps_each_tenants_state_and_forgets_the_least_recent_first():
    drafter = HistoryOnlyDrafter()
    remember(drafter, [9])  # the startup state (a warm start, say)
    drafters = TenantDrafters(drafter, HistoryMode.tenant, tenants=2)
    assert serve_one(drafters, "a", [1, 2]) == [9]
    assert serve_one(drafters, "b", [3, 4]) == [9]
    assert serve_one(drafters, "a") == [9, 1, 2]
    serve_one(drafters, "c")  # a third tenant: b, the least recently served, is forgotten
    assert drafters.tenants_kept == 2
    assert serve_one(drafters, "b") == [9]
    assert serve_one(drafters, "c") == [9]
    assert drafters.drafters == 1


def test_tenants_running_together_each_get_a_drafter_of_the_pool():
    """Up to ``slots`` drafters (one per request that may run at once); a tenant's requests share
    its drafter; an idle drafter passes to another tenant with its state saved back."""
    startup = HistoryOnlyDrafter()
    remember(startup, [9])
    drafters = TenantDrafters(startup, HistoryMode.tenant, tenants=8, slots=2, new_drafter=HistoryOnlyDrafter)
    with drafters.drafting("a") as a, drafters.drafting("b") as b, drafters.drafting("a") as a_again:
        assert a is startup and b is not a and a_again is a
        assert b.history.tolist() == [9]  # a new drafter starts from the startup state
        remember(a, [1])
        remember(b, [2])
        with pytest.raises(RuntimeError, match="all 2 drafters are in use"), drafters.drafting("c"):
            pass
        assert drafters.states() == {}, "running tenants have no saved state yet"
    assert serve_one(drafters, "c", [3]) == [9]  # takes a's drafter (least recently served)...
    assert drafters.drafters == 2
    assert serve_one(drafters, "a") == [9, 1]  # ...whose state was saved back, and comes back
    states = drafters.states()
    assert list(states) == ["b", "c", "a"]
    assert [states[t]["history"].tolist() for t in states] == [[9, 2], [9, 3], [9, 1]]


def test_history_off_resets_every_request_and_shared_history_has_one_drafter():
    startup = HistoryOnlyDrafter()
    off = TenantDrafters(startup, HistoryMode.off, tenants=4, slots=2, new_drafter=HistoryOnlyDrafter)
    assert serve_one(off, "a", [1]) == serve_one(off, "a", [2]) == []
    shared = TenantDrafters(startup, HistoryMode.shared, tenants=4, slots=2)
    with shared.drafting("a") as a, shared.drafting("b") as b:
        assert a is b is startup


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
        TenantDrafters(NoState(), HistoryMode.tenant, tenants=4)
    TenantDrafters(NoState(), HistoryMode.shared, tenants=4, slots=8)
    with pytest.raises(ValueError, match="needs new_drafter"):
        TenantDrafters(LookupDrafter(), HistoryMode.tenant, tenants=4, slots=2)
