"""Directories and files outloop owns, opened so that nobody who got there first can redirect them.

Two threats shape this module. Another local user can pre-create outloop's state directory (a shared or
`/tmp` OUTLOOP_HOME) and plant an audit.db or a link in it; outloop must refuse that directory, never adopt it,
as root too. And a hostile loop can plant links wherever it can write (its working directory, where an
operator often asks for `--summary-json`); outloop must never write through them.

So every walk goes one component at a time from an open directory (openat), state directories and files are
never reached through a symbolic link, and new files appear only by renaming a temp file that was created
`O_EXCL | O_NOFOLLOW` under a name nobody can predict. The rules are in docs/CHOICES.md ("State directories").
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from outloop_cli.errors import StateDirError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# An audit.db planted as a FIFO must not hang the check: O_NONBLOCK.
_CHECK_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_PRIVATE_DIR_MODE = 0o700
_PRIVATE_FILE_MODE = 0o600


def describe_user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _not_yours(path: Path, uid: int, what: str) -> StateDirError:
    return StateDirError(
        f"{path} is owned by {describe_user(uid)}, not by you ({describe_user(os.geteuid())}); outloop never "
        f"adopts {what} another user created, because they could read or forge what it holds. Remove it (as its "
        "owner or root), or set OUTLOOP_HOME to a directory of your own")


def _is_a_link(path: Path) -> StateDirError:
    return StateDirError(
        f"{path} is a symbolic link; outloop does not follow links in its state directories, where a link "
        f"could send its writes elsewhere. Use the real path (`readlink -f {path}`) or remove the link")


def _failed(path: Path, action: str, exc: OSError) -> StateDirError:
    return StateDirError(f"cannot {action} {path}: {exc.strerror or exc}")


def open_dir(path: Path, *, private_from: Path | None = None, create: bool = True) -> int | None:
    """A descriptor for directory `path`, walked from `/` one component at a time; None when it is missing and
    `create` is false.

    Components from `private_from` (default: `path` itself) down are outloop's own: created 0700, never a
    link, owned by the effective user, too-open modes tightened, world-writable ones refused (anything may have
    been planted in them). Ancestors above may be links and may be shared, but only root or the effective user
    may own them (or their links), and a world-writable one must be sticky like /tmp: whoever else could
    rename them could swap outloop's directory underneath it.
    """
    target = Path(os.path.abspath(path))
    root = Path(os.path.abspath(private_from or path))
    if target != root and root not in target.parents:
        raise ValueError(f"{private_from} is not {path} or one of its ancestors")
    first_private = len(root.parts) - 1
    fd: int | None = os.open("/", _DIR_FLAGS)
    current = Path("/")
    try:
        for index, name in enumerate(target.parts[1:], start=1):
            current = current / name
            assert fd is not None
            parent, fd = fd, _step(fd, name, current, private=index >= first_private, create=create)
            os.close(parent)
            if fd is None:
                return None
        return fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def _step(parent: int, name: str, shown: Path, *, private: bool, create: bool) -> int | None:
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        if not create:
            return None
        try:
            os.mkdir(name, _PRIVATE_DIR_MODE, dir_fd=parent)
        except FileExistsError:
            pass  # another run made it first: it is checked below like any directory that was already there
        except OSError as exc:
            raise _failed(shown, "create", exc) from None
        return _step(parent, name, shown, private=private, create=False)
    except OSError as exc:
        raise _failed(shown, "inspect", exc) from None
    link = stat.S_ISLNK(info.st_mode)
    if link and private:
        raise _is_a_link(shown)
    if link and info.st_uid not in (0, os.geteuid()):
        raise StateDirError(f"{shown} is a symbolic link owned by {describe_user(info.st_uid)}, who could point "
                            "it anywhere; use a path without it")
    try:
        fd = os.open(name, _DIR_FLAGS | (0 if link else os.O_NOFOLLOW), dir_fd=parent)
    except OSError as exc:
        raise _failed(shown, "open the directory", exc) from None
    try:
        _check_dir(fd, shown, private=private)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_dir(fd: int, shown: Path, *, private: bool) -> None:
    info = os.fstat(fd)
    mode = stat.S_IMODE(info.st_mode)
    if private:
        if info.st_uid != os.geteuid():
            raise _not_yours(shown, info.st_uid, "a directory")
        if mode & 0o002:
            raise StateDirError(
                f"{shown} is writable by every user (mode {mode:04o}), so anything in it may have been planted; "
                f"check what it holds, then `chmod 700 {shown}`, or remove it")
        if mode & 0o077:
            os.fchmod(fd, _PRIVATE_DIR_MODE)  # ours, and at most the operator's own group could write it
    else:
        if info.st_uid not in (0, os.geteuid()):
            raise StateDirError(f"{shown} is owned by {describe_user(info.st_uid)}, who could swap what outloop "
                                "keeps below it; set OUTLOOP_HOME to a path whose directories are yours or root's")
        if mode & 0o002 and not mode & stat.S_ISVTX:
            raise StateDirError(f"{shown} is writable by every user and not sticky (mode {mode:04o}), so anyone "
                                "could swap what outloop keeps below it; choose a path under a safe directory")


def check_private_file(path: Path, *, create: bool = False, companions: Sequence[str] = ()) -> bool:
    """Whether `path` exists, as a regular file of the effective user's in a private directory (created 0600,
    and its directory, when `create`); refuses links, other users' files and non-files.

    `companions` are suffixes of files that live beside it (SQLite's `-wal` and `-shm`): checked the same way
    when present, since the library opens them by name.
    """
    dir_fd = open_dir(path.parent, create=create)
    if dir_fd is None:
        return False
    try:
        exists = _check_file(dir_fd, path, create=create)
        for suffix in companions:
            _check_file(dir_fd, path.with_name(path.name + suffix), create=False)
        return exists
    finally:
        os.close(dir_fd)


def _check_file(dir_fd: int, path: Path, *, create: bool) -> bool:
    try:
        info = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        if not create:
            return False
        try:
            os.close(os.open(path.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             _PRIVATE_FILE_MODE, dir_fd=dir_fd))
        except FileExistsError:
            pass  # another run made it first: checked below
        except OSError as exc:
            raise _failed(path, "create", exc) from None
        return _check_file(dir_fd, path, create=False)
    except OSError as exc:
        raise _failed(path, "inspect", exc) from None
    if stat.S_ISLNK(info.st_mode):
        raise _is_a_link(path)
    if not stat.S_ISREG(info.st_mode):
        raise StateDirError(f"{path} is not a regular file; move it aside")
    if info.st_uid != os.geteuid():
        raise _not_yours(path, info.st_uid, "a file")
    if stat.S_IMODE(info.st_mode) & 0o077:
        try:
            fd = os.open(path.name, _CHECK_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise _failed(path, "open", exc) from None
        try:
            os.fchmod(fd, _PRIVATE_FILE_MODE)
        finally:
            os.close(fd)
    return True


def read_private_file(path: Path) -> bytes | None:
    """The content of `path` (None when it or its directory is missing), after the checks of
    `check_private_file`, read through a descriptor opened without following a link."""
    dir_fd = open_dir(path.parent, create=False)
    if dir_fd is None:
        return None
    try:
        if not _check_file(dir_fd, path, create=False):
            return None
        try:
            fd = os.open(path.name, _CHECK_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise _failed(path, "open", exc) from None
        with os.fdopen(fd, "rb") as handle:
            return handle.read()
    finally:
        os.close(dir_fd)


def replace_file(dir_fd: int, name: str, data: bytes, *, mode: int) -> None:
    """Put `data` at `name` in the directory `dir_fd`, all or nothing, without following any link.

    The temp file gets an unpredictable name and is created `O_EXCL | O_NOFOLLOW`, so a link planted at any
    name the writer could use makes the create fail instead of redirecting it. The rename replaces whatever
    sits at `name` (a planted link included) and never writes through it.
    """
    temp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        raise


class PinnedFile:
    """A file to write later (at the end of a run) into the directory it names now.

    The directory is opened before the child starts, so a loop that swaps a path component for a link while it
    runs cannot move the write; the write itself is `replace_file`.
    """

    def __init__(self, path: Path) -> None:
        if path.name in ("", ".", ".."):
            raise IsADirectoryError(21, "is a directory", str(path))
        self.path = path
        self._dir_fd = os.open(path.parent, _DIR_FLAGS)

    def write(self, data: bytes) -> None:
        replace_file(self._dir_fd, self.path.name, data, mode=0o644)

    def close(self) -> None:
        os.close(self._dir_fd)
