"""``restspec bench`` end to end on a tiny random model saved as a Hugging Face folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from restspec.cli import app


@pytest.fixture(scope="module")
def model_dir(tiny_model, tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_bench_writes_table_json_and_plot(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"question_id": 1, "category": "a", "turns": ["hi hi hi", "again"]})
        + "\n"
        + json.dumps({"question_id": 2, "category": "b", "turns": ["x y x y"]})
        + "\n"
    )
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--workload",
            str(prompts),
            "--model",
            str(model_dir),
            "--methods",
            "plain,pld,restspec-plain",
            "--max-new-tokens",
            "6",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--no-warmup",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "restspec-plain" in result.output
    data = json.loads(out.read_text())
    assert [m["method"] for m in data["methods"]] == ["plain", "pld", "restspec-plain"]
    for m in data["methods"]:
        assert set(m["categories"]) == {"a", "b"}
        assert m["exact"] == 1.0  # our loop and prompt lookup reproduce plain greedy
    assert data["config"]["turns"] == 3
    # restspec's plain loop: every step one input wide, listed in the steps-by-width table and JSON
    assert "steps by forward width" in result.output
    assert [row["inputs"] for row in data["methods"][2]["by_width"]] == ["1"]
    assert data["methods"][0]["by_width"] == []
    assert png.stat().st_size > 0


def test_bench_user_errors_exit_2(model_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--workload", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2
    assert "neither 'humaneval' nor an existing file" in result.output
    result = runner.invoke(app, ["bench", "--methods", "plain,warp"])
    assert result.exit_code == 2
    assert "unknown method 'warp'" in result.output
    result = runner.invoke(app, ["bench", "--samples", "0"])
    assert result.exit_code == 2
    assert "--samples=0 must be >= 1" in result.output


def test_bench_samples_every_prompt_again_at_a_temperature(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three\nfour five six\n")
    out = tmp_path / "bench.json"
    args = ["bench", "--workload", str(prompts), "--model", str(model_dir), "--reference", "restspec"]
    args += ["--methods", "plain,restspec,restspec-plain", "-n", "8", "--temperature", "5", "--samples", "2"]
    result = CliRunner().invoke(app, [*args, "--json", str(out), "--no-warmup"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["config"]["samples"] == 2
    assert data["config"]["temperature"] == 5
    turns = {(t["item_id"], t["method"]): t for t in data["turns"]}
    assert [i for i, m in turns if m == "restspec"] == ["line1#0", "line1#1", "line2#0", "line2#1"]
    # one seed per turn for every method: restspec's loop samples the same tokens with drafts or without
    assert {m["method"]: m["exact"] for m in data["methods"]}["restspec-plain"] == 1.0
    assert all(turns[i, "restspec-plain"]["identical"] for i in ("line1#0", "line1#1", "line2#0", "line2#1"))


def test_compare_pools_runs_and_writes_markdown(tmp_path):
    def run_file(name, suffix_seconds):
        turns = [
            {"item_id": item, "category": "a", "method": method, "new_tokens": 10, "seconds": seconds}
            for item, ours in (("1", 1.0), ("2", 1.0))
            for method, seconds in (("restspec", ours), ("suffix", suffix_seconds))
        ]
        path = tmp_path / name
        path.write_text(json.dumps({"turns": turns}))
        return str(path)

    runs = [run_file("one.json", 2.0), run_file("two.json", 0.5)]
    md = tmp_path / "pooled.md"
    result = CliRunner().invoke(app, ["compare", *runs, "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    assert "paired over 2 runs" in result.output
    # 40 tokens in 4 s against 40 in 5 s; faster on the first run's two items only
    assert "| restspec | suffix | all | 1.250 |" in md.read_text()
    assert "2/4" in md.read_text()
    result = CliRunner().invoke(app, ["compare", runs[0], "--method", "pld"])
    assert result.exit_code == 2
    assert "'pld' is in none of the runs" in result.output
