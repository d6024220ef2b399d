"""The datastore benchmark on a tiny synthetic store: it runs end to end and its generator is sane."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import datastore as bench


def test_synthetic_stream_is_deterministic_and_repetitive():
    a = bench.synthetic_stream(50_000, seed=1)
    assert len(a) == 50_000
    assert a.min() >= 0 and a.max() < bench.SYNTHETIC_VOCAB
    assert np.array_equal(a, bench.synthetic_stream(50_000, seed=1))
    assert not np.array_equal(a, bench.synthetic_stream(50_000, seed=2))
    counts = np.sort(np.bincount(a))[::-1]
    assert counts[0] > 20 * counts[100]  # heavy-tailed, not uniform noise
    docs = bench.split_docs(a, seed=0)
    assert sum(map(len, docs)) == len(a) and len(docs) > 5


def test_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.md"
    bench.main(
        ["--workdir", str(tmp_path / "w"), "--skip-stdlib", "--synthetic-tokens", "100000", "--out", str(out)]
    )
    text = out.read_text()
    results = json.loads(text.split("\n", 1)[0][len("<!--json") : -len("-->")])
    lookup = results["lookup"]["synthetic"]
    assert lookup["agree"] == f"{bench.QUERIES}/{bench.QUERIES}"  # both strategies find the same matches
    assert lookup["ours"]["p50_ms"] > 0 and results["build"]["synthetic"]["tokens"] == 100_000
    assert "| synthetic |" in text
