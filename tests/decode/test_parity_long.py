"""Greedy parity over long generations: 430 tokens, past the KV cache buffer's first growth.

The verification cache writes into a buffer with spare rows and copies it into a larger one when it
fills (``BufferedLayer``: at least GROW_MIN spare rows, so the first copy comes after about 256
generated tokens). A mistake in that copy only shows after it, where the short parity tests never
reach. Tiny random models fall into repetitive text, so the request's own context drafts well and
many drafts are accepted across the growth.
"""

from __future__ import annotations

import pytest
import torch
from conftest import IdTokenizer, build_config, plain_greedy
from transformers import AutoModelForCausalLM

from restspec.decode import GenerationConfig, SpeculativeGenerator
from restspec.decode.verify import BufferedLayer
from restspec.draft import ContextDrafter

PROMPT = [5, 17, 33, 2, 61, 7, 7, 40]
NEW_TOKENS = 430
POSITIONS = 512


def long_model(arch: str) -> torch.nn.Module:
    """A tiny float64 model (as conftest.tiny_model) with room for ``POSITIONS`` positions."""
    config = build_config(arch)
    if arch == "gpt2":
        config.n_positions = POSITIONS
    else:
        config.max_position_embeddings = POSITIONS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def first_capacity() -> int:
    """Rows of the first buffer: the prefilled prompt (all but its last token) and the spare rows."""
    prefilled = len(PROMPT) - 1
    return max(2 * prefilled, prefilled + BufferedLayer.GROW_MIN)


def test_the_generation_outgrows_the_first_buffer():
    assert len(PROMPT) + NEW_TOKENS >= first_capacity() + 100  # 100+ tokens after the first copy


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-hybrid", "mistral"])
def test_greedy_parity_past_the_first_cache_growth(arch):
    model = long_model(arch)
    expected = plain_greedy(model, PROMPT, NEW_TOKENS)
    gen = SpeculativeGenerator(model, IdTokenizer(), ContextDrafter(), budget=8)
    result = gen.generate(PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS))
    output = result.output_ids.tolist()
    first_difference = next(
        (i for i, (a, b) in enumerate(zip(output, expected, strict=True)) if a != b), None
    )
    assert first_difference is None, f"{arch}: first differs at generated token {first_difference}"
    # drafts were accepted, also after the growth
    length, accepted_after = len(PROMPT), 0
    for step in result.steps:
        if length > first_capacity():
            accepted_after += step.accepted
        length += step.emitted
    assert accepted_after > 10, accepted_after
