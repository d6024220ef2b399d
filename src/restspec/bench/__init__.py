"""``restspec bench``: decoding methods measured side by side on one workload (workloads, methods,
runner, report). :func:`main` runs the same command with more methods, for research harnesses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from restspec.bench.methods import MethodBuilder


def main(argv: Sequence[str], *, extra_methods: Mapping[str, MethodBuilder], prog_name: str) -> None:
    """Run ``restspec bench`` with ``argv`` (its options) where ``--methods`` also accepts
    ``extra_methods`` (name -> builder). Exits like the command does (``SystemExit``)."""
    from typer.main import get_command

    from restspec.bench.methods import extra_methods as registered
    from restspec.cli import app

    with registered(extra_methods):
        get_command(app).commands["bench"].main(list(argv), prog_name=prog_name)
