"""The workspace view: what it refuses and why, the mount list it computes (no namespaces needed for that), and
the legitimate loops it must keep working (a venv elsewhere, a cron job that follows the message).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import OUTLOOP, PYTHON, World
from sandbox_support import BACKENDS, use_backend

from outloop_cli.errors import SandboxError
from outloop_cli.sandbox.installation import command_dirs
from outloop_cli.sandbox.view import Mount, ViewRequest, build

pytestmark = pytest.mark.sandbox


def _request(tmp_path: Path, **changes: object) -> ViewRequest:
    home, work, state = tmp_path / "home", tmp_path / "work", tmp_path / "state"
    for directory in (home, work, state / "run" / "r1", state / "homes" / "acme"):
        directory.mkdir(parents=True, exist_ok=True)
    fields: dict[str, object] = {
        "mode": "workspace", "cwd": str(work), "user_home": str(home), "outloop_home": str(state),
        "keep": (str(state / "run" / "r1"), str(state / "homes" / "acme")), "installation": (sys.prefix,),
        "masks": (str(state),), "protected": (sys.prefix,),
    }
    fields.update(changes)
    return ViewRequest(**fields)  # type: ignore[arg-type]


def test_the_workspace_view_binds_system_dirs_read_only_and_only_the_workspace_writable(tmp_path: Path) -> None:
    view = build(_request(tmp_path))
    kinds = {m.dest: m.kind for m in view.mounts}
    assert kinds["/usr"] == "ro" and kinds["/tmp"] == "tmpfs" and kinds["/proc"] == "proc" and kinds["/dev"] == "dev"
    assert kinds[str(tmp_path / "work")] == "rw"
    assert view.writable == tuple(sorted([str(tmp_path / "work"), str(tmp_path / "state/run/r1"),
                                          str(tmp_path / "state/homes/acme")]))
    assert view.mounts[-1] == Mount("remount-ro", "/")
    # /tmp (the parent of this test's dirs) comes before what is bound inside it, or it would cover them.
    order = [m.dest for m in view.mounts]
    assert order.index("/tmp") < order.index(str(tmp_path / "work"))
    assert not any(m.dest in ("/run", "/var/run", "/home", "/root") for m in view.mounts)


@pytest.mark.parametrize(("cwd", "fragment"), [("/", "the working directory is /"),
                                               ("home", "your home directory"),
                                               ("tmp", "contains outloop's state dir")])
def test_a_working_dir_that_would_hand_the_loop_too_much_is_refused_with_the_crontab_line(
        tmp_path: Path, cwd: str, fragment: str) -> None:
    where = {"/": "/", "home": str(tmp_path / "home"), "tmp": str(tmp_path)}[cwd]
    with pytest.raises(SandboxError) as refused:
        build(_request(tmp_path, cwd=where))
    assert fragment in refused.value.message
    assert "cd /srv/loops/acme && outloop run" in refused.value.message


def test_a_working_dir_holding_a_secret_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "work" / "token"
    request = _request(tmp_path, secret_files=(str(secret),))
    secret.write_text("x")
    with pytest.raises(SandboxError, match="contains the secret file"):
        build(request)


def test_protected_dirs_inside_a_writable_root_are_read_only_with_their_ancestors_pinned(tmp_path: Path) -> None:
    lookup = tmp_path / "work" / "conf" / "profiles"
    lookup.mkdir(parents=True)
    hooks = tmp_path / "work" / ".git" / "hooks"
    hooks.mkdir(parents=True)
    (hooks.parent / "config").write_text("[core]\n")
    view = build(_request(tmp_path, protected=(str(lookup),), lookup_dirs=(str(lookup),)))
    kinds = {m.dest: m.kind for m in view.mounts}
    assert kinds[str(lookup)] == "ro" and kinds[str(lookup.parent)] == "rw"  # a mount point cannot be renamed
    assert kinds[str(hooks)] == "ro" and kinds[str(hooks.parent / "config")] == "ro"
    assert kinds[str(hooks.parent)] == "rw"
    assert str(lookup.parent) not in view.writable  # a pin, not a new writable root


def test_a_missing_lookup_dir_the_loop_could_create_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "work" / "later" / "profiles"
    with pytest.raises(SandboxError, match="does not exist, and the loop could create it"):
        build(_request(tmp_path, lookup_dirs=(str(missing),)))
    outside = tmp_path / "elsewhere" / "profiles"  # not writable by the loop: no reason to refuse
    build(_request(tmp_path, lookup_dirs=(str(outside),)))
    with pytest.raises(SandboxError, match="does not exist"):  # the host view can write anywhere
        build(_request(tmp_path, mode="host", lookup_dirs=(str(outside),)))


def test_masks_hold_in_the_host_view_and_the_run_dir_stays_reachable_inside_them(tmp_path: Path) -> None:
    view = build(_request(tmp_path, mode="host"))
    kinds = [(m.kind, m.dest) for m in view.mounts]
    state = str(tmp_path / "state")
    assert ("tmpfs", state) in kinds
    assert kinds.index(("tmpfs", state)) < kinds.index(("rw", str(tmp_path / "state/run/r1")))
    assert view.describe().startswith("HOST")


def test_a_command_in_bin_adds_nothing_to_the_view_and_never_the_hosts_root() -> None:
    """`/bin/sh`'s prefix is `/`, which has a lib/: taken as an installation, the whole host would be bound."""
    assert command_dirs("/bin/sh", "/usr/bin:/bin") == []
    assert command_dirs("/usr/bin/env", "/usr/bin:/bin") == ["/usr"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_command_given_by_its_path_in_bin_runs_and_sees_only_the_view(world: World, backend: str) -> None:
    use_backend(world, backend)
    outside = Path(tempfile.mkdtemp(prefix="outloop-view-", dir="/var/tmp"))  # not under /tmp, which is a tmpfs
    try:
        (outside / "host-file").write_text("on the host\n")
        result = world.run("/bin/sh", "-c", f'echo ran; cat "{outside}/host-file" 2>/dev/null || echo hidden')
    finally:
        shutil.rmtree(outside)
    assert result.code == 0, result.err
    assert result.out.split() == ["ran", "hidden"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loop_in_a_venv_outside_the_working_dir_runs(world: World, backend: str) -> None:
    use_backend(world, backend)
    venv = world.work.parent / "tools" / "venv"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    script = world.work / "where.py"
    script.write_text("import sys\nprint(sys.prefix)\n")
    result = world.run(str(venv / "bin" / "python"), str(script))
    assert result.code == 0, result.err
    assert result.out.strip() == str(venv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cron_like_run_from_home_gets_125_then_works_from_the_loops_dir(world: World, backend: str) -> None:
    use_backend(world, backend)
    home = world.work.parent / "operator-home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "OUTLOOP_HOME": str(world.home),
           "OUTLOOP_SANDBOX": backend, "PYTHON_KEYRING_BACKEND": world.env["PYTHON_KEYRING_BACKEND"],
           "PYTHONPATH": world.env["PYTHONPATH"], "XDG_DATA_HOME": world.env["XDG_DATA_HOME"]}
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), OUTLOOP, "run", "-w", "acme", "--profiles",
            str(world.profiles), "--", "sh", "-c", "pwd; echo ok > made-by-the-loop"]
    refused = subprocess.run(argv, cwd=home, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 125
    assert "your home directory" in refused.stderr and "cd /srv/loops/acme && outloop run" in refused.stderr
    assert not (home / "made-by-the-loop").exists()
    followed = subprocess.run(["sh", "-c", f'cd "{world.work}" && exec "$@"', "sh", *argv], cwd=home,
                              capture_output=True, text=True, timeout=60)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.strip() == str(world.work)
    assert (world.work / "made-by-the-loop").read_text() == "ok\n"


def test_the_per_workspace_home_persists_between_runs_and_is_not_shared(world: World) -> None:
    first = world.run("sh", "-c", 'echo "$HOME"; echo cached > "$HOME/cache"')
    assert first.code == 0, first.err
    assert first.out.strip() == str(world.home / "homes" / "acme")
    again = world.run("sh", "-c", 'cat "$HOME/cache"')
    other = world.run("sh", "-c", 'cat "$HOME/cache" 2>&1; echo "$HOME"', workspace="globex")
    assert again.out.strip() == "cached"
    assert "No such file" in other.out and str(world.home / "homes" / "globex") in other.out
    assert oct(os.stat(world.home / "homes" / "acme").st_mode & 0o777) == "0o700"


def test_sandbox_md_publishes_every_mandatory_list_the_code_applies() -> None:
    from outloop_cli.sandbox import view

    text = (Path(__file__).resolve().parent.parent / "docs" / "SANDBOX.md").read_text()
    lists = [*view.SYSTEM_DIRS, *view.HOME_CREDENTIALS, *view.HOME_PERSISTENCE, *view.PROJECT_PERSISTENCE,
             *view.SYSTEM_CREDENTIALS, *view.RUNTIME_CREDENTIALS]
    assert [item for item in lists if f"`{item}`" not in text] == []
