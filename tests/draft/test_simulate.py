"""The drafting simulator on synthetic references (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from replay_refs import TOP_K, VOCAB, OracleDrafter, reference

from restspec.bench.simulate import (
    load_references,
    longest_accepted,
    markdown_table,
    replay,
    save_references,
    synthesized_logits,
)
from restspec.draft import EmptyDrafter, HistoryDrafter, RecycleDrafter
from restspec.draft.tree import DraftTree


def test_longest_accepted_follows_the_matching_branch():
    # tree: (1) (1,2) (1,3) (1,3,4); truth 1 3 4 9 -> accepts 3 draft tokens
    tree = DraftTree(np.array([1, 2, 3, 4]), np.array([-1, 0, 0, 2]))
    assert longest_accepted(tree, np.array([1, 3, 4, 9])) == 3
    assert longest_accepted(tree, np.array([2, 1])) == 0
    assert longest_accepted(DraftTree.empty(), np.array([1])) == 0


def test_synthesized_logits_reproduce_the_recorded_ranking():
    top = np.array([[4, 2, 7], [1, 0, 3]], np.int32)
    logits = synthesized_logits(np.array([5, 4]), top, VOCAB)
    assert logits.top_candidates(3).tolist() == top.tolist()


def test_empty_drafter_gains_one_token_per_step():
    ref = reference("a", [1, 2], [3, 4, 5, 6, 7])
    result = replay([ref], EmptyDrafter(), 8, VOCAB)
    assert (result.steps, result.tokens, result.mean_accepted) == (5, 5, 1.0)


@pytest.mark.parametrize("budget", [1, 2, 4, 8])
def test_oracle_gains_budget_plus_one_tokens_per_step(budget):
    # 7 output tokens, each step gains budget + 1 (the last step what is left)
    ref = reference("a", [1, 2], [3, 4, 5, 6, 7, 8, 9])
    result = replay([ref], OracleDrafter(ref), budget, VOCAB)
    assert result.tokens == 7
    assert result.steps == -(-7 // (budget + 1))


def test_history_only_sees_earlier_references():
    ref = reference("a", [1, 2], [10, 11, 12, 13, 14, 15])
    once = replay([ref], HistoryDrafter(min_len=1), 8, VOCAB)
    assert once.mean_accepted == 1.0  # its own output is not history while it runs
    twice = replay([ref, ref], HistoryDrafter(min_len=1), 8, VOCAB)
    assert twice.steps < 2 * once.steps  # the second replay drafts from the first


def test_recycle_learns_from_synthesized_logits():
    # a periodic output: after one period the table predicts the next token
    ref = reference("a", [1], [2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4])
    result = replay([ref], RecycleDrafter(VOCAB, k=TOP_K), 4, VOCAB)
    assert result.mean_accepted > 1.5


def test_references_round_trip_and_table(tmp_path):
    refs = [reference("a", [1, 2], [3, 4]), reference("b", [5], [6])]
    save_references(tmp_path / "r.npz", refs, "test")
    loaded = load_references(tmp_path / "r.npz")
    assert [r.name for r in loaded] == ["a", "b"]
    assert all(np.array_equal(x.top, y.top) for x, y in zip(refs, loaded, strict=True))
    table = markdown_table([replay(refs, EmptyDrafter(), b, VOCAB, "empty") for b in (4, 8)])
    assert table.splitlines()[0] == "| drafter | b=4 | b=8 |"
    assert "| empty | **1.000** | **1.000** |" in table


@pytest.mark.slow
def test_recorded_references_are_plain_greedy_outputs():
    """The recorder's KV-cache loop equals transformers' greedy generate, and its top-1 is the output."""
    import torch

    from restspec.bench.simulate import _load_model, greedy_with_candidates, humaneval_prompts

    model, tokenizer, _ = _load_model()
    _, text = humaneval_prompts(1)[0]
    prompt = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    output, top = greedy_with_candidates(model, prompt, 12, [], TOP_K)
    expected = model.generate(
        torch.as_tensor(prompt[None], dtype=torch.long), max_new_tokens=12, do_sample=False
    )[0, len(prompt) :]
    assert output.tolist() == expected.tolist()
    assert top.shape == (len(prompt) + len(output), TOP_K)
    assert top[len(prompt) - 1 : -1, 0].tolist() == output.tolist()
