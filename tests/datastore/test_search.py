"""longest_match / continuations: worked examples, then properties against the brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from search_reference import brute_continuations

from restspec.datastore import Datastore, Match
from restspec.datastore.search import kernels

FP = "0123456789abcdef"


def make(tmp_path, shards, vocab_size, name="ds"):
    """A datastore whose shard i holds exactly the documents shards[i] (first built, rest appended)."""
    ds = Datastore.build_from_tokens(shards[0], tmp_path / name, vocab_size=vocab_size, fingerprint=FP)
    for docs in shards[1:]:
        ds.append_tokens(docs)
    assert len(ds.shards) == len(shards)
    return ds


# ---------------------------------------------------------------- worked examples
def test_longest_suffix_wins(tmp_path):
    # doc: 1 2 3 4 1 2 5; context ... 9 1 2 -> "1 2" occurs twice, "9 1 2" never
    ds = make(tmp_path, [[[1, 2, 3, 4, 1, 2, 5]]], vocab_size=10)
    match = ds.longest_match([9, 1, 2])
    assert (match.length, match.count) == (2, 2)
    conts = ds.continuations(match, m=3)
    # both continuations, padded with -1 where the document ends
    assert sorted(map(tuple, conts.tolist())) == [(3, 4, 1), (5, -1, -1)]


def test_three_token_match_narrows(tmp_path):
    # "3 4 1" occurs once: after it comes "2 5"
    ds = make(tmp_path, [[[1, 2, 3, 4, 1, 2, 5]]], vocab_size=10)
    match = ds.longest_match([3, 4, 1])
    assert (match.length, match.count) == (3, 1)
    assert ds.continuations(match, m=4).tolist() == [[2, 5, -1, -1]]


def test_match_never_spans_documents(tmp_path):
    # "7 8" only exists across the boundary of doc0 = [.., 7] and doc1 = [8, ..]
    ds = make(tmp_path, [[[1, 7], [8, 2]]], vocab_size=10)
    assert ds.longest_match([7, 8]) == Match.none()
    assert ds.longest_match([7, 8], min_len=1).length == 1  # "8" alone


def test_min_and_max_len(tmp_path):
    ds = make(tmp_path, [[[1, 2, 3, 4, 5, 6]]], vocab_size=10)
    assert ds.longest_match([1, 2, 3, 4, 5], max_len=3).length == 3
    assert ds.longest_match([9, 5], min_len=2) == Match.none()  # only "5" matches
    assert ds.longest_match([]) == Match.none()
    assert ds.longest_match([1, 2, 99]) == Match.none()  # 99 is outside the vocabulary
    with pytest.raises(ValueError, match="min_len=3, max_len=2"):
        ds.longest_match([1, 2], max_len=2, min_len=3)


def test_k_limits_rows_evenly_spaced(tmp_path):
    # "1" followed by 10..19 in ten documents; the reversed order of "x 1" is by the token before 1
    docs = [[5 + (i % 3), 1, 10 + i] for i in range(10)]
    ds = make(tmp_path, [docs], vocab_size=20)
    match = ds.longest_match([1], min_len=1)
    assert match.count == 10
    assert ds.continuations(match, k=3, m=1).shape == (3, 1)
    assert ds.continuations(match, k=0, m=1).shape == (0, 1)
    full = ds.continuations(match, k=100, m=1)[:, 0].tolist()
    assert sorted(full) == list(range(10, 20))
    # row i of the k=3 answer is occurrence i*10//3 = 0, 3, 6 of the full order
    assert ds.continuations(match, k=3, m=1)[:, 0].tolist() == [full[0], full[3], full[6]]


def test_shards_union(tmp_path):
    # shard 0 has "1 2 3" once; shard 1 has "2 3" twice and "1 2 3" never -> length 3, count 1
    ds = make(tmp_path, [[[1, 2, 3, 4]], [[2, 3, 5], [2, 3, 6]]], vocab_size=10)
    match = ds.longest_match([1, 2, 3])
    assert (match.length, match.count) == (3, 1)
    # "2 3" reaches length 2 in both shards: counts add up, shard 0 first
    match = ds.longest_match([2, 3])
    assert (match.length, match.count) == (2, 3)
    assert ds.continuations(match, m=1)[:, 0].tolist()[0] == 4


def test_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 4, 50) for _ in range(20)]
    a = make(tmp_path, [docs], 4, "a")
    b = make(tmp_path, [docs], 4, "b")
    ctx = [1, 2, 3, 0]
    assert np.array_equal(a.continuations(a.longest_match(ctx)), b.continuations(b.longest_match(ctx)))


# ---------------------------------------------------------------- properties
@st.composite
def corpora(draw, big: bool = False):
    vocab = draw(st.integers(1, 6)) if not big else 70_000
    alphabet = st.integers(0, 5).map(lambda t: t if not big else 65_530 + t)  # ids near/above 2^16
    doc = st.lists(alphabet.filter(lambda t: t < vocab), min_size=0, max_size=25)
    shards = draw(st.lists(st.lists(doc, min_size=1, max_size=5), min_size=1, max_size=3))
    shards = [s for s in shards if any(s)] or [[[0 if not big else 65_530]]]
    ctx = draw(st.lists(st.integers(-1, 7).map(lambda t: t if not big or t < 0 else 65_530 + t), max_size=20))
    return vocab, shards, ctx


def check(tmp_path, vocab, shards, ctx, max_len, min_len, k, m, jit):
    import shutil

    out = tmp_path / "p"
    shutil.rmtree(out, ignore_errors=True)
    ds = Datastore.build_from_tokens(shards[0], out, vocab_size=vocab, fingerprint=FP)
    for docs in shards[1:]:
        ds.append_tokens(docs)
    ds._kernels = kernels(jit=jit)
    match = ds.longest_match(ctx, max_len=max_len, min_len=min_len)
    conts = ds.continuations(match, k=k, m=m)
    length, count, ref = brute_continuations(shards, ctx, vocab, max_len, min_len, k, m)
    assert (match.length, match.count) == (length, count)
    np.testing.assert_array_equal(conts, ref)


common = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@common
@given(corpora(), st.integers(1, 16), st.integers(1, 4), st.integers(0, 12), st.integers(0, 6))
def test_matches_brute_force(tmp_path, corpus, max_len, min_len, k, m):
    vocab, shards, ctx = corpus
    min_len = min(min_len, max_len)
    check(tmp_path, vocab, shards, ctx, max_len, min_len, k, m, jit=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corpora(big=True), st.integers(1, 16), st.integers(0, 12))
def test_matches_brute_force_uint32(tmp_path, corpus, max_len, k):
    vocab, shards, ctx = corpus
    check(tmp_path, vocab, shards, ctx, max_len, 1, k, 4, jit=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corpora(), st.integers(1, 16), st.integers(0, 12))
def test_python_kernels_match_brute_force(tmp_path, corpus, max_len, k):
    """The same kernels run as plain Python (the reference kept next to the numba path)."""
    vocab, shards, ctx = corpus
    check(tmp_path, vocab, shards, ctx, max_len, 2 if max_len >= 2 else 1, k, 3, jit=False)


def test_uint32_storage(tmp_path):
    ds = make(tmp_path, [[[70_000, 65_536, 3, 70_000, 65_536, 4]]], vocab_size=70_001)
    assert ds.token_dtype == np.uint32
    match = ds.longest_match([70_000, 65_536])
    assert (match.length, match.count) == (2, 2)
    assert sorted(ds.continuations(match, m=1)[:, 0].tolist()) == [3, 4]
