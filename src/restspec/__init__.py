"""restspec: retrieval-based speculative decoding for any Hugging Face causal language model."""

from restspec.draft.base import Drafter, EmptyDrafter, TreeLogits
from restspec.draft.tree import DraftTree
from restspec.errors import RestspecError

__version__ = "0.1.0"

__all__ = ["DraftTree", "Drafter", "EmptyDrafter", "RestspecError", "TreeLogits", "__version__"]
