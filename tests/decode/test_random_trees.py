"""Random draft trees with planted end-of-sequence ids and stop-string tokens: greedy output equals
``model.generate`` with the same EOS ids and stop strings, on several architectures (hypothesis).

The tokenizer spells each of the 96 ids as one or two characters and decodes by concatenation, so a
stop string can span tokens, and transformers' StopStringCriteria and restspec's stop-string matcher
read the same text.
"""

from __future__ import annotations

import functools
import string

import numpy as np
import torch
from conftest import VOCAB, plain_greedy, tiny_model, trie
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from restspec.decode import GenerationConfig, SpeculativeGenerator
from restspec.draft.base import StatelessDrafter
from restspec.draft.tree import DraftTree

ARCHS = ("llama", "gpt2", "qwen2-hybrid", "gemma2", "gpt-neox")
NEW_TOKENS = 24
BIGRAMS = [
    "th",
    "he",
    "in",
    "er",
    "an",
    "re",
    "on",
    "at",
    "en",
    "nd",
    "ti",
    "es",
    "or",
    "te",
    "of",
    "ed",
    "is",
    "it",
    "al",
    "ar",
    "st",
    "to",
    "nt",
    "ng",
    "se",
    "ha",
]
PIECES = [*string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *" .,;:!?-", *BIGRAMS]
"""The spelling of each id (96 of them, as the tiny models' vocabulary)."""


@functools.cache
def char_tokenizer():
    """Id i decodes to PIECES[i]; text encodes one character per token (for transformers' stop-string
    criteria, which encodes a probe string)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert len(PIECES) == VOCAB
    core = Tokenizer(models.WordLevel({p: i for i, p in enumerate(PIECES)}, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def spell(ids) -> str:
    return "".join(PIECES[i] for i in ids)


class PlantedTreeDrafter(StatelessDrafter):
    """Tries of 1-4 paths along the known greedy continuation ``truth``, each cut at a random depth,
    with tokens swapped at random for ``planted`` ones (EOS ids, tokens of a stop string) or any id."""

    def __init__(self, truth: list[int], planted: list[int], seed: int) -> None:
        self.truth = truth
        self.planted = planted or [0]
        self.rng = np.random.default_rng(seed)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        rng = self.rng
        cont = self.truth[len(context) : len(context) + budget]
        paths = []
        for _ in range(int(rng.integers(1, 5))):
            path = list(cont[: int(rng.integers(0, len(cont) + 1))]) or [int(rng.integers(0, VOCAB))]
            for j in range(len(path)):
                roll = rng.random()
                if roll < 0.25:
                    path[j] = int(rng.choice(self.planted))
                elif roll < 0.35:
                    path[j] = int(rng.integers(0, VOCAB))
            paths.append(path)
        return trie(paths, budget)


def reference(model, prompt: list[int], stop: str | None) -> list[int]:
    """transformers' greedy generate, stopping at the model's EOS ids and at ``stop``."""
    ids = torch.tensor([prompt])
    kwargs = {"stop_strings": [stop], "tokenizer": char_tokenizer()} if stop else {}
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs
        )
    return out[0, len(prompt) :].tolist()


def straddles(prompt_text: str, text: str, stop: str) -> bool:
    """``stop`` occurs across the prompt's end: transformers stops there (it matches the whole
    sequence), restspec matches the generated text only."""
    full = prompt_text + text
    return any(
        full.startswith(stop, i) for i in range(max(0, len(prompt_text) - len(stop) + 1), len(prompt_text))
    )


@settings(max_examples=40, derandomize=True)
@given(data=st.data())
def test_random_trees_with_planted_eos_and_stop_strings_match_generate(data):
    arch = data.draw(st.sampled_from(ARCHS), label="arch")
    prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12), label="prompt")
    model = tiny_model(arch)
    free = plain_greedy(model, prompt, NEW_TOKENS)
    eos_at = data.draw(st.lists(st.integers(0, NEW_TOKENS - 1), max_size=2, unique=True), label="eos at")
    eos_ids = sorted({free[i] for i in eos_at})
    text = spell(free)
    stop = None
    if data.draw(st.booleans(), label="stop string"):
        start = data.draw(st.integers(0, len(text) - 1), label="stop start")
        stop = text[start : start + data.draw(st.integers(1, 4), label="stop length")]
        assume(not straddles(spell(prompt), text, stop))
    planted = eos_ids + [i for i, piece in enumerate(PIECES) if stop and piece in stop]
    budget = data.draw(st.sampled_from([2, 5, 12]), label="budget")
    seed = data.draw(st.integers(0, 2**16), label="drafter seed")

    model.generation_config.eos_token_id = eos_ids or None
    try:
        expected = reference(model, prompt, stop)
        drafter = PlantedTreeDrafter(prompt + free, planted, seed)
        gen = SpeculativeGenerator(model, char_tokenizer(), drafter, budget=budget)
        result = gen.generate(
            prompt, GenerationConfig(max_new_tokens=NEW_TOKENS, stop_strings=(stop,) if stop else ())
        )
    finally:
        model.generation_config.eos_token_id = None
    assert result.output_ids.tolist() == expected
    event(f"finish: {result.finish_reason}")  # pytest --hypothesis-show-statistics
    event(f"accepted drafts: {'some' if any(s.accepted for s in result.steps) else 'none'}")
    if stop and stop in spell(expected):  # also when the token completing it is an EOS id
        assert result.finish_reason == "stop"
        assert result.text == spell(expected)[: spell(expected).index(stop)]
    elif expected[-1] in eos_ids:
        assert result.finish_reason == "eos"
    else:
        assert result.finish_reason == "length" and len(expected) == NEW_TOKENS
