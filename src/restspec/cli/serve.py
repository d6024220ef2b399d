"""``restspec serve``: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import ipaddress
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from restspec.cli.app import app
from restspec.cli.common import (
    AUTO_BACKEND,
    AUTO_BUDGET,
    AUTO_DEVICE,
    EMBEDDED_MODEL,
    BackendOption,
    BudgetOption,
    DatastoreOption,
    DeviceOption,
    Dtype,
    DtypeOption,
    EngineOptions,
    MaxBatchOption,
    MaxNewTokensOption,
    ModelOption,
    PrefixCacheOption,
    SeedOption,
    StepFactorOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
    WarmStartOption,
    cli_errors,
    load_engine,
    stderr_console,
)
from restspec.engine import DEFAULT_MAX_BATCH
from restspec.errors import RestspecError

if TYPE_CHECKING:
    from restspec.serve import AccessConfig, HistoryMode, ServerLimits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS = 256
"""``max_tokens`` of a request that leaves it out (``--max-new-tokens`` changes it)."""
MAX_PORT = 65535
DEFAULT_SHUTDOWN_GRACE_S = 15.0
"""On SIGTERM or Ctrl-C, how long running requests may finish before the server ends them."""
SHUTDOWN_MARGIN_S = 3.0
"""After the grace period, time for the ended requests' error events to reach their clients."""
SERVER_PANEL = "Server"
LIMITS_PANEL = "Limits"
SECURITY_PANEL = "Access and tenancy"
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


def read_api_keys(keys: list[str] | None, key_file: Path | None) -> tuple[str, ...]:
    """``--api-key`` values and the lines of ``--api-key-file`` (blank lines and ``#`` comments skipped)."""
    found = list(keys or ())
    if key_file is not None:
        try:
            lines = key_file.read_text().splitlines()
        except OSError as error:
            raise ServeError(
                f"--api-key-file={str(key_file)!r} cannot be read: {error.strerror or error}"
            ) from None
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ServeError(f"--api-key-file={str(key_file)!r} holds no key (one key per line)")
    return tuple(found)


def history_mode(shared_history: bool, no_history: bool) -> HistoryMode:
    from restspec.serve import HistoryMode

    if shared_history and no_history:
        raise ServeError("--shared-history and --no-history contradict each other; give one of them")
    if shared_history:
        return HistoryMode.shared
    return HistoryMode.off if no_history else HistoryMode.tenant


def server_settings(
    api_keys: tuple[str, ...], cors_origins: list[str] | None, **limits: Any
) -> tuple[AccessConfig, ServerLimits]:
    """The flags as the server's configs; an invalid value is a :class:`ServeError` naming the flag."""
    from restspec.serve import AccessConfig, ServerLimits

    try:
        access = AccessConfig(api_keys=api_keys, cors_origins=tuple(cors_origins or ()))
    except ValueError as error:
        raise ServeError(f"--api-key: {error}") from None
    try:
        return access, ServerLimits(**limits)
    except ValueError as error:
        flag = str(error).split("=", 1)[0]
        raise ServeError(f"--{FLAG_OF_LIMIT.get(flag, flag)}: {error}") from None


FLAG_OF_LIMIT = {
    "max_queued": "max-queued",
    "request_timeout_s": "request-timeout",
    "max_tokens_limit": "max-tokens-limit",
    "max_body_bytes": "max-body-bytes",
    "max_prompt_tokens": "max-prompt-tokens",
    "tenants": "max-tenants",
}
"""The flag of each :class:`~restspec.serve.ServerLimits` field set from the command line."""


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
            help="Address to listen on. Keep the default loopback address unless clients must reach it "
            "from elsewhere; then set --api-key (or put a proxy that checks who calls in front).",
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
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="RESTSPEC_API_KEY",
            rich_help_panel=SECURITY_PANEL,
            help="Require 'Authorization: Bearer <key>' on every route but /health and /ready (repeat for "
            "several keys; each key is a tenant). Prefer --api-key-file: a flag shows in the process list.",
            show_default=False,
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            rich_help_panel=SECURITY_PANEL,
            help="A file of API keys, one per line (blank lines and # comments skipped).",
            show_default=False,
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            rich_help_panel=SECURITY_PANEL,
            help="A browser origin allowed to call the API, e.g. https://app.example.com "
            "(repeatable; * = any).",
            show_default=False,
        ),
    ] = None,
    shared_history: Annotated[
        bool,
        typer.Option(
            "--shared-history",
            rich_help_panel=SECURITY_PANEL,
            help="Let every client's past outputs draft for every other client (faster for one trusted "
            "user; leaks what others were answered through speed and figures). Default: per tenant.",
        ),
    ] = False,
    no_history: Annotated[
        bool,
        typer.Option(
            "--no-history",
            rich_help_panel=SECURITY_PANEL,
            help="Learn nothing across requests: each starts from the drafter's state at startup.",
        ),
    ] = False,
    history_file: Annotated[
        Path | None,
        typer.Option(
            "--history-file",
            rich_help_panel=SECURITY_PANEL,
            help="Save the drafting memory here (every 5 minutes and at shutdown, atomically) and continue "
            "from it at the next start. It holds past outputs: keep it as private as the logs.",
            show_default=False,
        ),
    ] = None,
    max_tenants: Annotated[
        int,
        typer.Option(
            "--max-tenants",
            rich_help_panel=SECURITY_PANEL,
            help="Tenants whose drafting memory is kept (the least recently served are forgotten first).",
        ),
    ] = 64,
    max_queued: Annotated[
        int,
        typer.Option(
            "--max-queued",
            rich_help_panel=LIMITS_PANEL,
            help="Requests that may wait for the model; more get 503 with Retry-After.",
        ),
    ] = 64,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            rich_help_panel=LIMITS_PANEL,
            help="Seconds a request may take, queue wait included, before it is ended (0 = no limit).",
        ),
    ] = 600.0,
    max_tokens_limit: Annotated[
        int,
        typer.Option(
            "--max-tokens-limit",
            rich_help_panel=LIMITS_PANEL,
            help="Largest max_tokens a request may ask for.",
        ),
    ] = 4096,
    max_body_bytes: Annotated[
        int,
        typer.Option(
            "--max-body-bytes", rich_help_panel=LIMITS_PANEL, help="Largest request body; larger get 413."
        ),
    ] = 1 << 20,
    max_prompt_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-prompt-tokens",
            rich_help_panel=LIMITS_PANEL,
            help="Longest prompt in tokens, checked before queueing (default: the model's context).",
            show_default=False,
        ),
    ] = None,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            "--shutdown-grace",
            rich_help_panel=LIMITS_PANEL,
            help="On SIGTERM or Ctrl-C, seconds running requests may finish before they are ended "
            "(queued ones get 503 at once; a second signal exits at once).",
        ),
    ] = DEFAULT_SHUTDOWN_GRACE_S,
    model: ModelOption = EMBEDDED_MODEL,
    datastore: DatastoreOption = None,
    max_new_tokens: MaxNewTokensOption = DEFAULT_MAX_TOKENS,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = None,
    budget: BudgetOption = AUTO_BUDGET,
    warm_start: WarmStartOption = True,
    max_batch: MaxBatchOption = DEFAULT_MAX_BATCH,
    step_factor: StepFactorOption = None,
    prefix_cache_mb: PrefixCacheOption = None,
    dtype: DtypeOption = Dtype.float32,
    device: DeviceOption = AUTO_DEVICE,
    backend: BackendOption = AUTO_BACKEND,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions,
    /v1/models, /metrics, /health, /ready.

    One model per process; up to --max-batch requests generate at once, sharing each step's forward
    pass, and the others wait in arrival order. --max-new-tokens,
    --temperature, --top-p, --top-k and --seed are the defaults for requests that leave those fields out.
    """
    if log_level.lower() not in LOG_LEVELS:
        raise ServeError(f"--log-level={log_level!r} must be one of {', '.join(LOG_LEVELS)}")
    if not shutdown_grace >= 0:
        raise ServeError(f"--shutdown-grace={shutdown_grace} must be >= 0 seconds")
    if request_timeout < 0:
        raise ServeError(f"--request-timeout={request_timeout} must be >= 0 seconds (0 = no limit)")
    history = history_mode(shared_history, no_history)
    if history_file is not None and no_history:
        raise ServeError("--history-file with --no-history would save nothing; leave out one of them")
    access, limits = server_settings(
        read_api_keys(api_key, api_key_file),
        cors_origin,
        max_queued=max_queued,
        request_timeout_s=request_timeout or None,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        max_prompt_tokens=max_prompt_tokens,
        tenants=max_tenants,
    )
    if max_new_tokens > max_tokens_limit:
        raise ServeError(
            f"--max-new-tokens={max_new_tokens} is above --max-tokens-limit={max_tokens_limit}; "
            "lower the one or raise the other"
        )
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
        max_batch=max_batch,
        step_factor=step_factor,
        prefix_cache_mb=prefix_cache_mb,
        dtype=dtype.value,
        device=device,
        backend=backend,
    )
    import uvicorn

    from restspec.serve import app_for_engine

    sock = bind_socket(host, port)
    try:
        err = stderr_console()
        if not is_loopback(host) and not access.api_keys:
            err.print(
                f"[yellow]warning:[/] listening on {host}, not a loopback address, without --api-key: "
                "anyone who can reach this port can use the model"
            )
        engine = load_engine(options)
        server_app = app_for_engine(
            engine,
            options.generation(),
            model_name=served_model_name,
            aliases=(options.model,),
            limits=limits,
            access=access,
            history=history,
            history_file=history_file,
        )
        bound_host, bound_port = sock.getsockname()[:2]
        bound_host = f"[{bound_host}]" if ":" in bound_host else bound_host  # IPv6 in a URL
        config = server_app.state.config
        err.print(
            f"[bold]restspec serve[/]: model [cyan]{config.model_id}[/] "
            f"on http://{bound_host}:{bound_port}/v1 (budget {options.budget}; max batch {engine.max_batch}; "
            f"history {history.value}; "
            f"{'API key required' if access.api_keys else 'no API key'}; Ctrl-C stops)"
        )
        uvicorn_config = uvicorn.Config(
            server_app,
            log_level=log_level.lower(),
            timeout_graceful_shutdown=shutdown_grace + SHUTDOWN_MARGIN_S,
        )
        server = _draining_server_class()(uvicorn_config, server_app.state.lifecycle, shutdown_grace)
        # uvicorn drains on Ctrl-C / SIGTERM, then raises the signal again. Under asyncio's own Ctrl-C
        # handler that second SIGINT cancelled the app mid-shutdown and logged a traceback; with the
        # default handler Ctrl-C ends the drained server as SIGTERM does, quietly (status 130 in a shell)
        previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        sock.close()


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server that, on SIGTERM or Ctrl-C, also tells the app to stop admitting, refuse
        the queued requests and end the running ones after ``grace_s`` (with an error event and [DONE])."""

        def __init__(self, config: uvicorn.Config, lifecycle: Any, grace_s: float) -> None:
            super().__init__(config)
            self.lifecycle = lifecycle
            self.grace_s = grace_s

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.lifecycle.begin_shutdown(self.grace_s)
            super().handle_exit(sig, frame)

    return DrainingServer
