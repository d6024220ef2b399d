"""Fixtures of the bench tests (tests/bench and benchmarks/tests import them into their conftest): a tiny
byte-level tokenizer (no merges, with the ChatML template), a tiny random Llama, a tiny datastore, and a
quick warm start."""

from __future__ import annotations

import functools
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


WARM_CONVERSATIONS = 2
"""Conversations of :func:`quick_warm_start` (the real warm start has 32 long ones)."""


@pytest.fixture
def quick_warm_start(monkeypatch, tmp_path):
    """A private cache and a warm start of two short conversations."""
    import restspec.decode.warm as warm_module

    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path / "cache"))
    quick = functools.partial(
        warm_module.learn_warm_start, conversations=WARM_CONVERSATIONS, question_tokens=8, answer_tokens=8
    )
    monkeypatch.setattr(warm_module, "learn_warm_start", quick)


@pytest.fixture(scope="module")
def datastore(tiny_tokenizer, tmp_path_factory):
    """A datastore of one repeated sentence in the tiny tokenizer."""
    from restspec.datastore import Datastore

    path = tmp_path_factory.mktemp("ds") / "tiny.ds"
    Datastore.build_from_texts(["hello world, hello there.\n"] * 3, path, tiny_tokenizer, progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_model_folder(tiny_model, tiny_tokenizer, tmp_path_factory):
    """The tiny model and tokenizer saved as a Hugging Face folder, for engines built from it."""
    out = tmp_path_factory.mktemp("tiny-bench-model")
    tiny_model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_engine(tiny_model_folder, datastore, monkeypatch, tmp_path):
    """``tiny_engine(warm_start, **options)``: a :class:`restspec.Engine` over the tiny model and
    datastore (its caches in a private folder), ``options`` passed to ``Engine.from_pretrained``."""
    from restspec.engine import Engine

    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path / "cache"))

    def build(warm_start: bool, **options) -> Engine:
        return Engine.from_pretrained(
            tiny_model_folder, datastores=[datastore], warm_start=warm_start, progress=False, **options
        )

    return build
