"""The bench's warm start: restspec's methods and SuffixDecoding start from the same conversations."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

import restspec.decode.warm as warm_module
from restspec.bench.methods import MethodContext, build_methods
from restspec.cli import app
from restspec.draft import HistoryDrafter
from restspec.draft.base import EmptyDrafter

CONVERSATIONS = 2


@pytest.fixture
def quick_warm_start(monkeypatch, tmp_path):
    """A private cache and a warm start of two short conversations (the real one has 32 long ones)."""
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path / "cache"))
    quick = functools.partial(
        warm_module.learn_warm_start, conversations=CONVERSATIONS, question_tokens=8, answer_tokens=8
    )
    monkeypatch.setattr(warm_module, "learn_warm_start", quick)


@pytest.fixture(scope="module")
def datastore(tiny_tokenizer, tmp_path_factory):
    from restspec.datastore import Datastore

    path = tmp_path_factory.mktemp("ds") / "tiny.ds"
    Datastore.build_from_texts(["hello world, hello there.\n"] * 3, path, tiny_tokenizer, progress=False)
    return path


def context(tiny_model, tiny_tokenizer, datastore, warm_start: bool) -> MethodContext:
    loaded = SimpleNamespace(model=tiny_model, tokenizer=tiny_tokenizer, name="tiny-bench")
    return MethodContext(loaded, [datastore], warm_start=warm_start)


@pytest.mark.usefixtures("quick_warm_start")
def test_restspec_starts_warm_and_the_plain_loop_has_nothing_to_warm(tiny_model, tiny_tokenizer, datastore):
    ctx = context(tiny_model, tiny_tokenizer, datastore, warm_start=True)
    restspec, plain = build_methods(["restspec", "restspec-plain"], ctx)
    warm = ctx.warm()
    assert warm.summary()["conversations"] == CONVERSATIONS
    history = next(d for d in restspec.drafter.drafters if isinstance(d, HistoryDrafter))
    assert history.num_tokens == warm.summary()["output_tokens"] > 0
    np.testing.assert_array_equal(
        restspec.budget.calibration.state_dict()["xtx"], warm.policy_state["calibration"]["xtx"]
    )
    assert isinstance(plain.drafter, EmptyDrafter)

    cold = build_methods(["restspec"], context(tiny_model, tiny_tokenizer, datastore, warm_start=False))[0]
    assert next(d for d in cold.drafter.drafters if isinstance(d, HistoryDrafter)).num_tokens == 0


@pytest.mark.usefixtures("quick_warm_start")
def test_suffix_decoding_gets_the_same_outputs(tiny_model, tiny_tokenizer, datastore):
    pytest.importorskip("arctic_inference")
    ctx = context(tiny_model, tiny_tokenizer, datastore, warm_start=True)
    suffix = build_methods(["suffix"], ctx)[0]
    output = max(ctx.warm().outputs, key=len)
    drafter = suffix.drafter
    drafter.start_request(np.zeros(1, np.int32))
    half = len(output) // 2
    tree = drafter.propose(output[:half], 8)  # a past output's start: its global tree knows the rest
    drafter.stop_request()
    assert int(output[half]) in tree.tokens[tree.parents < 0].tolist()


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
