"""Retrieving drafters: the request's context, past outputs, a datastore. Worked examples."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from steps import step

from restspec.datastore import Datastore
from restspec.draft import ContextDrafter, DatastoreDrafter, HistoryDrafter, longest_suffix_continuations
from restspec.draft.tree import DraftTree

VOCAB = 100


def node_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for tok, parent in zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True):
        paths.append((paths[parent] if parent >= 0 else ()) + (tok,))
    return paths


def ids(*tokens: int) -> np.ndarray:
    return np.asarray(tokens, np.int32)


def test_lookup_finds_longest_suffix_and_all_its_occurrences():
    # buffer: 1 2 3 | 1 2 4 | 9 2 5 ; query ends "1 2": longest suffix found is "1 2" (twice),
    # continuations after each, most recent first: [4 9 2], [3 1 2]; "9 2" does not match "1 2"
    buffer = ids(1, 2, 3, 1, 2, 4, 9, 2, 5)
    found = longest_suffix_continuations(buffer, ids(7, 1, 2), max_len=4, min_len=1, m=3, max_rows=10)
    assert found.length == 2
    assert found.continuations.tolist() == [[4, 9, 2], [3, 1, 2]]


def test_lookup_stops_at_separators_and_buffer_end():
    # documents [5 6 7] and [5 6] separated by -1: after "5 6" come [7 -1 ...] and nothing
    buffer = ids(5, 6, 7, -1, 5, 6)
    found = longest_suffix_continuations(buffer, ids(5, 6), max_len=4, min_len=2, m=3, max_rows=10)
    assert found.length == 2
    assert found.continuations.tolist() == [[7, -1, -1]]


def test_lookup_respects_min_len_and_max_rows():
    buffer = ids(1, 8, 2, 8, 3, 8, 4)
    # the suffix "8" (length 1) occurs 3 times; min_len=2 finds nothing
    assert longest_suffix_continuations(buffer, ids(0, 8), max_len=4, min_len=2, m=2, max_rows=9).length == 0
    found = longest_suffix_continuations(buffer, ids(0, 8), max_len=4, min_len=1, m=1, max_rows=2)
    assert found.continuations.tolist() == [[4], [3]]  # the two most recent


def brute_force_lookup(buffer, query, end, max_len, min_len, m, max_rows):
    """The definition, one occurrence at a time: (length, rows)."""
    buffer, query = buffer.tolist(), query.tolist()
    limit = len(buffer) if end is None else min(end, len(buffer))
    found: dict[int, list[int]] = {}
    for length in range(min(max_len, len(query)), min_len - 1, -1):
        suffix = query[-length:]
        found[length] = [q for q in range(length - 1, limit - 1) if buffer[q - length + 1 : q + 1] == suffix]
        if found[length]:
            rows = []
            for q in reversed(found[length][-max_rows:]):
                row = []
                for t in buffer[q + 1 : q + 1 + m]:
                    if t < 0:
                        break
                    row.append(t)
                rows.append(row + [-1] * (m - len(row)))
            return length, rows
    return 0, []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(-1, 3), max_size=60),
    st.lists(st.integers(0, 3), min_size=1, max_size=12),
    st.one_of(st.none(), st.integers(0, 70)),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 8),
)
def test_lookup_matches_the_brute_force_definition(buffer, query, end, max_len, min_len, m, max_rows):
    min_len = min(min_len, max_len)
    found = longest_suffix_continuations(
        ids(*buffer), ids(*query), end=end, max_len=max_len, min_len=min_len, m=m, max_rows=max_rows
    )
    length, rows = brute_force_lookup(ids(*buffer), ids(*query), end, max_len, min_len, m, max_rows)
    assert found.length == length
    assert found.continuations.tolist() == rows
    assert found.continuations.shape == (len(rows), m)


def test_context_drafter_builds_a_tree_from_all_earlier_occurrences():
    # context: a b X c | a b Y | a b  (a=1 b=2 X=3 c=4 Y=5): "a b" occurred twice before the end,
    # followed by [Y a] and [X c]: root children Y and X, each with one child
    context = ids(1, 2, 3, 4, 1, 2, 5, 1, 2)
    drafter = ContextDrafter(max_len=8, min_len=2, m=2)
    tree = drafter.propose(context, 8)
    assert tree.match_length == 2
    assert sorted(node_paths(tree)) == [(3,), (3, 4), (5,), (5, 1)]
    # one occurrence each of 2 (+1 prior row): weight 1 / 3
    np.testing.assert_allclose(tree.weights, [1 / 3] * 4, rtol=1e-6)
    assert len(drafter.propose(context, 2)) == 2


def test_context_drafter_without_repetition_drafts_nothing():
    drafter = ContextDrafter(min_len=1)
    assert len(drafter.propose(ids(1, 2, 3, 4), 8)) == 0
    assert len(drafter.propose(ids(), 8)) == 0
    assert len(drafter.propose(ids(1, 1), 0)) == 0


def test_history_drafter_sees_only_finished_requests_and_evicts_oldest():
    drafter = HistoryDrafter(max_tokens=5, min_len=2, m=3)
    drafter.start_request(ids(9))
    drafter.observe(step(ids(9), ids(1, 2, 3)))
    # the running request's own output is not history yet
    assert len(drafter.propose(ids(1, 2), 4)) == 0
    drafter.stop_request()
    assert node_paths(drafter.propose(ids(7, 1, 2), 4)) == [(3,)]
    # a second output of 4 tokens pushes the total to 7 > 5: the first output is evicted
    drafter.start_request(ids(9))
    drafter.observe(step(ids(9), ids(4, 5, 6, 7)))
    drafter.stop_request()
    assert drafter.num_tokens == 4
    assert len(drafter.propose(ids(1, 2), 4)) == 0
    assert node_paths(drafter.propose(ids(4, 5), 4)) == [(6,), (6, 7)]


def test_history_keeps_interleaved_requests_apart():
    # two requests in flight at once (continuous batching): each output joins the history whole
    drafter = HistoryDrafter(min_len=2, m=3)
    drafter.start_request(ids(9), request=1)
    drafter.start_request(ids(8), request=2)
    drafter.observe(replace(step(ids(9), ids(1, 2)), request=1))
    drafter.observe(replace(step(ids(8), ids(5, 6)), request=2))
    drafter.observe(replace(step(ids(9, 1, 2), ids(3)), request=1))
    drafter.stop_request(1)
    assert node_paths(drafter.propose(ids(7, 1, 2), 4)) == [(3,)]  # 1 2 3, not 1 2 5
    assert len(drafter.propose(ids(5, 6), 4)) == 0  # request 2 is still running
    drafter.observe(replace(step(ids(8, 5, 6), ids(7)), request=2))
    drafter.stop_request(2)
    assert node_paths(drafter.propose(ids(5, 6), 4)) == [(7,)]


def test_history_lifecycle_misuse_raises():
    drafter = HistoryDrafter()
    with pytest.raises(ValueError, match="start_request"):
        drafter.stop_request()
    with pytest.raises(ValueError, match="start_request"):
        drafter.observe(step(ids(1), ids(2)))
    drafter.start_request(ids(1))
    with pytest.raises(ValueError, match="twice"):
        drafter.start_request(ids(1))


@pytest.fixture
def tiny_datastore(tmp_path):
    # two documents; "1 2" is followed by 3 twice and by 4 once
    docs = [ids(1, 2, 3, 9, 1, 2, 3), ids(1, 2, 4, 8)]
    return Datastore.build_from_tokens(docs, tmp_path / "ds", vocab_size=VOCAB, fingerprint="test")


def test_datastore_drafter_counts_continuations(tiny_datastore):
    drafter = DatastoreDrafter(tiny_datastore, max_len=4, min_len=2, m=2, prior_rows=0)
    tree = drafter.propose(ids(5, 1, 2), 8)
    assert tree.match_length == 2
    # rows after "1 2": [3 9], [3 -], [4 8] (document ends pad); counts (3)=2 (4)=1 (3,9)=1 (4,8)=1
    assert node_paths(tree) == [(3,), (4,), (3, 9), (4, 8)]
    np.testing.assert_allclose(tree.weights, [2 / 3, 1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    empty = drafter.propose(ids(7, 7), 8)
    assert len(empty) == 0 and empty.match_length == 0


def test_history_persists_to_a_datastore_in_batches(tiny_datastore):
    drafter = HistoryDrafter(persist=tiny_datastore, persist_every=5)
    shards = len(tiny_datastore.shards)
    for output in (ids(40, 41, 42), ids(50, 51, 52), ids(60, 61)):
        drafter.start_request(ids(1))
        drafter.observe(step(ids(1), output))
        drafter.stop_request()
    # 3 tokens wait; 6 >= 5 are appended as one shard; the last 2 wait for flush()
    assert len(tiny_datastore.shards) == shards + 1
    assert tiny_datastore.longest_match(ids(50, 51)).length == 2
    assert tiny_datastore.longest_match(ids(60, 61)).length == 0
    drafter.flush()
    assert len(tiny_datastore.shards) == shards + 2
    assert tiny_datastore.longest_match(ids(60, 61)).length == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 4), min_size=0, max_size=60), st.integers(0, 20))
def test_lookup_drafters_are_prefix_closed_within_budget_deterministic(context, budget):
    ctx = np.asarray(context, np.int32)
    history = HistoryDrafter(min_len=1)
    history.add(ctx[: len(ctx) // 2])
    for drafter in (ContextDrafter(), ContextDrafter(min_len=2, m=3), history):
        tree = drafter.propose(ctx, budget)
        assert len(tree) <= budget
        paths = node_paths(tree)
        assert all(p[:-1] in paths[:i] for i, p in enumerate(paths) if len(p) > 1)
        assert np.all(np.diff(tree.weights) <= 0)
        assert paths == node_paths(drafter.propose(ctx, budget))
