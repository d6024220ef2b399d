"""Speculative sampling through the whole generator has transformers' own sampling distribution.

``SpeculativeGenerator.generate`` runs with random draft trees (some accepted, most rejected) once per
seed; ``model.generate(do_sample=True)`` draws the reference in one batch. Tiny model, vocabulary of
8, the first K = 4 generated tokens. A chi-square homogeneity test compares the two samples on the
joint of the first two tokens and on the token at each of the K positions (Bonferroni over those
K + 1 tests, family-wise false alarm rate ALPHA). Seeds are fixed, so the outcome is deterministic.

Negative control: the real draw (``restspec.decode.accept.draw_from_cdf``) tilted to make one token
TILT times likelier (then renormalized) must be rejected. Scanned while writing the test (p-values):
token 5 (probability 0.1-0.3 per position) x1.15: 0.023, x1.2: 0.016, x1.25: 0.0023, x1.3: 9e-5,
x1.5: 3e-13; token 2 (at most 0.08) x1.3: 0.57, x1.5: 5e-4. So at ALPHA this sample size detects a
x1.3 tilt of a common token and a x1.5 tilt of a rare one; the test plants the former.

Two requests without a seed differ (the chance that they agree is computed and negligible).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from conftest import SAMPLING_VOCAB, IdTokenizer, sampling_model, tiny_model

from restspec.decode import GenerationConfig, SamplingConfig, SpeculativeGenerator
from restspec.draft import ContextDrafter
from restspec.draft.base import StatelessDrafter
from restspec.draft.tree import DraftTree

accept_module = importlib.import_module("restspec.decode.accept")  # `restspec.decode.accept` is the function

K = 4
PROMPT = [1, 4, 2, 7, 3]
SPEC_DRAWS = 1500
"""Speculative requests (one seed each): about 2.5 steps and 10 ms per request."""
HF_DRAWS = 40_000
"""Reference draws of transformers' generate, one batch."""
ALPHA = 1e-3
"""Family-wise false alarm rate of the test."""
MIN_EXPECTED = 5.0
"""Cells the pooled sample expects fewer times than this in the smaller sample are pooled."""
SAMPLING = SamplingConfig(temperature=1.2, top_k=6, top_p=0.95)
TILT = 1.3
TILTED_TOKEN = 5


def small_model() -> torch.nn.Module:
    """The sampling tests' tiny model, with no end of sequence (transformers' sampling runs to length)."""
    model = sampling_model()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class RandomTreeDrafter(StatelessDrafter):
    """Random trees over the small vocabulary: 0 to ``budget`` nodes, each under a random earlier
    node or the root, siblings distinct."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []
        for _ in range(int(self.rng.integers(0, budget + 1))):
            parent = int(self.rng.integers(-1, len(tokens)))
            token = int(self.rng.integers(0, SAMPLING_VOCAB))
            if all(not (p == parent and t == token) for p, t in zip(parents, tokens, strict=True)):
                tokens.append(token)
                parents.append(parent)
        return DraftTree(np.array(tokens), np.array(parents)) if tokens else DraftTree.empty()


def reference_sample(model) -> np.ndarray:
    """int[HF_DRAWS, K]: transformers' own sampling, with the same warps."""
    torch.manual_seed(1234)
    ids = torch.tensor([PROMPT] * HF_DRAWS)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            max_new_tokens=K,
            temperature=SAMPLING.temperature,
            top_k=SAMPLING.top_k,
            top_p=SAMPLING.top_p,
        )
    return out[:, len(PROMPT) :].numpy()


def speculative_sample(model) -> tuple[np.ndarray, int, int]:
    """int[SPEC_DRAWS, K] from the generator (seeds 0..SPEC_DRAWS-1), drafted and accepted nodes."""
    gen = SpeculativeGenerator(model, IdTokenizer(), RandomTreeDrafter(seed=5), budget=6)
    rows, drafted, accepted = [], 0, 0
    for seed in range(SPEC_DRAWS):
        sampling = SamplingConfig(
            temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, top_p=SAMPLING.top_p, seed=seed
        )
        result = gen.generate(PROMPT, GenerationConfig(max_new_tokens=K, sampling=sampling))
        rows.append(result.output_ids)
        drafted += sum(s.drafted for s in result.steps)
        accepted += sum(s.accepted for s in result.steps)
    return np.stack(rows), drafted, accepted


def homogeneity_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test that category counts ``a`` and ``b`` (any totals) come from one distribution;
    cells expected fewer than MIN_EXPECTED times in the smaller sample are pooled into one."""
    a, b = a.astype(float), b.astype(float)
    na, nb = a.sum(), b.sum()
    pooled = (a + b) / (na + nb)
    rare = pooled * min(na, nb) < MIN_EXPECTED
    a = np.append(a[~rare], a[rare].sum())
    b = np.append(b[~rare], b[rare].sum())
    pooled = np.append(pooled[~rare], pooled[rare].sum())
    keep = pooled > 0
    a, b, pooled = a[keep], b[keep], pooled[keep]
    stat = float((((a - na * pooled) ** 2) / (na * pooled) + ((b - nb * pooled) ** 2) / (nb * pooled)).sum())
    dof = len(a) - 1
    # chi-square survival function: regularized upper incomplete gamma Q(dof/2, stat/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def min_p_value(spec: np.ndarray, ref: np.ndarray) -> float:
    """Bonferroni-adjusted smallest p-value over: the joint of the first two tokens, and the token at
    each of the K positions."""
    tests = [
        (spec[:, 0] * SAMPLING_VOCAB + spec[:, 1], ref[:, 0] * SAMPLING_VOCAB + ref[:, 1], SAMPLING_VOCAB**2)
    ]
    tests += [(spec[:, j], ref[:, j], SAMPLING_VOCAB) for j in range(K)]
    p = min(
        homogeneity_p_value(np.bincount(s, minlength=size), np.bincount(r, minlength=size))
        for s, r, size in tests
    )
    return min(1.0, p * len(tests))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return small_model()


@pytest.fixture(scope="module")
def reference(model) -> np.ndarray:
    return reference_sample(model)


def test_speculative_sampling_has_transformers_distribution(model, reference):
    spec, drafted, accepted = speculative_sample(model)
    assert accepted > SPEC_DRAWS // 4 and drafted - accepted > SPEC_DRAWS  # drafts accepted and rejected
    assert set(np.unique(spec)) <= set(np.unique(reference))  # top-k / top-p filtered tokens never appear
    assert min_p_value(spec, reference) > ALPHA


def tilted(original, token: int, factor: float):
    """``draw_from_cdf`` with ``token`` made ``factor`` times likelier (then renormalized)."""

    def draw_from_cdf(cdf: np.ndarray, generator) -> int:
        probs = np.diff(cdf, prepend=0.0)
        probs[token] *= factor
        return original(np.cumsum(probs), generator)

    return draw_from_cdf


def test_a_tilted_draw_is_detected(model, reference, monkeypatch):
    monkeypatch.setattr(
        accept_module, "draw_from_cdf", tilted(accept_module.draw_from_cdf, TILTED_TOKEN, TILT)
    )
    spec, _, _ = speculative_sample(model)
    assert min_p_value(spec, reference) < ALPHA


UNSEEDED_TOKENS = 48
UNSEEDED_TEMPERATURE = 1.5


def test_two_unseeded_requests_differ():
    # each request without a seed draws its own: the second equals the first by chance with
    # probability P(first) under the model, computed here and required below 1e-12
    model = tiny_model("llama")
    prompt = [5, 17, 33, 2, 61]
    config = GenerationConfig(
        max_new_tokens=UNSEEDED_TOKENS, sampling=SamplingConfig(temperature=UNSEEDED_TEMPERATURE)
    )
    gen = SpeculativeGenerator(model, IdTokenizer(), ContextDrafter(), budget=4)
    first = gen.generate(prompt, config).output_ids.tolist()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + first])).logits[0, len(prompt) - 1 : -1]
    log_p = torch.log_softmax(logits / UNSEEDED_TEMPERATURE, dim=-1)[torch.arange(len(first)), first].sum()
    assert float(log_p) < np.log(1e-12)
    assert gen.generate(prompt, config).output_ids.tolist() != first
