"""The direct forward of Llama-family decoders: bitwise the model's own forward where it applies (on
real trees, not just the probe's); other models fail to build it or fail the probe."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import transformers
from conftest import VOCAB, _common, tiny_model

from restspec.decode import ModelForward, forward_tree, new_cache, prefill
from restspec.decode import direct as direct_module
from restspec.decode.backends import DirectBackend, probe
from restspec.decode.kernels import PackedWeights
from restspec.decode.verify import prefill_segment
from restspec.draft.tree import DraftTree
from restspec.errors import ModelError

DIRECT = ("llama", "qwen2", "mistral")
"""Tiny architectures the direct forward runs (mistral: every layer slides, in the mask)."""


def score(backend, prompt_len: int = 20) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of a branching 6-node tree on a ``prompt_len``-token cache, and the cache's rows."""
    prompt = np.random.default_rng(0).integers(0, VOCAB, size=prompt_len)
    tree = DraftTree(np.array([5, 9, 11, 2, 7, 3]), np.array([-1, -1, 0, 2, 3, 1]))
    cache = new_cache()
    prefill(backend, cache, prompt[:-1])
    logits = forward_tree(backend, cache, int(prompt[-1]), tree, len(prompt) - 1)
    return logits, [t for layer in cache.layers for t in (layer.keys, layer.values)]


def assert_bitwise(a, b) -> None:
    (logits_a, rows_a), (logits_b, rows_b) = a, b
    assert torch.equal(logits_a, logits_b)
    assert all(torch.equal(x, y) for x, y in zip(rows_a, rows_b, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", DIRECT)
def test_direct_forward_is_bitwise_the_models_own(arch, dtype):
    model = copy.deepcopy(tiny_model(arch)).to(dtype)
    direct = DirectBackend(model)
    assert probe(direct).passed
    assert_bitwise(score(direct), score(ModelForward(model)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_grouped_packed_matmuls_are_bitwise_separate_packed_linears(arch, monkeypatch):
    model = copy.deepcopy(tiny_model(arch)).to(torch.float32)
    grouped_weights = PackedWeights.of(model)
    grouped = DirectBackend(model, grouped_weights)
    monkeypatch.setattr(
        "restspec.decode.kernels.shared_input_groups", lambda model, linears: [[m] for m in linears]
    )
    separate_weights = PackedWeights.of(model)
    separate = DirectBackend(model, separate_weights)
    assert len(separate_weights.groups) > len(grouped_weights.groups)
    assert_bitwise(score(grouped), score(separate))


@pytest.mark.parametrize("arch", ["qwen2-hybrid", "gemma2", "phi3", "gpt2"])
def test_models_without_the_parts_or_with_mixed_layers_have_no_direct_forward(arch):
    with pytest.raises(ModelError):
        DirectBackend(tiny_model(arch))


@pytest.mark.parametrize(
    "model",
    [
        # Qwen3 has every part the direct forward reads, and q/k norms it does not apply
        lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_common(head_dim=8))),
        # Gemma scales its embeddings and its norms differ
        lambda: tiny_model("gemma"),
    ],
    ids=["qwen3", "gemma"],
)
def test_a_llama_shaped_model_with_extra_parts_fails_the_probe(model):
    result = probe(DirectBackend(model()))
    assert not result.passed
    assert result.reason


@pytest.mark.parametrize("arch", DIRECT)
@pytest.mark.parametrize("past", [0, 7, 40])
def test_a_prompt_chunk_longer_than_its_past_takes_the_causal_kernel_with_the_masks_result(
    arch, past, monkeypatch
):
    """A prompt chunk continuing a shorter cache (a reused prefix) is attended with the causal kernel
    (the past's query rows padded), not its mask: the same logits and cache rows, bitwise. A longer
    past, or a sliding window (mistral), keeps the mask."""
    model = copy.deepcopy(tiny_model(arch)).to(torch.float32)
    backend = DirectBackend(model)
    prompt = np.random.default_rng(0).integers(0, VOCAB, size=60)
    causal_calls = []
    sdpa = direct_module.F.scaled_dot_product_attention

    def recording(*args, is_causal=False, **kwargs):
        causal_calls.append(is_causal)
        return sdpa(*args, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(direct_module.F, "scaled_dot_product_attention", recording)
    results = []
    for causal in (True, False):
        cache = new_cache()
        prefill(backend, cache, prompt[:past])
        segment = prefill_segment(backend, cache, prompt[past:], past)
        assert segment.causal == (arch != "mistral")
        segment = dataclasses.replace(segment, causal=causal and segment.causal, logits=True)
        causal_calls.clear()
        (logits,) = backend.forward_batch([segment])
        assert set(causal_calls) == {causal and arch != "mistral" and past < len(prompt) - past}
        results.append((logits, [t for layer in cache.layers for t in (layer.keys, layer.values)]))
    assert_bitwise(*results)
