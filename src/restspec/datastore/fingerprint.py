"""A stable identity for a tokenizer: the hash of its vocabulary and special tokens."""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref

FINGERPRINT_HEX_CHARS = 16
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits of SHA-256 over the (token, id) pairs sorted by id and the sorted special tokens.

    Independent of the tokenizer's class (slow or fast) and of where it was loaded from; changes
    when any id, token string or special token changes. Cached per tokenizer object and size.
    """
    try:
        size = len(tokenizer)
        cached = _cache.get(tokenizer)
    except TypeError:
        size, cached = -1, None
    if cached is not None and cached[0] == size:
        return cached[1]
    vocab = tokenizer.get_vocab()
    pairs = sorted(((int(i), str(t)) for t, i in vocab.items()))
    specials = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []) or [])
    payload = json.dumps(
        {"vocab": pairs, "special_tokens": specials}, ensure_ascii=False, separators=(",", ":")
    )
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:FINGERPRINT_HEX_CHARS]
    with contextlib.suppress(TypeError):
        _cache[tokenizer] = (size, digest)
    return digest


def vocab_size_of(tokenizer) -> int:
    """Ids the tokenizer can produce: len(tokenizer) (added tokens included), or max id + 1."""
    try:
        size = len(tokenizer)
    except TypeError:
        size = 0
    vocab = tokenizer.get_vocab()
    return max(size, max(vocab.values(), default=-1) + 1)
