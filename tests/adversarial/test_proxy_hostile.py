"""A prompt-injected loop against the egress proxy: raw CONNECTs, lying SNI and Host headers, smuggling, h2.

Each hostile loop talks to the proxy byte by byte (no client library tidies the attack up), prints what it saw
as JSON, and the test checks what the upstreams received. Each attack has a positive control in the same run:
the same bytes with the lie removed get through, so a refusal is the defence's doing, not a broken setup.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYTHON
from proxy_support import PROXY_PROFILE, ProxyWorld, make_proxy_world
from sandbox_support import require_layer

from adversarial.conftest import CanaryCollector, _injection_stripped

pytestmark = pytest.mark.sandbox

PRELUDE = r'''
import json, os, socket, ssl, sys

PORT = int(os.environ["HTTPS_PROXY"].rsplit(":", 1)[1])
API, INDEX, THIRD = (int(p) for p in sys.argv[1:4])


def proxy() -> socket.socket:
    return socket.create_connection(("127.0.0.1", PORT), timeout=10)


def read_all(sock) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data


def connect(target: str):
    sock = proxy()
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head.split(b" ")[1].decode() if head.count(b" ") else "closed"


def tls(sock, sni, alpn=None, check=True):
    context = ssl.create_default_context()  # SSL_CERT_FILE: the run's bundle
    context.check_hostname = check
    if alpn:
        context.set_alpn_protocols(alpn)
    return context.wrap_socket(sock, server_hostname=sni)


def status_of(raw: bytes) -> str:
    return raw.split(b" ")[1].decode() if raw.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else (
        "closed" if not raw else "garbage")


def get(sock, path, host, extra=b""):
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + extra
                 + b"Connection: close\r\n\r\n")
    return read_all(sock)


def report(**seen):
    print(json.dumps(seen), flush=True)
'''


@pytest.fixture
def pw(request: pytest.FixtureRequest, canary_collector: CanaryCollector) -> Iterator[ProxyWorld]:
    require_layer("network_isolation")
    with make_proxy_world() as proxy_world:
        yield proxy_world
        world = proxy_world.world
        canary_collector.harvest(world, request.node.nodeid)
        canary_collector.add(f"{request.node.nodeid}: the third host", proxy_world.third.all_bytes())
        canary_collector.add(f"{request.node.nodeid}: the egress host", proxy_world.index.all_bytes())
        for index, recorded in enumerate(proxy_world.api.requests):
            canary_collector.add(f"{request.node.nodeid}: api request #{index} outside the injection",
                                 _injection_stripped(recorded.raw))


def hostile(pw: ProxyWorld, body: str, profile: str | None = None) -> dict[str, object]:
    if profile is not None:
        pw.write_profile(profile)
    script = pw.world.work / "hostile.py"
    script.write_text(PRELUDE + body)
    result = pw.world.run(PYTHON, str(script), str(pw.api.port), str(pw.index.port), str(pw.third.port))
    assert result.code == 0, result.err
    return dict(json.loads(result.out.strip().splitlines()[-1]))


def _connects(pw: ProxyWorld) -> list[tuple[object, ...]]:
    return [(e["host"], e["decision"], e["reason"]) for e in pw.world.events(pw.world.last_run_id())
            if e["method"] == "CONNECT"]


def with_egress(*entries: str) -> str:
    listed = ", ".join(f'"{entry}"' for entry in entries)
    return PROXY_PROFILE.replace('egress = ["localhost:{INDEX_PORT}"]', f"egress = [{listed}]")


def test_connect_to_an_ip_literal_is_refused_even_where_the_credential_host_lives(pw: ProxyWorld) -> None:
    seen = hostile(pw, """
_, by_ip = connect(f"127.0.0.1:{API}")
_, by_ipv6 = connect(f"[::1]:{API}")
_, by_name = connect(f"localhost:{API}")  # control: the credential's own name is intercepted
report(by_ip=by_ip, by_ipv6=by_ipv6, by_name=by_name)
""")
    assert seen == {"by_ip": "403", "by_ipv6": "403", "by_name": "200"}
    assert pw.api.connections == 0
    assert (f"127.0.0.1:{pw.api.port}", "deny", "egress_denied") in _connects(pw)


def test_an_egress_entry_resolving_to_a_credential_host_is_not_tunnelled(pw: ProxyWorld) -> None:
    """An operator (or an injected profile edit) lists a name or address that is really the credential's upstream:
    a tunnel there would reach it without policy. Refused by address, whatever the name: the IP literal always,
    and another name for 127.0.0.1 where /etc/hosts has one (e.g. the machine's own host name)."""
    alias = _loopback_alias()
    entries = ["127.0.0.1:{API_PORT}", "127.0.0.1:{INDEX_PORT}"] + ([f"{alias}:{{API_PORT}}"] if alias else [])
    seen = hostile(pw, f"""
_, to_api = connect(f"127.0.0.1:{{API}}")
alias = {alias!r}
_, by_alias = connect(f"{{alias}}:{{API}}") if alias else (None, "403")
sock, to_index = connect(f"127.0.0.1:{{INDEX}}")  # control: an address listed in egress is tunnelled
sock.close()
report(to_api=to_api, by_alias=by_alias, to_index=to_index)
""", pw.fill(with_egress(*entries)))
    assert seen == {"to_api": "403", "by_alias": "403", "to_index": "200"}
    assert pw.api.connections == 0
    refused = [host for host, _, reason in _connects(pw) if reason == "resolves_to_credential_host"]
    assert refused == [f"127.0.0.1:{pw.api.port}"] + ([f"{alias}:{pw.api.port}"] if alias else [])


def _loopback_alias() -> str | None:
    """A name other than localhost that this machine resolves to 127.0.0.1, if any."""
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if fields[:1] == ["127.0.0.1"]:
            for name in fields[1:]:
                if name != "localhost" and re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name):
                    return name
    return None


def test_an_sni_other_than_the_connect_host_ends_the_handshake(pw: ProxyWorld) -> None:
    seen = hostile(pw, """
sock, _ = connect(f"localhost:{API}")
try:
    tls(sock, "evil.example", check=False)
    lied = "handshake completed"
except (ssl.SSLError, OSError) as exc:
    lied = "refused"
sock, _ = connect(f"localhost:{API}")
honest = status_of(get(tls(sock, "localhost"), "/crm/control", f"localhost:{API}"))
report(lied=lied, honest=honest)
""")
    assert seen == {"lied": "refused", "honest": "200"}
    assert [r.path for r in pw.api.requests] == ["/crm/control"]
    assert (f"localhost:{pw.api.port}", "deny", "tls_handshake_failed") in _connects(pw)


def test_a_host_header_naming_neither_the_connect_target_nor_its_sni_is_refused(pw: ProxyWorld) -> None:
    seen = hostile(pw, """
results = {}
for label, host in (("third", f"localhost:{THIRD}"), ("other", "evil.example"), ("ip", f"127.0.0.1:{API}"),
                    ("control", f"localhost:{API}")):
    sock, _ = connect(f"localhost:{API}")
    results[label] = status_of(get(tls(sock, "localhost"), "/crm/x", host))
report(**results)
""")
    assert seen == {"third": "400", "other": "400", "ip": "400", "control": "200"}
    assert len(pw.api.requests) == 1
    pw.assert_third_untouched()
    reasons = [e["reason"] for e in pw.world.events(pw.world.last_run_id()) if e["decision"] == "deny"]
    assert reasons == ["host_mismatch"] * 3


def test_a_credential_host_also_listed_in_egress_is_intercepted_never_tunnelled(pw: ProxyWorld) -> None:
    profile = pw.fill(with_egress("localhost:{API_PORT}", "localhost:{INDEX_PORT}"))
    seen = hostile(pw, """
# Plain HTTP smuggled where a blind tunnel would have carried it: the proxy expects TLS and gets none.
sock, status = connect(f"localhost:{API}")
smuggled = status_of(get(sock, "/crm/smuggled", f"localhost:{API}", b"Authorization: Bearer child-key\\r\\n"))
sock, _ = connect(f"localhost:{API}")
judged = status_of(get(tls(sock, "localhost"), "/crm/judged", f"localhost:{API}",
                       b"Authorization: Bearer child-key\\r\\n"))
sock, _ = connect(f"localhost:{API}")
denied = status_of(get(tls(sock, "localhost"), "/admin", f"localhost:{API}"))
report(status=status, smuggled=smuggled, judged=judged, denied=denied)
""", profile)
    assert seen == {"status": "200", "smuggled": "closed", "judged": "200", "denied": "403"}
    recorded = pw.api.wait_for(1)
    assert [r.path for r in recorded] == ["/crm/judged"]
    assert recorded[0].header("Authorization") == f"Bearer {pw.secret}"
    assert all(reason != "egress_tunnel" for _, _, reason in _connects(pw))


def test_http2_and_alpn_tricks_get_http_1_1_or_nothing(pw: ProxyWorld) -> None:
    seen = hostile(pw, """
sock, _ = connect(f"localhost:{API}")
h2_only = tls(sock, "localhost", alpn=["h2"])
alpn_h2_only = h2_only.selected_alpn_protocol()
h2_only.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + bytes.fromhex("000000040000000000"))
preface = status_of(read_all(h2_only))
sock, _ = connect(f"localhost:{API}")
both = tls(sock, "localhost", alpn=["h2", "http/1.1"])
alpn_both = both.selected_alpn_protocol()
upgrade = status_of(get(both, "/crm/upgrade", f"localhost:{API}",
                        b"Upgrade: h2c\\r\\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\\r\\n"))
report(alpn_h2_only=alpn_h2_only, preface=preface, alpn_both=alpn_both, upgrade=upgrade)
""")
    assert seen == {"alpn_h2_only": None, "preface": "400", "alpn_both": "http/1.1", "upgrade": "200"}
    recorded = pw.api.wait_for(1)
    assert [r.path for r in recorded] == ["/crm/upgrade"]
    assert recorded[0].header("Upgrade") is None
    curl = pw.world.run("curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version}", pw.url("/crm/curl"))
    assert curl.out == "1.1"


def test_an_absolute_form_request_to_a_third_host_is_refused(pw: ProxyWorld) -> None:
    seen = hostile(pw, """
third = status_of(get(proxy(), f"http://localhost:{THIRD}/x", f"localhost:{THIRD}"))
third_ip = status_of(get(proxy(), f"http://127.0.0.1:{THIRD}/x", f"127.0.0.1:{THIRD}"))
userinfo = status_of(get(proxy(), f"http://localhost:{API}@localhost:{THIRD}/x", f"localhost:{THIRD}"))
sock, _ = connect(f"localhost:{API}")
inside = status_of(get(tls(sock, "localhost"), f"https://localhost:{THIRD}/x", f"localhost:{API}"))
plain_to_credential = status_of(get(proxy(), f"http://localhost:{API}/crm/plain", f"localhost:{API}"))
report(third=third, third_ip=third_ip, userinfo=userinfo, inside=inside, plain_to_credential=plain_to_credential)
""")
    # Control: plain http naming the credential's host is judged and sent upstream over TLS with the secret.
    assert seen == {"third": "403", "third_ip": "403", "userinfo": "400", "inside": "400",
                    "plain_to_credential": "200"}
    assert pw.third.connections == 0
    pw.assert_third_untouched()
    recorded = pw.api.wait_for(1)
    assert [r.path for r in recorded] == ["/crm/plain"]
    assert recorded[0].header("Authorization") == f"Bearer {pw.secret}"


def test_a_secret_echoed_by_the_upstream_is_masked_on_the_intercepted_path(pw: ProxyWorld) -> None:
    seen = hostile(pw, """
sock, _ = connect(f"localhost:{API}")
raw = get(tls(sock, "localhost"), "/echo-auth-in-header", f"localhost:{API}")
sock, _ = connect(f"localhost:{API}")
headers = get(tls(sock, "localhost"), "/echo-headers", f"localhost:{API}")
report(raw=raw.decode("latin-1"), headers=headers.decode("latin-1"))
""")
    assert pw.secret not in str(seen["raw"]) + str(seen["headers"])
    assert "Bearer ***" in str(seen["raw"]) and "Bearer ***" in str(seen["headers"])


def test_a_process_outside_the_run_cannot_use_the_proxy(pw: ProxyWorld) -> None:
    """The proxy's hand-over socket is reachable by path for a same-user process only until the broker took the
    relay's listener from it; after that it is gone, and the proxy's port exists only in the child's network."""
    info, release = pw.world.work / "proxy-socket", pw.world.work / "release"
    script = pw.world.work / "waiting.py"
    script.write_text(
        "import os, pathlib, sys, time\n"
        "path = pathlib.Path(os.environ['OUTLOOP_SOCKET']).with_name('proxy.sock')\n"
        "port = os.environ['HTTPS_PROXY'].rsplit(':', 1)[1].rstrip('/')\n"
        "pathlib.Path(sys.argv[1] + '.tmp').write_text(f'{path}\\n{port}')\n"
        "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
        "while not os.path.exists(sys.argv[2]):\n"
        "    time.sleep(0.02)\n")
    runner = threading.Thread(target=pw.world.run, args=(PYTHON, str(script), str(info), str(release)), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        path, port = info.read_text().split()
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as outsider, pytest.raises(FileNotFoundError):
            outsider.connect(path)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=10).close()
    finally:
        release.touch()
        runner.join(60)
    assert pw.api.connections == 0
    assert _connects(pw) == []
