"""restspec: retrieval-based speculative decoding for any Hugging Face causal language model.

The public API. The decoding and model names import torch and transformers, so they load on first
use: ``import restspec.datastore`` stays light.
"""

from importlib import import_module
from typing import Any

from restspec.datastore import Datastore, Match
from restspec.draft.base import Drafter, EmptyDrafter, Learner, Step, TreeLogits
from restspec.draft.tree import DraftTree
from restspec.errors import RestspecError

__version__ = "0.1.0"

_LAZY = {
    "Engine": "restspec.engine",
    "AdaptiveBudget": "restspec.decode.budget",
    "FixedBudget": "restspec.decode.budget",
    "ForwardBackend": "restspec.decode.backends",
    "choose_backend": "restspec.decode.backends",
    "GenerationConfig": "restspec.decode.config",
    "SamplingConfig": "restspec.decode.config",
    "GenerationResult": "restspec.decode.generate",
    "SpeculativeGenerator": "restspec.decode.generate",
    "StreamChunk": "restspec.decode.generate",
    "default_drafter": "restspec.draft",
    "load_model": "restspec.models",
    "load_tokenizer": "restspec.models",
    "resolve_device": "restspec.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'restspec' has no attribute {name!r}")


__all__ = [
    "Datastore",
    "DraftTree",
    "Drafter",
    "EmptyDrafter",
    "Learner",
    "Match",
    "RestspecError",
    "Step",
    "TreeLogits",
    "__version__",
    *_LAZY,
]
