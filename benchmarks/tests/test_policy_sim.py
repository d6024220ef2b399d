"""Budget policies replayed on references and timed with a latency curve (no model)."""

from __future__ import annotations

import sys

import pytest
from replay_refs import VOCAB, OracleDrafter, reference

from benchmarks.policy_sim import policy_table, replay_policy
from restspec.decode.budget import DEFAULT_MAX_BUDGET, FixedBudget, LatencyCurve


def test_fixed_budget_oracle_is_timed_by_the_curve():
    # 10 tokens, every step accepts its 4-node chain + 1: 2 steps of a 5-wide forward (2.0 s each)
    ref = reference("r", [1, 2, 3], list(range(10, 20)))
    curve = LatencyCurve((1, 5), (1.0, 2.0))
    r = replay_policy([ref], OracleDrafter(ref), FixedBudget(4), curve, VOCAB)
    assert (r.steps, r.tokens, r.nodes) == (2, 10, 8)
    assert r.seconds == pytest.approx(4.0)
    assert r.speedup == pytest.approx(10 * 1.0 / 4.0)  # against one token per 1.0 s


def two_refs():
    return [
        reference("a", [1, 2, 3, 1, 2], [3, 1, 2, 3, 1, 2, 3, 4]),
        reference("b", [5, 6], [5, 6, 5, 6, 7]),
    ]


def test_policy_table_lists_every_policy():
    table = policy_table(two_refs(), [], VOCAB, LatencyCurve.reference())
    rows = table.splitlines()[2:]
    assert [r.split(" | ")[1] for r in rows[:9]] == [
        "adaptive, at most 8",
        f"adaptive, at most {DEFAULT_MAX_BUDGET} (default)",
        "adaptive, at most 16",
        "adaptive, at most 32",
        "adaptive, at most 64",
        "fixed 2",
        "fixed 4",
        "fixed 8",
        "fixed 16",
    ]
    assert "REST (datastore only) | fixed 64" in table
    flat = policy_table(two_refs(), [], VOCAB, LatencyCurve((1, 65), (1.0, 1.1)))  # width nearly free
    assert "adaptive, at most 64 (default)" in flat
    speedups = [float(r.rstrip("x |").split("| ")[-1]) for r in rows]
    assert all(s > 0 for s in speedups)


def test_policy_table_without_arctic_inference_leaves_out_its_row(monkeypatch):
    # the optional extra is missing: None in sys.modules makes its import raise ImportError
    monkeypatch.setitem(sys.modules, "arctic_inference.suffix_decoding", None)
    table = policy_table(two_refs(), [], VOCAB, LatencyCurve.reference())
    assert "REST (datastore only) | fixed 64" in table
    assert "SuffixDecoding" not in table
