"""AdaptiveBudget: tree size from a latency curve and node weights; what it learns from steps;
calibration caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from machine import quiet_machine, snapshots
from steps import step

from restspec.decode import budget as budget_module
from restspec.decode.budget import (
    DEFAULT_MAX_BUDGET,
    WIDE_MAX_BUDGET,
    AdaptiveBudget,
    BudgetPolicy,
    CpuSnapshot,
    LatencyCurve,
    best_budget,
    calibration_path,
    cores_busy_elsewhere,
    cpu_snapshot,
    default_max_budget,
    load_or_calibrate,
    read_calibration,
)
from restspec.draft.tree import DraftTree

WEIGHTS = [0.9, 0.8, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05]


def chain(weights):
    return DraftTree.chain(list(range(10, 10 + len(weights))), weights)


def observe(policy, tree: DraftTree, accepted: int = 0, seconds: float = 0.0) -> None:
    """The policy observes a step that verified ``tree`` (a chain) and accepted its first
    ``accepted`` nodes, then the model's own token 99, in ``seconds``."""
    tokens = [*tree.tokens[:accepted].tolist(), 99]
    policy.observe(step([1], tokens, tree=tree, path=np.arange(accepted), seconds=seconds))


def observe_cost(policy, width: int, seconds: float) -> None:
    """A step over ``width`` inputs (root + a chain of width - 1 nodes, none accepted) took ``seconds``."""
    observe(policy, chain([0.5] * (width - 1)), seconds=seconds)


def test_flat_latency_takes_the_whole_tree():
    # every node adds expected tokens at no cost: verify all 8
    flat = LatencyCurve((1, 100), (0.05, 0.05))
    assert AdaptiveBudget(flat, max_budget=64).choose(chain(WEIGHTS), 300) == 8
    assert AdaptiveBudget(flat, max_budget=5).choose(chain(WEIGHTS), 300) == 5


def test_the_default_cap_grows_only_where_width_is_nearly_free():
    # curves measured on CPUs (13 inputs at 1.3x and 2.8x one) keep 12 nodes; a GPU-like curve
    # (65 inputs at 1.1x one) verifies up to 64; in between, the widest tree costing 1.25 plain steps
    xeon = LatencyCurve((1, 13, 65), (0.040, 0.052, 0.134))
    epyc = LatencyCurve((1, 13, 65), (0.025, 0.069, 0.300))
    gpu = LatencyCurve((1, 65), (0.010, 0.011))
    middle = LatencyCurve((1, 33, 65), (0.010, 0.0124, 0.030))  # 33 inputs at 1.24x, then steep
    assert default_max_budget(xeon) == default_max_budget(epyc) == DEFAULT_MAX_BUDGET
    assert default_max_budget(gpu) == WIDE_MAX_BUDGET
    assert default_max_budget(middle) == 32
    assert AdaptiveBudget(gpu).max_budget == WIDE_MAX_BUDGET
    assert AdaptiveBudget(epyc).max_budget == DEFAULT_MAX_BUDGET
    assert AdaptiveBudget(gpu, max_budget=5).max_budget == 5  # a cap given is kept
    # on the flat curve every node of a 40-node chain pays
    assert AdaptiveBudget(gpu).choose(chain([0.5] * 40), 300) == 40


def test_steep_latency_takes_a_small_tree():
    # each extra input costs half a plain step and the rate to beat is plain decoding's (1 token per
    # step): a node pays when its weight exceeds 1 * 0.5, so 0.9, 0.8, 0.6 (0.5 only ties): 3 nodes
    steep = LatencyCurve((1, 2), (1.0, 1.5))
    assert AdaptiveBudget(steep).choose(chain(WEIGHTS), 300) == 3
    # each extra input costs a whole plain step: no draft node is certain, so none pays
    linear = LatencyCurve((1, 2), (1.0, 2.0))
    assert AdaptiveBudget(linear).choose(chain(WEIGHTS), 300) == 0


def test_a_higher_achieved_rate_raises_the_bar_for_each_node():
    # every step accepts all it verifies. 3 nodes: 4 tokens per 2.5 time units, the rate climbs above
    # 1.2 and the 0.6 node no longer beats rate * 0.5; 2 nodes: 3 tokens per 2.0, the rate settles at
    # 1.5 and the bar at 0.75, which 0.9 and 0.8 still clear
    steep = LatencyCurve((1, 2), (1.0, 1.5))
    policy = AdaptiveBudget(steep)
    past = 300
    chosen = [policy.choose(chain(WEIGHTS), past)]
    for _ in range(2000):
        observe(policy, chain(WEIGHTS).truncate(chosen[-1]), accepted=chosen[-1])
        past += chosen[-1] + 1
        chosen.append(policy.choose(chain(WEIGHTS), past))
    assert chosen[0] == 3 and chosen[-1] == 2
    assert policy.rate == pytest.approx(1.5, abs=0.01)


def test_rate_rule_against_brute_force():
    # best_budget(rate=r) maximizes expected tokens - r * seconds over every prefix
    rng = np.random.default_rng(1)
    lat = LatencyCurve.reference().table(65)
    for _ in range(50):
        w = np.sort(rng.random(20))[::-1]
        r = float(rng.uniform(5, 40))
        values = [1 + w[:c].sum() - r * lat[c + 1] for c in range(21)]
        assert best_budget(w, lat, 64, rate=r) == int(np.argmax(values))


def test_worked_example_on_the_reference_curve():
    # DESIGN facts: 1 -> 58 ms, 8 -> 95 ms, 16 -> 120 ms
    curve = LatencyCurve.reference()
    lat = curve.table(65)
    w = np.asarray(WEIGHTS)
    rates = [(1 + w[:c].sum()) / lat[c + 1] for c in range(9)]
    assert best_budget(w, lat, 64) == int(np.argmax(rates))
    assert 2 <= best_budget(w, lat, 64) <= 8


def test_zero_weights_and_empty_trees_choose_nothing():
    curve = LatencyCurve.reference()
    policy = AdaptiveBudget(curve)
    assert policy.choose(DraftTree.empty(), 100) == 0
    assert policy.choose(chain([0.0, 0.0]), 100) == 0
    assert isinstance(policy, BudgetPolicy)
    assert AdaptiveBudget(curve, max_budget=0).choose(chain(WEIGHTS), 10) == 0


def test_latency_curve_is_monotone_and_extrapolates():
    curve = LatencyCurve((1, 4, 8), (1.0, 0.9, 2.0))  # a noisy dip is flattened
    assert curve.seconds == (1.0, 1.0, 2.0)
    assert float(curve(6)) == pytest.approx(1.5)
    assert float(curve(12)) == pytest.approx(3.0)  # along the last segment
    with pytest.raises(ValueError, match="start at 1"):
        LatencyCurve((2, 4), (1.0, 2.0))
    with pytest.raises(ValueError, match="increase strictly"):
        LatencyCurve((1, 1), (1.0, 2.0))


def test_calibration_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path))
    quiet_machine(monkeypatch)
    calls = []

    def measure(width):
        calls.append(width)
        return 0.05 + 0.004 * width

    curve = load_or_calibrate("tiny-model", "float32", measure, max_width=17)
    path = calibration_path("tiny-model", "float32")
    assert path.is_file() and str(path).startswith(str(tmp_path))
    record = json.loads(path.read_text())
    assert record["model"] == "tiny-model" and record["dtype"] == "float32"
    assert curve.sizes[0] == 1 and curve.sizes[-1] == 17
    assert float(curve(9)) == pytest.approx(0.05 + 0.004 * 9)
    n = len(calls)
    again = load_or_calibrate("tiny-model", "float32", measure, max_width=17)
    assert len(calls) == n  # read from the cache, nothing measured
    assert again == curve
    load_or_calibrate("tiny-model", "bfloat16", measure, max_width=17)
    assert len(calls) > n  # another dtype is another calibration
    load_or_calibrate("tiny-model", "float32", measure, max_width=17, recalibrate=True)
    assert len(calls) > 2 * n - 1


def test_calibration_keeps_the_median_not_a_lucky_fast_sample():
    from restspec.decode.budget import calibrate

    samples = {1: iter([0.05] * 8), 8: iter([0.09, 0.07, 0.09, 0.10, 0.09, 0.09, 0.09])}

    def measure(width):
        return next(samples[width], 0.2)  # the warm-up call at the widest shape reads one sample

    curve = calibrate(measure, sizes=(1, 8), rounds=6)
    assert float(curve(8)) == pytest.approx(0.09)  # not the one fast 0.07
    assert float(curve(1)) == pytest.approx(0.05)


def test_for_model_calibrates_once_with_the_decode_forward(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    from restspec.decode.backends import DirectBackend, ModelForward
    from restspec.decode.budget import ForwardLatencyProbe
    from restspec.models import LoadedModel

    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path))
    quiet_machine(monkeypatch)
    probe = ForwardLatencyProbe(ModelForward(tiny_model), past_len=20)
    for width in (1, 9, 3):
        assert probe(width) > 0
        assert probe.cache.get_seq_length() == 20  # restored after every forward

    loaded = LoadedModel(tiny_model, tiny_tokenizer, "tiny")
    policy = AdaptiveBudget.for_model(loaded, max_budget=8)
    assert policy.max_budget == 8
    assert policy.latency.sizes[0] == 1 and policy.latency.sizes[-1] == 9
    files = list((tmp_path / "latency").glob("tiny-float32-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = AdaptiveBudget.for_model(loaded, max_budget=8)
    assert again.latency == policy.latency and files[0].stat().st_mtime_ns == mtime
    # no cap given: measured as wide as the widest cap it may choose, the cap then read off the curve
    chosen = AdaptiveBudget.for_model(loaded)
    assert chosen.latency.sizes[-1] == WIDE_MAX_BUDGET + 1
    assert chosen.max_budget == default_max_budget(chosen.latency)
    # the calibration times the backend the generator will run: another backend, another calibration
    AdaptiveBudget.for_model(loaded, max_budget=8, backend=DirectBackend(tiny_model))
    assert len(list((tmp_path / "latency").glob("tiny-float32-*.json"))) == 2
    assert calibration_path("tiny", "float32", backend="direct") != calibration_path("tiny", "float32")


def test_calibration_on_a_busy_machine_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path))
    snapshots(monkeypatch, other_cores=1.0)  # another process kept one core busy all along
    curve = load_or_calibrate("tiny-model", "float32", lambda w: 0.05 + 0.01 * w, max_width=9)
    assert curve.sizes[-1] == 9
    assert not calibration_path("tiny-model", "float32").exists()
    snapshots(monkeypatch, other_cores=0.1)  # background noise only: cached
    load_or_calibrate("tiny-model", "float32", lambda w: 0.05 + 0.01 * w, max_width=9)
    assert calibration_path("tiny-model", "float32").exists()


def test_without_proc_stat_the_load_average_decides(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(budget_module, "cpu_snapshot", lambda: CpuSnapshot(0.0, None, 0.0))
    monkeypatch.setattr(budget_module, "_load_per_core", lambda: 4.0)
    load_or_calibrate("tiny-model", "float32", lambda w: 0.05 + 0.01 * w, max_width=9)
    assert not calibration_path("tiny-model", "float32").exists()
    monkeypatch.setattr(budget_module, "_load_per_core", lambda: 0.5)
    load_or_calibrate("tiny-model", "float32", lambda w: 0.05 + 0.01 * w, max_width=9)
    assert calibration_path("tiny-model", "float32").exists()


def test_cores_busy_elsewhere_is_all_busy_time_less_our_own():
    # 10 s: every process together busy for 25 CPU-seconds, this one for 18 -> others 0.7 cores
    start, end = CpuSnapshot(100.0, 1000.0, 50.0), CpuSnapshot(110.0, 1025.0, 68.0)
    assert cores_busy_elsewhere(start, end) == pytest.approx(0.7)
    assert cores_busy_elsewhere(start, CpuSnapshot(110.0, None, 68.0)) is None
    now = cpu_snapshot()  # the real counters: this process's time is part of the busy time
    if now.busy is not None:
        assert now.busy >= now.own > 0


def test_a_corrupt_calibration_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path))
    quiet_machine(monkeypatch)
    path = calibration_path("tiny-model", "float32")
    path.parent.mkdir(parents=True)
    path.write_text('{"curve": 3}')
    with pytest.raises(ValueError, match="not a latency calibration"):
        read_calibration(path)
    curve = load_or_calibrate("tiny-model", "float32", lambda width: 0.05 + 0.004 * width, max_width=9)
    assert read_calibration(path) == (curve, 9)  # measured again and cached over the corrupt file


def test_measured_steps_replace_a_calibration_that_called_a_node_free():
    curve = LatencyCurve((1, 2, 3, 13), (0.050, 0.050, 0.055, 0.100))  # one node measured as free
    policy = AdaptiveBudget(curve)
    tree = chain([0.15])
    assert policy.choose(tree, 100) == 1  # a free node is worth 0.15 tokens
    for _ in range(64):
        observe_cost(policy, 1, 0.050)
        observe_cost(policy, 2, 0.060)  # the loop's own steps: one node costs 20 % more
    assert policy.choose(tree, 200) == 0
    assert policy.choose(chain([0.5]), 300) == 1  # still worth it for a likely node
    fixed = AdaptiveBudget(curve, learn_costs=False).fresh()
    for _ in range(64):
        observe_cost(fixed, 1, 0.050)
        observe_cost(fixed, 2, 0.060)
    assert fixed.choose(tree, 100) == 1  # plans with the curve alone


def test_one_stalled_step_does_not_set_a_widths_cost():
    curve = LatencyCurve((1, 2, 3, 13), (0.050, 0.050, 0.055, 0.100))
    policy = AdaptiveBudget(curve)
    for _ in range(64):
        observe_cost(policy, 1, 0.050)
        observe_cost(policy, 2, 0.052)
    observe_cost(policy, 2, 10.0)  # e.g. a kernel compiled on first use
    for _ in range(16):
        observe_cost(policy, 1, 0.050)
    assert policy.choose(chain([0.15]), 100) == 1
    observe_cost(policy, 99, 1.0)  # widths outside the table and non-positive times are ignored
    observe_cost(policy, 2, 0.0)
    assert policy.choose(chain([0.15]), 200) == 1
