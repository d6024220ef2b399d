"""Runner + report on a tiny random model with transformers' own methods (plain, prompt lookup)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from restspec.bench.methods import HFGenerateMethod, TurnOutput, build_methods, extra_methods, parse_methods
from restspec.bench.report import (
    compare,
    pooled_compare,
    render_compare_table,
    render_markdown,
    render_table,
    render_width_table,
    summarize,
    to_json,
    write_json,
    write_plot,
)
from restspec.bench.runner import BenchRun, TurnRecord, balanced_orders, run_bench
from restspec.bench.workloads import BenchItem
from restspec.decode.generate import StepStats
from restspec.errors import RestspecError

FIGURES = {"tokens_per_s", "speedup", "mean_accepted", "exact"}


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tiny_tokenizer):
    items = [
        BenchItem("c0", "code", ("def add(a, b):\n    return a + b\ndef add(a, b):\n",), chat=False),
        BenchItem("q1", "chat", ("hello there", "and again"), chat=True),
        BenchItem("q2", "chat", ("one two three one two",), chat=True),
    ]
    methods = [
        HFGenerateMethod("plain", tiny_model, tiny_tokenizer),
        HFGenerateMethod("pld", tiny_model, tiny_tokenizer, prompt_lookup_num_tokens=10),
    ]
    seen = []
    partial = []
    run = run_bench(
        items,
        methods,
        tiny_tokenizer,
        max_new_tokens=12,
        progress=seen.append,
        on_item=lambda r: partial.append(len(r.records)),
    )
    assert len(seen) == len(items) * len(methods)
    assert partial == [2, 6, 8]  # records after each item: 1, 1 + 2, 1 + 2 + 1 turns x 2 methods
    return run


def test_every_turn_of_every_method_is_recorded(tiny_run):
    assert tiny_run.methods == ["plain", "pld"]
    # 1 + 2 + 1 turns per method
    assert len(tiny_run.records) == 8
    turns = [(r.item_id, r.turn) for r in tiny_run.records if r.method == "pld"]
    assert turns == [("c0", 0), ("q1", 0), ("q1", 1), ("q2", 0)]
    for r in tiny_run.records:
        assert 1 <= len(r.output.output_ids) <= 12
        assert r.output.forwards >= 1 and r.output.elapsed_s > 0
    # greedy prompt lookup is lossless in float32 on this model: identical to plain
    assert all(r.identical for r in tiny_run.records)
    # the second chat turn carries the first answer: a longer prompt
    q1 = [r for r in tiny_run.records if r.method == "plain" and r.item_id == "q1"]
    assert q1[1].prompt_tokens > q1[0].prompt_tokens


def test_json_has_the_issue_shape(tiny_run, tmp_path):
    summaries = summarize(tiny_run)
    path = tmp_path / "out" / "bench.json"
    write_json(path, tiny_run, summaries)
    data = json.loads(path.read_text())
    assert data == to_json(tiny_run, summaries)
    assert [m["method"] for m in data["methods"]] == ["plain", "pld"]
    for m in data["methods"]:
        assert set(m) >= FIGURES
        assert set(m["categories"]) == {"code", "chat"}
        for cat in m["categories"].values():
            assert set(cat) >= FIGURES
        assert m["exact"] == 1.0
    plain = data["methods"][0]
    assert plain["speedup"] == 1.0 and plain["mean_accepted"] == 1.0


def test_plot_is_written(tiny_run, tmp_path):
    path = tmp_path / "img" / "bench.png"
    write_plot(path, summarize(tiny_run), title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_renders(tiny_run):
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(render_table(summarize(tiny_run)))
    text = console.export_text()
    assert "plain" in text and "pld" in text and "chat" in text


def _record(method, ids, seconds, forwards, identical=None, category="c", item="i", turn=0):
    out = TurnOutput(np.asarray(ids, np.int32), seconds, forwards, 0.0, seconds / 2, 0.0)
    return TurnRecord(item, category, turn, method, 5, out, identical)


def _worked_run(scale=1.0):
    """The worked example's run: restspec faster on items a and c, suffix on b (``scale`` stretches
    suffix's times)."""
    run = BenchRun(["restspec", "suffix"], 0.0, 32)
    for method, seconds in [("restspec", (1.0, 1.0, 1.0, 1.0)), ("suffix", (2.0, 0.5, 0.5, 2.0))]:
        k = scale if method == "suffix" else 1.0
        run.records += [
            _record(method, range(10), k * seconds[0], 1, category="x", item="a"),
            _record(method, range(6), k * seconds[1], 1, category="x", item="b"),
            _record(method, range(4), k * seconds[2], 1, category="x", item="b", turn=1),
            _record(method, range(20), k * seconds[3], 1, category="y", item="c"),
        ]
    return run


def test_paired_comparison_worked_example():
    # tokens / seconds per item; item b has two turns, which count together (6 + 4 tokens in 2 s)
    #            restspec    suffix
    #   a (x)    10 / 1 s    10 / 2 s
    #   b (x)    10 / 2 s    10 / 1 s
    #   c (y)    20 / 1 s    20 / 2 s
    run = _worked_run()
    rows = {(c.against, c.category): c for c in compare(run)}
    assert set(rows) == {("suffix", "all"), ("suffix", "x"), ("suffix", "y")}
    overall = rows["suffix", "all"]
    assert overall.ratio == pytest.approx((40 / 4) / (40 / 5))  # ratios of sums, as the table
    assert (overall.items, overall.faster) == (3, 2)
    assert overall.low <= overall.ratio <= overall.high
    assert overall.low < 1.0  # three items, one of them lost: a redraw can lose overall
    assert rows["suffix", "x"].ratio == pytest.approx(1.0)
    assert (rows["suffix", "x"].items, rows["suffix", "x"].faster) == (2, 1)
    only = rows["suffix", "y"]  # one item: every redraw is that item
    assert only.low == pytest.approx(2.0) and only.high == pytest.approx(2.0)
    assert compare(run, "pld") == []  # not in the run: nothing to compare
    assert compare(run) == compare(run)  # seeded: the same intervals every time
    text = render_markdown([], compare(run))
    assert "| restspec | suffix | y | 2.000 | 2.000-2.000 | 1/1 |" in text
    assert render_compare_table(compare(run)).row_count == 3
    assert to_json(run, summarize(run))["comparisons"][0]["against"] == "suffix"


def test_pooled_comparison_counts_every_runs_items_apart(tmp_path):
    first, second = _worked_run(), _worked_run(scale=1.5)
    paths = [tmp_path / "1.json", tmp_path / "2.json"]
    for path, run in zip(paths, (first, second), strict=True):
        write_json(path, run, summarize(run))
    pooled = {(c.against, c.category): c for c in pooled_compare(paths)}
    overall = pooled["suffix", "all"]
    # restspec: 40 tokens in 4 s per run; suffix: 40 in 5 s, then in 7.5 s
    assert overall.ratio == pytest.approx((80 / 8) / (80 / 12.5))
    assert (overall.items, overall.faster) == (6, 4)  # item b lost in the first run only
    assert overall.low <= overall.ratio <= overall.high
    # the same as one run holding both runs' items under distinct names
    merged = BenchRun(["restspec", "suffix"], 0.0, 32)
    for index, run in enumerate((first, second), 1):
        merged.records += [dataclasses.replace(r, item_id=f"{index}/{r.item_id}") for r in run.records]
    assert pooled_compare(paths) == compare(merged)


def test_pooled_comparison_errors_are_actionable(tmp_path):
    run = _worked_run()
    good = tmp_path / "run.json"
    write_json(good, run, summarize(run))
    with pytest.raises(RestspecError, match="no such file"):
        pooled_compare([good, tmp_path / "missing.json"])
    text = tmp_path / "notes.json"
    text.write_text("not json")
    with pytest.raises(RestspecError, match="not a file written by `restspec bench --json`"):
        pooled_compare([text])
    (tmp_path / "other.json").write_text(json.dumps({"methods": []}))
    with pytest.raises(RestspecError, match="not a file written by"):
        pooled_compare([tmp_path / "other.json"])
    with pytest.raises(RestspecError, match="'pld' is in none of the runs; they hold restspec, suffix"):
        pooled_compare([good], "pld")


def test_figures_are_ratios_of_sums():
    run = BenchRun(["plain", "fast"], 0.0, 8)
    run.records += [
        _record("plain", [1, 2, 3, 4], 4.0, 4, True),
        _record("fast", [1, 2, 3, 4], 1.0, 2, True),
        _record("plain", [5, 6], 2.0, 2, True, category="d"),
        _record("fast", [5, 7], 2.0, 1, False, category="d"),
    ]
    plain, fast = summarize(run)
    assert plain.overall.tokens_per_s == pytest.approx(1.0)
    assert fast.overall.tokens_per_s == pytest.approx(2.0)  # 6 tokens / 3 s
    assert fast.overall.speedup == pytest.approx(2.0)
    assert fast.overall.mean_accepted == pytest.approx(2.0)  # 6 tokens / 3 forwards
    assert fast.overall.exact == pytest.approx(0.5)
    assert fast.categories["c"].speedup == pytest.approx(4.0)
    assert fast.categories["d"].exact == 0.0
    assert fast.overall.time_split["forward"] == pytest.approx(0.5)


def test_steps_are_grouped_by_forward_width():
    # a loop method's steps: two 1-wide plain steps, two 3-wide (2 nodes), one 9-wide; transformers'
    # generate reports no steps and gets no rows
    steps = (
        StepStats(0, 0, 0.001, 0.060, 0.001, emitted=1),
        StepStats(0, 0, 0.001, 0.070, 0.001, emitted=1),
        StepStats(2, 1, 0.002, 0.070, 0.002, emitted=2),
        StepStats(2, 2, 0.002, 0.080, 0.002, emitted=3),
        StepStats(8, 5, 0.004, 0.100, 0.004, emitted=6),
    )
    loop = TurnOutput(np.arange(13, dtype=np.int32), 0.5, len(steps), 0.01, 0.38, 0.01, "length", steps)
    run = BenchRun(["plain", "loop"], 0.0, 16)
    run.records += [
        _record("plain", list(range(13)), 1.0, 13, True),
        TurnRecord("i", "c", 0, "loop", 5, loop, True),
    ]
    plain, summary = summarize(run)
    assert plain.by_width == []
    rows = {row.inputs: row for row in summary.by_width}
    assert list(rows) == ["1", "2-3", "7-9"]
    assert rows["1"].steps == 2 and rows["1"].share == pytest.approx(0.4)
    assert rows["1"].forward_ms == pytest.approx(65.0)
    assert rows["2-3"].tokens_per_step == pytest.approx(2.5)
    assert rows["2-3"].step_ms == pytest.approx(79.0)
    assert rows["7-9"].mean_inputs == 9.0
    assert to_json(run, [plain, summary])["methods"][1]["by_width"][2]["tokens_per_step"] == 6.0
    markdown = render_markdown([plain, summary])
    assert "| loop | 2-3 | 40 | 3.0 | 75.0 | 79.0 | 2.50 |" in markdown
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(render_width_table([plain, summary]))
    assert "7-9" in console.export_text()


def test_method_names_are_checked():
    assert parse_methods("plain, pld,plain") == ["plain", "pld"]
    with pytest.raises(RestspecError, match="unknown method 'nope'"):
        parse_methods("plain,nope")


def test_extra_methods_are_known_only_inside_their_block():
    def build(ctx):
        return HFGenerateMethod("greedy", ctx.model, ctx.tokenizer)

    with extra_methods({"greedy": build}):
        assert parse_methods("plain,greedy") == ["plain", "greedy"]
        ctx = SimpleNamespace(model="m", tokenizer=SimpleNamespace(eos_token_id=None, pad_token_id=None))
        assert [m.name for m in build_methods(["greedy"], ctx)] == ["greedy"]
        with (
            pytest.raises(RestspecError, match="methods plain are already defined"),
            extra_methods({"plain": build}),
        ):
            pass
    with pytest.raises(RestspecError, match="unknown method 'greedy'"):
        parse_methods("greedy")


@pytest.mark.parametrize("n", range(1, 10))
def test_balanced_orders_even_out_positions_and_predecessors(n):
    rows = balanced_orders(n)
    assert len(rows) == (2 * n if n % 2 else n)
    per = len(rows) // n  # times each method fills each position, follows each other method
    for row in rows:
        assert sorted(row) == list(range(n))
    for position in range(n):
        assert Counter(row[position] for row in rows) == dict.fromkeys(range(n), per)
    pairs = Counter((row[i], row[i + 1]) for row in rows for i in range(n - 1))
    assert pairs == {(a, b): per for a in range(n) for b in range(n) if a != b}


def test_the_runner_varies_the_predecessor_of_every_method(tiny_model, tiny_tokenizer):
    items = [BenchItem(f"c{i}", "code", ("def f(x):\n",), chat=False) for i in range(6)]
    methods = [HFGenerateMethod(name, tiny_model, tiny_tokenizer) for name in ("a", "b", "c")]
    seen: list[str] = []
    run_bench(items, methods, tiny_tokenizer, max_new_tokens=2, progress=seen.append)
    order = [s.split(" · ")[1] for s in seen]
    before_a = {order[i - 1] for i in range(1, len(order)) if order[i] == "a" and i % 3}
    assert before_a == {"b", "c"}  # a plain rotation would always run "c" just before "a"
