"""Tiny byte-level tokenizer (no merges, with the ChatML template) and a tiny random Llama for bench tests."""

from __future__ import annotations

import os

import pytest
from tiny_models import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    model = tiny_llama(tiny_tokenizer, num_attention_heads=2, max_position_embeddings=512).eval()
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    return model
