"""Tiny random models of several architectures, a byte-level tokenizer and test drafters.

Models run in float64 with a large initializer range so that their distributions are peaked: greedy
near-ties (where two kernels may round differently) become vanishingly rare, and the parity assertion
stays exact. They live on ``$RESTSPEC_TEST_DEVICE`` (default "cpu"): benchmarks/gpu_check.sh runs the
parity tests with it set to "cuda".
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from tiny_models import VARIANTS, tiny_config_kwargs, tiny_variant_config

from restspec.draft.base import StatelessDrafter
from restspec.draft.tree import DraftTree

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 96
"""Vocabulary of the tiny parity models."""
MAX_POSITIONS = 256
INIT_RANGE = 0.3
"""Initializer std of the tiny models: large enough for peaked, tie-free distributions."""
SLIDING_WINDOW = 7
"""Small enough that parity prompts plus outputs cross it."""
TEST_DEVICE = os.environ.get("RESTSPEC_TEST_DEVICE", "cpu")
"""Where the tiny models run."""


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: threads only add synchronisation cost on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _common(**extra):
    return tiny_config_kwargs(
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INIT_RANGE,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **extra,
    )


def build_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_common())
    if arch == "qwen2":
        return tf.Qwen2Config(**_common())
    if arch == "qwen2-hybrid":  # layer 0 full attention, layer 1 sliding window
        return tf.Qwen2Config(
            **_common(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1)
        )
    if arch == "mistral":  # every layer slides
        return tf.MistralConfig(**_common(sliding_window=SLIDING_WINDOW))
    if arch == "phi3":
        return tf.Phi3Config(**_common())
    if arch == "gemma":
        return tf.GemmaConfig(**_common(head_dim=8))
    if arch == "gemma2":  # alternating sliding / full layers, logit soft-capping
        return tf.Gemma2Config(**_common(head_dim=8, sliding_window=SLIDING_WINDOW))
    if arch in VARIANTS:
        return tiny_variant_config(arch, **_common())
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=MAX_POSITIONS,
            initializer_range=INIT_RANGE,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=False,
        )
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "qwen2-hybrid", "mistral", "phi3", "gemma", "gemma2", "gpt2")
VARIANT_ARCHS = tuple(VARIANTS)
"""Multi-query attention, rope scaling and partial rotary embeddings (tests/tiny_models.py)."""

_MODELS: dict[str, torch.nn.Module] = {}


def tiny_model(arch: str, head_dim: int | None = None) -> torch.nn.Module:
    """A tiny random float64 model on :data:`TEST_DEVICE` (built once per session), no end-of-sequence
    token; ``head_dim``: the attention heads' size where not the config's own (8)."""
    key = arch if head_dim is None else f"{arch}-head{head_dim}"
    if key not in _MODELS:
        from transformers import AutoModelForCausalLM

        config = build_config(arch)
        if head_dim is not None:
            config.head_dim = head_dim
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
        model.to(TEST_DEVICE)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        _MODELS[key] = model
    return _MODELS[key]


class IdTokenizer:
    """Decodes ids as space-separated numbers: enough for loops that only need text for stop strings."""

    eos_token_id = None

    def decode(self, ids, **kwargs) -> str:
        return "".join(f" {i}" for i in ids)


def plain_greedy(model, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding: the reference for parity."""
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def trie(sequences: Sequence[Sequence[int]], budget: int) -> DraftTree:
    """A prefix tree of ``sequences`` (inserted in order, parents before children), first ``budget`` nodes."""
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for seq in sequences:
        parent = -1
        for token in seq:
            key = (parent, int(token))
            if key not in index:
                if len(tokens) == budget:
                    break
                index[key] = len(tokens)
                tokens.append(int(token))
                parents.append(parent)
            parent = index[key]
    if not tokens:
        return DraftTree.empty()
    return DraftTree(np.array(tokens), np.array(parents))


class OracleDrafter(StatelessDrafter):
    """Drafts from the known greedy continuation ``truth`` (prompt + output), corrupted by ``mode``:

    - empty: nothing; chain: the true continuation as one deep chain;
    - wrong: only wrong tokens at every root child (every path wrong);
    - fan: a wide fan of wrong root children, the right one last, its subtree a chain;
    - mixed: a trie of corrupted copies of the continuation (random token swaps);
    - eos: the continuation with an end-of-sequence token planted inside (see test).
    """

    def __init__(self, truth: Sequence[int], mode: str, vocab: int, seed: int = 0) -> None:
        self.truth = list(truth)
        self.mode = mode
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.proposed = 0

    def _wrong(self, avoid: int, count: int) -> list[int]:
        pool = [t for t in self.rng.permutation(self.vocab).tolist() if t != avoid]
        return pool[:count]

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        self.proposed += 1
        pos = len(context)
        cont = self.truth[pos : pos + budget]
        if self.mode == "empty" or budget == 0:
            return DraftTree.empty()
        if not cont:  # past the known continuation: random guesses
            return trie([self.rng.integers(0, self.vocab, size=3).tolist()], budget)
        if self.mode == "chain":
            return DraftTree.chain(cont)
        if self.mode == "wrong":
            return trie([[w, *self._wrong(-1, 2)] for w in self._wrong(cont[0], 4)], budget)
        if self.mode == "fan":
            fan = [[w] for w in self._wrong(cont[0], max(budget // 2, 1))]
            return trie([*fan, cont], budget)
        if self.mode == "mixed":
            copies = []
            for _ in range(4):
                copy = list(cont)
                j = int(self.rng.integers(0, len(copy)))
                copy[j] = int(self.rng.integers(0, self.vocab))
                copies.append(copy)
            self.rng.shuffle(copies)
            return trie([*copies, cont], budget)
        raise ValueError(self.mode)


SAMPLING_VOCAB = 8
"""Vocabulary of :func:`sampling_model`: small enough to tabulate whole distributions."""


def sampling_model() -> torch.nn.Module:
    """A tiny float64 Llama over :data:`SAMPLING_VOCAB` tokens (multi-query attention), peaked enough
    that drafts get accepted: the sampling tests' model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=SAMPLING_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).to(torch.float64).eval()


Q4_0, Q4_1, Q5_0, Q8_0, Q3_K, Q4_K, Q6_K, BF16, F16 = (
    gguf.GGMLQuantizationType[name]
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q3_K", "Q4_K", "Q6_K", "BF16", "F16")
)
K_QUANT_SCALES = {Q4_K: ((0, 2), 63 * 15), Q6_K: ((208,), 127 * 32), Q3_K: ((108,), 32 * 4)}
"""Where a k-quant super-block (256 weights) holds its float16 scales (Q4_K's d and dmin, Q6_K's and
Q3_K's d; the sub-blocks' own scales are small integers, any byte value is one), and the largest
sub-block scale times the largest code."""


def gguf_weights(shape: tuple[int, int], kind, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    """Random float32 weights as a GGUF file of ``kind`` stores and transformers loads them (BF16, F16: as
    a bfloat16 or float16 checkpoint loaded in float32, the weights rounded to 16 bits). The k-quants
    (gguf-py decodes them but has no encoder) get random blocks: random codes and sub-block scales, and
    float16 super-block scales that make weights of about ``scale``."""
    rng = np.random.default_rng(seed)
    if kind in K_QUANT_SCALES:
        size = gguf.GGML_QUANT_SIZES[kind][1]
        raw = rng.integers(0, 256, (shape[0] * shape[1] // 256, size), dtype=np.uint8)
        places, largest = K_QUANT_SCALES[kind]
        for at in places:
            d = (rng.uniform(0.2, 1.0, len(raw)) * 4 * scale / largest).astype(np.float16)
            raw[:, at : at + 2] = d.view(np.uint8).reshape(-1, 2)
        return dequantize(raw, kind).astype(np.float32).reshape(shape)
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    return dequantize(quantize(w, kind), kind).astype(np.float32).reshape(shape)


GGUF_MIXES = {
    "Q4_1": (Q4_1, Q4_1, Q8_0),
    "Q4_K_M": (Q4_K, Q6_K, Q6_K),
    "BF16": (BF16, BF16, BF16),
    "F16": (F16, F16, F16),
}
"""A GGUF file's types as (most linears, v_proj and down_proj, the head): the embedded model's
(Q4_1, its head Q8_0), llama.cpp's common Q4_K_M, and 16-bit floats throughout (as checkpoints on the
Hugging Face hub are stored, most in bfloat16)."""


def gguf_model(arch: str = "llama", mix: str = "Q4_1", head_dim: int | None = 16) -> torch.nn.Module:
    """The tiny float32 model with GGUF-quantized weights of the types of ``mix``
    (:data:`GGUF_MIXES`), as transformers loads a quantized GGUF file; heads of ``head_dim`` (16: sizes
    the block decoder runs; None: the tiny model's own, 8, which it does not)."""
    most, wide, head = GGUF_MIXES[mix]
    model = copy.deepcopy(tiny_model(arch, head_dim)).to(torch.float32)
    with torch.no_grad():
        for i, (name, module) in enumerate(
            (n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear
        ):
            kind = (
                head if module is model.lm_head else wide if name.endswith(("v_proj", "down_proj")) else most
            )
            module.weight.copy_(
                torch.from_numpy(gguf_weights(tuple(module.weight.shape), kind, seed=i, scale=0.3))
            )
    return model
