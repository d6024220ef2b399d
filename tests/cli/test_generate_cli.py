"""``restspec demo``, ``generate`` and ``chat`` end to end on a tiny model (fast), and once on the
embedded model (slow)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from restspec.cli import app
from restspec.cli.generate import DEMO_PROMPTS

runner = CliRunner()
NEW_TOKENS = 12
FIXED_BUDGET = "4"
PROMPT = "def fibonacci(n):"  # a prefix of a TINY_CORPUS document, cut at a token boundary


@pytest.fixture
def tiny_args(tiny_model_dir: Path, tiny_datastore_dir: Path) -> list[str]:
    """Flags that run the tiny model greedily in float64 (no near-ties: exact parity), drafting up to
    FIXED_BUDGET tokens per step (the 'auto' budget is tested on its own)."""
    return [
        "--model",
        str(tiny_model_dir),
        "--datastore",
        str(tiny_datastore_dir),
        "--dtype",
        "float64",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--budget",
        FIXED_BUDGET,
    ]


def run_json(args: list[str], prompt: str = PROMPT) -> dict:
    result = runner.invoke(app, ["generate", prompt, "--json", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------- generate


def test_generate_json_has_text_token_ids_and_statistics(tiny_args, tiny_model_dir):
    from transformers import AutoTokenizer

    doc = run_json(tiny_args)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert doc["prompt_ids"] == tokenizer(PROMPT)["input_ids"]
    assert 1 <= len(doc["output_ids"]) <= NEW_TOKENS
    assert doc["finish_reason"] in ("eos", "length")
    if doc["finish_reason"] == "length":
        assert len(doc["output_ids"]) == NEW_TOKENS
    assert doc["text"] == tokenizer.decode(doc["output_ids"], skip_special_tokens=True)
    stats = doc["stats"]
    assert stats["new_tokens"] == len(doc["output_ids"])
    assert stats["prompt_tokens"] == len(doc["prompt_ids"])
    assert 1 <= stats["steps"] <= stats["new_tokens"]
    assert stats["mean_accepted"] == pytest.approx(stats["new_tokens"] / stats["steps"])  # tokens per step
    assert stats["tokens_per_s"] > 0
    assert stats["elapsed_s"] > 0


def test_the_backend_flag_picks_the_forward_and_keeps_the_output(tiny_args, monkeypatch):
    from restspec.engine import Engine

    built = []
    from_pretrained = Engine.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        engine = from_pretrained(cls, *args, **kwargs)
        built.append(engine.backend.name)
        return engine

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(recording))
    outputs = [run_json([*tiny_args, "--backend", name])["output_ids"] for name in ("model", "direct")]
    assert built == ["model", "direct"]
    assert outputs[0] == outputs[1]


def test_warm_start_is_learned_once_and_leaves_output_unchanged(tiny_args, tmp_path, monkeypatch):
    """The first run learns the warm start into the cache; --cold-start neither reads nor writes it;
    greedy output is the same either way (and equals plain greedy)."""
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path))
    cold = run_json([*tiny_args, "--budget", "auto", "--cold-start"])
    assert not (tmp_path / "warm").exists()
    warm = run_json([*tiny_args, "--budget", "auto"])
    files = list((tmp_path / "warm").glob("*.npz"))
    assert len(files) == 1
    learned = files[0].stat().st_mtime_ns
    again = run_json([*tiny_args, "--budget", "auto"])
    assert files[0].stat().st_mtime_ns == learned  # read from the cache, not learned again
    plain = run_json([*tiny_args, "--budget", "0", "--cold-start"])
    assert cold["output_ids"] == warm["output_ids"] == again["output_ids"] == plain["output_ids"]


@pytest.mark.parametrize("budget", ["auto", "1", "8"])
def test_restspec_greedy_output_equals_plain_greedy(tiny_args, budget):
    plain = run_json([*tiny_args, "--budget", "0"])
    fast = run_json([*tiny_args, "--budget", budget])
    assert fast["output_ids"] == plain["output_ids"]
    assert fast["text"] == plain["text"]
    assert plain["stats"]["steps"] == plain["stats"]["new_tokens"]  # budget 0: one token per step
    if budget != "auto":  # the tiny model continues its corpus, so drafts from it are accepted
        assert fast["stats"]["mean_accepted"] > 1.0
        assert fast["stats"]["steps"] < plain["stats"]["steps"]


def test_generate_streams_the_same_text_as_json(tiny_args):
    doc = run_json(tiny_args)
    result = runner.invoke(app, ["generate", PROMPT, *tiny_args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == doc["text"] + "\n"
    assert "tokens/s" in result.stderr
    assert "accepted tokens/step" in result.stderr


@pytest.mark.parametrize("dash", [[], ["-"]])
def test_generate_reads_the_prompt_from_stdin(tiny_args, dash):
    doc = run_json(tiny_args)
    result = runner.invoke(app, ["generate", *dash, "--json", *tiny_args], input=PROMPT)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["output_ids"] == doc["output_ids"]


def test_generate_chat_applies_the_chat_template(tiny_args, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    doc = run_json([*tiny_args, "--chat"], prompt="hello there")
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=False
    )
    assert doc["prompt_ids"] == tokenizer(templated, add_special_tokens=False)["input_ids"]
    with_system = run_json([*tiny_args, "--system", "be brief"], prompt="hello there")
    assert len(with_system["prompt_ids"]) > len(doc["prompt_ids"])


def test_sampling_with_a_seed_is_repeatable(tiny_args):
    sampled = [*tiny_args, "--temperature", "1.0", "--top-p", "0.9", "--top-k", "20", "--seed", "7"]
    assert run_json(sampled)["output_ids"] == run_json(sampled)["output_ids"]


@pytest.mark.parametrize("stdin", ["", "  \n\t\n"])
def test_empty_stdin_is_a_one_line_error(tiny_args, stdin, one_line_error):
    result = runner.invoke(app, ["generate", *tiny_args], input=stdin)
    one_line_error(result, "empty")


def test_empty_prompt_argument_is_a_one_line_error(tiny_args, one_line_error):
    result = runner.invoke(app, ["generate", "", *tiny_args])
    one_line_error(result, "empty")


def test_prompt_longer_than_the_context_is_a_one_line_error(tiny_args, tiny_context, one_line_error):
    long_prompt = "print(1)\n" * tiny_context  # several tokens per repetition: far past 128 positions
    result = runner.invoke(app, ["generate", long_prompt, *tiny_args])
    one_line_error(result)


# --------------------------------------------------------------------------------------------- chat


@pytest.fixture
def chat_requests(monkeypatch) -> list:
    """Records the message list of every request the chat command makes (not the token-id prompts of a
    warm start learned on the way, as when the test runs alone)."""
    from restspec.decode import SpeculativeGenerator

    seen: list = []
    original = SpeculativeGenerator.stream

    def recording_stream(self, prompt, config, *, chat=False, **options):
        if len(prompt) and isinstance(prompt[0], dict):
            seen.append((list(prompt), chat))
        return original(self, prompt, config, chat=chat, **options)

    monkeypatch.setattr(SpeculativeGenerator, "stream", recording_stream)
    return seen


def test_chat_answers_each_piped_line_with_history_and_statistics(tiny_args, chat_requests):
    result = runner.invoke(
        app, ["chat", *tiny_args, "--system", "be brief"], input="hello\n\nwhat is a stack?\n"
    )
    assert result.exit_code == 0, (result.output, result.exception)
    stats = [line for line in result.stderr.splitlines() if "tokens/s" in line]
    assert len(stats) == 2  # two messages (the empty line is skipped), two answers
    assert all("accepted tokens/step" in line for line in stats)
    assert "reused" not in stats[0] and "prompt tokens reused" in stats[1]  # the second turn's prefix
    assert "you>" not in result.stdout  # no prompt marker when stdin is not a terminal

    (first, first_chat), (second, second_chat) = chat_requests
    assert first_chat and second_chat
    assert first == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    answer = second[2]
    assert answer["role"] == "assistant"
    assert second == [*first, answer, {"role": "user", "content": "what is a stack?"}]
    # what was streamed is what went into the history
    first_alone = run_json([*tiny_args, "--system", "be brief"], prompt="hello")
    assert answer["content"] == first_alone["text"]
    assert result.stdout.startswith(first_alone["text"] + "\n")


def test_chat_stops_at_exit_and_reset_forgets(tiny_args, chat_requests):
    lines = "hello\n/help\n/reset\nhello\n/exit\nnever answered\n"
    result = runner.invoke(app, ["chat", *tiny_args], input=lines)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "conversation reset" in result.stderr
    assert "/help shows this" in result.stderr  # /help is answered, never sent to the model
    assert [messages for messages, _ in chat_requests] == [[{"role": "user", "content": "hello"}]] * 2


def test_chat_quits_at_end_of_input(tiny_args):
    result = runner.invoke(app, ["chat", *tiny_args], input="")
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == ""


def test_chat_keeps_going_after_a_message_that_overflows_the_context(tiny_args, tiny_context):
    too_long = "print(1) " * tiny_context
    result = runner.invoke(app, ["chat", *tiny_args], input=f"{too_long}\nhello\n")
    assert result.exit_code == 0, (result.output, result.exception)
    assert sum("error:" in line for line in result.stderr.splitlines()) == 1
    assert sum("tokens/s" in line for line in result.stderr.splitlines()) == 1  # "hello" was answered


# --------------------------------------------------------------------------------------------- demo


def test_demo_compares_transformers_generate_and_restspec_on_every_built_in_prompt(tiny_args):
    result = runner.invoke(app, ["demo", *tiny_args, "--show-text"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, (result.output, result.exception)
    out = result.stdout
    for header in ("transformers' greedy generate vs restspec", "generate", "tok/s", "speedup", "per step"):
        assert header in out
    for prompt in DEMO_PROMPTS:
        assert prompt.label in out
    n = len(DEMO_PROMPTS)
    assert f"{n}/{n} outputs identical to transformers' greedy generate" in out
    assert {p.chat for p in DEMO_PROMPTS} == {True, False}  # a mix of code completion and chat


def test_demo_builds_the_default_datastore_on_first_use(tiny_model_dir, tiny_datastore_dir, monkeypatch):
    """Without --datastore the demo asks for the default datastore (built once, then reused)."""
    import restspec.datastore as datastore_module

    calls = []

    def fake_default(tokenizer, progress=True):
        calls.append(progress)
        return tiny_datastore_dir

    monkeypatch.setattr(datastore_module, "ensure_default_datastore", fake_default)
    args = ["--model", str(tiny_model_dir), "--dtype", "float64", "--max-new-tokens", "4", "--budget", "2"]
    result = runner.invoke(app, ["demo", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert calls == [True]


# ------------------------------------------------------------------------------ the embedded model


@pytest.mark.slow
def test_generate_on_the_embedded_model(tmp_path):
    """The real default model, drafting from a small datastore built with its own tokenizer."""
    from restspec.datastore import Datastore
    from restspec.models import load_tokenizer

    texts = [Path(textwrap.__file__).read_text()] + [
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    ] * 3
    store = tmp_path / "ds"
    Datastore.build_from_texts(texts, store, load_tokenizer("smollm2"), progress=False)
    result = runner.invoke(
        app,
        ["generate", "--json", "--max-new-tokens", "8", "--datastore", str(store), "--budget", "4"],
        input="def fibonacci(n):\n",
    )
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.stdout)
    assert doc["model"].startswith("smollm2")
    assert 1 <= len(doc["output_ids"]) <= 8
    assert doc["text"].strip()
