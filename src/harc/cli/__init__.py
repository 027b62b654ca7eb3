"""The `harc` program: thin commands over the library; every user error is one line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

# Importing the command modules registers their commands on the app.
from harc.cli import compare, data, directions, evaluate, export, judges, serve, train  # noqa: F401
from harc.cli.common import app, console
from harc.errors import HarcError


def main(argv: Sequence[str] | None = None) -> None:
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except HarcError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
