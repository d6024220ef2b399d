"""The typer application every command module registers on."""

import typer

app = typer.Typer(
    name="restspec",
    help="Retrieval-based speculative decoding: the same output as plain decoding, sooner.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
