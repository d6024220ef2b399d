"""Record a run's drafter and policy calls on a tiny model, replay them without it."""

from __future__ import annotations

import numpy as np

from benchmarks.overhead import PARTS, Trace, record_calls, replay
from restspec.decode import GenerationConfig, SpeculativeGenerator
from restspec.decode.budget import AdaptiveBudget, LatencyCurve
from restspec.draft import default_drafter

PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 8, 9, 8, 9, 8]]


def recorded(tiny_model, tiny_tokenizer) -> Trace:
    vocab = tiny_model.get_input_embeddings().num_embeddings
    curve = LatencyCurve.reference()
    events = record_calls(
        tiny_model, tiny_tokenizer, default_drafter([], vocab), AdaptiveBudget(curve), PROMPTS, 24
    )
    return Trace(events, curve.to_json(), vocab, [])


def test_recording_leaves_the_output_alone(tiny_model, tiny_tokenizer):
    vocab = tiny_model.get_input_embeddings().num_embeddings
    plain = SpeculativeGenerator(tiny_model, tiny_tokenizer, budget=0)
    events = []
    for prompt in PROMPTS:
        policy = AdaptiveBudget(LatencyCurve.reference())
        start = len(events)
        events += record_calls(tiny_model, tiny_tokenizer, default_drafter([], vocab), policy, [prompt], 24)
        accepted = [e[2] for e in events[start:] if e[0] == "observe"]
        expected = plain.generate(prompt, GenerationConfig(max_new_tokens=24)).output_ids
        assert np.concatenate(accepted).tolist() == expected.tolist()
    kinds = [e[0] for e in events]
    assert kinds.count("start") == kinds.count("stop") == len(PROMPTS)
    assert (
        kinds.count("propose")
        == kinds.count("choose")
        == kinds.count("observe")
        == kinds.count("observe_policy")
    )


def test_replay_chooses_the_recorded_trees(tiny_model, tiny_tokenizer):
    trace = recorded(tiny_model, tiny_tokenizer)
    first, second = replay(trace, []), replay(trace, [])
    steps = sum(e[0] == "propose" for e in trace.events)
    assert first.steps == steps and first.mismatches == 0
    assert first.digest == second.digest
    assert set(first.seconds) == set(PARTS) and all(s >= 0 for s in first.seconds.values())
    # a recording whose first chosen tree differs is caught
    index = next(i for i, e in enumerate(trace.events) if e[0] == "choose")
    past_len, tokens = trace.events[index][1:]
    trace.events[index] = ("choose", past_len, np.append(tokens, 12345))
    assert replay(trace, []).mismatches == 1
