"""The lab tests' fixtures (tests/bench_fixtures.py), and a tiny run of the lab's bench."""

from __future__ import annotations

import json

import pytest
from bench_fixtures import (  # noqa: F401
    datastore,
    quick_warm_start,
    tiny_engine,
    tiny_model,
    tiny_model_folder,
    tiny_tokenizer,
)

from benchmarks.bench import main


@pytest.fixture
def lab_bench(tiny_model_folder, datastore, tmp_path):  # noqa: F811 - the fixtures imported above
    """``lab_bench(methods, prompts, max_new_tokens)``: the per-method rows of the JSON report of one
    ``python -m benchmarks.bench`` run of ``methods`` (comma-separated) over ``prompts`` (one a line) on
    the tiny model and datastore, with no warm-up and a cold start."""

    def run(methods: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
        workload = tmp_path / "prompts.txt"
        workload.write_text("".join(f"{p}\n" for p in prompts))
        out = tmp_path / "bench.json"
        args = ["--workload", str(workload), "--model", str(tiny_model_folder), "--datastore", str(datastore)]
        args += ["--methods", methods, "--max-new-tokens", str(max_new_tokens), "--json", str(out)]
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--no-warmup", "--cold-start"])
        assert exit_info.value.code == 0
        return json.loads(out.read_text())["methods"]

    return run
