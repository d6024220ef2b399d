"""benchmarks.prefix_reuse on the tiny engine: the second turn starts from the first turn's cache."""

from __future__ import annotations

import json

from benchmarks import prefix_reuse


def test_the_second_turn_reuses_the_first_and_both_cases_are_timed(tiny_engine, tmp_path, monkeypatch):
    engine = tiny_engine(warm_start=False)
    monkeypatch.setattr(prefix_reuse.Engine, "from_pretrained", lambda **_: engine)
    workload = tmp_path / "chat.jsonl"
    lines = [{"question_id": i, "turns": [f"hello world {i}", "and again"]} for i in range(3)]
    lines.append({"prompt": "one turn only"})
    workload.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "reuse.json"
    assert prefix_reuse.main(["--workload", str(workload), "--limit", "4", "-n", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["item_id"] for row in report["rows"]] == ["0", "1", "2"]
    for row in report["rows"]:
        # the first turn's prompt and all of its answer but the last token (never fed to the model)
        assert 0 < row["cached_tokens"] < row["prompt_tokens"]
        assert row["whole_s"] > 0 and row["reused_s"] > 0
    assert report["summary"]["items"] == 3
    assert engine.generator.prefixes.max_bytes > 0  # the kept caches are back in place


def test_one_long_conversation_grows_turn_by_turn_and_is_plotted(tiny_engine, tmp_path, monkeypatch):
    engine = tiny_engine(warm_start=False)
    monkeypatch.setattr(prefix_reuse.Engine, "from_pretrained", lambda **_: engine)
    workload = tmp_path / "chat.jsonl"
    workload.write_text(
        "".join(json.dumps({"question_id": i, "turns": [f"hi {i}"]}) + "\n" for i in range(3))
    )
    out, picture = tmp_path / "chain.json", tmp_path / "chain.png"
    args = ["--workload", str(workload), "--limit", "3", "-n", "4", "--chain", "--out", str(out)]
    assert prefix_reuse.main([*args, "--plot", str(picture)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["turn"] for row in rows] == [0, 1, 2]
    assert rows[0]["prompt_tokens"] < rows[1]["prompt_tokens"] < rows[2]["prompt_tokens"]
    # every later turn starts from the earlier turns' rows: all of the previous prompt and most of its answer
    assert all(rows[i]["cached_tokens"] >= rows[i - 1]["prompt_tokens"] for i in (1, 2))
    assert picture.stat().st_size > 0
