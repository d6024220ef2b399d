"""Block-encoded weights: codes are found only where every float32 weight decodes back bitwise, the
kernel gives F.linear's outputs up to float rounding at every width, and the direct forward on it keeps
greedy output equal to plain greedy."""

from __future__ import annotations

import copy
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BF16,
    F16,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q6_K,
    Q8_0,
    VOCAB,
    IdTokenizer,
    OracleDrafter,
    gguf_model,
    gguf_weights,
    plain_greedy,
    tiny_model,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from restspec.decode import (
    GenerationConfig,
    ModelForward,
    SpeculativeGenerator,
    compact_cache,
    forward_tree,
    new_cache,
    prefill,
)
from restspec.decode import blocks as blocks_module
from restspec.decode.backends import (
    BACKEND_NAMES,
    PACKED_TOLERANCE,
    DirectBackend,
    backend_by_name,
    candidates,
    probe,
    relative_error,
)
from restspec.decode.blocks import (
    BlockDecoder,
    BlockWeights,
    encode,
    encode_affine4,
    encode_half,
    encode_scaled8,
)
from restspec.decode.verify import prefill_segment, tree_segment
from restspec.draft.tree import DraftTree
from restspec.errors import ModelError

pytestmark = pytest.mark.skipif(blocks_module.kernel() is None, reason="no C compiler to build the kernel")


def decoded(e) -> np.ndarray:
    """The float32 weights (N, K) the codes stand for, decoded in numpy from the kernel's layout."""
    groups = e.codes.shape[0]
    if e.kind in ("bf16", "f16"):
        codes = e.codes.view(np.uint16)  # (G, K, 16)
        w = (codes.astype(np.uint32) << 16).view(np.float32) if e.kind == "bf16" else codes.view(np.float16)
        return np.moveaxis(w.astype(np.float32), 2, 1).reshape(groups * 16, -1)
    if e.kind == "affine4":
        low, high = e.codes & 15, e.codes >> 4  # (G, K/2, 16)
        q = np.stack([low, high], axis=2).reshape(groups, -1, 16)  # (G, K, 16)
    else:
        q = e.codes.view(np.int8)
    k = q.shape[1]
    d = np.repeat(e.scales, e.block, axis=1)[:, :k]
    w = d * q.astype(np.float32)
    if e.offsets is not None:
        w = w + np.repeat(e.offsets, 32, axis=1)[:, :k]
    return np.moveaxis(w, 2, 1).reshape(groups * 16, k)


@pytest.mark.parametrize(
    ("kind", "encoder", "name", "block"),
    [
        (Q4_1, encode_affine4, "affine4", 32),
        (Q4_K, encode_affine4, "affine4", 32),  # d and m: float16 x 6-bit; codes need not reach 0 or 15
        (Q8_0, encode_scaled8, "scaled8", 32),
        (Q4_0, encode_scaled8, "scaled8", 32),  # d * (q - 8): 8-bit codes, d of either sign
        (Q5_0, encode_scaled8, "scaled8", 32),
        (Q6_K, encode_scaled8, "scaled8", 16),  # d: float16 x int8, rounded products, zero sub-scales
        (Q3_K, encode_scaled8, "scaled8", 16),
        (BF16, encode_half, "bf16", 32),  # no scales: the sums still by blocks of 32
        (F16, encode_half, "f16", 32),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_gguf_weights_are_encoded_and_decode_bitwise(kind, encoder, name, block, seed):
    w = gguf_weights((48, 512), kind, seed)
    e = encoder(w)
    assert e is not None and e.kind == name and e.block == block
    assert decoded(e).view(np.uint32).tolist() == w.view(np.uint32).tolist()
    assert encode(w).kind == name  # the first encoding that holds


def test_weights_off_the_grid_are_not_encoded():
    rng = np.random.default_rng(1)
    assert encode(rng.standard_normal((32, 64)).astype(np.float32)) is None
    w = gguf_weights((32, 64), Q4_1)
    w[7, 40] = np.nextafter(w[7, 40], np.float32(1))  # one weight one float off its block's grid
    assert encode_affine4(w) is None
    assert encode(w) is None  # nor on an 8-bit grid, nor a bfloat16 value
    w = gguf_weights((32, 64), BF16)
    assert encode(w).kind == "bf16"
    w[31, 63] = np.nextafter(w[31, 63], np.float32(1))  # its lowest bit set: not a bfloat16 value
    assert encode(w) is None
    w = gguf_weights((32, 64), F16)
    assert encode(w).kind == "f16"
    w[0, 0] = 1e5  # beyond float16's range
    assert encode(w) is None


def test_shapes_the_kernel_does_not_tile_are_not_encoded():
    assert encode(gguf_weights((24, 64), Q4_1)) is None  # 24 output rows: not groups of 16
    assert encode(gguf_weights((16, 64), Q4_1)[:, :48]) is None  # 48 inputs: not blocks of 32


def kernel_case(rows, out_groups, in_blocks, kind, seed, bias, lib=None):
    """A linear of GGUF-``kind`` weights, its block group (on ``lib``, default the kernel built for this
    CPU) and ``rows`` random input rows."""
    w = gguf_weights((16 * out_groups, 32 * in_blocks), kind, seed)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
    group = blocks_module.BlockGroup([linear], encode(w), lib or blocks_module.kernel())
    x = torch.from_numpy(
        np.random.default_rng(seed + 1).standard_normal((rows, w.shape[1])).astype(np.float32)
    )
    return linear, group, x


# 32 to 288 inputs: one chunk of the wide tiles (more rows than a register tile holds) and two
kernel_cases = {
    "out_groups": st.integers(1, 9),
    "in_blocks": st.sampled_from([1, 2, 4, 9]),
    "kind": st.sampled_from([Q4_1, Q8_0, Q4_0, Q4_K, Q6_K, BF16, F16]),
    "seed": st.integers(0, 2**16),
}


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), **kernel_cases)
def test_the_kernel_gives_f_linears_outputs_at_every_width(rows, out_groups, in_blocks, kind, seed):
    linear, group, x = kernel_case(rows, out_groups, in_blocks, kind, seed, bias=True)
    with torch.no_grad():
        torch.testing.assert_close(group.matmul(x), linear(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(2, 40), **kernel_cases)
# the edges of AVX2's paths: one group a tile from 3 rows, one tile (6 rows), two (7, 12), the wide tiles (13)
@example(rows=3, out_groups=3, in_blocks=9, kind=Q4_1, seed=5)
@example(rows=6, out_groups=3, in_blocks=9, kind=Q4_1, seed=1)
@example(rows=7, out_groups=3, in_blocks=9, kind=Q4_1, seed=2)
@example(rows=12, out_groups=2, in_blocks=4, kind=Q6_K, seed=3)
@example(rows=13, out_groups=2, in_blocks=9, kind=Q8_0, seed=4)
@example(rows=13, out_groups=3, in_blocks=9, kind=BF16, seed=6)
@example(rows=3, out_groups=5, in_blocks=2, kind=F16, seed=7)
def test_a_rows_outputs_are_bitwise_the_same_at_every_width(rows, out_groups, in_blocks, kind, seed):
    """Tree verification reads a node's logits from a forward over the whole tree: they must be what a
    forward over that node alone gives, to the bit, whatever tiles the kernel cut the rows into."""
    _, group, x = kernel_case(rows, out_groups, in_blocks, kind, seed, bias=False)
    wide = group.matmul(x)
    assert torch.equal(wide, torch.cat([group.matmul(x[r : r + 1]) for r in range(rows)]))


def assert_near(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within the exactness probe's bound (:data:`PACKED_TOLERANCE` of the largest magnitude): the block
    kernel sums a block's products before scaling them, float32 in another order than ``F.linear``."""
    error = relative_error(got, want)
    assert error <= PACKED_TOLERANCE[torch.float32], error


def packaged_source() -> str:
    return resources.files("restspec.decode").joinpath(blocks_module.SOURCE).read_text(encoding="utf-8")


@pytest.mark.parametrize("kind", [Q4_1, Q8_0, Q6_K, BF16, F16])
def test_avx512s_tiles_built_for_any_cpu_compute_the_same(kind):
    """AVX-512's 16-float vectors and tiles (register tiles of up to 16 rows over 4, 2 or 1 groups, wide
    tiles of 12 beyond), through the compiler's generic vectors: the CPUs that test this mostly lack
    AVX-512, and its tiles must give F.linear's outputs with every row independent of the others."""
    lib = wide_vectors_kernel()
    assert lib is not None and lib is not blocks_module.kernel()
    for rows in (1, 3, 5, 9, 16, 17, 29, 40):
        linear, group, x = kernel_case(rows, 5, 9, kind, seed=rows, bias=False, lib=lib)
        wide = group.matmul(x)
        with torch.no_grad():
            torch.testing.assert_close(wide, linear(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(wide, torch.cat([group.matmul(x[r : r + 1]) for r in range(rows)])), rows


def test_weights_changed_in_place_are_encoded_again_or_computed_plainly():
    w = gguf_weights((32, 64), Q4_1)
    linear = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
    group = blocks_module.BlockGroup([linear], encode(w), blocks_module.kernel())
    x = torch.randn(3, 64)
    with torch.no_grad():
        linear.weight.mul_(2.0)  # still on a grid (d and m doubled)
        torch.testing.assert_close(group.matmul(x), F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)
        assert group.encoded is not None
        linear.weight.add_(torch.randn(32, 64) * 1e-3)  # off the grid: F.linear from now on
        assert torch.equal(group.matmul(x), F.linear(x, linear.weight))
        assert group.encoded is None


@pytest.mark.parametrize(
    ("mix", "head_kind", "head_block"),
    [("Q4_1", "scaled8", 32), ("Q4_K_M", "scaled8", 16), ("BF16", "bf16", 32), ("F16", "f16", 32)],
)
def test_a_gguf_model_gets_the_block_backend_and_its_logits(mix, head_kind, head_block):
    model = gguf_model(mix=mix)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert all(BlockWeights.of(model).member(m.weight) is not None for m in linears)  # every linear
    found = {b.name: b for b in candidates(model)}
    assert "direct-blocks" in found and "direct-blocks" in BACKEND_NAMES
    backend = found["direct-blocks"]
    weights = backend.direct.lm_head.__self__  # the head's group: one kernel call
    assert isinstance(weights, blocks_module.BlockGroup) and weights.encoded.kind == head_kind
    assert weights.encoded.block == head_block
    assert probe(backend).passed

    def tree_logits(b) -> torch.Tensor:
        prompt = np.random.default_rng(0).integers(0, VOCAB, size=12)
        cache = new_cache()
        prefill(b, cache, prompt[:-1])
        tree = DraftTree(np.array([5, 9, 11, 2, 7, 3]), np.array([-1, -1, 0, 2, 3, 1]))
        return forward_tree(b, cache, int(prompt[-1]), tree, len(prompt) - 1)

    assert_near(tree_logits(backend), tree_logits(ModelForward(model)))


@pytest.mark.parametrize(
    ("arch", "mix"),
    [("llama", "Q4_1"), ("qwen2", "Q4_1"), ("llama", "Q4_K_M"), ("qwen2", "BF16"), ("llama", "F16")],
)
def test_greedy_parity_on_the_block_backend(arch, mix):
    model = gguf_model(arch, mix)
    prompt = np.random.default_rng(3).integers(0, VOCAB, size=9).tolist()
    expected = plain_greedy(model, prompt, 24)  # stock kernels, through model.generate
    backend = backend_by_name(model, "direct-blocks")
    assert isinstance(backend, DirectBackend)
    for mode in ("chain", "mixed", "fan"):
        drafter = OracleDrafter(prompt + expected, mode, VOCAB)
        gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=8, backend=backend)
        assert gen.generate(prompt, GenerationConfig(max_new_tokens=24)).output_ids.tolist() == expected, mode


def test_a_kernel_built_from_another_source_serves_the_model_as_the_packaged_one():
    """``kernel(text)`` builds a given version of ``blocks.c`` (what benchmarks.forward_versions compares
    against); ``BlockWeights.of(model, lib)`` computes on it."""
    other = blocks_module.kernel(packaged_source() + "\n/* another version */\n")
    assert other is not None and other is not blocks_module.kernel()
    model = gguf_model()
    x = torch.randn(9, model.config.hidden_size)
    (head, _), (packaged, _) = (
        BlockWeights.of(model, lib).member(model.lm_head.weight) for lib in (other, None)
    )
    assert head._lib is other and packaged._lib is blocks_module.kernel()
    assert torch.equal(head.matmul(x), packaged.matmul(x))


def test_a_model_off_the_grid_has_no_block_backend():
    model = copy.deepcopy(tiny_model("llama")).to(torch.float32)  # random float32 weights
    assert BlockWeights.of(model) is None
    assert "direct-blocks" not in {b.name for b in candidates(model)}
    with pytest.raises(ModelError, match="direct-blocks"):
        backend_by_name(model, "direct-blocks")


def test_without_a_c_compiler_the_block_backend_is_not_offered(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    blocks_module.kernel.cache_clear()
    try:
        assert blocks_module.kernel() is None
        assert BlockWeights.of(gguf_model()) is None
    finally:
        monkeypatch.undo()
        blocks_module.kernel.cache_clear()


# ---- the decoder: every layer in one call ---------------------------------------------------------------


class DecoderSpy:
    """Wraps a backend's decoder and records whether each call ran the layers (True) or left them to
    the layer loop (False)."""

    def __init__(self, backend) -> None:
        self.decoder, self.results = backend.direct.decoder, []
        backend.direct.decoder = self

    def __call__(self, *args) -> bool:
        self.results.append(self.decoder(*args))
        return self.results[-1]


def prefilled(backend, prompt) -> object:
    cache = new_cache()
    prefill(backend, cache, prompt)
    return cache


BRANCHY = DraftTree(np.array([5, 9, 11, 2, 7, 3, 8]), np.array([-1, -1, 0, 2, 3, 1, 5]))
"""Two branches under the root, a chain of three under the first child, one of two under the second."""


@pytest.mark.parametrize(
    ("arch", "mix"),
    [
        ("llama", "Q4_1"),
        ("qwen2", "Q4_1"),
        ("llama", "Q4_K_M"),
        ("mqa", "Q4_1"),
        ("llama3-rope", "Q4_1"),
        ("llama", "BF16"),
        ("qwen2", "F16"),
    ],
)
def test_the_decoder_runs_every_layer_with_the_models_logits_and_cache_rows(arch, mix):
    model = gguf_model(arch, mix)
    backend = backend_by_name(model, "direct-blocks")
    spy = DecoderSpy(backend)
    prompt = np.random.default_rng(0).integers(0, VOCAB, size=30)
    got = prefilled(backend, prompt[:-1]), prefilled(ModelForward(model), prompt[:-1])
    logits = [
        forward_tree(b, c, int(prompt[-1]), BRANCHY, 29)
        for b, c in zip((backend, ModelForward(model)), got, strict=True)
    ]
    assert spy.results == [True]
    assert_near(logits[0], logits[1])
    for mine, theirs in zip(got[0].layers, got[1].layers, strict=True):  # with qwen2's biases
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)
    assert probe(backend).passed


def wide_vectors_kernel():
    """The kernel with AVX-512's 16-float vectors on any CPU (generic vectors)."""
    return blocks_module.kernel("#define RESTSPEC_WIDE_VECTORS 1\n" + packaged_source())


@pytest.mark.parametrize(
    ("arch", "head_dim", "wide", "mix"),
    [
        ("llama", 16, False, "Q4_K_M"),
        ("mqa", 64, False, "Q4_K_M"),
        ("llama", 64, True, "Q4_K_M"),
        ("mqa", 16, True, "Q4_K_M"),
        ("llama", 16, False, "BF16"),
        ("mqa", 16, True, "BF16"),
        ("llama", 64, True, "F16"),
    ],
)
def test_a_tree_row_is_bitwise_the_same_token_decoded_alone_after_compaction(arch, head_dim, wide, mix):
    """The tree's rows see only their ancestors: the decoder skips the other keys, so the leaf path
    (1, 5, 6) scored in one forward gives the logits and cache rows of its tokens decoded one at a
    time, bit for bit; with AVX2's vectors and AVX-512's (wide), one to four heads per key/value head,
    heads of 1 to 8 vectors, on 4/6-bit codes and on bfloat16 values."""
    model = gguf_model(arch, mix, head_dim=head_dim)
    backend = DirectBackend(model, BlockWeights.of(model, wide_vectors_kernel() if wide else None))
    spy = DecoderSpy(backend)
    prompt = np.random.default_rng(1).integers(0, VOCAB, size=40)
    tree_cache, alone_cache = prefilled(backend, prompt[:-1]), prefilled(backend, prompt[:-1])
    tree_logits = forward_tree(backend, tree_cache, int(prompt[-1]), BRANCHY, 39)
    path = [1, 5, 6]
    compact_cache(tree_cache, 39, path, len(BRANCHY))
    tokens = [int(prompt[-1]), *(int(BRANCHY.tokens[p]) for p in path)]
    for step, (token, row) in enumerate(zip(tokens, [0, *(p + 1 for p in path)], strict=True)):
        alone = forward_tree(backend, alone_cache, token, DraftTree.chain([]), 39 + step)
        assert torch.equal(alone[0], tree_logits[row]), row
    for a, b in zip(tree_cache.layers, alone_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert all(spy.results)


def test_a_segment_computes_bitwise_the_same_alone_and_in_a_batch():
    """A tree and a prompt chunk (causal) of two requests in one call of the decoder: each request's
    logits and cache rows are those of its segment run alone."""
    model = gguf_model("qwen2", "Q4_1")
    backend = backend_by_name(model, "direct-blocks")
    spy = DecoderSpy(backend)
    rng = np.random.default_rng(2)
    first, second = rng.integers(0, VOCAB, size=21), rng.integers(0, VOCAB, size=33)

    def segments():
        a, b = prefilled(backend, first[:-1]), prefilled(backend, second[:10])
        return [
            tree_segment(backend, a, int(first[-1]), BRANCHY, 20),
            prefill_segment(backend, b, second[10:], 10),
        ]

    together = segments()
    logits = backend.forward_batch(together)
    for index, seg in enumerate(segments()):
        alone = backend.forward_batch([seg])
        assert (alone[0] is None) == (logits[index] is None)
        if alone[0] is not None:
            assert torch.equal(alone[0], logits[index])
        for a, b in zip(seg.cache.layers, together[index].cache.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert spy.results == [True] * 3


def test_layers_the_decoder_does_not_know_keep_the_layer_loop():
    """Heads of 8 (not a multiple of 16 floats) or a part the decoder does not apply (Qwen3's q/k norms,
    layer norms as StableLM's) leave the layers to the direct forward's loop, which still serves the
    block kernel."""
    small_heads = gguf_model(head_dim=None)
    assert backend_by_name(small_heads, "direct-blocks").direct.decoder is None
    layer_norms = gguf_model()
    layer_norms.model.layers[0].input_layernorm = torch.nn.LayerNorm(layer_norms.config.hidden_size)
    assert BlockDecoder.of(layer_norms, BlockWeights.of(layer_norms), blocks_module.kernel()) is None
    extra = gguf_model()
    extra.model.layers[1].self_attn.q_norm = torch.nn.Identity()
    assert BlockDecoder.of(extra, BlockWeights.of(extra), blocks_module.kernel()) is None
    for model in (small_heads, extra):
        backend = backend_by_name(model, "direct-blocks")
        assert backend.direct.decoder is None and probe(backend).passed


def test_the_decoder_sees_weights_changed_in_place_and_plain_caches_take_the_loop():
    model = gguf_model()
    backend = backend_by_name(model, "direct-blocks")
    spy = DecoderSpy(backend)
    prompt = np.random.default_rng(4).integers(0, VOCAB, size=16)

    def agree() -> None:
        caches = prefilled(backend, prompt[:-1]), prefilled(ModelForward(model), prompt[:-1])
        got, want = (
            forward_tree(b, c, int(prompt[-1]), BRANCHY, 15)
            for b, c in zip((backend, ModelForward(model)), caches, strict=True)
        )
        assert_near(got, want)

    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # other weights on the grid: encoded again, still decoded in C
        q_proj.weight.copy_(
            torch.from_numpy(gguf_weights(tuple(q_proj.weight.shape), Q4_1, seed=99, scale=0.3))
        )
    agree()
    assert spy.results == [True]
    with torch.no_grad():  # off the grid: F.linear for that group, in the layer loop
        q_proj.weight.add_(torch.randn_like(q_proj.weight) * 1e-3)
    agree()
    assert spy.results == [True, False]
    plain = DynamicCache()  # not new_cache()'s buffered layers
    backend.prefill(plain, prompt)
    forward_tree(backend, plain, 3, BRANCHY, 16)
    assert spy.results == [True, False, False]


@pytest.mark.parametrize("wide", [False, True])
def test_every_finite_float16_value_decodes_exactly(wide):
    """The float16 codes' conversion (the CPU's instruction, or the C code of the generic vectors) gives
    every finite float16 value, subnormals and both zeros included: inputs of one 1 pick each weight."""
    values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    w = values[np.isfinite(values)].astype(np.float32).reshape(-1, 32)  # 63,488 values: 1,984 x 32
    encoded = encode_half(w)
    assert encoded is not None and encoded.kind == "f16"
    linear = torch.nn.Linear(32, w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
    group = blocks_module.BlockGroup(
        [linear], encoded, wide_vectors_kernel() if wide else blocks_module.kernel()
    )
    picked = group.matmul(torch.eye(32)).T.numpy()  # (1984, 32): weight (n, k) from input row k
    assert np.array_equal(picked, w)  # (-0.0 sums to 0.0: equal as numbers)
    assert np.array_equal(np.abs(picked).view(np.uint32), np.abs(w).view(np.uint32))
