"""Where outloop keeps its state: OUTLOOP_HOME, the config file and the profile search path.

Kept free of Typer so the broker and supervisor can import it cheaply.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from outloop_cli import private_fs
from outloop_cli.errors import UsageError


def outloop_home(environ: Mapping[str, str] | None = None) -> Path:
    """`OUTLOOP_HOME`, else the platform's app dir (the same place `typer.get_app_dir("outloop")` names)."""
    env = os.environ if environ is None else environ
    if env.get("OUTLOOP_HOME"):
        return Path(env["OUTLOOP_HOME"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "outloop"
    config_home = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "outloop"


def ensure_private_dir(path: Path, *, within: Path | None = None) -> Path:
    """Create or check `path` as outloop's own 0700 directory: never through a link, never another user's
    (StateDirError, exit 125). Pass `within=home` for a directory under OUTLOOP_HOME (`run/<id>`,
    `homes/<workspace>`), so every component from OUTLOOP_HOME down is held to the same rules."""
    fd = private_fs.open_dir(path, private_from=within)
    assert fd is not None  # created when missing
    os.close(fd)
    return path


def check_home(home: Path) -> None:
    """Refuse an OUTLOOP_HOME that is a link, another user's, or world-writable before anything in it is read
    (a planted profile or config is as dangerous as a planted audit.db); a missing one is fine."""
    fd = private_fs.open_dir(home, create=False)
    if fd is not None:
        os.close(fd)


def audit_db_path(home: Path) -> Path:
    return home / "audit.db"


def config_path(home: Path) -> Path:
    return home / "config.toml"


def profile_dirs(explicit: Path | None, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Lookup order: `--profiles DIR`, else `OUTLOOP_PROFILES` (colon-separated), else `$OUTLOOP_HOME/profiles`."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        return [explicit]
    if env.get("OUTLOOP_PROFILES"):
        return [Path(part).expanduser() for part in env["OUTLOOP_PROFILES"].split(":") if part]
    home = outloop_home(env)
    check_home(home)
    return [home / "profiles"]


def load_config(home: Path) -> dict[str, Any]:
    """The operator's config.toml, or an empty one; a broken file is an error, not silently ignored."""
    path = config_path(home)
    data = private_fs.read_private_file(path)
    if data is None:
        return {}
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read config: {exc}. Fix or delete the file.") from None


def save_config(home: Path, config: Mapping[str, Any]) -> Path:
    """Write config.toml all or nothing, never through a link planted at it or at a temp name."""
    path = config_path(home)
    dir_fd = private_fs.open_dir(home)
    assert dir_fd is not None
    try:
        private_fs.replace_file(dir_fd, path.name, tomli_w.dumps(dict(config)).encode(), mode=0o600)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)
    return path


def current_workspace(home: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """`OUTLOOP_WORKSPACE`, else the workspace chosen with `outloop workspace use`."""
    env = os.environ if environ is None else environ
    if env.get("OUTLOOP_WORKSPACE"):
        return env["OUTLOOP_WORKSPACE"]
    value = load_config(home).get("workspace")
    return value if isinstance(value, str) and value else None
