"""The direct forward of Llama-family decoders: used only where a probe finds it bitwise equal to the
model's own forward, and then bitwise equal on real trees too; other models keep their own forward."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from conftest import VOCAB, _common, tiny_model

from restspec.decode import forward_tree, kernels, model_layout, new_cache, prefill, verify
from restspec.draft.tree import DraftTree

DIRECT = ("llama", "qwen2", "mistral")
"""Tiny architectures the direct forward runs (mistral: every layer slides, in the mask)."""
OWN = ("qwen2-hybrid", "phi3", "gemma", "gemma2", "gpt2")
"""Tiny architectures that keep their own forward."""


def score(model, direct: bool, prompt_len: int = 20) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of a branching 6-node tree on a ``prompt_len``-token cache, and the cache's rows, with
    fast kernels and the direct forward on or off."""
    layout = model_layout(model)
    prompt = np.random.default_rng(0).integers(0, VOCAB, size=prompt_len)
    tree = DraftTree(np.array([5, 9, 11, 2, 7, 3]), np.array([-1, -1, 0, 2, 3, 1]))
    cache = new_cache()
    prefill(model, cache, prompt[:-1], layout)
    with kernels.fast_kernels(model)():
        found = verify._direct_forward(model, layout)
    verify._direct_forwards[model] = found if direct else None
    try:
        logits = forward_tree(model, cache, int(prompt[-1]), tree, len(prompt) - 1, layout)
    finally:
        verify._direct_forwards[model] = found
    return logits, [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", DIRECT)
def test_direct_forward_is_bitwise_the_models_own(arch, dtype):
    model = copy.deepcopy(tiny_model(arch)).to(dtype)
    (direct_logits, direct_rows), (own_logits, own_rows) = score(model, True), score(model, False)
    assert verify._direct_forwards[model] is not None
    assert torch.equal(direct_logits, own_logits)
    assert all(torch.equal(a, b) for a, b in zip(direct_rows, own_rows, strict=True))


def test_ungrouped_linears_give_the_same_logits(monkeypatch):
    """Without packed groups (another dtype, no oneDNN) the direct forward joins the modules' outputs."""
    grouped = score(copy.deepcopy(tiny_model("llama")).to(torch.float32), True)[0]
    monkeypatch.setattr(kernels, "shared_input_groups", lambda model, linears: [[m] for m in linears])
    model = copy.deepcopy(tiny_model("llama")).to(torch.float32)
    separate = score(model, True)[0]
    assert verify._direct_forwards[model] is not None
    assert torch.equal(grouped, separate)


@pytest.mark.parametrize("arch", OWN)
def test_other_architectures_keep_their_own_forward(arch):
    model = tiny_model(arch)
    score(model, True)
    assert verify._direct_forwards[model] is None


def test_a_llama_shaped_model_with_extra_parts_fails_the_probe():
    """Qwen3 has every part the direct forward reads, and q/k norms it does not apply."""
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_common(head_dim=8)))
    verify.DirectForward(model)  # builds: the parts it knows are all there
    score(model, True)
    assert verify._direct_forwards[model] is None


def test_the_probe_runs_once_per_model(monkeypatch):
    model = copy.deepcopy(tiny_model("llama"))
    calls = []
    probe = verify._agrees
    monkeypatch.setattr(verify, "_agrees", lambda *args: calls.append(1) or probe(*args))
    score(model, True)
    score(model, True, prompt_len=9)
    assert len(calls) == 1
