"""Packed CPU kernels: same logits as the model's own kernels up to float rounding, only inside the
context, re-packed when weights change in place, and greedy output still equals plain greedy."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from conftest import ARCHS, VOCAB, IdTokenizer, OracleDrafter, plain_greedy, tiny_model

from restspec.decode import GenerationConfig, SpeculativeGenerator, forward_tree, kernels, new_cache, prefill
from restspec.draft.tree import DraftTree

pytestmark = pytest.mark.skipif(not kernels.available(), reason="torch built without oneDNN")


def tiny32(arch: str = "llama") -> torch.nn.Module:
    """A float32 copy of the session's tiny model (``.to`` converts in place)."""
    return copy.deepcopy(tiny_model(arch)).to(torch.float32)


def tree_logits(model, fast: bool) -> torch.Tensor:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, size=12)
    # root + 6 nodes: a branch at the root and a chain of three under its first child
    tree = DraftTree(np.array([5, 9, 11, 2, 7, 3]), np.array([-1, -1, 0, 2, 3, 1]))
    cache = new_cache()
    with torch.inference_mode():
        prefill(model, cache, prompt[:-1])
        return forward_tree(model, cache, int(prompt[-1]), tree, len(prompt) - 1, fast=fast)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_fast_logits_equal_stock_up_to_rounding(arch):
    model = tiny32(arch)
    stock = tree_logits(model, fast=False)
    fast = tree_logits(model, fast=True)
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    assert kernels.fast_kernels(model).layers > 0 or arch == "gpt2"  # GPT-2 has Conv1D, not Linear


def test_outside_the_context_wrapped_layers_compute_exactly_f_linear():
    model = tiny32()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        packed = kernels.fast_kernels(model)
        after = model(input_ids=ids).logits
    assert packed.layers == 7 * 2 + 1  # q k v o gate up down per layer, and the LM head
    assert torch.equal(before, after)


def test_weights_changed_in_place_are_packed_again():
    model = tiny32()
    before = tree_logits(model, fast=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # in place: the packed copy is stale now
    stock = tree_logits(model, fast=False)
    fast = tree_logits(model, fast=True)
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast, before)


def test_no_packing_when_the_copy_would_not_fit_in_memory(monkeypatch):
    monkeypatch.setattr(kernels, "_free_memory_bytes", lambda: 1000)
    model = tiny32()
    assert kernels.FastKernels(model).layers == 0
    assert all("forward" not in vars(m) for m in model.modules())
    stock = tree_logits(model, fast=False)
    assert torch.equal(tree_logits(model, fast=True), stock)  # packed nothing: the same kernels


def test_other_dtypes_are_not_packed():
    assert kernels.FastKernels(tiny_model("llama")).layers == 0  # float64
    assert kernels.FastKernels(copy.deepcopy(tiny_model("llama")).to(torch.bfloat16)).layers == 0


def test_context_restores_the_gqa_switch_even_on_error():
    model = tiny32()
    os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
    with pytest.raises(RuntimeError), kernels.fast_kernels(model)():
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
        raise RuntimeError("boom")
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt2"])
def test_greedy_parity_in_float32_with_fast_kernels(arch):
    model = tiny32(arch)
    prompt = np.random.default_rng(3).integers(0, VOCAB, size=9).tolist()
    expected = plain_greedy(model, prompt, 24)  # stock kernels, through model.generate
    for mode in ("chain", "mixed", "fan"):
        drafter = OracleDrafter(prompt + expected, mode, VOCAB)
        gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=8)
        assert gen.generate(prompt, GenerationConfig(max_new_tokens=24)).output_ids.tolist() == expected


def test_the_generator_packs_when_built_not_in_its_first_step():
    model = tiny32()
    SpeculativeGenerator(model, IdTokenizer(), budget=4, fast_kernels=False)
    assert not any("forward" in vars(m) for m in model.modules())
    SpeculativeGenerator(model, IdTokenizer(), budget=4)
    assert kernels.fast_kernels(model).layers == 15
    assert all(
        isinstance(vars(m).get("forward"), kernels._PackedForward)
        for m in model.modules()
        if type(m) is torch.nn.Linear
    )
