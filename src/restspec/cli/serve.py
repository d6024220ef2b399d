"""``restspec serve``: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated

import typer

from restspec.cli.app import app
from restspec.cli.common import (
    AUTO_BUDGET,
    EMBEDDED_MODEL,
    BudgetOption,
    DatastoreOption,
    Dtype,
    DtypeOption,
    EngineOptions,
    MaxNewTokensOption,
    ModelOption,
    SeedOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
    WarmStartOption,
    cli_errors,
    load_engine,
    stderr_console,
)
from restspec.errors import RestspecError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS = 256
"""``max_tokens`` of a request that leaves it out (``--max-new-tokens`` changes it)."""
MAX_PORT = 65535
GRACEFUL_SHUTDOWN_S = 5
"""On Ctrl-C, how long open requests may finish before they are cut (their generation then stops)."""
SERVER_PANEL = "Server"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class ServeError(RestspecError):
    """The server cannot start as asked (port taken, bad address)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket before the model loads, so a taken port fails in a second, not after 20."""
    if not 0 <= port <= MAX_PORT:
        raise ServeError(f"--port={port} must be in 0..{MAX_PORT} (0 = any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ServeError(f"--host={host!r} is not an address this machine can listen on: {error}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port}: {error.strerror or error}; pick another --port "
            "(or stop the program using it)"
        ) from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
@cli_errors
def serve(
    host: Annotated[
        str,
        typer.Option(
            "--host",
            rich_help_panel=SERVER_PANEL,
            help="Address to listen on. The server has no authentication: keep the default loopback "
            "address unless a proxy in front of it checks who calls.",
        ),
    ] = DEFAULT_HOST,
    port: Annotated[
        int,
        typer.Option(
            "--port", "-p", rich_help_panel=SERVER_PANEL, help="Port to listen on (0 = any free port)."
        ),
    ] = DEFAULT_PORT,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            "--served-model-name",
            rich_help_panel=SERVER_PANEL,
            help="The model id clients send and GET /v1/models lists (default: the loaded model's name).",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level", rich_help_panel=SERVER_PANEL, help=f"uvicorn's log level: {', '.join(LOG_LEVELS)}."
        ),
    ] = "info",
    model: ModelOption = EMBEDDED_MODEL,
    datastore: DatastoreOption = None,
    max_new_tokens: MaxNewTokensOption = DEFAULT_MAX_TOKENS,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = None,
    budget: BudgetOption = AUTO_BUDGET,
    warm_start: WarmStartOption = True,
    dtype: DtypeOption = Dtype.float32,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions,
    /v1/models, /health.

    One model per process; requests are answered one at a time, in arrival order. --max-new-tokens,
    --temperature, --top-p, --top-k and --seed are the defaults for requests that leave those fields out.
    """
    if log_level.lower() not in LOG_LEVELS:
        raise ServeError(f"--log-level={log_level!r} must be one of {', '.join(LOG_LEVELS)}")
    options = EngineOptions(
        model=model,
        datastores=tuple(datastore or ()),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        budget=budget,
        warm_start=warm_start,
        dtype=dtype.value,
    )
    import uvicorn

    from restspec.serve import app_for_engine

    sock = bind_socket(host, port)
    try:
        err = stderr_console()
        if not is_loopback(host):
            err.print(
                f"[yellow]warning:[/] listening on {host}, not a loopback address: anyone who can reach "
                "this port can use the model (the server has no authentication)"
            )
        engine = load_engine(options)
        server_app = app_for_engine(
            engine, options.generation(), model_name=served_model_name, aliases=(options.model,)
        )
        bound_host, bound_port = sock.getsockname()[:2]
        bound_host = f"[{bound_host}]" if ":" in bound_host else bound_host  # IPv6 in a URL
        config = server_app.state.config
        err.print(
            f"[bold]restspec serve[/]: model [cyan]{config.model_id}[/] "
            f"on http://{bound_host}:{bound_port}/v1 (budget {options.budget}; Ctrl-C stops)"
        )
        server = uvicorn.Server(
            uvicorn.Config(
                server_app, log_level=log_level.lower(), timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
            )
        )
        server.run(sockets=[sock])
    finally:
        sock.close()
