"""Option and argument types shared by the operator commands, so one flag reads the same everywhere.

The completion generator recognises parameters by these names (workspace, credential, run_id) to complete them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from outloop_cli.units import parse_duration


def duration(text: str) -> float:
    """`parse_duration` as a Typer parser; its message (the accepted forms) becomes the usage error's."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
ProfilesOption = Annotated[
    Path | None,
    typer.Option("--profiles", help="Directory of profiles (default: OUTLOOP_PROFILES, else $OUTLOOP_HOME/profiles).",
                 show_default=False),
]
WorkspaceArgument = Annotated[str, typer.Argument(help="Workspace name (its profile is <name>.toml).",
                                                  show_default=False, metavar="WORKSPACE")]
CredentialArgument = Annotated[str, typer.Argument(help="Credential name, as in [credentials.<name>].",
                                                   show_default=False, metavar="CREDENTIAL")]
WorkspaceFilter = Annotated[str | None, typer.Option("--workspace", "-w", help="Only this workspace.",
                                                     show_default=False)]
