"""`outloop __complete KIND [WORKSPACE]`: the hidden callback the shell completion scripts use for names.

It prints nothing rather than an error: a broken profile must not spill messages into the user's prompt.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from typing import Annotated

import typer

from outloop_cli.errors import OutloopError


def register(root: typer.Typer) -> None:
    root.command("__complete", hidden=True)(complete)


def complete(
    kind: Annotated[str, typer.Argument(help="workspaces | credentials | runs | selections")],
    args: Annotated[list[str] | None, typer.Argument(help="For credentials: the workspace.")] = None,
) -> None:
    """Print completion candidates, one per line."""
    from outloop_cli.completion_values import completion_values  # only this hidden command needs the audit DB

    try:
        names = completion_values(kind, args or [], os.environ)
    except (OutloopError, OSError, sqlite3.Error):
        names = []
    sys.stdout.write("".join(f"{name}\n" for name in names))
