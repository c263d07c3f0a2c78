"""The rules for outloop's own directories and files, in-process: what is created, tightened, refused.

The attacks themselves (a neighbour's planted home, a loop's planted links) run end to end in
tests/adversarial/test_hostile_state_dirs.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from outloop_cli.audit.schema import SQLITE_COMPANIONS
from outloop_cli.errors import StateDirError
from outloop_cli.home import ensure_private_dir, load_config, save_config
from outloop_cli.private_fs import check_private_file


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_workspace_home_is_created_private_from_outloop_home_down(tmp_path: Path) -> None:
    home = tmp_path / "outloop"
    ensure_private_dir(home / "homes" / "acme", within=home)
    assert [mode(p) for p in (home, home / "homes", home / "homes" / "acme")] == [0o700] * 3


def test_a_loose_mode_on_our_own_directory_is_tightened(tmp_path: Path) -> None:
    home = tmp_path / "outloop"
    home.mkdir(mode=0o755)
    (home / "run").mkdir(mode=0o750)
    ensure_private_dir(home / "run" / "01RUN", within=home)
    assert (mode(home), mode(home / "run")) == (0o700, 0o700)


def test_our_own_world_writable_directory_is_refused_not_tightened(tmp_path: Path) -> None:
    home = tmp_path / "outloop"
    home.mkdir()
    home.chmod(0o777)
    with pytest.raises(StateDirError, match=r"writable by every user .*`chmod 700"):
        ensure_private_dir(home / "run" / "01RUN", within=home)
    assert mode(home) == 0o777 and not (home / "run").exists()


def test_a_link_below_outloop_home_is_refused_but_a_link_above_it_owned_by_us_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    ensure_private_dir(tmp_path / "alias" / "outloop")  # e.g. /home -> /usr/home: an ancestor, ours
    assert (real / "outloop").is_dir()
    (real / "outloop" / "homes").symlink_to(real)
    with pytest.raises(StateDirError, match="is a symbolic link"):
        ensure_private_dir(real / "outloop" / "homes" / "acme", within=real / "outloop")
    assert not (real / "acme").exists()


def test_a_world_writable_ancestor_must_be_sticky(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StateDirError, match="not sticky"):
        ensure_private_dir(shared / "outloop")
    shared.chmod(0o1777)  # like /tmp
    ensure_private_dir(shared / "outloop")


def test_a_loose_mode_on_our_own_audit_database_is_tightened(tmp_path: Path) -> None:
    home = tmp_path / "outloop"
    home.mkdir(mode=0o700)
    (home / "audit.db").write_bytes(b"")
    (home / "audit.db").chmod(0o644)
    assert check_private_file(home / "audit.db", companions=SQLITE_COMPANIONS)
    assert mode(home / "audit.db") == 0o600


def test_config_is_written_by_rename_replacing_a_planted_link_and_read_only_without_one(tmp_path: Path) -> None:
    home, precious = tmp_path / "outloop", tmp_path / "precious"
    precious.write_text("precious\n")
    home.mkdir(mode=0o700)
    (home / "config.toml").symlink_to(precious)
    with pytest.raises(StateDirError, match="is a symbolic link"):
        load_config(home)
    save_config(home, {"workspace": "acme"})
    assert precious.read_text() == "precious\n"
    assert not (home / "config.toml").is_symlink() and mode(home / "config.toml") == 0o600
    assert load_config(home) == {"workspace": "acme"}
    assert sorted(os.listdir(home)) == ["config.toml"]  # no temp file left behind
