"""Speculative sampling has exactly the distribution of plain sampling.

- The warps equal transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper.
- Chi-square: the first two tokens of 20,000 speculative draws (tree forward + acceptance) against
  20,000 plain draws (torch.multinomial on the closed-form joint distribution from plain forwards),
  for temperature, top-k and top-p; two deliberately biased acceptance rules must be rejected.
- With one seed, speculative and plain sampling emit the same tokens (one uniform per emitted token).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLING_VOCAB, VOCAB, IdTokenizer, OracleDrafter, sampling_model, tiny_model
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from restspec.decode import (
    GenerationConfig,
    ModelForward,
    SamplingConfig,
    SpeculativeGenerator,
    forward_tree,
    new_cache,
    prefill,
)
from restspec.decode.accept import (
    Acceptance,
    child_lookup,
    draw,
    draw_from_cdf,
    greedy_accept,
    sample_accept,
    walk_cdfs,
    warp_logits,
    warped_cdf,
    warped_probs,
)
from restspec.draft.tree import DraftTree

DRAWS = 20_000
P_PASS = 1e-3  # the exact rule must not be rejected at this level (fixed seeds: deterministic)
P_REJECT = 1e-6  # biased rules must be rejected at this level
MIN_EXPECTED = 5.0  # cells expected rarer than this are pooled


def transformers_warp(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    procs = LogitsProcessorList()
    if cfg.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(cfg.temperature)))
    if cfg.top_k:
        procs.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        procs.append(TopPLogitsWarper(cfg.top_p))
    return procs(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits.to(torch.float32))


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=0.7),
        SamplingConfig(temperature=1.0, top_k=5),
        SamplingConfig(temperature=1.3, top_p=0.6),
        SamplingConfig(temperature=0.5, top_k=40, top_p=0.9),
        SamplingConfig(temperature=1.0, top_k=1),
    ],
)
def test_warp_equals_transformers_processors(cfg):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 300, generator=gen, dtype=torch.float64) * 3
    logits[3, :10] = logits[3, 0]  # ties at the top
    assert torch.equal(warp_logits(logits, cfg), transformers_warp(logits, cfg))


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=0.8, top_k=50, top_p=0.9),
        SamplingConfig(temperature=1.0, top_k=5, top_p=0.5),
    ],
)
def test_top_p_after_top_k_shortcut_equals_transformers(cfg):
    # with top-k and top-p both set, top-p runs on the k survivors only (no sort of the vocabulary)
    for seed in range(50):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(4, 3000, generator=gen) * (0.1 + 5 * torch.rand(1, generator=gen))
        assert torch.equal(warp_logits(logits, cfg), transformers_warp(logits, cfg))


def test_greedy_acceptance_takes_each_rows_argmax_as_torch_does_ties_and_nan_included():
    # root -> node 0 (token 2) -> node 1 (token 0); root -> node 2 (token 3)
    tree = DraftTree(tokens=np.array([2, 0, 3]), parents=np.array([-1, 0, -1]))
    logits = torch.tensor(
        [
            [0.0, 1.0, 5.0, 5.0],  # tie between tokens 2 and 3: the first, node 0
            [float("nan"), 9.0, 1.0, float("nan")],  # NaN counts as the largest: the first, node 1
            [0.0, 7.0, 7.0, 1.0],  # tie: token 1, no child carries it
            [9.0, 0.0, 0.0, 0.0],
        ],
        dtype=torch.bfloat16,
    )
    assert [int(row.argmax()) for row in logits[:3]] == [2, 0, 1]
    result = greedy_accept(tree, logits)
    assert result.path.tolist() == [0, 1]
    assert result.tokens == [2, 0, 1]


def test_draw_never_picks_a_zero_probability_token():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    picks = {draw(probs, gen) for _ in range(2000)}
    assert picks == {1, 3}


# ---- chi-square over the first two tokens ------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return sampling_model()


PROMPT = [1, 4, 2, 7, 3]
# every first token is a root child, so the first step always emits >= 2 tokens; two grandchildren
# per root child (a+1 and a+3 mod V) and a deeper chain are drafted, the other second tokens come
# from the bonus draw.
_GRAND = [(a, (a + step) % SAMPLING_VOCAB) for a in range(SAMPLING_VOCAB) for step in (1, 3)]
FIRST_STEP_TREE = DraftTree(
    np.array([*range(SAMPLING_VOCAB), *(t for _, t in _GRAND), 2, 5]),
    np.array(
        [
            *([-1] * SAMPLING_VOCAB),
            *(a for a, _ in _GRAND),
            SAMPLING_VOCAB,
            2 * SAMPLING_VOCAB + SAMPLING_VOCAB,
        ]
    ),
)


def plain_joint(model, cfg: SamplingConfig) -> torch.Tensor:
    """(V, V): P(first = a, second = b) from plain forwards, without any tree."""
    with torch.inference_mode():
        first = model(torch.tensor([PROMPT])).logits[0, -1]
        batch = torch.tensor([[*PROMPT, a] for a in range(SAMPLING_VOCAB)])
        second = model(batch).logits[:, -1]
    p1 = warped_probs(first, cfg).double()
    p2 = warped_probs(second, cfg).double()
    return p1[:, None] * p2


def tree_logits(model) -> torch.Tensor:
    backend = ModelForward(model)
    cache = new_cache()
    prefill(backend, cache, np.array(PROMPT[:-1]))
    return forward_tree(backend, cache, PROMPT[-1], FIRST_STEP_TREE, len(PROMPT) - 1).to(torch.float32)


def first_two(walk_fn, logits, cfg, draws: int, seed: int) -> np.ndarray:
    """Counts (V, V) of the first two tokens of ``draws`` first steps. The warped CDF table of the tree
    rows is computed once (sample_accept = warped_cdf + walk_cdfs)."""
    gen = torch.Generator().manual_seed(seed)
    cdfs = warped_cdf(logits, cfg)
    counts = np.zeros((SAMPLING_VOCAB, SAMPLING_VOCAB), dtype=np.int64)
    for _ in range(draws):
        tokens = walk_fn(FIRST_STEP_TREE, cdfs, gen).tokens
        counts[tokens[0], tokens[1]] += 1
    return counts


def homogeneity_p_value(a: np.ndarray, b: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square test that counts ``a`` and ``b`` (same totals) come from one distribution; cells whose
    ``expected`` count is below MIN_EXPECTED are pooled into one."""
    a, b, expected = a.ravel(), b.ravel(), expected.ravel()
    rare = expected < MIN_EXPECTED
    a = np.append(a[~rare], a[rare].sum())
    b = np.append(b[~rare], b[rare].sum())
    keep = (a + b) > 0
    a, b = a[keep].astype(float), b[keep].astype(float)
    pooled = (a + b) / 2
    stat = float((((a - pooled) ** 2 + (b - pooled) ** 2) / pooled).sum())
    dof = len(a) - 1
    # chi-square survival function: regularized upper incomplete gamma Q(dof/2, stat/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def retry_once_walk(tree, cdfs, gen) -> Acceptance:
    """BIASED: a draw that misses every drafted child gets a second chance (favours drafted tokens)."""
    children = child_lookup(tree)
    path, tokens, node = [], [], -1
    while True:
        token = draw_from_cdf(cdfs[node + 1], gen)
        if (node, token) not in children and node in tree.parents:
            token = draw_from_cdf(cdfs[node + 1], gen)
        tokens.append(token)
        child = children.get((node, token))
        if child is None:
            return Acceptance(np.asarray(path, dtype=np.int64), tokens)
        path.append(child)
        node = child


TYPICAL_THRESHOLD = 0.2


def typical_walk(tree, cdfs, gen) -> Acceptance:
    """BIASED: take a drafted child whenever the model gives it probability >= 0.2 (typical acceptance)."""
    children = child_lookup(tree)
    probs = np.diff(cdfs, axis=-1, prepend=0.0)
    path, tokens, node = [], [], -1
    while True:
        likely = [t for (p, t) in children if p == node and probs[node + 1, t] >= TYPICAL_THRESHOLD]
        token = likely[0] if likely else draw_from_cdf(cdfs[node + 1], gen)
        tokens.append(token)
        child = children.get((node, token))
        if child is None:
            return Acceptance(np.asarray(path, dtype=np.int64), tokens)
        path.append(child)
        node = child


SAMPLING_CASES = {
    "temperature": SamplingConfig(temperature=1.4, seed=0),
    "top_k": SamplingConfig(temperature=1.0, top_k=3, seed=0),
    "top_p": SamplingConfig(temperature=1.0, top_p=0.7, seed=0),
}


def plain_counts(joint: torch.Tensor, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    plain = torch.multinomial(joint.ravel(), DRAWS, replacement=True, generator=gen)
    return np.bincount(plain.numpy(), minlength=SAMPLING_VOCAB**2).reshape(SAMPLING_VOCAB, SAMPLING_VOCAB)


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_speculative_first_two_tokens_match_plain_sampling(small_model, case):
    cfg = SAMPLING_CASES[case]
    joint = plain_joint(small_model, cfg)
    plain = plain_counts(joint, seed=7)
    expected = joint.numpy() * DRAWS
    logits = tree_logits(small_model)
    spec = first_two(walk_cdfs, logits, cfg, DRAWS, seed=11)
    assert spec[joint.numpy() == 0].sum() == 0  # filtered tokens (top-k / top-p) are never emitted
    assert homogeneity_p_value(spec, plain, expected) > P_PASS
    # the same statistic rejects a biased acceptance rule
    biased = first_two(typical_walk, logits, cfg, DRAWS, seed=11)
    assert homogeneity_p_value(biased, plain, expected) < P_REJECT


def test_retry_once_bias_is_rejected(small_model):
    cfg = SAMPLING_CASES["temperature"]
    joint = plain_joint(small_model, cfg)
    biased = first_two(retry_once_walk, tree_logits(small_model), cfg, DRAWS, seed=12)
    assert homogeneity_p_value(biased, plain_counts(joint, seed=8), joint.numpy() * DRAWS) < P_REJECT


@pytest.mark.parametrize("cfg", list(SAMPLING_CASES.values()))
def test_row_by_row_and_batched_warping_draw_the_same_tokens(cfg):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(FIRST_STEP_TREE.tokens.size + 1, SAMPLING_VOCAB, generator=gen, dtype=torch.float64)
    logits[:, :3] += 2.0  # make the drafted low ids likely, so paths get long
    for seed in range(200):
        lazy = sample_accept(
            FIRST_STEP_TREE, logits, cfg, torch.Generator().manual_seed(seed), batch_rows=False
        )
        batch = sample_accept(
            FIRST_STEP_TREE, logits, cfg, torch.Generator().manual_seed(seed), batch_rows=True
        )
        assert lazy.tokens == batch.tokens
        assert lazy.path.tolist() == batch.path.tolist()


# ---- the whole loop: seeds ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-hybrid"])
@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=1.0, seed=5),
        SamplingConfig(temperature=0.8, top_k=10, seed=6),
        SamplingConfig(temperature=1.2, top_p=0.8, seed=7),
    ],
)
def test_seeded_speculative_sampling_reproduces_seeded_plain_sampling(arch, cfg):
    model = tiny_model(arch)
    prompt = [5, 17, 33, 2, 61]
    config = GenerationConfig(max_new_tokens=20, sampling=cfg)
    plain = SpeculativeGenerator(model, IdTokenizer()).generate(prompt, config).output_ids.tolist()
    again = SpeculativeGenerator(model, IdTokenizer()).generate(prompt, config).output_ids.tolist()
    assert plain == again
    for mode in ("chain", "mixed", "fan"):
        drafter = OracleDrafter(prompt + plain, mode, VOCAB)
        result = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=8).generate(prompt, config)
        assert result.output_ids.tolist() == plain, mode
        if mode == "chain":
            assert sum(s.accepted for s in result.steps) > 0
    other = GenerationConfig(max_new_tokens=20, sampling=SamplingConfig(temperature=cfg.temperature, seed=99))
    assert SpeculativeGenerator(model, IdTokenizer()).generate(prompt, other).output_ids.tolist() != plain
