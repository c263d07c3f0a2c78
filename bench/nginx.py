"""Private nginx instances for the benches: a reverse proxy that injects the credential, and a canned upstream.

Each instance gets a generated config in its own temp dir (`master_process off`, one worker, logs and pid in
that dir), so nothing on the host is read or written and no root is needed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from common import SECRET
from upstream import BODY


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def proxy_config(upstream_port: int) -> tuple[str, str]:
    """(http-level block, location body) of a proxy that sets `Authorization` as outloop would."""
    upstream = f"""
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}"""
    location = f"""
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {SECRET}";"""
    return upstream, location


def canned_upstream_config() -> tuple[str, str]:
    """The upstream `upstream.py` imitates, in C: the same JSON body, and 401 without the bench secret."""
    body = BODY.decode()
    if any(c in body for c in "'$\\"):
        raise ValueError("the canned body cannot be quoted for nginx's `return`")
    location = f"""
            if ($http_authorization != "Bearer {SECRET}") {{ return 401; }}
            default_type application/json;
            return 200 '{body}';"""
    return "", location


class Nginx:
    """One nginx process: generated config in `workdir`, one worker, no master, logs and pid in `workdir`."""

    def __init__(self, binary: str, workdir: Path, config: tuple[str, str]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / sub).mkdir(exist_ok=True)
        self.port = free_port()
        self.version = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False).stderr.strip()
        http_extra, location = config
        conf = workdir / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;{http_extra}
    server {{
        listen 127.0.0.1:{self.port} backlog=1024;
        location / {{{location}
        }}
    }}
}}
""")
        self.proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_for_port(self.port):
            self.stop()
            err = (workdir / "error.log").read_text() if (workdir / "error.log").exists() else ""
            raise RuntimeError(f"nginx did not start: {err.strip()[-400:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def release(self) -> str:
        return self.version.split("/")[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
