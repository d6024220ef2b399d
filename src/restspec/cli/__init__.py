"""``restspec`` command line. Each module below registers its commands on :data:`app`."""

from restspec.cli import bench, datastore, generate, load, serve  # noqa: F401  (registers commands)
from restspec.cli.app import app


def main() -> None:
    app()
