"""Spec for the pure parts of outloop_cli.supervisor: the child's environment and finding its executable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from outloop_cli.errors import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND
from outloop_cli.profiles import DEFAULT_ENV_KEEP
from outloop_cli.supervisor import CommandNotExecutable, CommandNotFound, child_environment, resolve_command

OUTLOOP_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/op",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "LC_TIME": "en_GB.UTF-8",
    "TZ": "UTC",
    "TERM": "xterm",
    "AWS_SECRET_ACCESS_KEY": "canary-aws",
    "ACME_CRM_TOKEN": "canary-env",
    "OUTLOOP_HOME": "/home/op/.config/outloop",
    "SSH_AUTH_SOCK": "/tmp/ssh.sock",
    "LCX": "not-a-locale",
}
OWN = {"OUTLOOP_SOCKET": "/run/outloop/x/broker.sock", "OUTLOOP_RUN_ID": "01J0", "OUTLOOP_WORKSPACE": "acme"}


# ----- child_environment -------------------------------------------------------------------------------------


def test_env_default_keep_passes_only_the_usual_harmless_variables() -> None:
    env = child_environment(OUTLOOP_ENV, DEFAULT_ENV_KEEP, {}, OWN)
    assert env == {
        "PATH": "/usr/bin:/bin", "HOME": "/home/op", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "LC_TIME": "en_GB.UTF-8", "TZ": "UTC", "TERM": "xterm", **OWN,
    }


@pytest.mark.parametrize(("keep", "kept"), [
    (["LC_*"], {"LC_ALL", "LC_TIME"}),
    (["LC?*"], {"LC_ALL", "LC_TIME", "LCX"}),
    (["L?NG"], {"LANG"}),
    (["*_AUTH_SOCK"], {"SSH_AUTH_SOCK"}),
    (["T*"], {"TZ", "TERM"}),
    (["PATH", "HOME"], {"PATH", "HOME"}),
    ([], set()),
])
def test_env_keep_accepts_names_and_globs(keep: list[str], kept: set[str]) -> None:
    env = child_environment(OUTLOOP_ENV, keep, {}, {})
    assert set(env) == kept


@pytest.mark.parametrize("keep", [["path"], ["lc_*"], ["Path"]])
def test_env_keep_is_case_sensitive(keep: list[str]) -> None:
    assert child_environment(OUTLOOP_ENV, keep, {}, {}) == {}


def test_env_strips_secret_looking_variables_that_are_not_kept() -> None:
    env = child_environment(OUTLOOP_ENV, DEFAULT_ENV_KEEP, {}, OWN)
    assert "canary-aws" not in env.values()
    assert "canary-env" not in env.values()


def test_env_set_adds_variables() -> None:
    env = child_environment(OUTLOOP_ENV, ["PATH"], {"LOOP_CLIENT": "acme"}, {})
    assert env == {"PATH": "/usr/bin:/bin", "LOOP_CLIENT": "acme"}


def test_env_set_wins_over_a_kept_variable() -> None:
    env = child_environment(OUTLOOP_ENV, ["PATH", "TZ"], {"TZ": "Europe/Paris"}, {})
    assert env["TZ"] == "Europe/Paris"


@pytest.mark.parametrize("name", sorted(OWN))
def test_env_outloop_variables_win_over_kept_and_set_ones(name: str) -> None:
    environ = {**OUTLOOP_ENV, name: "from-outloops-environment"}
    env = child_environment(environ, ["*"], {name: "from-env-set"}, OWN)
    assert env[name] == OWN[name]


def test_env_does_not_change_the_given_mappings() -> None:
    environ, set_vars = dict(OUTLOOP_ENV), {"A": "1"}
    child_environment(environ, ["*"], set_vars, OWN)
    assert (environ, set_vars) == (OUTLOOP_ENV, {"A": "1"})


# ----- resolve_command -----------------------------------------------------------------------------------------


def make_file(path: Path, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


@pytest.fixture
def bin_dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "bin1", tmp_path / "bin2"


def path_env(*dirs: Path) -> dict[str, str]:
    return {"PATH": os.pathsep.join(str(d) for d in dirs)}


def test_command_is_found_on_the_childs_path(bin_dirs: tuple[Path, Path]) -> None:
    tool = make_file(bin_dirs[1] / "tool", 0o755)
    bin_dirs[0].mkdir()
    assert resolve_command(["tool", "--flag"], path_env(*bin_dirs)) == str(tool)


def test_command_is_found_in_the_first_path_dir_that_has_it(bin_dirs: tuple[Path, Path]) -> None:
    first = make_file(bin_dirs[0] / "tool", 0o755)
    make_file(bin_dirs[1] / "tool", 0o755)
    assert resolve_command(["tool"], path_env(*bin_dirs)) == str(first)


def test_command_skips_a_non_executable_file_when_a_later_dir_has_an_executable(bin_dirs: tuple[Path, Path]) -> None:
    make_file(bin_dirs[0] / "tool", 0o644)
    second = make_file(bin_dirs[1] / "tool", 0o755)
    assert resolve_command(["tool"], path_env(*bin_dirs)) == str(second)


def test_command_uses_the_childs_path_not_outloops(bin_dirs: tuple[Path, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    make_file(bin_dirs[0] / "tool", 0o755)
    monkeypatch.setenv("PATH", str(bin_dirs[0]))
    with pytest.raises(CommandNotFound):
        resolve_command(["tool"], path_env(bin_dirs[1]))


def test_command_with_a_slash_is_used_as_given(tmp_path: Path) -> None:
    tool = make_file(tmp_path / "scripts" / "loop.sh", 0o700)
    assert resolve_command([str(tool)], {"PATH": ""}) == str(tool)


@pytest.mark.parametrize("spelling", ["./loop.sh", "sub/../loop.sh"])
def test_command_relative_with_a_slash_becomes_absolute_so_no_wrapper_searches_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str,
) -> None:
    (tmp_path / "sub").mkdir()
    make_file(tmp_path / "loop.sh", 0o755)
    monkeypatch.chdir(tmp_path)
    resolved = resolve_command([spelling], {"PATH": "/usr/bin:/bin"})
    assert os.path.isabs(resolved)
    assert Path(resolved).resolve() == (tmp_path / "loop.sh").resolve()


@pytest.mark.parametrize(("argv", "env"), [
    (["no-such-tool-xyz"], {"PATH": "/nonexistent"}),
    (["no-such-tool-xyz"], {"PATH": ""}),
    (["/nonexistent/dir/tool"], {}),
    (["./missing.sh"], {}),
])
def test_command_missing_is_127(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(CommandNotFound, match="command not found") as caught:
        resolve_command(argv, env)
    assert caught.value.exit_code == EXIT_NOT_FOUND == 127


def test_command_missing_names_the_command(bin_dirs: tuple[Path, Path]) -> None:
    with pytest.raises(CommandNotFound, match=r"^no-such-tool-xyz: command not found$"):
        resolve_command(["no-such-tool-xyz"], path_env(*bin_dirs))


def test_command_empty_argv_is_127_with_an_example() -> None:
    with pytest.raises(CommandNotFound, match="after `--`") as caught:
        resolve_command([], {})
    assert caught.value.exit_code == 127


def test_command_not_executable_on_path_is_126(bin_dirs: tuple[Path, Path]) -> None:
    make_file(bin_dirs[0] / "tool", 0o644)
    with pytest.raises(CommandNotExecutable, match="tool: permission denied") as caught:
        resolve_command(["tool"], path_env(*bin_dirs))
    assert caught.value.exit_code == EXIT_NOT_EXECUTABLE == 126


def test_command_not_executable_by_path_is_126(tmp_path: Path) -> None:
    tool = make_file(tmp_path / "loop.sh", 0o600)
    with pytest.raises(CommandNotExecutable) as caught:
        resolve_command([str(tool)], {})
    assert caught.value.exit_code == 126


def test_command_that_is_a_directory_is_126(tmp_path: Path) -> None:
    with pytest.raises(CommandNotExecutable) as caught:
        resolve_command([str(tmp_path)], {})
    assert caught.value.exit_code == 126


def test_command_that_is_a_directory_on_path_is_126_like_env(bin_dirs: tuple[Path, Path]) -> None:
    (bin_dirs[0] / "tool").mkdir(parents=True)
    with pytest.raises(CommandNotExecutable):
        resolve_command(["tool"], path_env(*bin_dirs))


def test_command_without_path_in_the_childs_env_uses_the_default_path() -> None:
    assert resolve_command(["sh"], {}) in {f"{d}/sh" for d in os.defpath.split(os.pathsep) if d}
