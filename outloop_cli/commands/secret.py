"""`outloop secret`: put, list, remove and check a workspace's secrets. Never prints a value, not even in JSON.

A value arrives through a hidden, confirmed prompt on a terminal, or as one line on stdin with --stdin.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Annotated

import typer

from outloop_cli.commands.options import CredentialArgument, JsonFlag, ProfilesOption, WorkspaceArgument
from outloop_cli.commands.output import print_json
from outloop_cli.commands.tables import note, print_table
from outloop_cli.errors import EXIT_PROBLEMS_FOUND, UsageError
from outloop_cli.home import profile_dirs
from outloop_cli.profiles import check_workspace_name, load_profile
from outloop_cli.secret_admin import (
    SecretStatus,
    delete_secret,
    keyring_credential,
    keyring_document,
    one_line,
    profile_secrets,
    store_secret,
    storing_keyring,
)
from outloop_cli.secrets import keyring_service, stores_plaintext

app = typer.Typer(help="Store, list, remove and check secrets (keyring service outloop/<workspace>, user "
                       "<credential>); values are never printed.", no_args_is_help=True, rich_markup_mode=None)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="secret")


@app.command("set")
def set_command(
    workspace: WorkspaceArgument,
    credential: CredentialArgument,
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the value from stdin (one line; one trailing "
                                                        "newline is dropped; for an `auth` credential, its whole "
                                                        "TOML or JSON document) instead of prompting.")] = False,
    allow_plaintext: Annotated[bool, typer.Option(
        "--allow-plaintext", help="Store it even when the keyring backend keeps values unencrypted in a file "
                                  "(e.g. keyrings.alt's PlaintextKeyring); refused without this flag.")] = False,
    profiles: ProfilesOption = None,
) -> None:
    """Store CREDENTIAL's secret for WORKSPACE in the keyring; only for `secret = "keyring"` credentials."""
    profile = load_profile(workspace, profile_dirs(profiles))
    cred = keyring_credential(profile, credential)
    if cred.auth is not None and not stdin:
        raise UsageError(f"credential {credential!r} uses auth {cred.auth.scheme}: its secret is a TOML or JSON "
                         f"document; pipe it in, e.g. `outloop secret set {workspace} {credential} --stdin < "
                         "secret.toml`")
    backend = storing_keyring(allow_plaintext=allow_plaintext)
    if cred.auth is not None:
        value = keyring_document(cred, _read_stdin(whole=True))
    else:
        value = _read_stdin() if stdin else _prompt(workspace, credential)
    store_secret(backend, workspace, credential, value)
    sys.stdout.write(f"stored {workspace}/{credential} in the keyring ({type(backend).__name__}, service "
                     f"{keyring_service(workspace)!r})\n")
    if stores_plaintext(backend):
        note(f"warning: {type(backend).__name__} keeps this secret UNENCRYPTED"
             + (f" in {backend.file_path}" if hasattr(backend, "file_path") else ""))


def _read_stdin(*, whole: bool = False) -> str:
    if sys.stdin.isatty():  # typing it there would echo it: the hidden prompt is for terminals
        raise UsageError("--stdin reads a pipe or a file; on a terminal leave out --stdin to get a hidden prompt")
    text = sys.stdin.read()
    return text if whole else one_line(text)


def _prompt(workspace: str, credential: str) -> str:
    if not sys.stdin.isatty():
        # getpass would fall back to reading stdin with echo on; refuse instead.
        raise UsageError("no terminal to prompt on; pipe the value in with --stdin")
    value = getpass.getpass(f"Secret for {workspace}/{credential}: ")
    if getpass.getpass("Again, to confirm: ") != value:
        raise UsageError("the two entries differ; nothing was stored")
    return value


@app.command("list")
def list_command(workspace: WorkspaceArgument, profiles: ProfilesOption = None, as_json: JsonFlag = False) -> None:
    """WORKSPACE's credentials, where each secret lives, and whether it is present (cmd: sources are not run)."""
    _print_statuses(_statuses(workspace, profiles, run_commands=False), as_json)


@app.command("rm")
def rm(workspace: WorkspaceArgument, credential: CredentialArgument) -> None:
    """Delete the keyring entry of CREDENTIAL in WORKSPACE (also for credentials no longer in the profile)."""
    check_workspace_name(workspace)
    delete_secret(workspace, credential)
    sys.stdout.write(f"removed {workspace}/{credential} from the keyring\n")


@app.command("check")
def check(workspace: WorkspaceArgument, profiles: ProfilesOption = None, as_json: JsonFlag = False) -> None:
    """Resolve every secret of WORKSPACE, cmd: sources included, without printing any; exit 1 if one is missing."""
    statuses = _statuses(workspace, profiles, run_commands=True)
    _print_statuses(statuses, as_json)
    missing = [s for s in statuses if s.state != "present"]
    if missing:
        if not as_json:
            for status in missing:
                note(f"{status.credential}: {status.problem}")
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


def _statuses(workspace: str, profiles: ProfilesOption, *, run_commands: bool) -> list[SecretStatus]:
    return profile_secrets(load_profile(workspace, profile_dirs(profiles)), os.environ, run_commands=run_commands)


def _print_statuses(statuses: list[SecretStatus], as_json: bool) -> None:
    if as_json:
        print_json([{"credential": s.credential, "owner": s.owner, "source": s.source, "state": s.state,
                     "problem": s.problem} for s in statuses])
        return
    print_table(("credential", "owner", "source", "state"),
                [[s.credential, s.owner, s.source, s.state] for s in statuses])
