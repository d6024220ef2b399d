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


def assert_states_equal(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_states_equal(a[key], b[key])
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.usefixtures("quick_warm_start")
def test_restspec_without_history_keeps_every_other_source_warmed(tiny_engine):
    ctx = MethodContext(tiny_engine(warm_start=True))
    with extra_methods(LAB_METHODS):
        default, silent = build_methods(["restspec", "restspec-nohistory"], ctx)
    output = max(ctx.engine.warm.outputs, key=len)
    half = len(output) // 2
    trees = {}
    for method in (default, silent):
        merged = method.generator.drafter
        assert [type(d).__name__ for d in merged.drafters][-1] in ("HistoryDrafter", "SilentHistory")
        history = merged.drafters[-1]
        history.add(output)  # a past output: the history source knows what follows its first half
        trees[method.name] = history.propose(output[:half], 8)
    learned = [m.generator.drafter.state_dict() for m in (default, silent)]
    for key in ("calibration", "correction", "extender"):  # warmed alike
        assert_states_equal(learned[0][key], learned[1][key])
    assert int(output[half]) in trees["restspec"].tokens[trees["restspec"].parents < 0].tolist()
    assert len(trees["restspec-nohistory"].tokens) == 0


def test_restspec_without_prefix_reuse_prefills_every_prompt_whole(tiny_engine):
    ctx = MethodContext(tiny_engine(warm_start=False))
    with extra_methods(LAB_METHODS):
        default, whole = build_methods(["restspec", "restspec-noprefix"], ctx)
    prompt = ctx.tokenizer("hello world, hello world")["input_ids"]
    for method, reused in ((default, len(prompt) - 1), (whole, 0)):
        first = method.generate(prompt, 4, 0.0)
        again = method.generate(prompt, 4, 0.0)
        assert (first.cached_tokens, again.cached_tokens) == (0, reused)
        assert again.output_ids.tolist() == first.output_ids.tolist()
