"""What the CLI tests share besides the suite-wide fixtures of tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest


def assert_one_line_user_error(result, *needles: str) -> None:
    """Exit code 2, no traceback, exactly one line on stderr (``error: ...``) containing each needle,
    besides the lines of phases that ran before it (``restspec: ...``, when stderr is not a terminal)."""
    from restspec.cli.common import USER_ERROR_EXIT_CODE

    assert result.exit_code == USER_ERROR_EXIT_CODE, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [
        line for line in result.stderr.splitlines() if line.strip() and not line.startswith("restspec: ")
    ]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:"), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="session")
def one_line_error():
    """The assertion that a CLI run ended on a user error reported as one line."""
    return assert_one_line_user_error


@pytest.fixture(autouse=True)
def _one_torch_thread_for_tiny_models(request: pytest.FixtureRequest):
    """Tiny models spend their time in per-operation overhead; on a busy machine two threads spinning
    against each other make them many times slower. The embedded model (slow tests) keeps the default."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline_and_private_cache(monkeypatch: pytest.MonkeyPatch, _session_cache: Path) -> None:
    """No hub access; caches (default datastore, latency calibration) go to one temporary folder per
    test session, not ~/.cache: `--budget auto` calibrates the tiny model once, not in every test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RESTSPEC_CACHE", str(_session_cache))
