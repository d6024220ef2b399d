"""Tree verification: the mask, the logits of every tree row, and KV compaction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import ARCHS, SLIDING_WINDOW, VOCAB, tiny_model
from packaging.version import Version

from restspec.decode import (
    ModelForward,
    compact_cache,
    forward_tree,
    model_layout,
    new_cache,
    prefill,
    tree_attention_bias,
)
from restspec.decode.verify import buffered_layers
from restspec.draft.tree import DraftTree

# root ─┬─ 0:a ── 2:c ── 3:d
#       ├─ 1:b ── 5:f
#       └─ 4:e
TREE = DraftTree(np.array([11, 12, 13, 14, 15, 16]), np.array([-1, -1, 0, 2, -1, 1]))
CONTEXT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]  # the last token is the root


def test_bias_is_the_boolean_tree_mask_made_additive():
    bias = tree_attention_bias(TREE, past_len=5, dtype=torch.float32)
    allowed = TREE.attention_mask(5)
    assert bias.shape == (1, 1, 7, 12)
    assert torch.equal(bias[0, 0] == 0, torch.from_numpy(allowed))
    assert (bias[0, 0][~torch.from_numpy(allowed)] == torch.finfo(torch.float32).min).all()


def test_sliding_window_hides_keys_at_or_before_q_minus_window():
    window = 3
    bias = tree_attention_bias(TREE, past_len=5, dtype=torch.float64, sliding_window=window)[0, 0] == 0
    # root at position 5 sees cache positions 3, 4 and itself (k > 5 - 3)
    assert bias[0].nonzero().flatten().tolist() == [3, 4, 5]
    # node d (row 4) at position 5 + 3 = 8 sees k > 5: ancestors a (6), c (7) and itself, not the root
    assert bias[4].nonzero().flatten().tolist() == [6, 8, 9]


# Gemma2's eager attention takes the softmax in float32 even in a float64 model: ~1e-7 rounding
TOLERANCE = {"gemma2": 1e-5}
EXACT = 1e-9


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1]


def path_tokens(tree: DraftTree, node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(int(tree.tokens[node]))
        node = int(tree.parents[node])
    return out[::-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tree_row_scores_like_a_plain_forward_of_its_path(arch):
    model = tiny_model(arch)
    cache = new_cache()
    prefill(ModelForward(model), cache, np.array(CONTEXT[:-1]))
    past_len = len(CONTEXT) - 1
    logits = forward_tree(ModelForward(model), cache, CONTEXT[-1], TREE, past_len)
    assert logits.shape == (len(TREE) + 1, VOCAB)
    assert cache.get_seq_length() == past_len + len(TREE) + 1
    tol = TOLERANCE.get(arch, EXACT)
    torch.testing.assert_close(logits[0], plain_logits(model, CONTEXT), rtol=tol, atol=tol)
    for node in range(len(TREE)):
        expected = plain_logits(model, CONTEXT + path_tokens(TREE, node))
        torch.testing.assert_close(logits[node + 1], expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral", "qwen2-hybrid", "gemma2"])
@pytest.mark.parametrize("path", [[], [0], [0, 2, 3], [1, 5], [4]])
def test_compaction_leaves_the_cache_of_the_accepted_path(arch, path):
    model = tiny_model(arch)
    cache = new_cache()
    prefill(ModelForward(model), cache, np.array(CONTEXT[:-1]))
    past_len = len(CONTEXT) - 1
    forward_tree(ModelForward(model), cache, CONTEXT[-1], TREE, past_len)
    compact_cache(cache, past_len, np.array(path), len(TREE))
    accepted = [int(TREE.tokens[i]) for i in path]
    reference = new_cache()
    prefill(ModelForward(model), reference, np.array(CONTEXT + accepted))
    assert cache.get_seq_length() == reference.get_seq_length() == len(CONTEXT) + len(path)
    tol = TOLERANCE.get(arch, EXACT)
    for layer, ref in zip(cache.layers, reference.layers, strict=True):
        torch.testing.assert_close(layer.keys, ref.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(layer.values, ref.values, rtol=tol, atol=tol)
    # and the next step from the compacted cache scores like a plain forward (past the sliding window)
    assert len(CONTEXT) + len(path) > SLIDING_WINDOW
    nxt = forward_tree(ModelForward(model), cache, 7, DraftTree.empty(), len(CONTEXT) + len(path))
    torch.testing.assert_close(nxt[0], plain_logits(model, [*CONTEXT, *accepted, 7]), rtol=tol, atol=tol)


def test_a_chain_prefix_is_cropped_without_copying():
    model = tiny_model("llama")
    cache = new_cache()
    prefill(ModelForward(model), cache, np.array(CONTEXT[:-1]))
    forward_tree(ModelForward(model), cache, CONTEXT[-1], TREE, len(CONTEXT) - 1)
    before = [layer.keys.data_ptr() for layer in cache.layers]
    compact_cache(cache, len(CONTEXT) - 1, np.array([0]), len(TREE))
    assert [layer.keys.data_ptr() for layer in cache.layers] == before  # a view: no copy


@pytest.mark.parametrize("path", [[], [0], [1, 5], [0, 2, 3], [4]])
def test_a_writer_that_fills_the_buffers_compacts_as_the_views_do(path):
    # the block decoder's way: reserve, write rows into the buffers, advance; no view is read until later
    def written(read_views: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        cache = new_cache()
        layer = buffered_layers(cache, 1)[0]
        layer.update(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4, 3), 0)
        keys, values, length = layer.reserve(torch.empty(1, 2, 0, 3), torch.empty(1, 2, 0, 3), 7)
        rows = torch.arange(7.0)[None, None, :, None].expand(1, 2, 7, 3) + 10
        keys[:, :, length : length + 7], values[:, :, length : length + 7] = rows, -rows
        layer.advance(length + 7)
        assert layer.get_seq_length() == 11
        if read_views:
            assert layer.keys.shape[-2] == 11
        compact_cache(cache, 4, path, 6)  # rows: 4 past, the root (10), nodes 0-5 (11-16)
        return layer.keys.clone(), layer.values.clone(), layer.get_seq_length()

    keys, values, length = written(read_views=False)
    want_keys, want_values, want_length = written(read_views=True)
    assert length == want_length == 5 + len(path)
    torch.testing.assert_close(keys, want_keys, rtol=0, atol=0)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    assert keys[0, 0, 5:, 0].tolist() == [11.0 + node for node in path]  # node i: row 5 + i


def test_layout_of_the_architectures():
    assert model_layout(tiny_model("mistral")).sliding_window == SLIDING_WINDOW
    assert not model_layout(tiny_model("mistral")).hybrid
    assert model_layout(tiny_model("qwen2-hybrid")).hybrid
    assert model_layout(tiny_model("qwen2")).sliding_window is None
    assert model_layout(tiny_model("gpt2")).max_positions == 256
    assert not model_layout(tiny_model("llama")).hybrid
    assert model_layout(tiny_model("gemma2")).hybrid


@pytest.mark.parametrize("arch", ARCHS)
def test_the_cache_goes_by_the_keyword_of_the_installed_transformers(arch):
    # 5.24 renamed forward(past_key_values=) to forward(cache=); an unknown keyword would be swallowed
    # by **kwargs and the forward would run without the cache
    renamed = Version(transformers.__version__).release >= (5, 24)
    assert model_layout(tiny_model(arch)).cache_argument == ("cache" if renamed else "past_key_values")
