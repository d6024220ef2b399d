"""The drafting simulator on synthetic references (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from replay_refs import TOP_K, VOCAB, OracleDrafter, reference

from benchmarks.simulate import (
    calibration_table,
    load_references,
    longest_accepted,
    make_drafter,
    markdown_table,
    replay,
    save_references,
    step_logits,
    synthesized_logits,
)
from restspec.decode.warm import WarmStart
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


def test_step_logits_have_a_row_per_node_and_only_accepted_ones_hold_a_ranking():
    # tree below root 5: (1) (1,2) (3); path (1)(1,2) accepted: rows of 5, 1, 2 recorded, 3's not
    tree = DraftTree(np.array([1, 2, 3]), np.array([-1, 0, -1]))
    top = np.array([[1, 9, 8], [2, 7, 6], [4, 0, 3]], np.int32)
    logits = step_logits(tree, np.array([0, 1]), 5, top, VOCAB)
    assert logits.input_ids.tolist() == [5, 1, 2, -1]
    assert logits.top_candidates(3)[:3].tolist() == top.tolist()
    assert np.all(logits.logits[3] == logits.logits[3, 0])  # flat: nothing recorded


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


def test_a_warm_start_reaches_the_drafter_before_the_first_reference():
    ref = reference("a", [1, 2], [10, 11, 12, 13, 14, 15])
    warm = WarmStart([ref.prompt], [ref.output], drafter_state={}, policy_state=None)
    cold = replay([ref], make_drafter("history", [], VOCAB), 8, VOCAB)
    warmed = replay([ref], make_drafter("history", [], VOCAB, warm), 8, VOCAB)
    assert cold.mean_accepted == 1.0
    assert warmed.steps < cold.steps  # the warm start's conversation is history from the start


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


def test_calibration_table_counts_each_node_by_its_weight_and_whether_it_was_accepted():
    # a period-3 output: once recycling knows it, its first-level nodes are right and weighted high
    ref = reference("a", [1], [2, 3, 4] * 8)
    table = calibration_table([ref], [], VOCAB, 4)
    rows = [
        line.split(" | ") for line in table.splitlines() if line.startswith("| 0.") or line.startswith("| 1.")
    ]
    assert len(rows) == 12
    nodes = sum(int(r[1].replace(",", "")) for r in rows)
    assert f"({nodes:,} nodes" in table.splitlines()[0]
    accepted = [(int(r[1].replace(",", "")), float(r[3])) for r in rows if r[3] != "–"]
    assert accepted and all(0.0 <= share <= 1.0 for _, share in accepted)
    assert sum(n * share for n, share in accepted) > 0  # some drafted node was accepted


@pytest.mark.slow
def test_recorded_references_are_plain_greedy_outputs():
    """The recorder's KV-cache loop equals transformers' greedy generate, and its top-1 is the output."""
    import torch

    from benchmarks.simulate import _load_model, greedy_with_candidates
    from restspec.bench.workloads import load_humaneval

    model, tokenizer, _ = _load_model()
    text = load_humaneval()[0].turns[0]
    prompt = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    output, top = greedy_with_candidates(model, prompt, 12, [], TOP_K)
    expected = model.generate(
        torch.as_tensor(prompt[None], dtype=torch.long), max_new_tokens=12, do_sample=False
    )[0, len(prompt) :]
    assert output.tolist() == expected.tolist()
    assert top.shape == (len(prompt) + len(output), TOP_K)
    assert top[len(prompt) - 1 : -1, 0].tolist() == output.tolist()


def test_chat_references_follow_the_models_own_answers_and_resume(tmp_path, monkeypatch):
    """Each turn of a chat item is one reference; the second turn's prompt carries the recorded
    greedy answer to the first; an interrupted recording resumes from its partial file."""
    from tiny_models import tiny_llama, trained_bpe_tokenizer

    import benchmarks.simulate as sim
    from restspec.bench.runner import answer_text, prompt_ids
    from restspec.bench.workloads import BenchItem

    tokenizer = trained_bpe_tokenizer(["the cat sat on the mat, then the dog ran"] * 20, 300)
    model = tiny_llama(tokenizer).eval()
    monkeypatch.setattr(sim, "_load_model", lambda: (model, tokenizer, "tiny"))
    items = [BenchItem("q1", "writing", ("the cat", "then the dog"), chat=True)]
    path = tmp_path / "refs.npz"
    refs = sim.record_references(path, items, max_new_tokens=5, progress=None)
    assert [r.name for r in refs] == ["q1", "q1#1"]
    answer = answer_text(tokenizer, refs[0].output)
    messages = [
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "then the dog"},
    ]
    assert refs[1].prompt.tolist() == prompt_ids(tokenizer, items[0], messages)
    # resume: with the first turn already in the partial file, only the second is recorded again
    partial = tmp_path / "again.partial.npz"
    save_references(partial, refs[:1], "tiny")
    calls = []
    real = sim.greedy_with_candidates
    monkeypatch.setattr(sim, "greedy_with_candidates", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = sim.record_references(tmp_path / "again.npz", items, max_new_tokens=5, progress=None)
    assert len(calls) == 1 and not partial.exists()
    assert [r.prompt.tolist() for r in again] == [r.prompt.tolist() for r in refs]
