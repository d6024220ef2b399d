"""Synthetic greedy references and an oracle drafter for the replay tests (simulator, policy replay)."""

from __future__ import annotations

import numpy as np

from benchmarks.simulate import Reference
from restspec.draft import StatelessDrafter
from restspec.draft.tree import DraftTree

VOCAB = 50
TOP_K = 3


def reference(name: str, prompt: list[int], output: list[int]) -> Reference:
    """A reference whose recorded top-1 is the true next token (rank 1, 2: other tokens)."""
    full = np.asarray(prompt + output, np.int32)
    top = np.stack([np.roll(full, -1), (np.roll(full, -1) + 1) % VOCAB, (np.roll(full, -1) + 2) % VOCAB], 1)
    return Reference(name, np.asarray(prompt, np.int32), np.asarray(output, np.int32), top.astype(np.int32))


class OracleDrafter(StatelessDrafter):
    """Knows the reference: proposes the true next ``budget`` tokens as a chain."""

    def __init__(self, ref: Reference) -> None:
        self.full = np.concatenate([ref.prompt, ref.output])

    def propose(self, context, budget):
        return DraftTree.chain(self.full[len(context) : len(context) + budget])
