"""Spec for outloop_cli.secrets: the Secret type never shows itself, and every source fails with a clear message."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.core
import pytest
from conftest import KEYRING_BACKEND, KEYRING_DIR
from keyring.backend import KeyringBackend
from keyring.backends import fail
from outloop_test_keyring import PlaintextFileKeyring

from outloop_cli import secrets
from outloop_cli.errors import SecretError
from outloop_cli.secrets import MAX_SECRET_BYTES, Secret, keyring_service, resolve_secret, source_kind

CANARY = "canary-7f3e9a1c-sk"
WS, CRED = "acme", "crm"
PY = shlex.quote(sys.executable)


def resolve(ref: str, environ: dict[str, str] | None = None) -> str:
    return resolve_secret(WS, CRED, ref, environ if environ is not None else {}).reveal()


def failure(ref: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(SecretError) as caught:
        resolve(ref, environ)
    return caught.value.message


def py_cmd(source: str) -> str:
    """A `cmd:` source that runs a Python snippet (no shell involved)."""
    return f"cmd:{PY} -c {shlex.quote(source)}"


def secret_file(tmp_path: Path, content: bytes, mode: int = 0o600, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(mode)
    return path


# ----- Secret ------------------------------------------------------------------------------------------------


@pytest.fixture
def secret() -> Secret:
    return Secret(CANARY)


def test_secret_reveals_its_value(secret: Secret) -> None:
    assert secret.reveal() == CANARY


def test_secret_length_is_its_utf8_byte_length() -> None:
    assert len(Secret("pässwört")) == len("pässwört".encode())


@pytest.mark.parametrize("render", [
    repr, str, format, ascii,
    lambda s: f"{s}", lambda s: f"{s!r}", lambda s: f"{s!s}", lambda s: f"{s:>60}", lambda s: f"{s:s}",
    lambda s: "%s" % s, lambda s: "%r" % s, lambda s: "{}".format(s),  # noqa: UP031, UP032 (the old ways too)
    lambda s: str([s]), lambda s: str({"k": s}),
    lambda s: str((s,)), lambda s: repr(SecretError(s)),
], ids=["repr", "str", "format", "ascii", "fstring", "fstring-r", "fstring-s", "fstring-spec", "format-spec-s",
        "percent-s", "percent-r", "str.format", "in-list", "in-dict", "in-tuple", "in-exception"])
def test_secret_never_renders_its_value(secret: Secret, render: object) -> None:
    text = render(secret)  # type: ignore[operator]
    assert CANARY not in text
    assert "redacted" in text


@pytest.mark.parametrize("message", ["%s", "token=%r", "%-40s|"])
def test_secret_never_reaches_a_log_record(secret: Secret, caplog: pytest.LogCaptureFixture, message: str) -> None:
    logger = logging.getLogger("outloop-test")
    with caplog.at_level(logging.DEBUG, logger="outloop-test"):
        logger.info(message, secret)
        logger.warning("pair %s %s", "x", secret)
    assert caplog.records
    assert CANARY not in caplog.text


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_secret_cannot_be_pickled(secret: Secret, protocol: int) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(secret, protocol=protocol)


@pytest.mark.parametrize("clone", [copy.copy, copy.deepcopy])
def test_secret_cannot_be_copied_into_an_unwipeable_twin(secret: Secret, clone: object) -> None:
    with pytest.raises(TypeError):
        clone(secret)  # type: ignore[operator]


def test_secret_has_no_instance_dict_to_leak_through_vars(secret: Secret) -> None:
    with pytest.raises(TypeError):
        vars(secret)


def test_secret_wipe_zeroes_the_bytes_in_place(secret: Secret) -> None:
    buffer = secret._buffer  # the very buffer that held the value
    secret.wipe()
    assert buffer == bytearray(len(CANARY))
    assert len(secret) == 0


def test_secret_reveal_after_wipe_raises(secret: Secret) -> None:
    secret.wipe()
    with pytest.raises(SecretError, match="already wiped"):
        secret.reveal()


def test_secret_wipe_twice_is_harmless(secret: Secret) -> None:
    secret.wipe()
    secret.wipe()
    assert len(secret) == 0


# ----- source_kind / dispatch ------------------------------------------------------------------------------


@pytest.mark.parametrize(("ref", "kind"), [
    ("keyring", ("keyring", "")),
    ("env:CRM_TOKEN", ("env", "CRM_TOKEN")),
    ("file:~/secrets/crm", ("file", "~/secrets/crm")),
    ("cmd:pass show crm:token", ("cmd", "pass show crm:token")),
])
def test_source_kind_splits_scheme_and_argument_at_the_first_colon(ref: str, kind: tuple[str, str]) -> None:
    assert source_kind(ref) == kind


@pytest.mark.parametrize("ref", ["vault:secret/crm", "ENV:X", "Keyring", "plain"])
def test_unknown_source_is_refused_naming_it(ref: str) -> None:
    message = failure(ref)
    assert "unknown secret source" in message
    assert repr(source_kind(ref)[0]) in message


# ----- env: --------------------------------------------------------------------------------------------------


def test_env_source_reads_outloops_environment() -> None:
    assert resolve("env:CRM_TOKEN", {"CRM_TOKEN": CANARY}) == CANARY


def test_env_source_reads_the_given_environment_not_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_TOKEN", "from-os-environ")
    assert "is not set" in failure("env:CRM_TOKEN", {})


def test_env_source_missing_variable_names_it() -> None:
    message = failure("env:CRM_TOKEN", {"OTHER": CANARY})
    assert "environment variable CRM_TOKEN is not set in outloop's environment" in message


def test_env_source_empty_variable_is_refused() -> None:
    assert "the secret is empty" in failure("env:CRM_TOKEN", {"CRM_TOKEN": ""})


# ----- file: -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "value"), [
    (CANARY.encode(), CANARY),
    (CANARY.encode() + b"\n", CANARY),
    (CANARY.encode() + b"\r\n", CANARY),
    (CANARY.encode() + b"\n\n\n", CANARY),
    (b"  spaced  \n", "  spaced  "),
    ("pässwört\n".encode(), "pässwört"),
])
def test_file_source_reads_the_file_without_its_trailing_newline(tmp_path: Path, content: bytes,
                                                                 value: str) -> None:
    assert resolve(f"file:{secret_file(tmp_path, content)}") == value


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_file_source_accepts_owner_only_modes(tmp_path: Path, mode: int) -> None:
    assert resolve(f"file:{secret_file(tmp_path, CANARY.encode(), mode)}") == CANARY


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o666, 0o601, 0o610])
def test_file_source_refuses_files_others_may_read_and_says_chmod_600(tmp_path: Path, mode: int) -> None:
    path = secret_file(tmp_path, CANARY.encode(), mode)
    message = failure(f"file:{path}")
    assert f"readable by group or others (mode {mode:o})" in message
    assert f"chmod 600 {path}" in message


def test_file_source_expands_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    secret_file(tmp_path, CANARY.encode(), name="crm.secret")
    assert resolve("file:~/crm.secret") == CANARY


def test_file_source_follows_a_symlink_and_checks_the_target(tmp_path: Path) -> None:
    target = secret_file(tmp_path, CANARY.encode(), 0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert "readable by group or others" in failure(f"file:{link}")


def test_file_source_refuses_a_directory(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    message = failure(f"file:{tmp_path}")
    assert f"secret file {tmp_path}" in message
    assert "Is a directory" in message or "not a regular file" in message


def test_file_source_refuses_a_fifo_at_once_instead_of_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert "is not a regular file" in failure(f"file:{fifo}")


def test_file_source_missing_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    assert f"secret file {path} cannot be read: No such file or directory" in failure(f"file:{path}")


def test_file_source_accepts_a_secret_at_the_size_limit(tmp_path: Path) -> None:
    assert len(resolve(f"file:{secret_file(tmp_path, b'x' * MAX_SECRET_BYTES)}")) == MAX_SECRET_BYTES


def test_file_source_refuses_a_file_over_the_size_limit(tmp_path: Path) -> None:
    path = secret_file(tmp_path, b"x" * (MAX_SECRET_BYTES + 1))
    assert f"is larger than {MAX_SECRET_BYTES} bytes" in failure(f"file:{path}")


@pytest.mark.parametrize("content", [b"\xff\xfe" + CANARY.encode(), CANARY.encode() + b"\xc3", b"\xe9t\xe9"])
def test_file_source_refuses_non_utf8(tmp_path: Path, content: bytes) -> None:
    assert "is not UTF-8 text" in failure(f"file:{secret_file(tmp_path, content)}")


def test_file_source_empty_file_is_refused(tmp_path: Path) -> None:
    path = secret_file(tmp_path, b"\n")
    assert "the secret is empty" in failure(f"file:{path}")


# ----- cmd: --------------------------------------------------------------------------------------------------


def test_cmd_source_takes_the_commands_output() -> None:
    assert resolve(py_cmd(f"print({CANARY!r})")) == CANARY


def test_cmd_source_takes_only_the_first_line_like_pass_show() -> None:
    assert resolve(py_cmd(f"print({CANARY!r}); print('login: bob'); print('url: x')")) == CANARY


def test_cmd_source_runs_without_a_shell_so_a_semicolon_is_literal(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    assert resolve(f"cmd:echo hi; touch {marker}") == f"hi; touch {marker}"
    assert not marker.exists()


@pytest.mark.parametrize(("argument", "value"), [
    ("echo $HOME", "$HOME"),
    ("echo a | cat", "a | cat"),
    ("echo `id`", "`id`"),
    ("echo 'two  spaces'", "two  spaces"),
    ('echo "quoted arg"', "quoted arg"),
])
def test_cmd_source_splits_like_a_shell_but_expands_nothing(argument: str, value: str) -> None:
    assert resolve(f"cmd:{argument}", {"HOME": "/home/op", "PATH": os.defpath}) == value


def test_cmd_source_passes_outloops_environment_to_the_command() -> None:
    source = "import os; print(os.environ['PASSWORD_STORE_DIR'])"
    assert resolve(py_cmd(source), {"PASSWORD_STORE_DIR": "/vault"}) == "/vault"


def test_cmd_source_gives_the_command_no_stdin_to_wait_on() -> None:
    assert resolve(py_cmd("import sys; print(sys.stdin.read() or 'eof')")) == "eof"


def test_cmd_source_failure_names_exit_code_and_last_stderr_line_but_never_stdout() -> None:
    source = (f"import sys; print({CANARY!r}); print('gpg: starting', file=sys.stderr); "
              "print('gpg: decryption failed', file=sys.stderr); sys.exit(3)")
    message = failure(py_cmd(source))
    assert "exited with code 3: gpg: decryption failed" in message
    assert "starting" not in message
    assert CANARY not in message


def test_cmd_source_failure_without_stderr_names_just_the_code() -> None:
    assert failure(py_cmd("import sys; sys.exit(7)")).endswith("exited with code 7")


def test_cmd_source_failure_truncates_a_long_stderr_line() -> None:
    message = failure(py_cmd("import sys; print('e' * 5000, file=sys.stderr); sys.exit(1)"))
    assert "e" * 200 in message
    assert "e" * 201 not in message


def test_cmd_source_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "CMD_TIMEOUT_SECONDS", 0.3)
    assert "did not finish within" in failure(py_cmd("import time; time.sleep(30)"))


def test_cmd_source_missing_binary_says_not_found_on_path() -> None:
    message = failure("cmd:no-such-password-manager show crm", {"PATH": "/nonexistent"})
    assert "'no-such-password-manager' was not found on PATH" in message


def test_cmd_source_non_executable_file_says_so(tmp_path: Path) -> None:
    script = secret_file(tmp_path, b"#!/bin/sh\necho x\n", 0o600, name="getsecret")
    assert f"{str(script)!r} is not executable" in failure(f"cmd:{script}")


@pytest.mark.parametrize("argument", ["", "   ", "''"])
def test_cmd_source_empty_command_is_refused(argument: str) -> None:
    message = failure(f"cmd:{argument}")
    assert "secret command" in message


def test_cmd_source_unbalanced_quote_is_refused() -> None:
    assert "cannot be parsed: No closing quotation" in failure("cmd:pass show 'crm")


def test_cmd_source_refuses_output_over_the_size_limit() -> None:
    message = failure(py_cmd(f"print('x' * {MAX_SECRET_BYTES + 1})"))
    assert f"printed more than {MAX_SECRET_BYTES} bytes" in message


def test_cmd_source_refuses_non_utf8_output() -> None:
    assert "is not UTF-8 text" in failure(py_cmd("import sys; sys.stdout.buffer.write(b'\\xff\\xfe')"))


@pytest.mark.parametrize("source", ["pass", "print()", "print('   ')"])
def test_cmd_source_without_output_is_refused(source: str) -> None:
    assert "the secret is empty" in failure(py_cmd(source))


# ----- keyring -----------------------------------------------------------------------------------------------


@pytest.fixture
def use_keyring(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever backend a test installs with keyring.set_keyring is undone afterwards."""
    monkeypatch.setattr(keyring.core, "_keyring_backend", None)
    yield


@pytest.fixture
def file_keyring(tmp_path: Path, use_keyring: None, monkeypatch: pytest.MonkeyPatch) -> PlaintextFileKeyring:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    backend = PlaintextFileKeyring()
    keyring.set_keyring(backend)
    return backend


class BrokenKeyring(KeyringBackend):
    """A backend that fails the way a locked Secret Service does, with the value in its error text."""

    priority = 1  # type: ignore[assignment]

    def get_password(self, service: str, username: str) -> str | None:
        raise RuntimeError(f"dbus said no; also here is {CANARY}")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise NotImplementedError

    def delete_password(self, service: str, username: str) -> None:
        raise NotImplementedError


def test_keyring_service_is_outloop_slash_workspace() -> None:
    assert keyring_service("acme") == "outloop/acme"


def test_keyring_source_reads_service_outloop_workspace_user_credential(file_keyring: PlaintextFileKeyring) -> None:
    file_keyring.set_password("outloop/acme", "crm", CANARY)
    file_keyring.set_password("outloop/globex", "crm", "globex-value")
    assert resolve("keyring") == CANARY
    assert resolve_secret("globex", "crm", "keyring", {}).reveal() == "globex-value"


def test_keyring_source_missing_entry_says_how_to_store_it(file_keyring: PlaintextFileKeyring) -> None:
    file_keyring.set_password("outloop/globex", "crm", CANARY)
    message = failure("keyring")
    assert "no secret in the keyring (service 'outloop/acme', user 'crm')" in message
    assert "`outloop secret set acme crm`" in message


def test_keyring_source_refuses_a_value_with_a_line_break(file_keyring: PlaintextFileKeyring) -> None:
    file_keyring.set_password("outloop/acme", "crm", CANARY + "\nX-Injected: 1")
    assert "line break or NUL" in failure("keyring")


def test_keyring_without_a_usable_backend_names_the_ways_out(use_keyring: None) -> None:
    keyring.set_keyring(fail.Keyring())
    message = failure("keyring")
    assert "no usable keyring backend on this machine (found Keyring)" in message
    for way_out in ("keyrings.alt", "PYTHON_KEYRING_BACKEND", "env:VAR", "file:PATH", "cmd:COMMAND"):
        assert way_out in message


def test_keyring_backend_failure_names_the_error_type_but_not_its_text(use_keyring: None) -> None:
    keyring.set_keyring(BrokenKeyring())
    message = failure("keyring")
    assert "the keyring (BrokenKeyring) failed: RuntimeError" in message
    assert CANARY not in message
    assert "dbus" not in message


def test_keyring_file_backend_configured_by_environment_works_in_a_fresh_process(tmp_path: Path) -> None:
    """The documented way out for headless machines: PYTHON_KEYRING_BACKEND plus a data dir."""
    import subprocess

    env = {**os.environ, "PYTHON_KEYRING_BACKEND": KEYRING_BACKEND, "PYTHONPATH": str(KEYRING_DIR),
           "XDG_DATA_HOME": str(tmp_path / "data")}
    code = ("import keyring, sys; from outloop_cli.secrets import resolve_secret; "
            "keyring.set_password('outloop/acme', 'crm', sys.argv[1]); "
            "print(resolve_secret('acme', 'crm', 'keyring', {}).reveal() == sys.argv[1])")
    completed = subprocess.run([sys.executable, "-c", code, CANARY], env=env, capture_output=True, text=True,
                               timeout=30, check=True)
    assert completed.stdout.strip() == "True"


# ----- refused values and message hygiene -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "\r\n"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_secret_with_cr_lf_or_nul_is_refused(bad: str, where: str) -> None:
    value = {"start": bad + CANARY, "middle": CANARY[:5] + bad + CANARY[5:], "end": CANARY + bad}[where]
    message = failure("env:CRM_TOKEN", {"CRM_TOKEN": value})
    assert "contains a line break or NUL, which would corrupt the request headers" in message


@pytest.mark.parametrize("content", [CANARY.encode() + b"\nsecond line", b"a\x00" + CANARY.encode()])
def test_a_file_secret_with_an_inner_line_break_or_nul_is_refused(tmp_path: Path, content: bytes) -> None:
    assert "line break or NUL" in failure(f"file:{secret_file(tmp_path, content)}")


def test_a_cmd_secret_with_nul_is_refused() -> None:
    assert "line break or NUL" in failure(py_cmd(f"print({CANARY!r} + chr(0) + 'x')"))


FAILURES = {
    "unknown source": ("vault:x", {}),
    "env missing": ("env:CRM_TOKEN", {"OTHER": CANARY}),
    "env empty": ("env:CRM_TOKEN", {"CRM_TOKEN": ""}),
    "env newline": ("env:CRM_TOKEN", {"CRM_TOKEN": CANARY + "\n"}),
    "env nul": ("env:CRM_TOKEN", {"CRM_TOKEN": CANARY + "\x00"}),
    "cmd exit": (py_cmd(f"import sys; print({CANARY!r}); sys.exit(2)"), {}),
    "cmd exit with stderr": (py_cmd(f"import sys; print({CANARY!r}); print('oops', file=sys.stderr); sys.exit(1)"),
                             {}),
    "cmd too big": (py_cmd(f"print({CANARY!r} * 5000)"), {}),
    "cmd nul": (py_cmd(f"print({CANARY!r} + chr(0))"), {}),
    "cmd missing": ("cmd:no-such-binary-xyz", {"PATH": "/nonexistent"}),
    "cmd parse": ("cmd:x 'unclosed", {}),
}


@pytest.mark.parametrize("case", FAILURES)
def test_every_failure_names_workspace_and_credential_but_never_the_value(case: str) -> None:
    ref, environ = FAILURES[case]
    message = failure(ref, environ)
    assert message.startswith("workspace 'acme', credential 'crm': ")
    assert CANARY not in message


@pytest.mark.parametrize(("content", "mode"), [
    (CANARY.encode(), 0o644),
    (CANARY.encode() + b"\x00", 0o600),
    (CANARY.encode() * 4000, 0o600),
    (CANARY.encode() + b"\xff", 0o600),
    (CANARY.encode() + b"\nsecond", 0o600),
])
def test_every_file_failure_names_workspace_and_credential_but_never_the_value(tmp_path: Path, content: bytes,
                                                                               mode: int) -> None:
    message = failure(f"file:{secret_file(tmp_path, content, mode)}")
    assert message.startswith("workspace 'acme', credential 'crm': ")
    assert CANARY not in message


def test_every_keyring_failure_names_workspace_and_credential(use_keyring: None) -> None:
    keyring.set_keyring(BrokenKeyring())
    assert failure("keyring").startswith("workspace 'acme', credential 'crm': ")
