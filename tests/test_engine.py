"""restspec.Engine: the one composition root, on the tiny trained model of tests/conftest.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from machine import quiet_machine
from rich.console import Console

from restspec.decode import generation_config
from restspec.engine import Engine, check_datastore_paths, parse_budget
from restspec.errors import DatastoreError, GenerationError, ModelError
from restspec.progress import ConsoleProgress


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, _session_cache: Path) -> None:
    monkeypatch.setenv("RESTSPEC_CACHE", str(_session_cache))


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tiny_datastore_dir: Path) -> Engine:
    return Engine.from_pretrained(
        tiny_model_dir, datastores=[tiny_datastore_dir], budget=6, warm_start=False, progress=False
    )


@pytest.mark.parametrize(("text", "size"), [("auto", None), ("AUTO", None), ("0", 0), ("12", 12), (7, 7)])
def test_parse_budget(text, size):
    assert parse_budget(text) == size


@pytest.mark.parametrize("value", ["lots", "-3", -1])
def test_a_bad_budget_names_the_value(value):
    with pytest.raises(GenerationError, match=f"budget={value!r}"):
        parse_budget(value)


def test_missing_datastore_path_is_a_datastore_error(tmp_path: Path):
    check_datastore_paths([])  # nothing to check
    with pytest.raises(DatastoreError, match="does-not-exist"):
        check_datastore_paths([tmp_path / "does-not-exist"])
    (tmp_path / "notes.txt").write_text("not a datastore")
    with pytest.raises(DatastoreError, match=r"notes\.txt' is a file"):
        check_datastore_paths([tmp_path / "notes.txt"])


def test_generation_settings_as_keywords():
    config = generation_config(None, {"max_new_tokens": 9, "temperature": 0.5, "seed": 3, "stop": "\n\n"})
    assert config.max_new_tokens == 9
    assert config.sampling.temperature == 0.5
    assert config.sampling.seed == 3
    assert config.stop_strings == ("\n\n",)
    assert generation_config(None, {}).sampling.greedy  # nothing given: the defaults, greedy


def test_generation_settings_are_checked():
    with pytest.raises(GenerationError, match="min_p"):
        generation_config(None, {"min_p": 0.1})
    with pytest.raises(GenerationError, match="not both"):
        generation_config(generation_config(None, {}), {"max_new_tokens": 4})
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generation_config(None, {"max_new_tokens": 0})


def test_engine_output_equals_plain_decoding_and_drafts_get_accepted(engine: Engine):
    prompt = "def fibonacci(n):"  # a prefix of a corpus document, cut at a token boundary
    fast = engine.generate(prompt, max_new_tokens=40)
    plain = engine.plain().generate(prompt, max_new_tokens=40)  # keyword settings as on the engine
    np.testing.assert_array_equal(fast.output_ids, plain.output_ids)
    assert fast.text == plain.text
    assert sum(s.accepted for s in fast.steps) > 0  # the datastore's continuations were accepted
    assert all(s.drafted == 0 for s in plain.steps)


def test_stream_ends_with_the_result_and_its_pieces_add_up(engine: Engine):
    chunks = list(engine.stream("for i in range(10):", max_new_tokens=24))
    result = chunks[-1].result
    assert result is not None and all(c.result is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == result.text
    np.testing.assert_array_equal(np.concatenate([c.token_ids for c in chunks]), result.output_ids)


def test_a_chats_next_turn_reuses_the_previous_one_within_its_scope(engine: Engine):
    messages = [{"role": "user", "content": "def add(a, b):"}]
    first = engine.generate(messages, max_new_tokens=12, prefix_scope="alice")
    turn = [*messages, {"role": "assistant", "content": first.text}, {"role": "user", "content": "and sub?"}]
    second = engine.generate(turn, max_new_tokens=12, prefix_scope="alice")
    other = engine.generate(turn, max_new_tokens=12, prefix_scope="bob")
    assert second.cached_tokens > len(first.prompt_ids)  # the first prompt and (most of) its answer
    assert other.cached_tokens < len(first.prompt_ids)  # at most what bob's own earlier requests share
    np.testing.assert_array_equal(second.output_ids, other.output_ids)


def test_the_prefix_cache_bound_reaches_the_engines_generators(
    tiny_model_dir: Path, tiny_datastore_dir: Path
):
    with pytest.raises(GenerationError, match=r"prefix_cache_mb=-1 must be >= 0"):
        Engine.from_pretrained("no-such-model", prefix_cache_mb=-1, progress=False)  # before loading
    off = Engine.from_pretrained(
        tiny_model_dir, datastores=[tiny_datastore_dir], warm_start=False, prefix_cache_mb=0, progress=False
    )
    assert off.generator.prefixes.max_bytes == off.plain().prefixes.max_bytes == 0
    assert off.generate("def f(x):", max_new_tokens=4).cached_tokens == 0
    assert off.generate("def f(x):", max_new_tokens=4).cached_tokens == 0


def test_a_variant_shares_the_model(engine: Engine):
    from restspec.decode.budget import FixedBudget
    from restspec.draft import ContextDrafter

    variant = engine.variant(ContextDrafter(), FixedBudget(3))
    assert variant.model is engine.model and variant.tokenizer is engine.tokenizer
    assert variant.policy == FixedBudget(3)


def test_default_datastore_auto_budget_and_warm_start(
    tiny_model_dir: Path, tiny_datastore_dir: Path, monkeypatch
):
    """'auto' calibrates on the model (cached), the warm start is learned once, then read from the cache."""
    from restspec.decode.budget import AdaptiveBudget

    quiet_machine(monkeypatch)  # else a calibration timed while other work ran would not be cached
    first = Engine.from_pretrained(
        tiny_model_dir, datastores=[tiny_datastore_dir], recalibrate=True, progress=False
    )
    assert isinstance(first.policy, AdaptiveBudget)
    out = console()
    again = Engine.from_pretrained(
        tiny_model_dir, datastores=[tiny_datastore_dir], progress=ConsoleProgress(out)
    )
    assert first.policy.latency == again.policy.latency  # read from the cache, and its line says so
    assert "restspec: Loading the forward latency curve measured on this machine: done" in out.file.getvalue()
    prompt = "class Stack:"
    np.testing.assert_array_equal(
        first.generate(prompt, max_new_tokens=24).output_ids,
        again.generate(prompt, max_new_tokens=24).output_ids,
    )


def console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=200)


def test_phases_print_one_line_each_when_not_on_a_terminal(tiny_model_dir: Path, tiny_datastore_dir: Path):
    out = console()
    Engine.from_pretrained(
        tiny_model_dir,
        datastores=[tiny_datastore_dir],
        budget=2,
        warm_start=False,
        progress=ConsoleProgress(out),
    )
    lines = out.file.getvalue().splitlines()
    assert lines[0].startswith("restspec: Loading model") and lines[0].endswith("…")
    assert lines[1].startswith("restspec: Loading model") and " done in " in lines[1]


def test_the_step_factor_reaches_the_engines_adaptive_budgets(tiny_model_dir: Path, tiny_datastore_dir: Path):
    with pytest.raises(GenerationError, match=r"step_factor=0\.5 must be >= 1"):
        Engine.from_pretrained("no-such-model", step_factor=0.5, progress=False)  # before loading
    tight = Engine.from_pretrained(
        tiny_model_dir, datastores=[tiny_datastore_dir], warm_start=False, step_factor=1.1, progress=False
    )
    assert tight.policy.step_factor == 1.1 and tight.adaptive_budget().step_factor == 1.1


def test_a_missing_datastore_fails_before_the_model_loads(tmp_path: Path):
    with pytest.raises(DatastoreError, match="restspec build"):
        Engine.from_pretrained("no-such-model", datastores=[tmp_path / "missing"], progress=False)


def test_the_engine_is_the_one_place_that_assembles_model_drafter_and_budget():
    """No module of the package but restspec/engine.py calls what builds the pieces of an engine."""
    import ast

    import restspec

    builders = {"SpeculativeGenerator", "default_drafter", "load_model", "for_model", "choose_backend"}
    package = Path(restspec.__file__).parent
    callers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in builders:
                    callers.add(f"{path.relative_to(package)}:{name}")
    assert {c.split(":")[0] for c in callers} == {"engine.py"}, sorted(callers)


def test_an_unavailable_device_fails_before_the_model_loads(tiny_model_dir: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = io.StringIO()
    with pytest.raises(ModelError, match="--device 'cuda'"):
        Engine.from_pretrained(tiny_model_dir, device="cuda", progress=ConsoleProgress(Console(file=out)))
    assert out.getvalue() == ""  # no phase started
