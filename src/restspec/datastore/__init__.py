"""Datastore: corpus readers, bulk tokenizing, on-disk format, memory-mapped suffix index.

ds = Datastore.build(["corpus/"], "my.ds", tokenizer, glob="**/*.py")
ds = Datastore.open("my.ds", tokenizer)
match = ds.longest_match(context_ids)        # Match(length, count, ranges)
conts = ds.continuations(match, k=5000, m=10)  # int32[n, 10], -1 padded
"""

from restspec.datastore.build import DEFAULT_SHARD_TOKENS, BuildStats
from restspec.datastore.corpus import CorpusStats
from restspec.datastore.default import default_datastore_path, ensure_default_datastore
from restspec.datastore.fingerprint import tokenizer_fingerprint
from restspec.datastore.store import Datastore, Match, ShardRange

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "BuildStats",
    "CorpusStats",
    "Datastore",
    "Match",
    "ShardRange",
    "default_datastore_path",
    "ensure_default_datastore",
    "tokenizer_fingerprint",
]
