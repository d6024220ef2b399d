"""Workload parsing: HumanEval, MT-Bench-style chat files, plain prompt files, and bad input."""

from __future__ import annotations

import gzip
import json

import pytest

from restspec.bench.workloads import (
    HUMANEVAL_CATEGORY,
    PROMPTS_CATEGORY,
    WorkloadError,
    load_humaneval,
    load_prompt_file,
    load_workload,
    repeated,
    select,
)
from restspec.errors import RestspecError

MT_BENCH = "/work/shared/data/mt_bench_questions.jsonl"


def test_humaneval_from_package_is_raw_completion():
    items = load_workload("humaneval")
    assert len(items) == 164
    first = items[0]
    assert first.item_id == "HumanEval/0"
    assert first.category == HUMANEVAL_CATEGORY
    assert not first.chat
    assert first.turns[0].startswith("from typing import List")


def test_humaneval_record_without_prompt_is_rejected(tmp_path):
    path = tmp_path / "he.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"task_id": "X/0"}) + "\n")
    with pytest.raises(WorkloadError, match="needs 'task_id' and 'prompt'"):
        load_humaneval(path)


def test_mt_bench_shape(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
        {"question_id": 82, "category": "math", "turns": ["1+1?", "Times 3?"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_prompt_file(path)
    assert [i.item_id for i in items] == ["81", "82"]
    assert [i.category for i in items] == ["writing", "math"]
    assert items[0].turns == ("Write a poem.", "Now shorter.")
    assert all(i.chat for i in items)


def test_shared_mt_bench_per_category_limit():
    items = select(load_workload(MT_BENCH), 3, per_category=True)
    cats = [i.category for i in items]
    assert len(items) == 24
    assert {c: cats.count(c) for c in set(cats)} == dict.fromkeys(set(cats), 3)
    assert all(len(i.turns) == 2 for i in items)


def test_plain_lines_and_prompt_jsonl(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\nsecond prompt\n")
    items = load_prompt_file(lines)
    assert [i.turns for i in items] == [("first prompt",), ("second prompt",)]
    assert [i.item_id for i in items] == ["line1", "line3"]
    assert all(i.category == PROMPTS_CATEGORY and not i.chat for i in items)
    assert all(i.chat for i in load_prompt_file(lines, chat=True))

    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a", "category": "c1"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    items = load_prompt_file(jl)
    assert [(i.category, i.turns[0]) for i in items] == [("c1", "a"), (PROMPTS_CATEGORY, "b")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ('{"prompt": "a"}\n{not json\n', r":2: not valid JSON"),
        ('{"text": "a"}\n', "needs 'turns'"),
        ('{"turns": []}\n', "non-empty list"),
        ('{"prompt": ""}\n', "non-empty string"),
        ("[1, 2]\n", "expected a JSON object"),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', "occurs more than once"),
    ],
)
def test_bad_files_have_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(WorkloadError, match=message) as info:
        load_prompt_file(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, RestspecError)


def test_missing_file_names_the_choices(tmp_path):
    with pytest.raises(WorkloadError, match="neither 'humaneval' nor an existing file"):
        load_workload(tmp_path / "nope.jsonl")
    with pytest.raises(WorkloadError, match="is a directory"):
        load_workload(tmp_path)


def test_repeated_asks_every_prompt_in_a_row_under_its_own_id():
    items = select(load_workload(MT_BENCH), 2)
    again = repeated(items, 3)
    assert [i.item_id for i in again] == ["81#0", "81#1", "81#2", "82#0", "82#1", "82#2"]
    assert [i.turns for i in again] == [items[0].turns] * 3 + [items[1].turns] * 3
    assert {i.category for i in again[:3]} == {items[0].category}
    assert repeated(items, 1) == items
    with pytest.raises(WorkloadError, match="--samples=0 must be >= 1"):
        repeated(items, 0)


def test_select_limits():
    items = load_workload(MT_BENCH)
    assert [i.item_id for i in select(items, 2)] == ["81", "82"]
    assert select(items, None) == items
    with pytest.raises(WorkloadError, match="--limit=0"):
        select(items, 0)
