"""A file-backed keyring for the tests only, selected through the environment:

    PYTHONPATH=tests/keyring_backend PYTHON_KEYRING_BACKEND=outloop_test_keyring.PlaintextFileKeyring

It keeps values unencrypted in `$XDG_DATA_HOME/python_keyring/keyring_pass.cfg` (where keyrings.alt keeps its
plaintext file, so the sandbox tests that hide that store keep their meaning). It lives here, not in an extra of
the package, so no user's venv ever gets a plaintext backend by installing outloop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError


class PlaintextFileKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    @property
    def file_path(self) -> Path:
        data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
        return Path(data) / "python_keyring" / "keyring_pass.cfg"

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            loaded = json.loads(self.file_path.read_text())
        except FileNotFoundError:
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def _save(self, entries: dict[str, dict[str, str]]) -> None:
        self.file_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = self.file_path.with_suffix(".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle)
        os.replace(partial, self.file_path)

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(service, {}).get(username)

    def set_password(self, service: str, username: str, password: str) -> None:
        entries = self._load()
        entries.setdefault(service, {})[username] = password
        self._save(entries)

    def delete_password(self, service: str, username: str) -> None:
        entries = self._load()
        if username not in entries.get(service, {}):
            raise PasswordDeleteError("no such entry")
        del entries[service][username]
        self._save(entries)
