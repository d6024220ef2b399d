"""The bench's warm start: restspec's methods start from the model's own conversations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bench_fixtures import WARM_CONVERSATIONS as CONVERSATIONS
from typer.testing import CliRunner

from restspec.bench.methods import MethodContext, build_methods
from restspec.cli import app
from restspec.draft import HistoryDrafter
from restspec.draft.base import EmptyDrafter


@pytest.mark.usefixtures("quick_warm_start")
def test_restspec_starts_warm_and_the_plain_loop_has_nothing_to_warm(tiny_engine):
    engine = tiny_engine(warm_start=True)
    restspec, plain = build_methods(["restspec", "restspec-plain"], MethodContext(engine))
    warm = engine.warm
    assert warm.summary()["conversations"] == CONVERSATIONS
    drafter = restspec.generator.drafter
    assert drafter is not engine.drafter  # a fresh copy: the bench's runs do not teach the engine's own
    history = next(d for d in drafter.drafters if isinstance(d, HistoryDrafter))
    assert history.num_tokens == warm.summary()["output_tokens"] > 0
    learned = warm.drafter_state["correction"]["xtx"]
    np.testing.assert_array_equal(drafter.correction.state_dict()["xtx"], learned)
    assert isinstance(plain.generator.drafter, EmptyDrafter)

    cold = build_methods(["restspec"], MethodContext(tiny_engine(warm_start=False)))[0]
    assert next(d for d in cold.generator.drafter.drafters if isinstance(d, HistoryDrafter)).num_tokens == 0


@pytest.mark.usefixtures("quick_warm_start")
@pytest.mark.parametrize("flag", ["--warm-start", "--cold-start"])
def test_bench_json_records_the_warm_start(tiny_model, tiny_tokenizer, datastore, tmp_path, flag):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "bench.json"
    args = ["bench", "--workload", str(prompts), "--model", str(model_dir), "--datastore", str(datastore)]
    args += ["--methods", "restspec", "--max-new-tokens", "4", "--json", str(out), "--no-warmup", flag]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    recorded = json.loads(out.read_text())["config"]["warm_start"]
    if flag == "--warm-start":
        assert recorded["conversations"] == CONVERSATIONS and recorded["output_tokens"] > 0
    else:
        assert recorded is None
