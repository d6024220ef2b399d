"""restspec: retrieval-based speculative decoding for any Hugging Face causal language model."""

from restspec.datastore import Datastore, Match
from restspec.draft.base import Drafter, EmptyDrafter, TreeLogits
from restspec.draft.tree import DraftTree
from restspec.errors import RestspecError

__version__ = "0.1.0"

__all__ = [
    "Datastore",
    "DraftTree",
    "Drafter",
    "EmptyDrafter",
    "Match",
    "RestspecError",
    "TreeLogits",
    "__version__",
]
