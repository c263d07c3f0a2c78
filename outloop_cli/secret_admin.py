"""Keep the keyring entries behind `secret = "keyring"` credentials, and tell whether each secret is in place.

Nothing here returns, logs or raises a value: presence checks resolve a secret and wipe it at once, and every
message names only the workspace, the credential and where the secret lives.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from keyring.backend import KeyringBackend

from outloop_cli.auth.documents import compact_document, document_kind, resolve_credential_secret
from outloop_cli.errors import EXIT_PROBLEMS_FOUND, InsecureSecretError, OutloopError, SecretError, UsageError
from outloop_cli.profiles import Credential, Profile
from outloop_cli.secrets import (
    MAX_SECRET_BYTES,
    backend_name,
    keyring_service,
    source_kind,
    stores_plaintext,
    usable_keyring,
)

SecretState = Literal["present", "missing", "insecure mode", "not checked"]


@dataclass(frozen=True)
class SecretStatus:
    """Whether one credential's secret can be resolved; `problem` says why not (never the value)."""

    credential: str
    owner: str
    source: str
    state: SecretState
    problem: str | None = None


def describe_source(secret_ref: str) -> str:
    """Where the secret lives, safe to print: a `cmd:` shows its program only, its arguments could hold a token."""
    kind, argument = source_kind(secret_ref)
    if kind == "keyring":
        return "keyring"
    if kind == "cmd":
        try:
            program = shlex.split(argument)[0]
        except (ValueError, IndexError):
            program = "?"
        return f"cmd:{program} ..."
    return f"{kind}:{argument}"


def secret_status(credential: Credential, environ: Mapping[str, str], *, run_commands: bool) -> SecretStatus:
    """Resolve the secret and drop it at once; a `cmd:` source runs only when `run_commands` (it may be slow)."""
    source = describe_source(credential.secret_ref)
    if source_kind(credential.secret_ref)[0] == "cmd" and not run_commands:
        return SecretStatus(credential.name, credential.owner, source, "not checked",
                            "cmd: sources run only in `outloop workspace check` and `outloop secret check`")
    try:
        resolve_credential_secret(credential, environ).wipe()
    except InsecureSecretError as exc:
        return SecretStatus(credential.name, credential.owner, source, "insecure mode", exc.message)
    except SecretError as exc:
        return SecretStatus(credential.name, credential.owner, source, "missing", exc.message)
    return SecretStatus(credential.name, credential.owner, source, "present")


def profile_secrets(profile: Profile, environ: Mapping[str, str], *, run_commands: bool) -> list[SecretStatus]:
    return [secret_status(cred, environ, run_commands=run_commands)
            for _, cred in sorted(profile.credentials.items())]


def keyring_credential(profile: Profile, name: str) -> Credential:
    """The credential `outloop secret set` may write: defined by this very profile and kept in the keyring.

    Refusing the others avoids a secret nobody reads: an inherited credential is read from its owner's
    entry, and an env:/file:/cmd: credential never looks in the keyring at all.
    """
    cred = profile.credentials.get(name)
    if cred is None:
        known = ", ".join(sorted(profile.credentials)) or "none"
        raise UsageError(f"workspace {profile.workspace!r} has no credential {name!r} (it has: {known}); "
                         f"add [credentials.{name}] to {profile.path} first")
    if cred.owner != profile.workspace:
        raise UsageError(f"credential {name!r} of {profile.workspace!r} is inherited from {cred.owner!r}, whose "
                         f"keyring entry every workspace extending it shares: run `outloop secret set "
                         f"{cred.owner} {name}`, or define [credentials.{name}] in {profile.path} to give "
                         f"{profile.workspace!r} its own")
    if source_kind(cred.secret_ref)[0] != "keyring":
        raise UsageError(f"credential {name!r} of {profile.workspace!r} reads its secret from "
                         f"{describe_source(cred.secret_ref)}, not the keyring; set it there, or write "
                         f"`secret = \"keyring\"` in {profile.path} to keep it in the keyring")
    return cred


def one_line(text: str) -> str:
    """The value piped to `--stdin`: one trailing newline is the shell's, anything more is a mistake."""
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if "\n" in text or "\r" in text:
        raise UsageError("--stdin: expected one line (one value), found several")
    return text


def check_value(value: str) -> None:
    """The checks `outloop run` would apply, made now, so a bad value is refused before it is stored."""
    if not value:
        raise UsageError("the secret is empty; nothing was stored")
    if any(ch in value for ch in "\r\n\0"):
        raise UsageError("the secret contains a line break or NUL, which would corrupt request headers; "
                         "nothing was stored")
    if len(value.encode("utf-8")) > MAX_SECRET_BYTES:
        raise UsageError(f"the secret is larger than {MAX_SECRET_BYTES} bytes; nothing was stored")


def storing_keyring(*, allow_plaintext: bool) -> KeyringBackend:
    """The backend `secret set` writes to, checked before a value is asked for: a plaintext file backend is
    refused unless the user chose it knowingly, since "stored in the keyring" reads as "stored encrypted"."""
    backend = usable_keyring()
    if stores_plaintext(backend) and not allow_plaintext:
        where = getattr(backend, "file_path", None)
        raise SecretError(
            f"the keyring backend {backend_name(backend)} stores secrets unencrypted"
            + (f" in {where}" if where else "") + "; nothing was stored. Use a Secret Service or KWallet "
            "keyring, or give the credential secret = \"cmd:...\", \"file:PATH\" (mode 0600) or \"env:VAR\" "
            "in its profile; or pass --allow-plaintext to store it in that file anyway")
    return backend


def store_secret(backend: KeyringBackend, workspace: str, credential: str, value: str) -> None:
    """Write the keyring entry (service outloop/<workspace>, user <credential>)."""
    check_value(value)
    try:
        backend.set_password(keyring_service(workspace), credential, value)
    except Exception as exc:  # backends raise anything; the message of some may echo what was stored
        raise SecretError(f"workspace {workspace!r}, credential {credential!r}: the keyring "
                          f"({type(backend).__name__}) refused the secret: {type(exc).__name__}") from None


def delete_secret(workspace: str, credential: str) -> None:
    """Remove the keyring entry; saying so when there is none, since a typo should not look like success."""
    backend = usable_keyring()
    service = keyring_service(workspace)
    try:
        present = backend.get_password(service, credential) is not None
        if present:
            backend.delete_password(service, credential)
    except Exception as exc:  # as in store_secret: report the kind of failure, never a message
        raise SecretError(f"workspace {workspace!r}, credential {credential!r}: the keyring "
                          f"({type(backend).__name__}) failed: {type(exc).__name__}") from None
    if not present:
        raise OutloopError(f"no keyring entry for workspace {workspace!r}, credential {credential!r} "
                           f"(service {service!r}, user {credential!r}); nothing was removed",
                           exit_code=EXIT_PROBLEMS_FOUND)


def keyring_document(credential: Credential, text: str) -> str:
    """An `auth` credential's document as the keyring keeps it: checked against its scheme (a missing field is
    named, nothing stored), then one line of compact JSON, like every other keyring value."""
    assert credential.auth is not None
    if len(text.encode("utf-8")) > MAX_SECRET_BYTES:
        raise UsageError(f"the secret is larger than {MAX_SECRET_BYTES} bytes; nothing was stored")
    try:
        return compact_document(credential.auth, text, f"credential {credential.name!r} "
                                f"({document_kind(credential.auth)})")
    except SecretError as exc:
        raise UsageError(f"{exc.message}\nnothing was stored") from None


def write_back_document(credential: Credential, text: str, warn: Callable[[str], None] | None = None) -> bool:
    """Store an `auth` credential's updated document (a rotated refresh token) whole, in one keyring write.

    False when the source is not the keyring (env:, file:, cmd: are the operator's to change) or the write failed.
    A plaintext backend is not refused here as `secret set` refuses it: the old document was read from that very
    backend (stored there with --allow-plaintext) and no longer works, so refusing would lose the only working
    token. It is stored, and `warn` says so in the run summary.
    """
    if source_kind(credential.secret_ref)[0] != "keyring":
        return False
    try:
        backend = usable_keyring()
        store_secret(backend, credential.owner, credential.name, keyring_document(credential, text))
    except OutloopError:
        return False
    if stores_plaintext(backend) and warn is not None:
        warn(f"credential {credential.name!r}: the rotated refresh token was stored UNENCRYPTED by the keyring "
             f"backend {backend_name(backend)}, where its previous one was kept")
    return True
