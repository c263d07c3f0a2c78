"""What a command needs in order to run at all in the workspace view: the dirs of its installation.

Found from the resolved command, every symlink on the way to it, its `#!` interpreter (through `env`), and a
venv's `pyvenv.cfg` (whose `home` is the base interpreter); plus outloop's own interpreter and code, which the
base-URL relay and the own-namespaces init run inside the sandbox.
"""

from __future__ import annotations

import os
import shutil
import site
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_HOPS = 16  # symlinks and interpreters followed per command; loops and absurd chains stop here


def command_dirs(executable: str, search_path: str) -> list[str]:
    """Dirs to bind read-only so `executable` (and what it runs through) can start."""
    found: list[str] = []
    todo = [executable]
    for _ in range(MAX_HOPS):
        if not todo:
            break
        path = todo.pop()
        for hop in _link_chain(path):
            found += _installation_root(hop)
        interpreter = _shebang_interpreter(os.path.realpath(path), search_path)
        if interpreter is not None:
            todo.append(interpreter)
    return list(dict.fromkeys(found))


def outloop_dirs() -> list[str]:
    """outloop's package, interpreter and site-packages: what the next run loads, and what the init needs."""
    package = str(Path(__file__).resolve().parent.parent)
    dirs = [package, sys.prefix, sys.base_prefix, site.getusersitepackages()]
    dirs += [d for hop in _link_chain(sys.executable) for d in _installation_root(hop)]
    return list(dict.fromkeys(dirs))


def system_links() -> list[str]:
    """Files a system dir links out to, which the view must hold too: /etc/resolv.conf often points into
    /run/systemd/resolve, which the workspace view has not (an open network needs it to resolve names)."""
    target = os.path.realpath("/etc/resolv.conf")
    return [target] if os.path.isfile(target) and not target.startswith("/etc/") else []


def _link_chain(path: str) -> Iterator[str]:
    """`path`, then each symlink target on the way to the real file (the dirs of every hop must be visible)."""
    current = os.path.abspath(path)
    for _ in range(MAX_HOPS):
        yield current
        if not os.path.islink(current):
            return
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))


def _installation_root(file: str) -> list[str]:
    """A file in `PREFIX/bin` needs PREFIX when PREFIX is an installation (a venv, or has lib/); else its dir.

    Never `/` itself: `/bin/sh` would otherwise make the whole host the command's installation. /bin belongs to the
    system dirs every view holds (a directory, or the link to usr/bin on a merged-/usr system).
    """
    directory = os.path.dirname(file)
    if os.path.basename(directory) != "bin":
        return [directory]
    prefix = os.path.dirname(directory)
    if prefix == "/":
        return []
    config = os.path.join(prefix, "pyvenv.cfg")
    if os.path.isfile(config):
        return [prefix, *_venv_home(config)]
    return [prefix] if os.path.isdir(os.path.join(prefix, "lib")) else [directory]


def _venv_home(config: str) -> list[str]:
    """The base interpreter's prefix named by `home = .../bin` in pyvenv.cfg."""
    try:
        with open(config, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition("=")
                if key.strip() == "home" and value.strip():
                    home = value.strip()
                    return [os.path.dirname(home) if os.path.basename(home) == "bin" else home]
    except OSError:
        pass
    return []


def _shebang_interpreter(path: str, search_path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            head = handle.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if not words:
        return None
    if os.path.basename(words[0]) != "env":
        return words[0]
    program = next((w for w in words[1:] if not w.startswith("-") and "=" not in w), None)
    return shutil.which(program, path=search_path) if program else words[0]
