"""Where outloop keeps its state: OUTLOOP_HOME, the config file and the profile search path.

Kept free of Typer so the broker and supervisor can import it cheaply.
"""

from __future__ import annotations

import os
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

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


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700 and tighten it if it already exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


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
    return [outloop_home(env) / "profiles"]


def load_config(home: Path) -> dict[str, Any]:
    """The operator's config.toml, or an empty one; a broken file is an error, not silently ignored."""
    path = config_path(home)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise UsageError(f"{path}: cannot read config: {exc}. Fix or delete the file.") from exc


def save_config(home: Path, config: Mapping[str, Any]) -> Path:
    """Write config.toml atomically (temp file + rename) so a crash never leaves half a file."""
    ensure_private_dir(home)
    path = config_path(home)
    fd, tmp_name = tempfile.mkstemp(dir=home, prefix=".config.", suffix=".toml")
    try:
        with os.fdopen(fd, "wb") as handle:
            tomli_w.dump(dict(config), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def current_workspace(home: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """`OUTLOOP_WORKSPACE`, else the workspace chosen with `outloop workspace use`."""
    env = os.environ if environ is None else environ
    if env.get("OUTLOOP_WORKSPACE"):
        return env["OUTLOOP_WORKSPACE"]
    value = load_config(home).get("workspace")
    return value if isinstance(value, str) and value else None
