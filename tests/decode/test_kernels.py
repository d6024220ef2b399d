"""Packed CPU kernels: same logits as the model's own kernels up to float rounding, only inside the
context, re-packed when weights change in place, and greedy output still equals plain greedy."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from conftest import ARCHS, VOCAB, IdTokenizer, OracleDrafter, plain_greedy, tiny_model

from restspec.decode import (
    GenerationConfig,
    SpeculativeGenerator,
    forward_tree,
    kernels,
    new_cache,
    prefill,
    verify,
)
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


def test_the_generator_packs_and_probes_when_built_not_in_its_first_step():
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
    assert verify._direct_forwards[model] is not None  # probed when built too


def test_linears_that_read_the_same_input_share_one_packed_matmul():
    model = tiny32()
    packed = kernels.fast_kernels(model)
    assert (packed.layers, packed.groups) == (15, 4 * 2 + 1)  # qkv, o, gate+up, down per layer; LM head
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.forward.group is attn.k_proj.forward.group is attn.v_proj.forward.group
    assert mlp.gate_proj.forward.group is mlp.up_proj.forward.group
    assert attn.o_proj.forward.group is not attn.q_proj.forward.group


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_grouped_logits_are_bitwise_those_of_separate_packed_linears(arch, monkeypatch):
    grouped = tree_logits(tiny32(arch), fast=True)
    monkeypatch.setattr(kernels, "shared_input_groups", lambda model, linears: [[m] for m in linears])
    separate = tree_logits(tiny32(arch), fast=True)
    assert torch.equal(grouped, separate)


def test_a_member_called_alone_or_out_of_order_computes_its_own_output():
    model = tiny32()
    attn = model.model.layers[0].self_attn
    kernels.fast_kernels(model)
    x, y = torch.randn(1, 3, attn.q_proj.in_features), torch.randn(1, 3, attn.q_proj.in_features)
    with torch.inference_mode(), kernels.fast_kernels(model)():
        attn.q_proj(x)  # keeps q/k/v outputs for x
        got_k = attn.k_proj(y)  # another input: not x's outputs
        got_v = attn.v_proj(x)
    torch.testing.assert_close(got_k, torch.nn.functional.linear(y, attn.k_proj.weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_v, torch.nn.functional.linear(x, attn.v_proj.weight), rtol=1e-5, atol=1e-5)


def test_a_model_the_probe_cannot_run_gets_one_group_per_linear(monkeypatch):
    model = tiny32()

    def broken(*args, **kwargs):
        raise TypeError("needs pixel_values")

    monkeypatch.setattr(model, "forward", broken)
    packed = kernels.FastKernels(model)
    assert packed.groups == packed.layers == 15
