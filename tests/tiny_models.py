"""Tiny stand-ins shared by the test folders: ChatML special tokens and chat template, a byte-level BPE
tokenizer trained on a few texts, and the dimensions of the tiny random models (2 layers, 32 wide).

A module of its own, not a conftest: every folder's conftest.py is imported as ``conftest`` and they
shadow each other, so shared code needs a unique name (``tests/`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML, the template of the tiny tokenizers."""


def trained_bpe_tokenizer(texts: Iterable[str], vocab_size: int, **special_tokens: str):
    """A byte-level BPE tokenizer trained on ``texts`` (up to ``vocab_size`` tokens) with the ChatML
    specials and template: EOS ``<|im_end|>``, padding ``<|endoftext|>``, and ``special_tokens`` (such as
    ``bos_token=...``; none by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        **special_tokens,
    )


def tiny_config_kwargs(**overrides) -> dict:
    """Keyword arguments of a tiny model's config: 2 layers, 32 wide, 4 query and 2 key-value heads,
    untied embeddings; ``overrides`` add to or replace them."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        **overrides,
    }


VARIANTS: dict[str, tuple[str, dict]] = {
    "mqa": ("LlamaConfig", {"num_key_value_heads": 1}),
    "llama3-rope": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "linear-rope": (
        "Qwen2Config",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    "stablelm": (
        "StableLmConfig",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    ),
    "gpt-neox": (
        "GPTNeoXConfig",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
    ),
    "phi": (
        "PhiConfig",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    ),
}
"""Attention variants beyond the usual layouts, as (transformers config class, overrides of
:func:`tiny_config_kwargs`): multi-query attention (one key-value head), rope scaling (Llama 3's
frequency-dependent and linear position interpolation, whose wavelengths the tiny head dims reach),
and partial rotary embeddings (StableLM, GPT-NeoX, Phi rotate only part of each head)."""


def tiny_variant_config(name: str, **common):
    """The config of variant ``name`` (:data:`VARIANTS`) with ``common`` (vocabulary, positions, ...)
    going to :func:`tiny_config_kwargs` first."""
    import transformers

    class_name, overrides = VARIANTS[name]
    return getattr(transformers, class_name)(**tiny_config_kwargs(**{**common, **overrides}))


def tiny_llama(tokenizer, *, seed: int = 0, **overrides):
    """A random tiny Llama (torch seeded with ``seed`` first) over ``tokenizer``'s vocabulary, with its
    EOS and padding ids; ``overrides`` go to :func:`tiny_config_kwargs`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **tiny_config_kwargs(
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **overrides,
        )
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
