"""Secret sources (keyring, env:, file:, cmd:) and the redacting Secret type they return.

A source is one small class behind `SecretSource`, so a new backend is one class and one line in `_SOURCES`.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from keyring.backend import KeyringBackend

from outloop_cli.errors import InsecureSecretError, SecretError

CMD_TIMEOUT_SECONDS = 30.0
MAX_SECRET_BYTES = 64 * 1024


class Secret:
    """A secret value that never prints itself and can be wiped when the run ends.

    The bytes live in a mutable buffer so `wipe()` can overwrite them; `str` copies made for the wire cannot
    be wiped, which is why callers build them once per run and drop them with the broker.
    """

    __slots__ = ("_buffer",)

    def __init__(self, value: str) -> None:
        self._buffer = bytearray(value.encode("utf-8"))

    def reveal(self) -> str:
        if not self._buffer:
            raise SecretError("secret was already wiped at the end of the run")
        return self._buffer.decode("utf-8")

    def wipe(self) -> None:
        for index in range(len(self._buffer)):
            self._buffer[index] = 0
        self._buffer = bytearray()

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> str:
        raise TypeError("a Secret cannot be pickled")

    def __len__(self) -> int:
        return len(self._buffer)


class SecretSource(Protocol):
    def fetch(self, workspace: str, credential: str, argument: str, environ: Mapping[str, str]) -> str: ...


class KeyringSource:
    """Service `outloop/<workspace>`, username `<credential>`, as `outloop secret set` stores them."""

    def fetch(self, workspace: str, credential: str, argument: str, environ: Mapping[str, str]) -> str:
        try:
            backend = usable_keyring()
        except SecretError as exc:
            raise SecretError(f"workspace {workspace!r}, credential {credential!r}: {exc.message}") from None
        try:
            value = backend.get_password(keyring_service(workspace), credential)
        except Exception as exc:  # backends raise anything: dbus errors, locked collections...
            raise SecretError(
                f"workspace {workspace!r}, credential {credential!r}: the keyring "
                f"({type(backend).__name__}) failed: {type(exc).__name__}. {KEYRING_WAYS_OUT}"
            ) from None
        if not isinstance(value, str):
            raise SecretError(
                f"workspace {workspace!r}, credential {credential!r}: no secret in the keyring "
                f"(service {keyring_service(workspace)!r}, user {credential!r}). "
                f"Store it with `outloop secret set {workspace} {credential}`."
            )
        return value


KEYRING_WAYS_OUT = (
    "Ways out for cron and servers: use secret = \"cmd:COMMAND\" with a password manager that works "
    "unattended (e.g. cmd:op read op://vault/item/field), \"file:PATH\" with a 0600 file, or \"env:VAR\"; "
    "or run where a Secret Service or KWallet keyring is unlocked (a desktop session). File-backed keyrings such "
    "as keyrings.alt's PlaintextKeyring store values unencrypted (PYTHON_KEYRING_BACKEND selects one; "
    "`outloop secret set` refuses it without --allow-plaintext)."
)


def keyring_service(workspace: str) -> str:
    return f"outloop/{workspace}"


def usable_keyring() -> KeyringBackend:
    """The keyring backend, or a SecretError explaining that none is usable (headless Linux, cron)."""
    import keyring  # imported lazily: backend discovery is slow and most runs use it at most once
    from keyring.backends import fail

    backend = keyring.get_keyring()
    if isinstance(backend, fail.Keyring) or backend.priority <= 0:
        raise SecretError(f"no usable keyring backend on this machine (found {type(backend).__name__}). "
                          f"{KEYRING_WAYS_OUT}")
    return backend


def stores_plaintext(backend: KeyringBackend) -> bool:
    """Whether the backend keeps values unencrypted. keyring backends do not declare it; the plaintext ones
    (keyrings.alt's PlaintextKeyring and the like) say so in their class name, a chainer through any member."""
    members = getattr(backend, "backends", None)
    if isinstance(members, list) and members:
        return any(stores_plaintext(member) for member in members)
    return "plaintext" in type(backend).__name__.lower()


def backend_name(backend: KeyringBackend) -> str:
    return f"{type(backend).__module__}.{type(backend).__name__}"


class EnvSource:
    """Read from outloop's own environment; the child never inherits it (see supervisor.child_environment)."""

    def fetch(self, workspace: str, credential: str, argument: str, environ: Mapping[str, str]) -> str:
        if argument not in environ:
            raise SecretError(
                f"workspace {workspace!r}, credential {credential!r}: environment variable {argument} "
                "is not set in outloop's environment"
            )
        return environ[argument]


class FileSource:
    """Read a file that only its owner may read, like ssh insists for private keys."""

    def fetch(self, workspace: str, credential: str, argument: str, environ: Mapping[str, str]) -> str:
        path = Path(argument).expanduser()
        where = f"workspace {workspace!r}, credential {credential!r}: secret file {path}"
        try:
            with open(path, "rb", opener=_open_nonblocking) as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise SecretError(f"{where} is not a regular file")
                if info.st_mode & 0o077:
                    raise InsecureSecretError(
                        f"{where} is readable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
                        f"run `chmod 600 {path}`"
                    )
                data = handle.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise SecretError(f"{where} cannot be read: {exc.strerror}") from None
        return _decode(where, data).rstrip("\r\n")


def _open_nonblocking(path: str, flags: int) -> int:
    """O_NONBLOCK, so a FIFO is refused as "not a regular file" instead of hanging the run until a writer comes."""
    return os.open(path, flags | os.O_NONBLOCK)


class CommandSource:
    """Run a password manager (`pass show x`, `op read op://...`) without a shell unless the user wrote one."""

    def fetch(self, workspace: str, credential: str, argument: str, environ: Mapping[str, str]) -> str:
        where = f"workspace {workspace!r}, credential {credential!r}: secret command"
        try:
            argv = shlex.split(argument)
        except ValueError as exc:
            raise SecretError(f"{where} cannot be parsed: {exc}") from None
        if not argv:
            raise SecretError(f"{where} is empty; write e.g. secret = \"cmd:pass show crm\"")
        try:
            completed = subprocess.run(
                argv, capture_output=True, timeout=CMD_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL,
                env=dict(environ), check=False,
            )
        except FileNotFoundError:
            raise SecretError(f"{where} {argv[0]!r} was not found on PATH") from None
        except PermissionError:
            raise SecretError(f"{where} {argv[0]!r} is not executable") from None
        except subprocess.TimeoutExpired:
            raise SecretError(f"{where} {argv[0]!r} did not finish within {CMD_TIMEOUT_SECONDS:.0f}s") from None
        if completed.returncode != 0:
            # stderr may help (e.g. "gpg: decryption failed"); stdout never appears, it may hold the secret.
            hint = completed.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = f": {hint[-1][:200]}" if hint else ""
            raise SecretError(f"{where} {argv[0]!r} exited with code {completed.returncode}{detail}")
        if len(completed.stdout) > MAX_SECRET_BYTES:
            raise SecretError(f"{where} printed more than {MAX_SECRET_BYTES} bytes; print only the secret")
        return _decode(where, completed.stdout)  # resolve_secret keeps the first line, or all of a document


def _decode(where: str, data: bytes) -> str:
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"{where} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{where} is not UTF-8 text") from None


_SOURCES: dict[str, SecretSource] = {
    "keyring": KeyringSource(),
    "env": EnvSource(),
    "file": FileSource(),
    "cmd": CommandSource(),
}


def source_kind(secret_ref: str) -> tuple[str, str]:
    """("keyring", "") or (scheme, argument) for "env:VAR", "file:PATH", "cmd:COMMAND"."""
    if secret_ref == "keyring":
        return "keyring", ""
    scheme, _, argument = secret_ref.partition(":")
    return scheme, argument


def resolve_secret(workspace: str, credential: str, secret_ref: str, environ: Mapping[str, str], *,
                   document: bool = False) -> Secret:
    """Fetch one secret; every failure names the workspace and credential, never the value.

    `document`: the secret is an `auth` credential's TOML/JSON document, so line breaks belong in it; its fields are
    checked by outloop_cli.auth.documents.
    """
    scheme, argument = source_kind(secret_ref)
    source = _SOURCES.get(scheme)
    if source is None:
        raise SecretError(f"workspace {workspace!r}, credential {credential!r}: unknown secret source {scheme!r}")
    value = source.fetch(workspace, credential, argument, environ)
    if document:
        if not value.strip() or "\0" in value:
            raise SecretError(f"workspace {workspace!r}, credential {credential!r}: the secret document is empty "
                              "or contains NUL")
        return Secret(value)
    if scheme == "cmd":  # like `pass show`, the first line: password managers print metadata after it
        value = value.splitlines()[0] if value.strip() else ""
    if not value:
        raise SecretError(f"workspace {workspace!r}, credential {credential!r}: the secret is empty")
    if any(ch in value for ch in "\r\n\0"):
        raise SecretError(
            f"workspace {workspace!r}, credential {credential!r}: the secret contains a line break or NUL, "
            "which would corrupt the request headers"
        )
    return Secret(value)
