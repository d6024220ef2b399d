"""End to end on the embedded SmolLM2-135M-Instruct: drafting changes speed, never the output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from restspec.decode import GenerationConfig, SpeculativeGenerator
from restspec.draft.base import StatelessDrafter
from restspec.draft.tree import DraftTree

pytestmark = pytest.mark.slow

NGRAM = 2
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def factorial(n):\n",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
]


class NgramDrafter(StatelessDrafter):
    """Drafts a small tree from the context: what followed the last two matches of its last NGRAM tokens."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        key = context[-NGRAM:]
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], NGRAM)
        hits = np.flatnonzero((windows == key).all(axis=1))[::-1][:2]
        seqs = [context[h + NGRAM : h + NGRAM + budget].tolist() for h in hits]
        index: dict[tuple[int, int], int] = {}
        tokens, parents = [], []
        for seq in seqs:
            parent = -1
            for token in seq:
                if (parent, token) not in index and len(tokens) < budget:
                    index[(parent, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(parent)
                if (parent, token) not in index:
                    break
                parent = index[(parent, token)]
        return DraftTree(np.array(tokens, dtype=np.int32), np.array(parents, dtype=np.int32))


@pytest.fixture(scope="module")
def embedded():
    from restspec.models import load_model

    return load_model("smollm2")


def test_embedded_model_loads_ready_for_inference(embedded):
    assert embedded.name == "smollm2-135m-instruct-q4_1"
    assert not embedded.model.training and embedded.model.dtype == torch.float32
    assert embedded.tokenizer.chat_template


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_output_is_identical_with_and_without_drafting(embedded, chat):
    config = GenerationConfig(max_new_tokens=48)
    plain = SpeculativeGenerator(embedded.model, embedded.tokenizer)
    spec = SpeculativeGenerator(embedded.model, embedded.tokenizer, NgramDrafter(), budget=8)
    for prompt in PROMPTS:
        a = plain.generate(prompt, config, chat=chat)
        b = spec.generate(prompt, config, chat=chat)
        assert b.output_ids.tolist() == a.output_ids.tolist()
        assert b.text == a.text and b.finish_reason == a.finish_reason
        decoded = embedded.tokenizer.decode(a.output_ids.tolist(), skip_special_tokens=True)
        assert a.text == decoded  # the incremental text adds up to a plain decode
        assert sum(s.accepted for s in b.steps) > 0  # drafts were really accepted
        assert len(b.steps) < len(a.steps)
    # and the plain loop is transformers' greedy decoding
    ids = torch.tensor([plain.encode(PROMPTS[0], chat).tolist()])
    with torch.inference_mode():
        ref = embedded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False
        )
    assert (
        ref[0, ids.shape[1] :].tolist() == plain.generate(PROMPTS[0], config, chat=chat).output_ids.tolist()
    )
