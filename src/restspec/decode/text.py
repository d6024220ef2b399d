"""Text out of token ids, one step at a time: incremental decoding and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PROMPT_CONTEXT_TOKENS = 4
"""Prompt tokens decoded ahead of the output, so the first output token keeps its leading space."""
_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Decodes a growing list of token ids into text increments.

    Decodes a small window ``ids[prefix:]`` and returns what it adds to ``ids[prefix:read]``; text
    ending in U+FFFD (a multi-byte character split across tokens) is held back until complete.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:]) if len(prompt_ids) else []
        self._prefix = 0
        self._read = len(self._ids)
        self._sent = 0  # characters after decode(ids[prefix:read]) already returned

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, ids: Sequence[int]) -> str:
        """Add ``ids``; the text they complete (possibly empty)."""
        self._ids.extend(ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        start = len(prefix_text) + self._sent
        if new_text.endswith(_INCOMPLETE):  # emit what is complete, wait for the rest
            delta = new_text.rstrip(_INCOMPLETE)[start:]
            self._sent += len(delta)
            return delta
        if len(new_text) <= len(prefix_text):
            return ""
        self._prefix, self._read, self._sent = self._read, len(self._ids), 0
        return new_text[start:]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        start = len(prefix_text) + self._sent
        self._prefix = self._read = len(self._ids)
        self._sent = 0
        return new_text[start:]


class StopStringMatcher:
    """Finds the first stop string in a growing text and tells how much text is safe to emit."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = tuple(stop_strings)
        self._longest = max((len(s) for s in self.stop_strings), default=0)

    def find(self, text: str, start: int) -> int:
        """Index of the first stop string in ``text`` that ends after ``start``, or -1."""
        if not self.stop_strings:
            return -1
        begin = max(0, start - self._longest + 1)
        hits = [i for i in (text.find(s, begin) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else -1

    def holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that could still grow into a stop string."""
        for size in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return size
        return 0
