"""Unmodified clients reach a credential's HTTPS host through the egress proxy, with no key of their own.

Each test runs a real client as the loop, inside `outloop run` with the network isolated, against a real local
TLS upstream named `localhost` whose certificate comes from a test CA (given to outloop by `ca_file`). The
upstream must see the injected secret; the child must never hold it.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Iterator

import pytest
from conftest import PYTHON
from proxy_support import PROXY_PROFILE, ProxyWorld, make_proxy_world, require_tool
from sandbox_support import require_layer
from tool_servers import GitServer, serve_index

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def shared() -> Iterator[ProxyWorld]:
    require_layer("network_isolation")
    with make_proxy_world() as proxy_world:
        yield proxy_world


@pytest.fixture
def pw(shared: ProxyWorld) -> ProxyWorld:
    shared.api.clear()
    shared.index.clear()
    shared.write_profile()
    return shared


def _python(pw: ProxyWorld, source: str) -> tuple[int, str, str]:
    result = pw.world.run(PYTHON, "-c", source)
    return result.code, result.out, result.err


def _assert_injected(pw: ProxyWorld, path: str) -> None:
    recorded = pw.api.wait_for(1)
    assert [r.path for r in recorded] == [path]
    assert recorded[0].header("Authorization") == f"Bearer {pw.secret}"
    pw.world.assert_no_canary()


def test_curl_with_no_flags(pw: ProxyWorld) -> None:
    require_tool("curl")
    result = pw.world.run("curl", "-sS", "--fail", pw.url("/crm/v3/contacts"))
    assert result.code == 0, result.err
    assert json.loads(result.out) == {"ok": True, "method": "GET", "path": "/crm/v3/contacts"}
    _assert_injected(pw, "/crm/v3/contacts")


def test_python_requests(pw: ProxyWorld) -> None:
    code, out, err = _python(pw, f"import requests; r = requests.get({pw.url('/crm/a')!r}); print(r.status_code)")
    assert (code, out.strip()) == (0, "200"), err
    _assert_injected(pw, "/crm/a")


def test_httpx(pw: ProxyWorld) -> None:
    code, out, err = _python(pw, f"import httpx; print(httpx.get({pw.url('/crm/b')!r}).status_code)")
    assert (code, out.strip()) == (0, "200"), err
    _assert_injected(pw, "/crm/b")


def test_urllib(pw: ProxyWorld) -> None:
    code, out, err = _python(pw, f"import urllib.request as u; print(u.urlopen({pw.url('/crm/c')!r}).status)")
    assert (code, out.strip()) == (0, "200"), err
    _assert_injected(pw, "/crm/c")


def test_a_post_body_goes_up_and_the_placeholder_auth_the_child_sent_is_replaced(pw: ProxyWorld) -> None:
    result = pw.world.run("curl", "-sS", "--fail", "-H", "Authorization: Bearer child-made-this-up",
                          "-d", '{"name": "x"}', "-H", "Content-Type: application/json", pw.url("/crm/v3/contacts"))
    assert result.code == 0, result.err
    recorded = pw.api.wait_for(1)[0]
    assert (recorded.method, recorded.body) == ("POST", b'{"name": "x"}')
    assert recorded.header("Authorization") == f"Bearer {pw.secret}"
    assert b"child-made-this-up" not in recorded.raw


def test_a_denied_path_gets_the_brokers_403_and_reaches_nothing(pw: ProxyWorld) -> None:
    result = pw.world.run("curl", "-sS", "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}",
                          pw.url("/crm/42/merge"))
    assert result.out == "403"
    assert pw.api.requests == []
    events = pw.world.events(pw.world.last_run_id())
    assert [(e["method"], e["path"], e["reason"], e["rule"]) for e in events] == [
        ("POST", "/crm/42/merge", "denied_by_rule", "* /crm/*/merge")]


ANSWERS = """
import json, requests, sys
answers = []
for method, url, body in json.load(open(sys.argv[1])):
    r = requests.request(method, url, data=body, headers={"Content-Type": "application/json"} if body else {})
    error = r.json().get("error") if r.headers.get("Outloop-Decision") == "deny" else None
    answers.append([r.status_code, r.headers.get("Outloop-Reason"), error])
print(json.dumps(answers))
"""


def _answers(pw: ProxyWorld, calls: list[tuple[str, str, str | None]]) -> list[list[object]]:
    """Each call's status, Outloop-Reason and nested error body; the calls travel in a file, not in argv (which
    the audit records)."""
    (pw.world.work / "calls.json").write_text(json.dumps(calls))
    (pw.world.work / "answers.py").write_text(ANSWERS)
    code, out, err = _python(pw, "import runpy, sys; sys.argv[1:] = ['calls.json']; runpy.run_path('answers.py')")
    assert code == 0, err
    return list(json.loads(out.strip().splitlines()[-1]))


def test_the_proxys_refusals_are_the_brokers_nested_errors(pw: ProxyWorld) -> None:
    """What an SDK behind the proxy reads is what it reads from /v1/http/: the nested error and Outloop-Reason."""
    answers = _answers(pw, [("POST", pw.url("/crm/42/merge"), None), ("GET", pw.url("/other"), None),
                            ("GET", pw.url("/crm/a%2Fb"), None)])
    assert answers == [
        [403, "denied_by_rule", {"type": "denied", "reason": "denied_by_rule", "credential": "api",
                                 "rule": "* /crm/*/merge", "message": "POST /crm/42/merge is not allowed for 'api' "
                                                                      "(denied by rule '* /crm/*/merge')"}],
        [403, "no_matching_rule", {"type": "denied", "reason": "no_matching_rule", "credential": "api", "rule": None,
                                   "message": "GET /other is not allowed for 'api' (no allow rule matches)"}],
        [400, "encoded_slash", answers[2][2]]]
    assert isinstance(answers[2][2], dict) and answers[2][2]["type"] == "bad_request"
    assert pw.api.requests == []


def test_a_refused_connect_answers_with_the_nested_error_too(pw: ProxyWorld) -> None:
    source = f"""
import json, os, socket
sock = socket.create_connection(("127.0.0.1", int(os.environ["HTTPS_PROXY"].rsplit(":", 1)[1])))
sock.sendall(b"CONNECT localhost:{pw.third.port} HTTP/1.1\\r\\nHost: localhost:{pw.third.port}\\r\\n\\r\\n")
data = b""
while chunk := sock.recv(65536):
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
print(json.dumps([head.decode().split("\\r\\n"), json.loads(body)]))
"""
    code, out, err = _python(pw, source)
    assert code == 0, err
    head, body = json.loads(out)
    assert head[0] == "HTTP/1.1 403 Forbidden"
    assert "Outloop-Reason: egress_denied" in head and "Outloop-Decision: deny" in head
    assert body["error"]["type"] == "denied" and body["error"]["reason"] == "egress_denied"
    assert f"localhost:{pw.third.port}" in body["error"]["message"]
    pw.assert_third_untouched()


GLOBEX_GUARD = '\n[guard]\nidentifiers = ["globex.example", "GLX-"]\n'


def test_the_wrong_client_guard_judges_intercepted_requests_as_it_does_v1_http(pw: ProxyWorld) -> None:
    globex = pw.world.profiles / "globex.toml"
    original = globex.read_text()
    globex.write_text(original + GLOBEX_GUARD)
    try:
        answers = _answers(pw, [("POST", pw.url("/crm/v3/contacts"), '{"email": "jane@acme.example"}'),
                                ("POST", pw.url("/crm/v3/contacts"), '{"email": "bob@GLOBEX.example"}'),
                                ("GET", pw.url("/crm/v3/contacts/glx-7"), None)])
    finally:
        globex.write_text(original)
    assert [answer[:2] for answer in answers] == [[200, None], [403, "foreign_identifier"],
                                                  [403, "foreign_identifier"]]
    assert all(isinstance(answer[2], dict) and answer[2]["rule"] is None for answer in answers[1:])  # not globex
    assert [r.body for r in pw.api.requests] == [b'{"email": "jane@acme.example"}']  # only acme's own lead
    denied = [e for e in pw.world.events(pw.world.last_run_id()) if e["decision"] == "deny"]
    assert [(e["reason"], e["rule"]) for e in denied] == [("foreign_identifier", "globex: guard.identifiers[0]"),
                                                          ("foreign_identifier", "globex: guard.identifiers[1]")]
    assert b"glx-7" not in pw.world.audit_bytes().lower()


def test_a_secret_echoed_by_the_upstream_comes_back_masked(pw: ProxyWorld) -> None:
    result = pw.world.run("curl", "-sS", "-i", "--fail", pw.url("/echo-auth-in-header"))
    assert result.code == 0, result.err
    assert pw.secret not in result.out
    assert "Bearer ***" in result.out  # the header and the chunked body both echo it, masked
    pw.world.assert_no_canary(result.out)


def test_sse_arrives_event_by_event(pw: ProxyWorld) -> None:
    source = f"""
import time, requests
start = time.monotonic()
with requests.get({pw.url('/sse?n=4&interval=0.4')!r}, stream=True) as r:
    for line in r.iter_lines():
        if line:
            print(round(time.monotonic() - start, 3), line.decode(), flush=True)
"""
    code, out, err = _python(pw, source)
    assert code == 0, err
    arrivals = [float(line.split()[0]) for line in out.splitlines()]
    assert len(arrivals) == 4
    # Buffered, all four would arrive together after ~1.2 s; streamed, they arrive ~0.4 s apart.
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap > 0.2 for gap in gaps), arrivals


def test_a_tunnel_to_an_egress_host_is_untouched_and_audited(pw: ProxyWorld) -> None:
    # The tunnelled TLS is end to end: the client verifies the index's own certificate (the test CA).
    result = pw.world.run("curl", "-sS", "--fail", "--cacert", str(pw.ca.ca_pem), pw.index.base_url + "/simple/")
    assert result.code == 0, result.err
    recorded = pw.index.wait_for(1)
    assert recorded[0].path == "/simple/" and recorded[0].header("Authorization") is None
    events = pw.world.events(pw.world.last_run_id(), kind=None)
    tunnel = [e for e in events if e["method"] == "CONNECT"]
    assert [(e["kind"], e["host"], e["decision"], e["reason"], e["rule"]) for e in tunnel] == [
        ("request", f"localhost:{pw.index.port}", "allow", "egress_tunnel", f"localhost:{pw.index.port}"),
        ("response", f"localhost:{pw.index.port}", None, None, None)]
    response = tunnel[1]
    assert int(str(response["bytes_in"])) > 0 and int(str(response["bytes_out"])) > 0
    assert float(str(response["latency_ms"])) > 0


def test_a_host_in_neither_list_gets_403_at_connect_and_hears_nothing(pw: ProxyWorld) -> None:
    result = pw.world.run("curl", "-sS", "--cacert", str(pw.ca.ca_pem), pw.third.base_url + "/anything")
    assert result.code != 0
    assert "403" in result.err
    assert pw.third.connections == 0
    pw.assert_third_untouched()
    events = pw.world.events(pw.world.last_run_id())
    assert [(e["method"], e["host"], e["decision"], e["reason"], e["status"]) for e in events] == [
        ("CONNECT", f"localhost:{pw.third.port}", "deny", "egress_denied", 403)]


def test_the_childs_environment_points_every_tool_at_the_proxy_and_the_runs_ca(pw: ProxyWorld) -> None:
    result = pw.world.run(PYTHON, "-c", "import json, os; print(json.dumps(dict(os.environ)))")
    env = json.loads(result.out)
    proxy = env["HTTPS_PROXY"]
    assert proxy.startswith("http://127.0.0.1:")
    assert all(env[name] == proxy for name in ("HTTP_PROXY", "https_proxy", "http_proxy"))
    assert env["NO_PROXY"] == "" and env["no_proxy"] == ""
    assert env["NODE_USE_ENV_PROXY"] == "1"
    bundles = {env[name] for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                                      "GIT_SSL_CAINFO", "AWS_CA_BUNDLE", "PIP_CERT", "CARGO_HTTP_CAINFO",
                                      "BUNDLE_SSL_CA_CERT", "npm_config_cafile", "DENO_CERT")}
    assert len(bundles) == 1
    pw.world.assert_no_canary(result.out)


def test_the_ca_bundle_holds_the_system_roots_and_the_runs_ca_and_is_gone_after_the_run(pw: ProxyWorld) -> None:
    source = ("import os, ssl; path = os.environ['SSL_CERT_FILE']; text = open(path).read(); "
              "print(path); print(text.count('BEGIN CERTIFICATE')); "
              "print(open(ssl.get_default_verify_paths().openssl_cafile).read().count('BEGIN CERTIFICATE'))")
    result = pw.world.run(PYTHON, "-c", source)
    path, in_bundle, system = result.out.split()
    assert int(in_bundle) == int(system) + 1
    assert not (pw.world.home / "run").exists() or not any((pw.world.home / "run").iterdir())
    assert not path.startswith(str(pw.world.work))


def test_proxy_false_leaves_the_environment_alone(pw: ProxyWorld) -> None:
    pw.write_profile(pw.fill(_with_run_line("proxy = false")))
    result = pw.world.run(PYTHON, "-c", "import os; print(sorted(k for k in os.environ if 'PROXY' in k.upper() "
                                       "or k.endswith(('CERT_FILE', 'CA_BUNDLE'))))")
    assert result.out.strip() == "[]"


def test_an_sdk_in_base_url_mode_reaches_the_broker_through_the_proxy(pw: ProxyWorld) -> None:
    """NO_PROXY is empty, so http://127.0.0.1 (OUTLOOP_URL) goes through the proxy too; it must still work."""
    pw.write_profile(pw.fill(PROFILE_WITH_CHILD_ENV))
    source = ("import os, requests; r = requests.get(os.environ['API_URL'] + '/crm/d', "
              "headers={'Authorization': 'Bearer ' + os.environ['API_TOKEN']}); print(r.status_code)")
    code, out, err = _python(pw, source)
    assert (code, out.strip()) == (0, "200"), err
    _assert_injected(pw, "/crm/d")


def test_git_ls_remote_over_https_with_the_credential_as_basic_auth(pw: ProxyWorld) -> None:
    require_tool("git")
    with GitServer(pw.world.work / "srv", pw.ca) as git:
        pw.write_profile(pw.fill(GIT_PROFILE.replace("{GIT}", git.base_url)))
        pw.world.set_keyring("acme", "git", pw.secret)
        result = pw.world.run("git", "ls-remote", git.base_url + "/repo.git")
        assert result.code == 0, result.err
        assert "refs/heads/main" in result.out
        assert git.authorizations and set(git.authorizations) == {git.expected_basic(pw.secret)}
        pw.world.assert_no_canary(result.out)


def test_pip_download_from_an_index_listed_in_egress_goes_through_an_audited_tunnel(pw: ProxyWorld) -> None:
    with serve_index(pw.world.work / "index", pw.ca) as index:
        pw.write_profile(pw.fill(PROXY_PROFILE_EGRESS.replace("{INDEX_PORT}", str(index.port))))
        # The index is private (the test CA): the loop adds that CA to the run's bundle, as a user would. pip's
        # --cert alone is not enough here: requests prefers REQUESTS_CA_BUNDLE, which outloop sets.
        script = (f'cat "$SSL_CERT_FILE" {pw.ca.ca_pem} > bundle.pem && REQUESTS_CA_BUNDLE=$PWD/bundle.pem '
                  f'{PYTHON} -m pip download --no-deps --disable-pip-version-check -d dl '
                  f'--index-url https://localhost:{index.port}/simple/ outloop-probe')
        result = pw.world.run("sh", "-c", script, timeout=120)
        assert result.code == 0, result.err
        assert (pw.world.work / "dl" / "outloop_probe-1.0-py3-none-any.whl").exists()
        events = pw.world.events(pw.world.last_run_id(), kind=None)
        tunnels = [e for e in events if e["method"] == "CONNECT" and e["reason"] == "egress_tunnel"]
        assert tunnels and all(e["host"] == f"localhost:{index.port}" for e in tunnels)
        finished = [e for e in events if e["method"] == "CONNECT" and e["kind"] == "response"]
        assert finished and all(int(str(e["bytes_out"])) > 0 for e in finished)


def test_node_fetch_honours_the_proxy_where_node_supports_it(pw: ProxyWorld) -> None:
    """Node 22.21+ and 24.5+ read HTTPS_PROXY with NODE_USE_ENV_PROXY=1 (outloop sets it); Node before 22.21
    ignores proxy variables, and with the network isolated its fetch then fails without reaching anything. In
    between (23.x, early 24.x) either outcome is accepted, but never a leak."""
    require_tool("node")
    version = tuple(int(part) for part in _node_version().split("."))
    honours = version >= (24, 5, 0) or (22, 21, 0) <= version < (23, 0, 0)
    ignores = version < (22, 21, 0)
    script = pw.world.work / "fetch.mjs"
    script.write_text(f"const r = await fetch({pw.url('/crm/node')!r}); console.log(r.status);\n")
    result = pw.world.run("node", str(script))
    worked = (result.code, result.out.strip()) == (0, "200")
    if honours or (worked and not ignores):
        assert worked, result.err
        _assert_injected(pw, "/crm/node")
    else:
        assert result.code != 0 and "fetch failed" in result.err
        assert pw.api.requests == []
    pw.world.assert_no_canary(result.out, result.err)


def _node_version() -> str:
    return subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip().lstrip("v")


def _with_run_line(line: str) -> str:
    return PROXY_PROFILE.replace("[run]\n", f"[run]\n    {line}\n")


PROFILE_WITH_CHILD_ENV = _with_run_line("").replace(
    'deny = ["* /crm/*/merge"]',
    'deny = ["* /crm/*/merge"]\n    child_env = { API_URL = "{url}", API_TOKEN = "{token}" }')
GIT_PROFILE = """
    version = 1
    [credentials.git]
    secret = "keyring"
    base_url = "{GIT}"
    ca_file = "{CA}"
    inject = { basic = "x-access-token" }
    allow = ["GET /repo.git/info/refs", "POST /repo.git/git-upload-pack"]
"""
PROXY_PROFILE_EGRESS = _with_run_line("")


def test_the_upstream_is_verified_so_a_private_ca_needs_ca_file(pw: ProxyWorld) -> None:
    pw.write_profile(pw.fill(PROXY_PROFILE.replace('ca_file = "{CA}"\n', "")))
    result = pw.world.run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", pw.url("/crm/unverified"))
    assert result.out == "502"
    assert pw.api.requests == []  # the TLS handshake failed before any request was sent


def test_proxy_true_without_an_isolated_network_refuses_to_start(pw: ProxyWorld) -> None:
    pw.write_profile(pw.fill(_with_run_line("proxy = true")))
    result = pw.world.run("true", flags=["--network", "open"])
    assert result.code == 125
    assert "run.proxy = true needs the child's network isolated" in result.err


def test_with_the_network_open_the_proxy_is_off_by_default(pw: ProxyWorld) -> None:
    result = pw.world.run(PYTHON, "-c", "import os; print(os.environ.get('HTTPS_PROXY'))", flags=["--network", "open"])
    assert result.out.strip() == "None"
