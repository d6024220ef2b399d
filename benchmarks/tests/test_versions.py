"""benchmarks.versions: a method's new run over its old run, paired by prompt."""

from __future__ import annotations

import json

import pytest

from benchmarks.versions import compare_versions
from restspec.errors import RestspecError


def run_file(path, seconds_by_item: dict[str, float], method: str = "restspec"):
    turns = [
        {"item_id": item, "category": "all", "method": method, "new_tokens": 100, "seconds": seconds}
        for item, seconds in seconds_by_item.items()
    ]
    path.write_text(json.dumps({"turns": turns}))
    return path


def test_a_version_twice_as_fast_on_every_prompt_is_2x_with_a_tight_interval(tmp_path):
    old = run_file(tmp_path / "old.json", {"a": 2.0, "b": 4.0, "c": 1.0})
    new = run_file(tmp_path / "new.json", {"a": 1.0, "b": 2.0, "c": 0.5})
    (overall,) = compare_versions(old, new, ["restspec"])
    assert overall.method == "restspec@new" and overall.against == "restspec@old"
    assert overall.ratio == pytest.approx(2.0) and overall.low == pytest.approx(2.0)
    assert overall.items == 3 and overall.faster == 3


def test_only_prompts_both_ran_are_paired_and_a_missing_method_is_an_error(tmp_path):
    old = run_file(tmp_path / "old.json", {"a": 1.0, "b": 1.0})
    new = run_file(tmp_path / "new.json", {"b": 1.0, "c": 1.0})
    (overall,) = compare_versions(old, new, ["restspec"])
    assert overall.items == 1 and overall.ratio == pytest.approx(1.0)
    with pytest.raises(RestspecError, match="plain"):
        compare_versions(old, new, ["plain"])
