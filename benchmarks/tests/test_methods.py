"""The lab's methods run through ``restspec bench``'s runner (:func:`restspec.bench.main`)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.methods import LAB_METHODS
from restspec.bench.methods import MethodContext, build_methods, extra_methods


def test_lab_methods_run_through_the_bench_runner(lab_bench):
    methods = lab_bench("plain,rest,restspec-fixed4,plain-w8", ["hello world, hello"], 6)
    assert [m["method"] for m in methods] == ["plain", "rest", "restspec-fixed4", "plain-w8"]
    assert all(m["exact"] == 1.0 for m in methods)  # float32 greedy: every method reproduces plain


@pytest.mark.usefixtures("quick_warm_start")
def test_suffix_decoding_gets_the_same_warm_start(tiny_engine):
    pytest.importorskip("arctic_inference")
    ctx = MethodContext(tiny_engine(warm_start=True))
    with extra_methods(LAB_METHODS):
        suffix = build_methods(["suffix"], ctx)[0]
    output = max(ctx.engine.warm.outputs, key=len)
    drafter = suffix.generator.drafter
    drafter.start_request(np.zeros(1, np.int32))
    half = len(output) // 2
    tree = drafter.propose(output[:half], 8)  # a past output's start: its global tree knows the rest
    drafter.stop_request()
    assert int(output[half]) in tree.tokens[tree.parents < 0].tolist()
