"""Packed CPU kernels: the direct forward with oneDNN group matmuls gives the model's logits up to float
rounding, re-packs when weights change in place, and keeps greedy output equal to plain greedy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import VOCAB, IdTokenizer, OracleDrafter, plain_greedy, tiny_model

from restspec.decode import (
    GenerationConfig,
    ModelForward,
    SpeculativeGenerator,
    forward_tree,
    kernels,
    new_cache,
    prefill,
)
from restspec.decode.backends import DirectBackend, probe
from restspec.decode.kernels import PackedWeights
from restspec.draft.tree import DraftTree

pytestmark = pytest.mark.skipif(not kernels.available(), reason="torch built without oneDNN")


def tiny32(arch: str = "llama") -> torch.nn.Module:
    """A float32 copy of the session's tiny model (``.to`` converts in place)."""
    return copy.deepcopy(tiny_model(arch)).to(torch.float32)


def tree_logits(backend) -> torch.Tensor:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, size=12)
    # root + 6 nodes: a branch at the root and a chain of three under its first child
    tree = DraftTree(np.array([5, 9, 11, 2, 7, 3]), np.array([-1, -1, 0, 2, 3, 1]))
    cache = new_cache()
    prefill(backend, cache, prompt[:-1])
    return forward_tree(backend, cache, int(prompt[-1]), tree, len(prompt) - 1)


def packed_backend(model) -> DirectBackend:
    packed = PackedWeights.of(model)
    assert packed is not None
    return DirectBackend(model, packed)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_packed_logits_equal_the_models_up_to_rounding(arch):
    model = tiny32(arch)
    backend = packed_backend(model)
    torch.testing.assert_close(tree_logits(backend), tree_logits(ModelForward(model)), rtol=1e-5, atol=1e-5)
    assert probe(backend).passed


def test_weights_changed_in_place_are_packed_again():
    model = tiny32()
    backend = packed_backend(model)
    before = tree_logits(backend)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # in place: the packed copy is stale now
    after = tree_logits(backend)
    torch.testing.assert_close(after, tree_logits(ModelForward(model)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


def test_no_packing_when_the_copy_would_not_fit_in_memory(monkeypatch):
    monkeypatch.setattr(kernels, "_free_memory_bytes", lambda: 1000)
    assert PackedWeights.of(tiny32()) is None


def test_other_dtypes_are_not_packed():
    assert PackedWeights.of(tiny_model("llama")) is None  # float64
    assert PackedWeights.of(copy.deepcopy(tiny_model("llama")).to(torch.bfloat16)) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_parity_in_float32_with_packed_kernels(arch):
    model = tiny32(arch)
    prompt = np.random.default_rng(3).integers(0, VOCAB, size=9).tolist()
    expected = plain_greedy(model, prompt, 24)  # stock kernels, through model.generate
    backend = packed_backend(model)
    for mode in ("chain", "mixed", "fan"):
        drafter = OracleDrafter(prompt + expected, mode, VOCAB)
        gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=8, backend=backend)
        assert gen.generate(prompt, GenerationConfig(max_new_tokens=24)).output_ids.tolist() == expected, mode


def test_linears_that_read_the_same_input_share_one_packed_matmul():
    model = tiny32()
    packed = PackedWeights.of(model)
    assert (packed.layers, len(packed.groups)) == (15, 4 * 2 + 1)  # qkv, o, gate+up, down per layer; head
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    group = packed.group_of([attn.q_proj, attn.k_proj, attn.v_proj])
    assert group is not None and group.sizes == [32, 16, 16]  # 4 query heads, 2 key-value heads of 8
    assert packed.group_of([attn.k_proj, attn.q_proj, attn.v_proj]) is None  # not in call order
    assert packed.group_of([mlp.gate_proj, mlp.up_proj]) is not None
    assert packed.member(attn.o_proj.weight)[0] is not group


def test_a_model_the_grouping_probe_cannot_run_gets_one_group_per_linear():
    model = tiny32()

    class NeedsMore(torch.nn.Module):  # a wrapper whose forward needs more than input_ids
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values, **kwargs):
            raise TypeError("needs pixel_values")

    packed = PackedWeights(NeedsMore(model), [m for m in model.modules() if type(m) is torch.nn.Linear])
    assert len(packed.groups) == packed.layers == 15
