"""The load benchmark (``restspec load``) on the tiny engine: every configuration at 1 and 3 clients,
every answer equal to the same prompt decoded alone, the JSON's shape, and the latency figures of a
hand-made trace."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from restspec.bench.load import (
    BATCHED,
    BATCHED_PLAIN,
    CONFIGS,
    SERIAL,
    LoadCell,
    LoadRequest,
    LoadRun,
    build_generator,
    check_outputs,
    parse_concurrencies,
    run_load,
)
from restspec.bench.load_report import cell_figures, compare_load, load_json, summarize_load
from restspec.bench.methods import MethodContext
from restspec.bench.workloads import BenchItem
from restspec.cli import app
from restspec.errors import RestspecError

ITEMS = [
    BenchItem("a", "code", ("hello world, hello",), chat=False),
    BenchItem("b", "code", ("hello there.",), chat=False),
    BenchItem("c", "chat", ("say hello", "again"), chat=True),
    BenchItem("d", "code", ("world, hello world",), chat=False),
]


def request(chunk_s, chunk_tokens, *, sent_s=0.0, prompt=(1, 2), config=BATCHED, concurrency=1, out=None):
    tokens = int(sum(chunk_tokens))
    return LoadRequest(
        item_id="x",
        category="c",
        turn=0,
        config=config,
        concurrency=concurrency,
        prompt_ids=np.asarray(prompt, dtype=np.int32),
        output_ids=np.arange(tokens, dtype=np.int32) if out is None else np.asarray(out, dtype=np.int32),
        sent_s=sent_s,
        chunk_s=np.asarray(chunk_s, dtype=np.float64),
        chunk_tokens=np.asarray(chunk_tokens, dtype=np.int32),
        steps=len(chunk_tokens),
        queued_s=0.0,
        finish_reason="length",
    )


def test_latencies_of_a_hand_made_trace():
    # sent at 1.0 s; chunks at 1.1 (2 tokens), 1.3 (1 token), 1.6 (3 tokens)
    one = request([1.1, 1.3, 1.6], [2, 1, 3], sent_s=1.0)
    assert one.ttft_s == pytest.approx(0.1)
    assert one.latency_s == pytest.approx(0.6)
    # 0.2 s for one token, then 0.3 s spread over three: 0.1 each; the first chunk's tokens have no ITL
    np.testing.assert_allclose(one.itl_s(), [0.2, 0.1, 0.1, 0.1])
    # a second request: sent at 0, first chunk at 0.5 (1 token), then 0.9 (2 tokens): ITLs 0.2, 0.2
    two = request([0.5, 0.9], [1, 2])
    # every client busy until 1.2 s: by then 2 + 3 tokens had arrived; all 9 by the last answer at 2.0 s
    fig = cell_figures(LoadCell(BATCHED, 1, 2.0, 1.2, (one, two)))
    assert (fig.requests, fig.tokens) == (2, 9)
    assert fig.tokens_per_s == pytest.approx(5 / 1.2)
    assert fig.overall_tokens_per_s == pytest.approx(4.5)
    assert fig.tokens_per_step == pytest.approx(9 / 5)
    # TTFTs 0.1, 0.5: p50 = 0.3, p99 = 0.1 + 0.99 * 0.4 (linear interpolation)
    assert fig.ttft_p50_s == pytest.approx(0.3)
    assert fig.ttft_p99_s == pytest.approx(0.496)
    # ITLs sorted 0.1 0.1 0.1 0.2 0.2 0.2: p50 between the 3rd and 4th = 0.15, p99 = 0.2
    assert fig.itl_p50_s == pytest.approx(0.15)
    assert fig.itl_p99_s == pytest.approx(0.2)
    # chunk gaps 0.2, 0.3, 0.4: p50 0.3
    assert fig.gap_p50_s == pytest.approx(0.3)
    # a one-chunk answer has no ITL at all
    assert cell_figures(LoadCell(BATCHED, 1, 1.0, 1.0, (request([0.4], [3]),))).itl_p99_s is None


def test_outputs_are_checked_against_serial_then_lone_decoding():
    serial = request([0.1], [2], prompt=(1, 2), config=SERIAL, out=[5, 6])
    same = request([0.1], [2], prompt=(1, 2), out=[5, 6])
    differs = request([0.1], [2], prompt=(1, 2), out=[5, 7])
    unseen = request([0.1], [2], prompt=(3,), out=[8, 9])
    alone = []

    def decode_alone(ids):
        alone.append(ids.tolist())
        return np.asarray([8, 9], dtype=np.int32)

    cells, counts = check_outputs(
        [LoadCell(SERIAL, 1, 1.0, 1.0, (serial,)), LoadCell(BATCHED, 2, 1.0, 1.0, (same, differs, unseen))],
        decode_alone,
    )
    assert [r.identical for c in cells for r in c.requests] == [True, True, False, True]
    assert counts == {SERIAL: 1, "alone": 1}
    assert alone == [[3]]  # only the prompt no serial cell answered was decoded again


def test_throughput_ratio_pairs_requests_and_counts_unreached_ones_as_zero():
    # a: 4 + 4 tokens in 1 s; b: 2 tokens of the first prompt in 2 s and never reached the second
    a = LoadCell(BATCHED, 2, 1.0, 1.0, (request([0.5], [4], prompt=(1,)), request([0.9], [4], prompt=(2,))))
    b = LoadCell(SERIAL, 2, 3.0, 2.0, (request([1.5, 2.5], [2, 2], prompt=(1,), config=SERIAL),))
    (ratio,) = [c for c in compare_load(LoadRun([BATCHED, SERIAL], [2], 4, None, [a, b]))]
    assert ratio.ratio == pytest.approx((8 / 1.0) / (2 / 2.0))
    assert (ratio.requests, ratio.against_requests) == (2, 1)
    assert ratio.low <= ratio.ratio <= ratio.high


def test_parse_concurrencies():
    assert parse_concurrencies("1, 2,4,4,16") == [1, 2, 4, 16]
    for bad in ("", "0", "2,x"):
        with pytest.raises(RestspecError, match="--concurrency"):
            parse_concurrencies(bad)


def test_every_batched_configuration_gets_the_engines_step_factor(tiny_engine):
    ctx = MethodContext(tiny_engine(False, step_factor=1.1))
    assert ctx.adaptive_budget().step_factor == 1.1
    assert build_generator(BATCHED, ctx, 3).policy.step_factor == 1.1


def test_load_run_on_the_tiny_engine(tiny_engine):
    ctx = MethodContext(tiny_engine(False))
    events = []
    run = run_load(
        ITEMS,
        ctx,
        concurrencies=[1, 3],
        max_new_tokens=6,
        progress=lambda *event: events.append(event),
    )
    assert {(c.config, c.concurrency) for c in run.cells} == {(n, c) for n in CONFIGS for c in (1, 3)}
    turns = sum(len(item.turns) for item in ITEMS)
    for cell in run.cells:
        assert len(cell.requests) == turns  # no --duration: every item, both turns of the chat one
        assert [(r.item_id, r.turn) for r in cell.requests] == [
            ("a", 0),
            ("b", 0),
            ("c", 0),
            ("c", 1),
            ("d", 0),
        ]
        for r in cell.requests:
            assert int(r.chunk_tokens.sum()) == len(r.output_ids)
            assert r.sent_s <= r.chunk_s[0] <= r.chunk_s[-1] <= cell.wall_s
        assert 0 < cell.steady_s <= cell.wall_s
    assert run.mismatches == 0
    assert all(r.identical for c in run.cells for r in c.requests)
    assert run.references == {SERIAL: turns, "alone": 0}
    assert sum(finished for *_, finished in events) == len(run.cells)

    figures = summarize_load(run)
    assert [(f.concurrency, f.config) for f in figures] == [(c, n) for c in (1, 3) for n in CONFIGS]
    assert all(f.mismatches == 0 and f.tokens_per_s > 0 for f in figures)
    plain = [f for f in figures if f.config == BATCHED_PLAIN]
    assert all(f.tokens_per_step == 1.0 for f in plain)
    comparisons = compare_load(run)
    assert [(c.figure, c.concurrency, c.against) for c in comparisons] == [
        ("tokens/s", 1, BATCHED_PLAIN),
        ("tokens/s", 1, SERIAL),
        ("tokens/s", 3, BATCHED_PLAIN),
        ("tokens/s", 3, SERIAL),
        ("p99 ITL", 3, BATCHED),
    ]
    assert all(c.low <= c.ratio <= c.high for c in comparisons if c.figure == "tokens/s")

    data = json.loads(json.dumps(load_json(run, figures, comparisons)))
    assert set(data) == {
        "cells", "comparisons", "mismatches", "references", "definitions", "config", "machine", "requests",
    }  # fmt: skip
    assert data["mismatches"] == 0
    assert set(data["cells"][0]) >= {
        "config", "concurrency", "requests", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
        "itl_p99_ms", "tokens_per_step", "mismatches",
    }  # fmt: skip
    assert "divided evenly" in data["definitions"]["itl"]
    assert len(data["requests"]) == turns * len(run.cells)
    first = data["requests"][0]
    assert len(first["chunk_ms"]) == len(first["chunk_tokens"])
    assert data["config"]["concurrencies"] == [1, 3]


def test_duration_bounds_a_cell(tiny_engine):
    run = run_load(
        ITEMS, MethodContext(tiny_engine(False)), concurrencies=[2], max_new_tokens=4, duration_s=1e-9
    )
    # the deadline passed before any client took an item
    assert all(len(cell.requests) == 0 for cell in run.cells)
    assert isinstance(run, LoadRun) and run.mismatches == 0


def test_load_cli_writes_table_json_and_plot(tiny_model_folder, datastore, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nhello there\n")
    out = tmp_path / "load.json"
    result = CliRunner().invoke(
        app,
        [
            "load", "--workload", str(prompts), "--model", str(tiny_model_folder),
            "--datastore", str(datastore), "--concurrency", "1,2", "--max-new-tokens", "4",
            "--json", str(out), "--no-warmup", "--cold-start",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "batched-plain" in result.output and "mismatches: 0" in result.output
    data = json.loads(out.read_text())
    assert len(data["cells"]) == 6
    assert out.with_suffix(".png").stat().st_size > 0
