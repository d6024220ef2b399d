"""``restspec serve``: flags, user errors before the model loads, and the app it would serve."""

from __future__ import annotations

import socket

import pytest
from serve_helpers import CORPUS, free_loopback_socket
from typer.testing import CliRunner

import restspec.cli  # noqa: F401  (registers the commands)
from restspec.cli.app import app
from restspec.cli.common import USER_ERROR_EXIT_CODE
from restspec.cli.serve import ServeError, bind_socket, is_loopback, read_api_keys

runner = CliRunner()


def test_help_lists_the_server_and_the_shared_flags():
    result = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for flag in (
        "--host",
        "--port",
        "--served-model-name",
        "--model",
        "--datastore",
        "--budget",
        "--max-new-tokens",
        "--warm-start",
        "--api-key",
        "--api-key-file",
        "--cors-origin",
        "--shared-history",
        "--no-history",
        "--max-queued",
        "--request-timeout",
        "--max-tokens-limit",
        "--max-body-bytes",
        "--max-prompt-tokens",
        "--shutdown-grace",
        "--history-file",
        "--max-batch",
    ):
        assert flag in result.output


def test_a_taken_port_is_a_one_line_error_before_the_model_loads():
    taken = free_loopback_socket()
    taken.listen()
    port = taken.getsockname()[1]
    try:
        # the model does not exist either: the port is checked first, so that is the error reported
        result = runner.invoke(app, ["serve", "--port", str(port), "--model", "/no/such/model"])
    finally:
        taken.close()
    assert result.exit_code == USER_ERROR_EXIT_CODE, result.output
    assert f"127.0.0.1:{port}" in result.output
    assert "--port" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--port", "70000"], "--port=70000"),
        (["--port", "-1"], "--port=-1"),
        (["--log-level", "loud"], "--log-level='loud'"),
        (["--temperature", "-1"], "--temperature=-1"),
        (["--budget", "many"], "--budget='many'"),
        (["--host", "no.such.host.invalid"], "--host='no.such.host.invalid'"),
        (["--api-key", "short"], "--api-key: an API key of 5 characters"),
        (["--api-key-file", "/no/such/keys"], "--api-key-file='/no/such/keys' cannot be read"),
        (["--shared-history", "--no-history"], "--shared-history and --no-history"),
        (["--no-history", "--history-file", "/tmp/h.npz"], "--history-file with --no-history"),
        (["--max-queued", "0"], "--max-queued: max_queued=0"),
        (["--max-body-bytes", "0"], "--max-body-bytes: max_body_bytes=0"),
        (["--max-prompt-tokens", "0"], "--max-prompt-tokens: max_prompt_tokens=0"),
        (["--request-timeout", "-1"], "--request-timeout=-1"),
        (["--max-batch", "0"], "--max-batch=0 must be >= 1"),
        (["--shutdown-grace", "-1"], "--shutdown-grace=-1"),
        (["--max-new-tokens", "300", "--max-tokens-limit", "200"], "--max-new-tokens=300 is above"),
    ],
)
def test_bad_flag_values_are_user_errors(args, fragment):
    result = runner.invoke(app, ["serve", "--model", "/no/such/model", *args])
    assert result.exit_code == USER_ERROR_EXIT_CODE, result.output
    assert fragment in " ".join(result.output.split())


def test_bind_socket_listens_on_a_free_port_when_asked_for_port_0():
    sock = bind_socket("127.0.0.1", 0)
    try:
        host, port = sock.getsockname()[:2]
        assert host == "127.0.0.1" and port > 0
    finally:
        sock.close()
    with pytest.raises(ServeError, match="--port=65536"):
        bind_socket("127.0.0.1", 65536)


@pytest.mark.parametrize(
    ("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False)]
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_serve_builds_the_app_from_the_shared_flags(model_folder, tmp_path, monkeypatch):
    """The whole command with a tiny model and datastore; uvicorn's run is replaced by requests
    through a test client against the app it was handed, on the socket the command bound."""
    import uvicorn
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from restspec.datastore import Datastore

    datastore = tmp_path / "tiny.ds"
    Datastore.build_from_texts(CORPUS, datastore, AutoTokenizer.from_pretrained(model_folder), progress=False)
    seen = {}

    def fake_run(server: uvicorn.Server, sockets: list[socket.socket]) -> None:
        seen["address"] = sockets[0].getsockname()[:2]
        seen["max_running"] = server.config.app.state.worker.max_running
        with TestClient(server.config.app) as client:
            seen["models"] = client.get("/v1/models").json()
            seen["answer"] = client.post(
                "/v1/completions", json={"prompt": "def add(a, b):", "restspec_stats": True}
            ).json()
            seen["sampled"] = client.post(
                "/v1/completions", json={"prompt": "def add(a, b):", "temperature": 0.0, "max_tokens": 2}
            ).json()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    max_new_tokens = 5
    result = runner.invoke(
        app,
        [
            "serve",
            "--port",
            "0",
            "--model",
            str(model_folder),
            "--datastore",
            str(datastore),
            "--budget",
            "3",
            "--max-new-tokens",
            str(max_new_tokens),
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--served-model-name",
            "my-model",
            "--max-batch",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    host, port = seen["address"]
    assert host == "127.0.0.1" and port > 0
    assert f"http://127.0.0.1:{port}/v1" in " ".join(result.output.split())
    assert [m["id"] for m in seen["models"]["data"]] == ["my-model"]
    assert seen["max_running"] == 2  # --max-batch: the engine's batch, and the requests run at once
    answer = seen["answer"]
    assert answer["model"] == "my-model"
    assert answer["usage"]["completion_tokens"] == max_new_tokens  # --max-new-tokens is the default
    assert answer["restspec"]["steps"] >= 1
    assert seen["sampled"]["usage"]["completion_tokens"] == 2


def test_api_keys_come_from_flags_and_a_file_of_one_key_per_line(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# the team's keys\n\nfirst-key-0123456789\n  second-key-0123456789  \n")
    assert read_api_keys(["flag-key-0123456789"], key_file) == (
        "flag-key-0123456789",
        "first-key-0123456789",
        "second-key-0123456789",
    )
    key_file.write_text("# nothing but a comment\n")
    with pytest.raises(ServeError, match="holds no key"):
        read_api_keys(None, key_file)
