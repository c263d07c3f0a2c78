"""The filesystem the child sees, as an ordered list of mounts that both backends apply the same way.

Computed, not performed: it stats paths and reads links but never mounts, so it is tested without namespaces.
The order is the contract: binds from the shallowest path down (an ancestor pinned before what it holds),
then masks over them, then the dirs that must stay reachable inside a mask (the run dir, the workspace HOME).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from outloop_cli.errors import SandboxError

WORKSPACE = "workspace"
HOST = "host"

# Read-only in the workspace view, whichever of them exist (symlinks such as /bin -> usr/bin are kept as links).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/nix")

# Credentials and stores under the operator's home, masked in every view (docs/SANDBOX.md publishes the list).
HOME_CREDENTIALS = (
    ".ssh", ".gnupg", ".netrc", ".git-credentials", ".config/git/credentials", ".config/gh", ".config/hub",
    ".aws", ".azure", ".config/gcloud", ".docker", ".config/containers/auth.json", ".kube", ".npmrc",
    ".yarnrc.yml", ".pypirc", ".cargo/credentials", ".cargo/credentials.toml", ".gem/credentials",
    ".m2/settings.xml", ".gradle/gradle.properties", ".vault-token", ".terraform.d/credentials.tfrc.json",
    ".pgpass", ".my.cnf", ".s3cfg", ".config/rclone", ".password-store", ".local/share/keyrings",
    ".local/share/kwalletd", ".local/share/python_keyring", ".config/op", ".op",
)
# Only root may read these, and a root loop keeps uid 0: password hashes, TLS and VPN keys, Kerberos keytabs.
SYSTEM_CREDENTIALS = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/security/opasswd", "/etc/ssl/private",
    "/etc/pki/tls/private", "/etc/letsencrypt", "/etc/krb5.keytab", "/etc/wireguard", "/etc/ipsec.secrets",
    "/etc/ppp/chap-secrets", "/etc/ppp/pap-secrets", "/etc/NetworkManager/system-connections", "/etc/openvpn",
)
SYSTEM_CREDENTIAL_GLOBS = (("/etc/ssh", "ssh_host_", "_key"),)  # (dir, prefix, suffix)
RUNTIME_CREDENTIALS = ("bus", "keyring", "gnupg")  # secret-service / gpg-agent sockets in XDG_RUNTIME_DIR

# Inside a writable home: what later runs as the operator, outside any sandbox. Read-only where they exist.
HOME_PERSISTENCE = (
    ".bashrc", ".bash_profile", ".bash_login", ".bash_logout", ".profile", ".zshrc", ".zshenv", ".zprofile",
    ".zlogin", ".zlogout", ".config/fish", ".cshrc", ".tcshrc", ".kshrc", ".inputrc", ".pam_environment",
    ".xprofile", ".xsessionrc", ".xinitrc", ".config/environment.d", ".config/systemd", ".config/autostart",
    ".local/bin", "bin", ".gitconfig", ".config/git", ".vimrc", ".vim", ".config/nvim", ".emacs", ".emacs.d",
    ".config/Code/User", ".vscode", ".claude", ".claude.json", ".cursor", ".config/outloop",
)
# Inside the working dir and each `write` dir (and the git repositories they belong to): editor and agent
# settings that run commands when the operator next opens the project, and git's hooks and config.
PROJECT_PERSISTENCE = (".envrc", ".vscode", ".idea", ".claude", ".cursor", ".devcontainer")
GIT_PERSISTENCE = ("hooks", "config")


@dataclass(frozen=True)
class Mount:
    """One step of the view. kind: ro | rw (bind `source` at `dest`), tmpfs, null (a file masked with
    /dev/null), symlink (`source` is the link's text), dev (minimal /dev), proc (this PID namespace's /proc,
    its /proc/sys read-only), remount-ro (`dest` becomes read-only once everything under it is in place)."""

    kind: str
    dest: str
    source: str = ""


@dataclass(frozen=True)
class ViewRequest:
    """Everything the view depends on, resolved by the caller (paths absolute; `~` already expanded)."""

    mode: str
    cwd: str
    user_home: str
    outloop_home: str
    keep: tuple[str, ...]  # the run dir and the workspace HOME: read-write, even inside a mask
    installation: tuple[str, ...]  # read-only: the command's interpreter and environment, outloop's own code
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()
    secret_files: tuple[str, ...] = ()  # the `file:` secrets (a working dir holding one is refused)
    protected: tuple[str, ...] = ()  # must not change under the child: lookup dirs, outloop's code, prefixes
    lookup_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class View:
    mode: str
    mounts: tuple[Mount, ...]
    writable: tuple[str, ...]
    readonly: tuple[str, ...]
    masked: tuple[str, ...]

    def describe(self) -> str:
        """The line the summary and the audit carry."""
        counts = f"{len(self.readonly)} read-only, {len(self.masked)} masked"
        if self.mode == HOST:
            return f"HOST: the whole host is visible (by profile); {counts}"
        return f"workspace: {len(self.writable)} writable ({', '.join(self.writable)}), {counts}"


def build(request: ViewRequest) -> View:
    """The mounts for this request; SandboxError (125) when the request would expose what it must not."""
    cwd = os.path.realpath(request.cwd)
    masks = _existing(request.masks)
    _refuse_masked_cwd(cwd, masks)
    if request.mode == WORKSPACE:
        _refuse_workspace_cwd(cwd, request)
    binds: dict[str, str] = {}
    links: dict[str, str] = {}
    if request.mode == HOST:
        binds["/"] = "rw"
        binds["/sys"] = "ro"
    else:
        for directory in SYSTEM_DIRS:
            if os.path.islink(directory):
                links[directory] = os.readlink(directory)
            elif os.path.isdir(directory):
                binds[directory] = "ro"
        for path in _existing([*request.installation, *request.read]):
            _add(binds, path, "ro")
        for path in _existing([cwd, *request.write]):
            _add(binds, path, "rw")
    keep = [os.path.realpath(path) for path in request.keep]
    readonly: list[str] = []
    pins: set[str] = set()
    for path in _protected(request, cwd):
        mask = next((m for m in masks if _within(path, m)), None)
        if mask is not None:  # the mask is a mount point itself; what holds it must stay put too
            pins |= _pin_ancestors(binds, mask)
        elif _state(binds, path) == "rw":
            pins |= _pin_ancestors(binds, path)
            binds[path] = "ro"
            readonly.append(path)
    _refuse_creatable_lookup_dirs(request.lookup_dirs, binds, keep)
    mounts = _ordered(request.mode, binds, links)
    masked = [path for path in _outermost(masks) if _state(binds, path) is not None]
    for path in masked:
        mounts.append(Mount("tmpfs" if os.path.isdir(path) else "null", path))
    for path in sorted(keep, key=_depth):
        mounts.append(Mount("rw", path, path))
    if request.mode == WORKSPACE:
        mounts.append(Mount("remount-ro", "/"))
    writable = sorted({*[p for p, k in binds.items() if k == "rw" and p not in pins and p != "/"], *keep})
    return View(request.mode, tuple(mounts), tuple(writable), tuple(sorted(readonly)), tuple(masked))


def home_masks(user_home: str, runtime_dir: str) -> list[str]:
    """Credential files and stores of the operator and the system, for `ViewRequest.masks`."""
    paths = [os.path.join(user_home, rel) for rel in HOME_CREDENTIALS]
    paths += [os.path.join(runtime_dir, rel) for rel in RUNTIME_CREDENTIALS]
    paths += list(SYSTEM_CREDENTIALS)
    for directory, prefix, suffix in SYSTEM_CREDENTIAL_GLOBS:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        paths += [os.path.join(directory, n) for n in names if n.startswith(prefix) and n.endswith(suffix)]
    return paths


# ----- refusals ----------------------------------------------------------------------------------------------

CRON_HINT = ("run it from the loop's own directory, e.g. in a crontab: "
             "`cd /srv/loops/acme && outloop run -w acme -- ./loop.sh` (cron starts jobs in $HOME)")


def _refuse_masked_cwd(cwd: str, masks: Sequence[str]) -> None:
    """The loop would start in an empty mask and fail as if it were its own fault: say so before it starts."""
    hiding = next((m for m in masks if _within(cwd, m)), None)
    if hiding is not None:
        raise SandboxError(f"the current directory {cwd} is inside {hiding}, which the sandbox hides from the "
                           "child; cd to the loop's own directory and run again")


def _refuse_workspace_cwd(cwd: str, request: ViewRequest) -> None:
    """The working dir becomes writable by the child: never the whole disk, the operator's home or outloop's
    state."""
    home = os.path.realpath(request.user_home)
    if cwd in ("/", home):
        where = "/" if cwd == "/" else f"your home directory ({cwd})"
        raise SandboxError(f"the working directory is {where}: the loop may write its working directory, so "
                           f"outloop will not hand it all of that; {CRON_HINT}")
    state = os.path.realpath(request.outloop_home)
    if _within(state, cwd):
        raise SandboxError(f"the working directory {cwd} contains outloop's state dir {state}; {CRON_HINT}, "
                           "or set OUTLOOP_HOME outside it")
    secret = next((s for s in _existing(request.secret_files) if _within(s, cwd)), None)
    if secret is not None:
        raise SandboxError(f"the working directory {cwd} contains the secret file {secret}; move the secret "
                           f"out of it, or {CRON_HINT}")


def _refuse_creatable_lookup_dirs(lookup_dirs: Iterable[str], binds: dict[str, str], keep: Sequence[str]) -> None:
    """A lookup dir that does not exist yet, where the child could create it, would shadow profiles later."""
    for directory in lookup_dirs:
        if os.path.exists(directory):
            continue
        parent = _nearest_existing(directory)
        if _state(binds, parent) == "rw" or any(_within(parent, k) for k in keep):
            raise SandboxError(f"the profile lookup dir {directory} does not exist, and the loop could create it "
                               f"(it may write {parent}) to plant a profile for the next run; create it "
                               f"(mkdir -p {directory}) or remove it from OUTLOOP_PROFILES")


# ----- what is visible, and how ------------------------------------------------------------------------------


def _protected(request: ViewRequest, cwd: str) -> Iterator[str]:
    """Paths the child must not change (real paths, existing ones only)."""
    candidates = [*request.protected]
    candidates += [os.path.join(request.user_home, rel) for rel in HOME_PERSISTENCE]
    for root in [cwd, *request.write]:
        candidates += [os.path.join(root, rel) for rel in PROJECT_PERSISTENCE]
        for ancestor in _self_and_ancestors(os.path.realpath(root)):
            git = os.path.join(ancestor, ".git")
            if os.path.isdir(git):
                candidates += [os.path.join(git, rel) for rel in GIT_PERSISTENCE]
            elif os.path.lexists(git):
                candidates.append(git)
    yield from sorted(set(_existing(candidates)), key=_depth)


def _pin_ancestors(binds: dict[str, str], path: str) -> set[str]:
    """Bind each writable ancestor of `path` onto itself: a mount point cannot be renamed (EBUSY), so the child
    cannot move the protected dir aside and put its own in its place."""
    pinned = set()
    for ancestor in reversed(list(_self_and_ancestors(os.path.dirname(path)))):
        if ancestor != "/" and _state(binds, ancestor) == "rw" and ancestor not in binds:
            binds[ancestor] = "rw"
            pinned.add(ancestor)
    return pinned


def _ordered(mode: str, binds: dict[str, str], links: dict[str, str]) -> list[Mount]:
    entries: list[Mount] = [Mount(kind, path, path) for path, kind in binds.items()]
    entries += [Mount("symlink", path, target) for path, target in links.items()]
    if mode == WORKSPACE:
        entries += [Mount("tmpfs", "/tmp"), Mount("dev", "/dev"), Mount("proc", "/proc")]
    else:
        entries.append(Mount("proc", "/proc"))
    return sorted(entries, key=lambda m: (_depth(m.dest), m.dest))


def _add(binds: dict[str, str], path: str, kind: str) -> None:
    """Add a bind unless an identical one above already covers it."""
    if _state(binds, path) != kind or kind == "rw":
        binds[path] = kind


def _state(binds: dict[str, str], path: str) -> str | None:
    """"ro", "rw" or None (not in the view) for `path`, by its innermost bind."""
    top = _innermost(binds, path)
    return None if top is None else binds[top]


def _innermost(binds: dict[str, str], path: str) -> str | None:
    best: str | None = None
    for bound in binds:
        if _within(path, bound) and (best is None or len(bound) > len(best)):
            best = bound
    return best


def _within(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


def _outermost(paths: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for path in sorted(set(paths), key=_depth):
        if not any(_within(path, top) for top in chosen) and path != "/":
            chosen.append(path)
    return chosen


def _existing(paths: Iterable[str]) -> list[str]:
    """Real paths of those that exist; one lstat first, since most candidates (credential files) do not."""
    found = []
    for path in paths:
        if not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if os.path.lexists(real):
            found.append(real)
    return found


def _nearest_existing(path: str) -> str:
    for ancestor in _self_and_ancestors(os.path.realpath(path)):
        if os.path.exists(ancestor):
            return ancestor
    return "/"


def _self_and_ancestors(path: str) -> Iterator[str]:
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")
