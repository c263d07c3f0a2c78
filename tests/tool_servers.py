"""Real servers for real tools, over TLS on 127.0.0.1 (named `localhost`): git's smart HTTP and a PEP 503 index.

- `GitServer`: `git http-backend` behind a small CGI bridge; it records every Authorization header it receives
  and answers 401 without one, so a clone only works when outloop injected the credential.
- `serve_index`: a static simple index with one tiny wheel, `outloop-probe 1.0`, for `pip download`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from ca_support import TestCA

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


class _TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, handler: Any, ca: TestCA) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.socket = ca.server_context().wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up are routine here


class _Running:
    def __init__(self, server: _TLSServer) -> None:
        self.server = server
        self.port = server.server_address[1]
        self.base_url = f"https://localhost:{self.port}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> _Running:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()


class GitServer(_Running):
    """A bare repository `repo.git` with one commit on `main`, served by git http-backend."""

    def __init__(self, root: Path, ca: TestCA) -> None:
        self.root = root
        self.authorizations: list[str] = []
        _make_repo(root)
        super().__init__(_TLSServer(functools.partial(_GitHandler, self), ca))

    @staticmethod
    def expected_basic(secret: str, user: str = "x-access-token") -> str:
        return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


class _GitHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, git: GitServer, *args: Any) -> None:
        self.git = git
        super().__init__(*args)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._cgi()

    def do_POST(self) -> None:
        self._cgi()

    def _cgi(self) -> None:
        auth = self.headers.get("Authorization")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else self._read_chunked()
        if auth is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.git.authorizations.append(auth)
        path, _, query = self.path.partition("?")
        env = {**GIT_ENV, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": str(self.git.root),
               "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path, "QUERY_STRING": query,
               "REQUEST_METHOD": self.command, "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": "git", "GIT_PROTOCOL":
               self.headers.get("Git-Protocol", "")}
        backend = subprocess.run([_git_core() + "/git-http-backend"], input=body, env=env, capture_output=True,
                                 check=False)
        head, _, payload = backend.stdout.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _read_chunked(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", ""):
            return b""
        data = bytearray()
        while (size := int(self.rfile.readline().split(b";")[0], 16)) != 0:
            data += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return bytes(data)


@functools.cache
def _git_core() -> str:
    return subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True).stdout.strip()


def _make_repo(root: Path) -> None:
    work = root / "work"
    work.mkdir(parents=True)
    env = {**os.environ, **GIT_ENV}
    for argv in (["git", "init", "-q", "-b", "main", str(work)],
                 ["git", "-C", str(work), "commit", "-q", "--allow-empty", "-m", "first"],
                 ["git", "clone", "-q", "--bare", str(work), str(root / "repo.git")]):
        subprocess.run(argv, env=env, check=True, capture_output=True)
    shutil.rmtree(work)


@contextlib.contextmanager
def serve_index(root: Path, ca: TestCA) -> Iterator[_Running]:
    """`/simple/outloop-probe/` links to a minimal valid wheel under `/files/`."""
    wheel = "outloop_probe-1.0-py3-none-any.whl"
    (root / "files").mkdir(parents=True)
    (root / "simple" / "outloop-probe").mkdir(parents=True)
    with zipfile.ZipFile(root / "files" / wheel, "w") as archive:
        archive.writestr("outloop_probe/__init__.py", "")
        archive.writestr("outloop_probe-1.0.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: outloop-probe\nVersion: 1.0\n")
        archive.writestr("outloop_probe-1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("outloop_probe-1.0.dist-info/RECORD", "")
    (root / "simple" / "outloop-probe" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="/files/{wheel}">{wheel}</a></body></html>\n')
    (root / "simple" / "index.html").write_text(
        '<!DOCTYPE html><html><body><a href="/simple/outloop-probe/">outloop-probe</a></body></html>\n')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    with _Running(_TLSServer(functools.partial(Quiet, directory=str(root)), ca)) as running:
        yield running
