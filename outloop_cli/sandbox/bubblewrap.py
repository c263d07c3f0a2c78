"""The view and the process namespaces as `bwrap` arguments (bubblewrap >= 0.8, for --disable-userns)."""

from __future__ import annotations

import os

from outloop_cli.sandbox.probe import bubblewrap_path
from outloop_cli.sandbox.view import HOST, View

# /proc of the child's PID namespace is its own, but sysctls under /proc/sys are host-wide for the most part,
# and a root loop (uid 0 held in a user namespace) would pass their owner check: bind them read-only.
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger")


def command(view: View, *, isolate_network: bool, cwd: str) -> list[str]:
    """bwrap ... -- : every namespace, a new session, no nested user namespaces, dies with its parent."""
    argv = [str(bubblewrap_path()), "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if isolate_network:
        argv.append("--unshare-net")
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]  # uid 0 stays 0 in its user namespace, with nothing to wield
    if view.mode == HOST:
        argv += ["--dev-bind", "/", "/"]
    for mount in view.mounts:
        if mount.kind == "ro":
            argv += ["--ro-bind", mount.source, mount.dest]
        elif mount.kind == "rw" and mount.dest != "/":
            argv += ["--bind", mount.source, mount.dest]
        elif mount.kind == "tmpfs":
            argv += ["--tmpfs", mount.dest]
        elif mount.kind == "null":
            argv += ["--ro-bind", "/dev/null", mount.dest]
        elif mount.kind == "symlink":
            argv += ["--symlink", mount.source, mount.dest]
        elif mount.kind == "dev":
            argv += ["--dev", mount.dest]
        elif mount.kind == "proc":
            argv += ["--proc", mount.dest]
            for path in PROC_READ_ONLY:
                if os.path.exists(path):
                    argv += ["--ro-bind", path, path]
        elif mount.kind == "remount-ro":
            argv += ["--remount-ro", mount.dest]
    return [*argv, "--chdir", cwd, "--"]
