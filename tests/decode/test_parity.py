"""Speculative greedy output equals ``model.generate(do_sample=False)`` token for token, on tiny random
models of several architectures and attention variants (multi-query attention, rope scaling, partial
rotary embeddings), for many prompts and adversarial draft trees, with one or several EOS ids."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ARCHS, VARIANT_ARCHS, VOCAB, IdTokenizer, OracleDrafter, plain_greedy, tiny_model

from restspec.decode import GenerationConfig, SpeculativeGenerator

MODES = ("empty", "chain", "wrong", "fan", "mixed")
NEW_TOKENS = 24
PROMPT_LENGTHS = (1, 3, 9, 17)
BUDGETS = (
    4,
    16,
)  # alternated over prompts and modes  # 1: nothing to prefill; 9 and 17 cross the sliding window


def prompts(count_seed: int) -> list[list[int]]:
    rng = np.random.default_rng(count_seed)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


ALL_ARCHS = ARCHS + VARIANT_ARCHS


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_greedy_parity_every_tree_shape(arch):
    model = tiny_model(arch)
    for i, prompt in enumerate(prompts(ALL_ARCHS.index(arch))):
        expected = plain_greedy(model, prompt, NEW_TOKENS)
        for j, mode in enumerate(MODES):
            for budget in BUDGETS[(i + j) % 2 :: 2]:
                drafter = OracleDrafter(prompt + expected, mode, VOCAB, seed=budget)
                gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=budget)
                result = gen.generate(prompt, GenerationConfig(max_new_tokens=NEW_TOKENS))
                assert result.output_ids.tolist() == expected, (arch, mode, budget, prompt)
                assert result.finish_reason == "length"
                assert sum(s.emitted for s in result.steps) == NEW_TOKENS
                accepted = sum(s.accepted for s in result.steps)
                if mode in ("empty", "wrong"):
                    assert accepted == 0
                if mode == "chain":  # the truth, so every step accepts its whole (depth-limited) tree
                    assert len(result.steps) < NEW_TOKENS / 2


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_eos_inside_a_draft_stops_there(arch):
    model = tiny_model(arch)
    prompt = prompts(7)[2]
    free = plain_greedy(model, prompt, NEW_TOKENS)
    eos = free[9]  # a token the model emits at step 10 (maybe earlier too)
    model.generation_config.eos_token_id = eos
    try:
        expected = plain_greedy(model, prompt, NEW_TOKENS)
        stop = expected.index(eos)
        assert expected[stop + 1 :] in ([], [0] * (len(expected) - stop - 1))  # generate pads after EOS
        expected = expected[: stop + 1]
        # the chain drafts past the EOS: tokens after it must not be emitted
        for mode in ("chain", "mixed"):
            drafter = OracleDrafter(prompt + free, mode, VOCAB)
            gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=16)
            result = gen.generate(prompt, GenerationConfig(max_new_tokens=NEW_TOKENS))
            assert result.output_ids.tolist() == expected
            assert result.finish_reason == "eos"
    finally:
        model.generation_config.eos_token_id = None


@pytest.mark.parametrize("max_new", [1, 2, 5, 13])
def test_never_more_than_max_new_tokens_even_when_a_step_accepts_many(max_new):
    model = tiny_model("llama")
    prompt = prompts(3)[1]
    expected = plain_greedy(model, prompt, max_new)
    drafter = OracleDrafter(prompt + plain_greedy(model, prompt, 40), "chain", VOCAB)
    gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=32)
    result = gen.generate(prompt, GenerationConfig(max_new_tokens=max_new))
    assert result.output_ids.tolist() == expected
    assert all(s.drafted <= max_new - 1 for s in result.steps)  # depth capped to what can be emitted


@pytest.mark.parametrize("arch", ["llama", "mqa", "gpt-neox", "gemma2"])
def test_several_eos_ids_stop_at_the_first_one_emitted(arch):
    model = tiny_model(arch)
    prompt = prompts(11)[2]
    free = plain_greedy(model, prompt, NEW_TOKENS)
    # three ids the model emits at steps 13, 6 and 10 (maybe earlier too): generation stops at the first
    eos_ids = [free[12], free[5], free[9]]
    model.generation_config.eos_token_id = eos_ids
    try:
        expected = plain_greedy(model, prompt, NEW_TOKENS)
        stop = min(i for i, t in enumerate(expected) if t in eos_ids)
        expected = expected[: stop + 1]  # generate pads after EOS
        for mode, budget in (("chain", 16), ("mixed", 16), ("fan", 6)):
            drafter = OracleDrafter(prompt + free, mode, VOCAB)  # drafts run past the EOS
            gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=budget)
            result = gen.generate(prompt, GenerationConfig(max_new_tokens=NEW_TOKENS))
            assert result.output_ids.tolist() == expected, (mode, eos_ids)
            assert result.finish_reason == "eos"
    finally:
        model.generation_config.eos_token_id = None
