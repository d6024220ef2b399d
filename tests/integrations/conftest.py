"""A tiny Llama and its tokenizer saved as a Hugging Face folder (no hub): vLLM serves it, and the
proposer checks datastores against its tokenizer."""

from __future__ import annotations

import pytest
from tiny_models import tiny_llama, trained_bpe_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "the quick brown fox jumps over the lazy dog"] * 20


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> str:
    """2 layers, 128 wide, 2 heads of 64 (vLLM's CPU attention rejects a head size of 16), 300 tokens."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = trained_bpe_tokenizer(TEXTS, 300)
    model = tiny_llama(
        tokenizer, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
