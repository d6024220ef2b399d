"""Suite-wide settings, and tiny stand-ins for the engine and CLI tests: a 2-layer Llama trained for a
few steps on a few lines of code (so that it continues them and drafts get accepted), saved as a Hugging
Face folder with a small byte-level BPE tokenizer (with a chat template), and a datastore built from
the same lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from tiny_models import tiny_llama, trained_bpe_tokenizer

# property tests judge correctness, not speed, on a shared 2-core machine
settings.register_profile(
    "restspec", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("restspec")

TINY_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n    print(i)\n",
    "import os\n\nfor root, dirs, files in os.walk('.'):\n    print(root, len(files))\n",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n",
]
TINY_CONTEXT = 128
"""max_position_embeddings of the tiny model, small so that a too-long prompt is easy to make."""
TINY_SEED = 0
TRAIN_STEPS = 40
TRAIN_LR = 1e-2
"""Enough for the tiny model to reproduce TINY_CORPUS greedily (loss < 0.1), a few seconds on one core."""


def _train(model, tokenizer, steps: int, lr: float) -> None:
    """Fit the model to TINY_CORPUS (one batch, every document then EOS) so that it continues it."""
    import torch

    docs = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in TINY_CORPUS]
    width = max(len(doc) for doc in docs)
    ids = torch.full((len(docs), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)] = torch.tensor(doc)
        mask[row, : len(doc)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_torch_thread_for_tiny_models
    model.train()
    try:
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a 128-token context, trained for a few steps on TINY_CORPUS (so it continues
    those texts and drafts from them get accepted), saved with its tokenizer as a Hugging Face folder."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = trained_bpe_tokenizer(TINY_CORPUS * 4, vocab_size=400, bos_token="<|endoftext|>")
    model = tiny_llama(
        tokenizer,
        seed=TINY_SEED,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
    )
    _train(model, tokenizer, steps=TRAIN_STEPS, lr=TRAIN_LR)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_datastore_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A datastore over :data:`TINY_CORPUS`, tokenized with the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    from restspec.datastore import Datastore

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("tiny-ds") / "ds"
    Datastore.build_from_texts(TINY_CORPUS * 3, out, tokenizer, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_context() -> int:
    return TINY_CONTEXT


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("restspec-cache")
