"""A set/get/delete round trip on a throwaway keyring entry, run by `outloop doctor` in a child process.

A child with no terminal and no stdin is what cron gives outloop, and it can be killed if a backend hangs on an
unlock prompt; the doctor process itself never blocks on the keyring. Prints one JSON object, never a value.
"""

from __future__ import annotations

import json
import secrets
import sys

PROBE_SERVICE = "outloop-doctor/probe"


def probe() -> dict[str, object]:
    import keyring

    from outloop_cli.secrets import backend_name, stores_plaintext

    backend = keyring.get_keyring()
    user = f"probe-{secrets.token_hex(4)}"
    value = secrets.token_hex(16)
    result: dict[str, object] = {"backend": backend_name(backend), "plaintext": stores_plaintext(backend),
                                 "priority": getattr(backend, "priority", None)}
    step = "set"
    try:
        backend.set_password(PROBE_SERVICE, user, value)
        step = "get"
        matched = backend.get_password(PROBE_SERVICE, user) == value
        step = "delete"
        backend.delete_password(PROBE_SERVICE, user)
    except BaseException as exc:  # EOFError from a password prompt, dbus errors, anything: report the kind
        return {**result, "ok": False, "step": step, "error": type(exc).__name__}
    return {**result, "ok": matched, "step": "done", "error": None if matched else "value read back differs"}


def main() -> int:
    outcome = probe()
    print(json.dumps(outcome))
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
