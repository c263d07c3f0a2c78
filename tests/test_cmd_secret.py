"""`outloop secret`: set (prompt or --stdin), list, rm and check, through the installed binary.

The keyring is the test's file-backed one; values are read back with keyring itself, never from outloop.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import subprocess
import termios
import time

from conftest import OUTLOOP, PYTHON, World

INITECH = """
    version = 1
    extends = "agency"
    [credentials.crm]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    [credentials.viaenv]
    secret = "env:INITECH_TOKEN"
    base_url = "{UPSTREAM}"
"""


def keyring_value(world: World, workspace: str, credential: str) -> str | None:
    code = "import json, keyring, sys; print(json.dumps(keyring.get_password(sys.argv[1], sys.argv[2])))"
    out = subprocess.run([PYTHON, "-c", code, f"outloop/{workspace}", credential], env=world.env,
                         capture_output=True, text=True, check=True).stdout
    value = json.loads(out)
    assert value is None or isinstance(value, str)
    return value


def test_set_from_stdin_stores_service_outloop_workspace_user_credential(world: World) -> None:
    world.write_profile("initech", INITECH)
    result = world.outloop("secret", "set", "--allow-plaintext", "initech", "crm", "--stdin", stdin="s3cr3t-value\n")
    assert result.code == 0 and "stored initech/crm" in result.out
    assert keyring_value(world, "initech", "crm") == "s3cr3t-value"
    assert "s3cr3t-value" not in result.combined
    crlf = world.outloop("secret", "set", "--allow-plaintext", "initech", "crm", "--stdin", stdin="other\r\n")
    assert crlf.code == 0 and keyring_value(world, "initech", "crm") == "other"


def test_set_refuses_a_plaintext_backend_unless_allowed_and_then_warns(world: World) -> None:
    world.write_profile("initech", INITECH)
    refused = world.outloop("secret", "set", "initech", "crm", "--stdin", stdin="s3cr3t-value\n")
    assert refused.code == 125
    assert "stores secrets unencrypted" in refused.err and "nothing was stored" in refused.err
    assert "--allow-plaintext" in refused.err and "cmd:" in refused.err
    assert keyring_value(world, "initech", "crm") is None
    allowed = world.outloop("secret", "set", "--allow-plaintext", "initech", "crm", "--stdin", stdin="v\n")
    assert allowed.code == 0 and "UNENCRYPTED" in allowed.err and "keyring_pass.cfg" in allowed.err
    assert keyring_value(world, "initech", "crm") == "v"


def test_stdin_must_hold_exactly_one_non_empty_line(world: World) -> None:
    world.write_profile("initech", INITECH)
    for value, message in (("a\nb\n", "expected one line"), ("a\n\n", "expected one line"), ("\n", "empty")):
        result = world.outloop("secret", "set", "--allow-plaintext", "initech", "crm", "--stdin", stdin=value)
        assert result.code == 2 and message in result.err, value
    assert keyring_value(world, "initech", "crm") is None


def test_set_refuses_credentials_whose_secret_is_not_read_from_this_keyring_entry(world: World) -> None:
    world.write_profile("initech", INITECH)
    for credential, message in (("nope", "has no credential 'nope' (it has: crm, llm, viaenv)"),
                                ("llm", "inherited from 'agency'"),
                                ("viaenv", "reads its secret from env:INITECH_TOKEN, not the keyring")):
        result = world.outloop("secret", "set", "--allow-plaintext", "initech", credential, "--stdin", stdin="value\n")
        assert result.code == 2 and message in result.err, credential
        assert "Traceback" not in result.err


def test_without_a_terminal_the_prompt_is_refused_rather_than_echoing(world: World) -> None:
    result = world.outloop("secret", "set", "--allow-plaintext", "acme", "crm", stdin="typed\n")
    assert result.code == 2 and "no terminal to prompt on; pipe the value in with --stdin" in result.err


def test_the_prompt_hides_the_value_and_asks_twice(world: World) -> None:
    world.write_profile("initech", INITECH)

    def session(first: str, second: str) -> tuple[int, bytes]:
        controller, terminal = pty.openpty()
        process = subprocess.Popen(
            [OUTLOOP, "secret", "set", "--allow-plaintext", "initech", "crm"], stdin=terminal, stdout=terminal,
            stderr=terminal, env=world.env, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(terminal)
        seen = b""
        for answer in (first, second):
            seen += read_until(controller, b": ")
            os.write(controller, answer.encode() + b"\n")
        code = process.wait(timeout=30)
        seen += read_until(controller, b"")
        os.close(controller)
        return code, seen

    code, seen = session("typed-secret", "typed-secret")
    assert code == 0 and b"Again, to confirm: " in seen and b"stored initech/crm" in seen
    assert b"typed-secret" not in seen
    assert keyring_value(world, "initech", "crm") == "typed-secret"
    code, seen = session("one", "two")
    assert code == 2 and b"the two entries differ; nothing was stored" in seen
    assert keyring_value(world, "initech", "crm") == "typed-secret"


def read_until(fd: int, marker: bytes, timeout: float = 20.0) -> bytes:
    """Read the terminal until `marker` appears (b"": until the other side closes)."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline and not (marker and marker in data):
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        data += chunk
    return data


def test_list_and_check_show_presence_and_rm_removes(world: World) -> None:
    listed = json.loads(world.outloop("secret", "list", "globex", "--json").out)
    assert [(s["credential"], s["owner"], s["source"], s["state"]) for s in listed] == [
        ("billing", "globex", "keyring", "present"), ("crm", "globex", "keyring", "present"),
        ("llm", "agency", "keyring", "present")]
    assert world.outloop("secret", "check", "globex").code == 0
    removed = world.outloop("secret", "rm", "globex", "billing")
    assert removed.code == 0 and keyring_value(world, "globex", "billing") is None
    again = world.outloop("secret", "rm", "globex", "billing")
    assert again.code == 1 and "nothing was removed" in again.err
    check = world.outloop("secret", "check", "globex")
    assert check.code == 1 and "billing: " in check.err and "outloop secret set globex billing" in check.err
    plain = world.outloop("secret", "list", "globex")
    assert "billing" in plain.out and "missing" in plain.out
    world.assert_no_canary()


def test_no_usable_keyring_is_explained_with_ways_out(world: World) -> None:
    env = {**world.env, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    result = world.outloop("secret", "set", "--allow-plaintext", "acme", "crm", "--stdin", env=env, stdin="value\n")
    assert result.code != 0 and "no usable keyring backend" in result.err and "Ways out" in result.err
    assert "Traceback" not in result.err


def test_a_file_secret_others_may_read_is_an_insecure_mode_not_a_missing_secret(world: World) -> None:
    secret_file = world.work / "token"
    secret_file.write_text("file-secret\n")
    secret_file.chmod(0o644)
    world.write_profile("initech", INITECH.replace('"env:INITECH_TOKEN"', f'"file:{secret_file}"'))
    listed = {s["credential"]: s for s in json.loads(world.outloop("secret", "list", "initech", "--json").out)}
    assert listed["viaenv"]["state"] == "insecure mode"
    assert "chmod 600" in listed["viaenv"]["problem"]
    check = world.outloop("secret", "check", "initech")
    (viaenv_line,) = [line for line in check.out.splitlines() if line.startswith("viaenv")]
    assert check.code == 1 and viaenv_line.endswith("insecure mode")
    workspace_check = world.outloop("workspace", "check", "initech")
    assert workspace_check.code == 1 and "insecure mode: " in workspace_check.out
    secret_file.chmod(0o600)
    listed = {s["credential"]: s for s in json.loads(world.outloop("secret", "list", "initech", "--json").out)}
    assert listed["viaenv"]["state"] == "present"
