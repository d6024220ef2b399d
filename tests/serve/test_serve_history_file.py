"""The drafting memory survives a restart (--history-file), and a flush killed at any point leaves the
previous file intact."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from serve_helpers import HistoryOnlyDrafter, make_app
from test_serve_tenancy import KEY_A, KEY_B, QUESTION, STATS, ask

from restspec.serve import AccessConfig
from restspec.serve.persist import HistoryFileError, load_states, save_states

SMALL = {"anonymous": {"history": np.arange(5, dtype=np.int32)}, "t1": {"n": 3, "x": 0.5, "nested": {}}}
KILL_TIMEOUT_S = 60


def serve_once(tiny_model, history_file, *requests, max_batch: int = 1):
    """A fresh server (new drafter) over ``history_file``; runs ``requests(client)`` and shuts down."""
    from fastapi.testclient import TestClient

    from restspec.decode import SpeculativeGenerator

    model, tokenizer = tiny_model
    drafter = HistoryOnlyDrafter()
    generator = SpeculativeGenerator(model, tokenizer, drafter=drafter, budget=4, max_batch=max_batch)
    app = make_app(generator, access=AccessConfig(api_keys=(KEY_A, KEY_B)), history_file=history_file)
    with TestClient(app) as client:
        return [request(client) for request in requests]


@pytest.mark.parametrize("max_batch", [1, 3])  # one drafter swapped between tenants, or one each
def test_a_restart_keeps_each_tenants_memory_and_only_theirs(tiny_model, tmp_path, max_batch):
    history_file = tmp_path / "history.npz"
    serve_once(tiny_model, history_file, lambda client: ask(client, KEY_A), max_batch=max_batch)
    assert history_file.exists()  # saved at shutdown
    mine, theirs = serve_once(
        tiny_model,
        history_file,
        lambda client: ask(client, KEY_A, **STATS)["restspec"],
        lambda client: ask(client, KEY_B, **STATS)["restspec"],
        max_batch=max_batch,
    )
    assert mine["accepted_draft_tokens"] > 0
    assert theirs["accepted_draft_tokens"] == 0
    assert theirs["steps"] == QUESTION["max_tokens"]


def test_states_round_trip_with_their_numbers_nesting_and_order(tmp_path):
    path = tmp_path / "h.npz"
    save_states(path, SMALL)
    loaded = load_states(path)
    assert list(loaded) == ["anonymous", "t1"]
    assert loaded["anonymous"]["history"].tolist() == [0, 1, 2, 3, 4]
    assert loaded["t1"] == {"n": 3, "x": 0.5, "nested": {}}
    assert type(loaded["t1"]["n"]) is int


def test_a_flush_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "h.npz"
    save_states(path, SMALL)

    def failing_fsync(fd: int) -> None:  # the new file's bytes are written, the disk then fails
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("os.fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        save_states(path, {"t": {"history": np.ones(1000, np.int32)}})
    monkeypatch.undo()
    assert load_states(path)["anonymous"]["history"].tolist() == [0, 1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["h.npz"]  # the partial temporary file is gone
    with pytest.raises(TypeError, match="object"):
        save_states(path, {"t": {"bad": np.array([object()], dtype=object)}})  # never pickled


def test_a_flush_killed_before_it_finished_leaves_the_previous_file(tmp_path):
    """SIGKILL while the new file is written (the disk is held on fsync): the old file still loads."""
    path = tmp_path / "h.npz"
    save_states(path, SMALL)
    child = textwrap.dedent(
        f"""
        import os, sys, time
        import numpy as np
        from restspec.serve.persist import save_states

        def stuck_fsync(fd):
            print("written", flush=True)
            time.sleep({KILL_TIMEOUT_S})

        os.fsync = stuck_fsync
        big = {{"t": {{"history": np.ones(10**6, np.int32)}}}}
        save_states(__import__("pathlib").Path({str(path)!r}), big)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "written"
    finally:
        process.kill()
        process.wait(KILL_TIMEOUT_S)
    assert load_states(path)["anonymous"]["history"].tolist() == [0, 1, 2, 3, 4]


def test_a_history_file_that_is_torn_or_does_not_fit_is_a_clear_error_at_startup(tiny_model, tmp_path):
    torn = tmp_path / "torn.npz"
    save_states(torn, SMALL)
    torn.write_bytes(torn.read_bytes()[:100])
    with pytest.raises(HistoryFileError, match="cannot be read"):
        serve_once(tiny_model, torn)
    other = tmp_path / "other.npz"
    save_states(other, {"t1": {"table": np.zeros(3)}})  # saved by another drafter
    with pytest.raises(HistoryFileError, match="does not fit this drafter"):
        serve_once(tiny_model, other)
