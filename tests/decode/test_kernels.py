"""Packed CPU kernels: the model's own forward and the direct forward with oneDNN group matmuls give the
model's logits up to float rounding, re-pack when weights change in place, write nothing into the
model, and keep greedy output equal to plain greedy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import ARCHS, VOCAB, IdTokenizer, OracleDrafter, plain_greedy, tiny_model

from restspec.decode import (
    GenerationConfig,
    ModelForward,
    SpeculativeGenerator,
    forward_tree,
    kernels,
    new_cache,
    prefill,
)
from restspec.decode.backends import DirectBackend, PackedModelForward, probe
from restspec.decode.kernels import PackedLinears, PackedWeights
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


def packed_backend(model) -> PackedModelForward:
    packed = PackedWeights.of(model)
    assert packed is not None
    return PackedModelForward(model, packed)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # GPT-2: Conv1D layers, only its head is Linear
def test_packed_logits_equal_the_models_up_to_rounding(arch):
    model = tiny32(arch)
    backend = packed_backend(model)
    torch.testing.assert_close(tree_logits(backend), tree_logits(ModelForward(model)), rtol=1e-5, atol=1e-5)
    assert probe(backend).passed


def test_packed_linears_route_only_inside_the_mode_and_only_the_modules_own_calls():
    model = tiny32()
    packed = PackedWeights.of(model)
    calls = []
    original = kernels.PackedGroup.matmul
    kernels.PackedGroup.matmul = lambda self, x: calls.append(self) or original(self, x)
    try:
        with torch.inference_mode():
            ids = torch.tensor([[1, 2, 3, 4, 5]])
            model(input_ids=ids)
            assert calls == []  # outside the mode: the stock kernels
            with PackedLinears(packed):
                model(input_ids=ids)
            assert len(calls) == len(packed.groups)  # one matmul per group, each member served from it
            weight = model.lm_head.weight
            x = torch.randn(3, weight.shape[1])
            with PackedLinears(packed):
                # another bias than the module's own (here: one) is computed as asked
                got = torch.nn.functional.linear(x, weight, torch.ones(weight.shape[0]))
            torch.testing.assert_close(got, x @ weight.T + 1)
    finally:
        kernels.PackedGroup.matmul = original


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


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt2"])
def test_greedy_parity_in_float32_with_packed_backends(arch):
    model = tiny32(arch)
    prompt = np.random.default_rng(3).integers(0, VOCAB, size=9).tolist()
    expected = plain_greedy(model, prompt, 24)  # stock kernels, through model.generate
    packed = PackedWeights.of(model)
    backends = [PackedModelForward(model, packed)]
    if arch in ("llama", "qwen2", "mistral"):
        backends.append(DirectBackend(model, packed))
    for backend in backends:
        for mode in ("chain", "mixed", "fan"):
            drafter = OracleDrafter(prompt + expected, mode, VOCAB)
            gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=8, backend=backend)
            output = gen.generate(prompt, GenerationConfig(max_new_tokens=24)).output_ids.tolist()
            assert output == expected, (backend.name, mode)


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


def test_a_member_called_alone_or_out_of_order_computes_its_own_output():
    model = tiny32()
    attn = model.model.layers[0].self_attn
    packed = PackedWeights.of(model)
    x, y = torch.randn(1, 3, attn.q_proj.in_features), torch.randn(1, 3, attn.q_proj.in_features)
    with torch.inference_mode(), PackedLinears(packed):
        attn.q_proj(x)  # keeps q/k/v outputs for x
        got_k = attn.k_proj(y)  # another input: not x's outputs
        got_v = attn.v_proj(x)
    torch.testing.assert_close(got_k, torch.nn.functional.linear(y, attn.k_proj.weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_v, torch.nn.functional.linear(x, attn.v_proj.weight), rtol=1e-5, atol=1e-5)


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
