"""The view and the process namespaces as arguments for outloop's own init (`python -m outloop_cli.sandbox.init`).

The fallback when bubblewrap is missing: the init needs only the standard library and unprivileged user
namespaces (or root).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import outloop_cli
from outloop_cli.sandbox.view import HOST, View

STAGE_NAME = ".root"  # the new root is built under the run dir, where no source of the view can lie


def command(view: View, *, isolate_network: bool, cwd: str, run_dir: Path,
            relays: Sequence[tuple[int, Path]]) -> list[str]:
    mounts = [[m.kind, m.dest, m.source] for m in view.mounts]
    spec = {"mounts": mounts, "stage": None if view.mode == HOST else str(run_dir / STAGE_NAME)}
    argv = [sys.executable, "-m", "outloop_cli.sandbox.init", "--view", json.dumps(spec), "--chdir", cwd]
    if isolate_network:
        argv.append("--isolate-network")
    return [*argv, *relay_arguments(relays), "--"]


def relay_arguments(relays: Sequence[tuple[int, Path]]) -> list[str]:
    """One `--relay PORT SOCKET` per pair: the base-URL listener and the egress proxy."""
    return [arg for port, path in relays for arg in ("--relay", str(port), str(path))]


def relay_command(relays: Sequence[tuple[int, Path]]) -> list[str]:
    """The relay alone, started inside bubblewrap's namespaces, ahead of the loop: so without `site` (-S) and
    without the environment (-I, which also keeps the child's PYTHONPATH out of it); outloop's own package
    directory goes last on its path (relay_start.py)."""
    root = str(Path(outloop_cli.__file__).resolve().parent.parent)
    bootstrap = (f"import sys; sys.path.append({root!r}); from outloop_cli.sandbox.relay_start import main; "
                 "main(sys.argv[1:])")
    return [sys.executable, "-I", "-S", "-c", bootstrap, *relay_arguments(relays), "--"]
