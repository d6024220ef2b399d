"""The shared flags: validation that names the flag, help text for every flag, one-line user errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from restspec.cli import app
from restspec.cli.common import EngineOptions, cli_errors, parse_budget
from restspec.errors import GenerationError, ModelError

SHARED_FLAGS = (
    "--model",
    "--datastore",
    "--max-new-tokens",
    "--temperature",
    "--top-p",
    "--top-k",
    "--seed",
    "--budget",
    "--dtype",
    "--warm-start",
    "--backend",
)
# The demo compares greedy outputs token for token, so it has no sampling flags.
DEMO_FLAGS = ("--model", "--datastore", "--max-new-tokens", "--budget", "--dtype", "--warm-start")
WIDE_TERMINAL = {"COLUMNS": "200", "NO_COLOR": "1"}

runner = CliRunner()


# ----------------------------------------------------------------------------------- EngineOptions


def test_defaults_are_greedy_with_auto_budget_on_the_embedded_model():
    options = EngineOptions()
    assert options.model == "smollm2"
    assert options.temperature == 0.0
    assert options.fixed_budget is None  # 'auto'
    assert options.datastores == ()
    assert options.dtype == "float32"
    assert options.max_batch == 8  # the engine's default


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("temperature", -0.5, "--temperature=-0.5"),
        ("temperature", math.nan, "--temperature=nan"),
        ("top_p", 0.0, "--top-p=0.0"),
        ("top_p", 1.5, "--top-p=1.5"),
        ("top_k", -1, "--top-k=-1"),
        ("max_new_tokens", 0, "--max-new-tokens=0"),
        ("seed", -3, "--seed=-3"),
        ("budget", "lots", "--budget='lots'"),
        ("budget", "-3", "--budget='-3'"),
        ("max_batch", 0, "--max-batch=0"),
        ("step_factor", 0.5, "--step-factor=0.5"),
        ("step_factor", math.nan, "--step-factor=nan"),
        ("prefix_cache_mb", -1.0, "--prefix-cache-mb=-1.0"),
        ("prefix_cache_mb", math.nan, "--prefix-cache-mb=nan"),
    ],
)
def test_invalid_values_name_the_flag_and_the_value(field, value, flag):
    with pytest.raises(GenerationError) as caught:
        EngineOptions(**{field: value})
    assert flag in str(caught.value)


@pytest.mark.parametrize(("text", "size"), [("auto", None), ("AUTO", None), ("0", 0), ("12", 12), (7, 7)])
def test_parse_budget(text, size):
    assert parse_budget(text) == size


def test_sampling_and_generation_configs_carry_the_flags():
    options = EngineOptions(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=40, seed=3)
    config = options.generation(stop_strings=["\n\n"])
    assert config.max_new_tokens == 9
    assert config.stop_strings == ("\n\n",)
    assert (
        config.sampling.temperature,
        config.sampling.top_p,
        config.sampling.top_k,
        config.sampling.seed,
    ) == (
        0.7,
        0.9,
        40,
        3,
    )


# ------------------------------------------------------------------------------------ cli_errors


def _app_raising(error: BaseException) -> typer.Typer:
    probe = typer.Typer()

    @probe.command()
    @cli_errors
    def boom(name: str = "x") -> None:
        """A command that fails."""
        raise error

    return probe


def test_user_error_is_one_red_line_and_exit_code_2(one_line_error):
    result = runner.invoke(_app_raising(ModelError("model 'x' not found;\n give a folder")), ["--name", "y"])
    one_line_error(result, "model 'x' not found; give a folder")
    assert result.stdout == ""


def test_internal_error_is_not_swallowed():
    bug = ZeroDivisionError("a bug")
    result = runner.invoke(_app_raising(bug), [])
    assert result.exit_code == 1
    assert result.exception is bug


def test_decorated_command_keeps_its_signature_for_typer():
    result = runner.invoke(_app_raising(ModelError("m")), ["--help"], env=WIDE_TERMINAL)
    assert result.exit_code == 0
    assert "--name" in result.stdout


# --------------------------------------------------------------------------------------- --help


@pytest.mark.parametrize(
    ("command", "flags"), [("generate", SHARED_FLAGS), ("chat", SHARED_FLAGS), ("demo", DEMO_FLAGS)]
)
def test_help_explains_every_shared_flag(command, flags):
    result = runner.invoke(app, [command, "--help"], env=WIDE_TERMINAL)
    assert result.exit_code == 0, result.output
    for flag in flags:
        line = next((ln for ln in result.stdout.splitlines() if f"{flag} " in ln), None)
        assert line is not None, f"{command} --help does not mention {flag}"
        after = line.partition(flag)[2]
        assert len(after.split()) >= 3, f"{command} --help has no explanation for {flag}: {line!r}"


def test_top_level_help_lists_the_front_door_commands():
    result = runner.invoke(app, ["--help"], env=WIDE_TERMINAL)
    assert result.exit_code == 0
    for command in ("demo", "generate", "chat"):
        assert command in result.stdout


# ------------------------------------------------------------------- user errors through the CLI
# These fail before any model loads, so they are instant.


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--temperature", "-1"], "--temperature=-1.0"),
        (["--top-p", "0"], "--top-p=0.0"),
        (["--top-p", "1.01"], "--top-p=1.01"),
        (["--top-k", "-2"], "--top-k=-2"),
        (["--budget", "many"], "--budget='many'"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0"),
        (["--seed", "-3"], "--seed=-3"),
        (["--backend", "fastest"], "backend 'fastest' is unknown"),
        (["--backend", "direct-split@1"], "direct-split@N"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_invalid_flag_values_are_one_line_errors(command, args, needle, one_line_error):
    prompt = ["hello"] if command == "generate" else []
    result = runner.invoke(app, [command, *prompt, *args], input="")
    one_line_error(result, needle)


@pytest.mark.parametrize("duration", ["-1", "0"])
def test_a_load_run_without_time_is_refused_before_the_model_loads(duration, one_line_error):
    result = runner.invoke(app, ["load", "--duration", duration])
    one_line_error(result, f"--duration={float(duration)}")


@pytest.mark.parametrize("command", ["generate", "chat", "demo"])
def test_missing_datastore_path_is_a_one_line_error(command, tmp_path: Path, one_line_error):
    missing = tmp_path / "no-such-datastore"
    prompt = ["hello"] if command == "generate" else []
    result = runner.invoke(app, [command, *prompt, "--datastore", str(missing)], input="")
    one_line_error(result, str(missing), "restspec build")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a datastore")
    result = runner.invoke(app, [command, *prompt, "--datastore", str(a_file)], input="")
    one_line_error(result, "is a file", "restspec build")


@pytest.mark.parametrize("model", ["no/such/model-folder", "missing-model.gguf"])
def test_missing_model_path_is_a_one_line_error(model, tiny_datastore_dir: Path, one_line_error):
    result = runner.invoke(
        app, ["generate", "hello", "--model", model, "--datastore", str(tiny_datastore_dir)]
    )
    one_line_error(result, model)


def test_datastore_of_another_tokenizer_is_a_one_line_error(
    tiny_model_dir: Path, tmp_path: Path, one_line_error
):
    from transformers import AutoTokenizer

    from restspec.datastore import Datastore

    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_tokens(["<an extra token>"])  # another vocabulary, so another fingerprint
    store = tmp_path / "other.ds"
    Datastore.build_from_texts(["x = 1\n", "y = 2\n"], store, other, progress=False)
    result = runner.invoke(
        app, ["generate", "x =", "--model", str(tiny_model_dir), "--datastore", str(store), "--budget", "2"]
    )
    one_line_error(result, "tokenizer")
