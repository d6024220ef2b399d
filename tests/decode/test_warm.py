"""Warm start: learned from the model's own conversations, saved, loaded, applied; output unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama, trained_bpe_tokenizer

from restspec.decode import GenerationConfig, SpeculativeGenerator
from restspec.decode.budget import AdaptiveBudget
from restspec.decode.warm import (
    WARM_START_VERSION,
    WarmStart,
    find_warm_start,
    learn_warm_start,
    load_or_learn_warm_start,
    question_prefix,
    shipped_warm_start,
    warm_start_path,
)
from restspec.draft import HistoryDrafter, MergedDrafter, RecycleDrafter, default_drafter
from restspec.draft.base import StatelessDrafter, Step
from restspec.models import load_tokenizer

TEXTS = ["Tell me about the sea. The sea is wide and deep.", "How do birds fly? Birds fly with wings."] * 4
CONVERSATIONS = 3


@pytest.fixture(scope="module")
def tiny():
    tokenizer = trained_bpe_tokenizer(TEXTS, vocab_size=300)
    model = tiny_llama(tokenizer, max_position_embeddings=96).eval()
    return SimpleNamespace(model=model, tokenizer=tokenizer, name="tiny-warm", vocab=len(tokenizer))


def fresh(tiny) -> tuple[MergedDrafter, AdaptiveBudget]:
    return default_drafter([], tiny.vocab), AdaptiveBudget(max_budget=6)


def learn(tiny, **kwargs) -> WarmStart:
    drafter, policy = fresh(tiny)
    with torch.inference_mode():
        return learn_warm_start(
            SpeculativeGenerator(tiny.model, tiny.tokenizer, budget=0),
            SpeculativeGenerator(tiny.model, tiny.tokenizer, drafter=drafter, budget=policy),
            conversations=CONVERSATIONS,
            question_tokens=12,
            answer_tokens=16,
            **kwargs,
        )


@pytest.fixture(scope="module")
def warm(tiny) -> WarmStart:
    return learn(tiny)


def test_learns_conversations_and_state(tiny, warm):
    assert len(warm.prompts) == len(warm.outputs) == CONVERSATIONS
    prefix = question_prefix(tiny.tokenizer)
    for prompt, output in zip(warm.prompts, warm.outputs, strict=True):
        assert prompt[: len(prefix)].tolist() == prefix.tolist()  # the question sits in the user turn
        assert 1 <= len(output) <= 16
    recycle = warm.drafter_state["extender"]
    assert (recycle["table"][:, 0] >= 0).sum() > 0  # rows the verification passes scored
    assert recycle["trials"].sum() > 0
    assert set(warm.drafter_state["sources"]) == {"0", "1"}  # context, history
    assert warm.drafter_state["calibration"]["trials"].sum() > 0
    assert warm.drafter_state["correction"]["steps"] > 0
    assert warm.policy_state == {}  # the adaptive policy learns only this machine's costs
    assert warm.summary() == {
        "version": WARM_START_VERSION,
        "conversations": CONVERSATIONS,
        "output_tokens": sum(len(o) for o in warm.outputs),
    }


def test_same_seed_same_conversations(tiny, warm):
    again = learn(tiny)
    assert [p.tolist() for p in again.prompts] == [p.tolist() for p in warm.prompts]
    assert [o.tolist() for o in again.outputs] == [o.tolist() for o in warm.outputs]
    other = learn(tiny, seed=100)
    assert [p.tolist() for p in other.prompts] != [p.tolist() for p in warm.prompts]


def test_question_prefix_without_chat_template(tiny):
    tokenizer = trained_bpe_tokenizer(TEXTS, vocab_size=300, bos_token="<|endoftext|>")
    tokenizer.chat_template = None
    assert question_prefix(tokenizer).tolist() == [tokenizer.bos_token_id]
    assert question_prefix(tiny.tokenizer).tolist() == tiny.tokenizer("<|im_start|>user\n")["input_ids"]


def test_save_load_round_trip(tmp_path, warm):
    path = tmp_path / "warm.npz"
    warm.save(path)
    loaded = WarmStart.load(path)
    assert [p.tolist() for p in loaded.prompts] == [p.tolist() for p in warm.prompts]
    assert [o.tolist() for o in loaded.outputs] == [o.tolist() for o in warm.outputs]
    assert_same_state(loaded.drafter_state, warm.drafter_state)
    assert_same_state(loaded.policy_state, warm.policy_state)
    assert loaded.drafter_state["sources"]["0"] == {}  # the context drafter's empty state survives


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in b.items():
        if isinstance(value, dict):
            assert_same_state(a[key], value)
        else:
            np.testing.assert_array_equal(a[key], value)


def test_load_rejects_other_files(tmp_path, warm):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a warm start"):
        WarmStart.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, version=np.asarray(WARM_START_VERSION + 1))
    with pytest.raises(ValueError, match="version"):
        WarmStart.load(other)


def test_apply_loads_the_learned_states(tiny, warm):
    drafter, policy = fresh(tiny)
    assert warm.apply(drafter, policy)
    assert_same_state(drafter.state_dict(), warm.drafter_state)
    assert_same_state(policy.state_dict(), warm.policy_state)
    history = next(d for d in drafter.drafters if isinstance(d, HistoryDrafter))
    assert history.num_tokens == sum(len(o) for o in warm.outputs)


def test_apply_replays_the_conversations_where_the_state_does_not_fit(tiny, warm):
    # another vocabulary: the recycling table does not fit, so nothing of the state is taken (the
    # parts that did fit are restored); the drafter learns from the replayed outputs instead, as any
    # drafter does; a policy of another size still takes what was learned about the drafts
    small = default_drafter([], tiny.vocab - 1)
    policy = AdaptiveBudget(max_budget=3)
    assert not warm.apply(small, policy)
    assert small.calibration.trials.sum() == 0
    replayed = RecycleDrafter(tiny.vocab - 1)
    for prompt, output in zip(warm.prompts, warm.outputs, strict=True):
        replayed.observe(Step.finished(prompt, output))
    np.testing.assert_array_equal(small.extender.table, replayed.table)
    history = next(d for d in small.drafters if isinstance(d, HistoryDrafter))
    assert history.num_tokens == sum(len(o) for o in warm.outputs)
    assert_same_state(policy.state_dict(), warm.policy_state)


class Recorder(StatelessDrafter):
    """Records the requests a warm start replays into it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def start_request(self, prompt, request=0):
        self.calls.append(("start", np.asarray(prompt).tolist()))

    def observe(self, step):
        assert step.logits is None and len(step.tree) == 0
        self.calls.append(("observe", np.asarray(step.accepted).tolist()))

    def stop_request(self, request=0):
        self.calls.append(("stop", []))

    def propose(self, context, budget):  # pragma: no cover - never asked
        raise AssertionError


def test_apply_replays_conversations_into_any_drafter(warm):
    recorder = Recorder()
    assert not warm.apply(recorder)  # a stateless drafter's empty state is not the default drafter's
    expected = []
    for prompt, output in zip(warm.prompts, warm.outputs, strict=True):
        expected += [("start", prompt.tolist()), ("observe", output.tolist()), ("stop", [])]
    assert recorder.calls == expected


def test_warm_generation_stays_exact(tiny, warm):
    config = GenerationConfig(max_new_tokens=20)
    prompt = tiny.tokenizer("The sea is")["input_ids"]
    plain = SpeculativeGenerator(tiny.model, tiny.tokenizer, budget=0).generate(prompt, config)
    drafter, policy = fresh(tiny)
    warm.apply(drafter, policy)
    warmed = SpeculativeGenerator(tiny.model, tiny.tokenizer, drafter=drafter, budget=policy)
    result = warmed.generate(prompt, config)
    assert result.output_ids.tolist() == plain.output_ids.tolist()


def test_load_or_learn_caches_and_relearns_a_corrupt_file(tmp_path, monkeypatch, tiny, warm):
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path))
    path = warm_start_path(tiny.name, "float32", tiny.tokenizer)
    assert path.parent == tmp_path / "warm"
    made = []

    def make():
        made.append(1)
        return fresh(tiny)

    import restspec.decode.warm as warm_module

    def quick(asker, answerer, **kwargs):
        return learn(tiny)

    monkeypatch.setattr(warm_module, "learn_warm_start", quick)
    first = load_or_learn_warm_start(tiny, make)
    assert path.is_file() and len(made) == 1
    second = load_or_learn_warm_start(tiny, make)
    assert len(made) == 1 and [o.tolist() for o in second.outputs] == [o.tolist() for o in first.outputs]
    path.write_bytes(b"corrupt")
    load_or_learn_warm_start(tiny, make)
    assert len(made) == 2 and WarmStart.load(path).summary() == warm.summary()


def test_the_embedded_models_warm_start_ships_for_this_version(monkeypatch, tmp_path):
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path))  # an empty cache: only the shipped one is found
    # a bump of WARM_START_VERSION renames the cache file: the shipped one must be learned again
    path = warm_start_path("smollm2-135m-instruct-q4_1", "float32", load_tokenizer("smollm2"))
    shipped = shipped_warm_start(path.name)
    assert shipped is not None, f"no shipped warm start {path.name}: learn it (restspec.decode.warm)"
    assert WarmStart.load(shipped).summary()["version"] == WARM_START_VERSION
    # found by model name, dtype and tokenizer, without loading the model
    found = find_warm_start("smollm2-135m-instruct-q4_1", "float32", load_tokenizer("smollm2"))
    assert found is not None and found.summary() == WarmStart.load(shipped).summary()
