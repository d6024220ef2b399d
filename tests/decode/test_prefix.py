"""Prefix reuse: a prompt that starts with a finished request's tokens is prefilled from where they end,
and the outputs stay the model's own (greedy parity with transformers' ``generate``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import VOCAB, IdTokenizer, plain_greedy, tiny_model

from restspec.decode import GenerationConfig, SpeculativeGenerator
from restspec.decode.budget import FixedBudget
from restspec.decode.prefix import PrefixCache, common_prefix
from restspec.decode.verify import new_cache
from restspec.draft import ContextDrafter
from restspec.errors import GenerationError

RNG = np.random.default_rng(5)
HEADS, DIM, LAYERS = 2, 4, 3
ROW_BYTES = LAYERS * 2 * HEADS * DIM * 8  # float64 keys and values of one token


def cache_of(length: int, seed: int = 0):
    """A cache of ``length`` rows of random keys and values."""
    gen = torch.Generator().manual_seed(seed)
    cache = new_cache()
    for layer in range(LAYERS):
        keys = torch.randn(1, HEADS, length, DIM, generator=gen, dtype=torch.float64)
        cache.update(keys, keys + 1, layer)
    return cache


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def test_common_prefix():
    assert common_prefix(ids(1, 2, 3), ids(1, 2, 4, 5)) == 2
    assert common_prefix(ids(1, 2), ids(1, 2, 3)) == 2
    assert common_prefix(ids(7), ids(1)) == 0
    assert common_prefix(ids(), ids(1)) == 0


def test_take_copies_the_longest_match_and_leaves_the_root_out():
    kept = PrefixCache(1 << 20)
    cache = cache_of(6)
    kept.store("a", ids(1, 2, 3, 4, 5, 6), cache)
    kept.store("a", ids(1, 9, 9), cache_of(3, seed=1))
    reused, n = kept.take("a", ids(1, 2, 3, 4, 8))
    assert n == 4
    for layer, original in zip(reused.layers, cache.layers, strict=True):
        assert torch.equal(layer.keys, original.keys[:, :, :4])
        assert torch.equal(layer.values, original.values[:, :, :4])
    # the whole prompt is kept: all but its last token (the first step's root) comes from the cache
    assert kept.take("a", ids(1, 2, 3))[1] == 2
    # the copy is the caller's: growing it leaves the kept rows alone
    reused.update(torch.zeros(1, HEADS, 2, DIM, dtype=torch.float64), torch.zeros(1, HEADS, 2, DIM), 0)
    assert kept.take("a", ids(1, 2, 3, 4, 5, 6, 7))[0].layers[0].keys.equal(cache.layers[0].keys)


def test_nothing_is_shared_across_scopes_or_reused_without_a_match():
    kept = PrefixCache(1 << 20)
    kept.store("a", ids(1, 2, 3), cache_of(3))
    assert kept.take("b", ids(1, 2, 3, 4)) is None
    assert kept.take("a", ids(5, 2, 3)) is None
    assert kept.take("a", ids(1)) is None  # one token: it is the root, nothing to prefill


def test_a_longer_conversation_replaces_the_turn_it_extends():
    kept = PrefixCache(1 << 20)
    kept.store("a", ids(1, 2, 3), cache_of(3))
    kept.store("b", ids(1, 2, 3), cache_of(3))
    kept.store("a", ids(1, 2, 3, 4, 5), cache_of(5))
    assert len(kept) == 2 and kept.nbytes == 8 * ROW_BYTES


def test_memory_stays_within_the_bound_least_recently_used_first():
    kept = PrefixCache(10 * ROW_BYTES)
    kept.store("a", ids(1, 1, 1, 1), cache_of(4))
    kept.store("a", ids(2, 2, 2, 2), cache_of(4))
    kept.take("a", ids(1, 1, 1, 1, 1))  # the first is now the most recently used
    kept.store("a", ids(3, 3, 3, 3), cache_of(4))
    assert kept.nbytes == 8 * ROW_BYTES
    assert kept.take("a", ids(2, 2, 2)) is None
    assert kept.take("a", ids(1, 1, 1)) is not None
    kept.store("a", ids(*range(11)), cache_of(11))  # larger than the bound: not kept, nothing dropped
    assert kept.nbytes == 8 * ROW_BYTES
    nothing = PrefixCache(0)
    nothing.store("a", ids(1, 2), cache_of(2))
    assert len(nothing) == 0


@dataclass(frozen=True)
class SlowBudget(FixedBudget):
    """A fixed budget whose steps take 5 ms more (so that requests overlap), recording batch sizes."""

    batch_sizes: list = field(default_factory=list)

    def observe(self, step) -> None:
        self.batch_sizes.append(step.batch_size)
        time.sleep(0.005)


def test_a_copy_that_cannot_be_allocated_is_not_kept(monkeypatch):
    kept = PrefixCache(1 << 20)

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    cache = cache_of(3)
    monkeypatch.setattr(torch.Tensor, "clone", out_of_memory)
    kept.store("a", ids(1, 2, 3), cache)
    assert len(kept) == 0 and kept.nbytes == 0


def _generator(model, prefix_cache_mb: float = 16) -> SpeculativeGenerator:
    return SpeculativeGenerator(
        model, IdTokenizer(), ContextDrafter(), budget=6, prefix_cache_mb=prefix_cache_mb
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2-hybrid", "mistral", "gemma2", "gpt2"])
def test_a_second_turn_starts_from_the_first_and_stays_exact(arch):
    model = tiny_model(arch)
    prompt = RNG.integers(0, VOCAB, size=30).tolist()
    gen = _generator(model)
    first = gen.generate(prompt, GenerationConfig(max_new_tokens=24))
    assert first.cached_tokens == 0
    turn = [*prompt, *first.output_ids.tolist(), *RNG.integers(0, VOCAB, size=9).tolist()]
    second = gen.generate(turn, GenerationConfig(max_new_tokens=24))
    # every token of the first request but its last output (never fed to the model) is reused
    assert second.cached_tokens == len(prompt) + len(first.output_ids) - 1
    assert second.output_ids.tolist() == plain_greedy(model, turn, 24)
    assert _generator(model, 0).generate(turn, GenerationConfig(max_new_tokens=24)).cached_tokens == 0
    other = gen.generate(turn, GenerationConfig(max_new_tokens=24), prefix_scope="someone else")
    assert other.cached_tokens == 0
    assert other.output_ids.tolist() == second.output_ids.tolist()


def test_a_repeated_prompt_prefills_nothing():
    model = tiny_model("llama")
    prompt = RNG.integers(0, VOCAB, size=20).tolist()
    gen = _generator(model)
    first = gen.generate(prompt, GenerationConfig(max_new_tokens=10))
    again = gen.generate(prompt, GenerationConfig(max_new_tokens=10))
    assert again.cached_tokens == len(prompt) - 1
    assert again.output_ids.tolist() == first.output_ids.tolist() == plain_greedy(model, prompt, 10)


def test_a_cancelled_request_leaves_its_rows_for_the_next():
    model = tiny_model("llama")
    prompt = RNG.integers(0, VOCAB, size=20).tolist()
    gen = _generator(model)
    stream = gen.stream(prompt, GenerationConfig(max_new_tokens=40))
    emitted = [*next(stream).token_ids.tolist()]
    stream.close()
    again = gen.generate(prompt, GenerationConfig(max_new_tokens=12))
    assert again.cached_tokens == len(prompt) - 1
    assert again.output_ids.tolist()[: len(emitted)] == emitted
    assert again.output_ids.tolist() == plain_greedy(model, prompt, 12)


def test_a_negative_bound_is_refused():
    with pytest.raises(GenerationError, match="prefix_cache_mb"):
        _generator(tiny_model("llama"), -1)


def test_a_reusing_request_joins_a_running_batch_and_both_stay_exact():
    """The second turn joins while another request decodes: its new tokens are prefilled in chunks
    on top of the reused rows, in the shared forwards."""
    model = tiny_model("qwen2-hybrid")
    policy = SlowBudget(4)
    gen = SpeculativeGenerator(model, IdTokenizer(), ContextDrafter(), policy, max_batch=2, prefill_chunk=4)
    prompt = RNG.integers(0, VOCAB, size=25).tolist()
    first = gen.generate(prompt, GenerationConfig(max_new_tokens=12))
    turn = [*prompt, *first.output_ids.tolist(), *RNG.integers(0, VOCAB, size=15).tolist()]
    other = RNG.integers(0, VOCAB, size=30).tolist()
    running = gen.stream(other, GenerationConfig(max_new_tokens=30))
    head = next(running).token_ids.tolist()  # the other request decodes now
    second = gen.generate(turn, GenerationConfig(max_new_tokens=16))
    rest = [t for chunk in running for t in chunk.token_ids.tolist()]
    assert second.cached_tokens == len(prompt) + len(first.output_ids) - 1
    assert second.output_ids.tolist() == plain_greedy(model, turn, 16)
    assert head + rest == plain_greedy(model, other, 30)
    assert max(policy.batch_sizes) == 2  # the two did share forwards
