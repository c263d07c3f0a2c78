"""OAuth2 credentials against a real token endpoint: the broker mints, caches, refreshes and rotates; the child
never holds a refresh token, a client secret or an access token."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from auth_support import IdentityProvider, write_auth_profile
from conftest import World
from sandbox_support import require_layer
from test_cmd_secret import keyring_value

LOOP_PRINTS_ENV = """
    import json, os
    from outloop_cli.client import Outloop
    client = Outloop()
    statuses = [client.request("sf", method, path).status for method, path in {calls!r}]
    with open(f"/proc/{{os.getpid()}}/environ", "rb") as handle:
        raw = handle.read().decode("utf-8", "replace")
    print(json.dumps({{"statuses": statuses, "env": raw}}))
"""


@pytest.fixture
def idp(world: World) -> Iterator[IdentityProvider]:
    tag = world.canaries["acme"].rsplit("-", 1)[1]
    with IdentityProvider(client_secret=f"cnry-cs-{tag}", refresh_token=f"cnry-rt-{tag}") as provider:
        world.canaries["refresh_token"] = provider.refresh_token
        world.canaries["client_secret"] = provider.client_secret
        yield provider


def _oauth2(world: World, idp: IdentityProvider, *, grant: str = "refresh_token", token_url: str | None = None,
            extra: str = "", secret: str = "keyring") -> None:
    url = token_url or f"{idp.base_url}/token"
    write_auth_profile(world, "sales", "sf", f"{idp.base_url}/api",
                       f'{{ oauth2 = {{ token_url = "{url}", grant = "{grant}", client_id = "{idp.client_id}"'
                       f'{extra} }} }}', secret=secret)
    if secret == "keyring":
        document = f'client_secret = "{idp.client_secret}"\n'
        if grant == "refresh_token":
            document = f'refresh_token = "{idp.refresh_token}"\n' + document
        world.set_keyring("sales", "sf", document)


def _run(world: World, calls: list[tuple[str, str]]) -> tuple[list[int], str, str]:
    result = world.run_loop(LOOP_PRINTS_ENV.format(calls=calls), workspace="sales")
    assert result.code == 0, result.err
    seen = json.loads(result.out.splitlines()[-1])
    return seen["statuses"], seen["env"], result.err


def _assert_child_saw_no_token(world: World, idp: IdentityProvider, *texts: str) -> None:
    world.assert_no_canary(*texts)  # refresh token, client secret: also the audit DB and outloop's output
    audit = world.audit_bytes()
    for token in [*idp.all_access_tokens(), *idp.refresh_tokens_issued]:
        assert token.encode() not in audit
        for text in (*texts, *world.seen_output):
            assert token not in text


def test_the_access_token_is_minted_once_cached_and_sent_as_bearer(world: World, idp: IdentityProvider) -> None:
    _oauth2(world, idp)
    statuses, env, err = _run(world, [("GET", "/ok"), ("GET", "/ok"), ("POST", "/ok")])
    assert statuses == [200, 200, 200]
    assert len(idp.token_calls) == 1 and idp.token_calls[0].ok
    assert {call.token for call in idp.api_calls} == set(idp.all_access_tokens())
    _assert_child_saw_no_token(world, idp, env, err)


def test_token_calls_are_audited_as_their_own_events_without_values(world: World, idp: IdentityProvider) -> None:
    _oauth2(world, idp)
    _run(world, [("GET", "/ok")])
    (event,) = world.events(kind="token")
    assert event["credential"] == "sf" and event["method"] == "POST" and event["path"] == "/token"
    assert event["status"] == 200 and event["error"] is None
    detail = json.loads(str(event["detail"]))
    assert detail == {"scheme": "oauth2", "trigger": "first_use", "grant": "refresh_token", "rotated": True}
    verify = world.outloop("audit", "verify", world.last_run_id())
    assert verify.code == 0, verify.combined
    shown = world.outloop("audit", "show", "last")
    assert shown.code == 0 and "token" in shown.out, shown.combined


def test_the_token_is_refreshed_before_it_expires(world: World, idp: IdentityProvider) -> None:
    idp.lifetime = 3.0  # refreshed 0.75 s before it expires
    _oauth2(world, idp)
    # Calls for more than two token lifetimes: every one must carry a live token, none may meet a 401.
    result = world.run_loop("""
        import json, time
        from outloop_cli.client import Outloop
        client = Outloop()
        end, statuses = time.monotonic() + 7.0, []
        while time.monotonic() < end:
            statuses.append(client.request("sf", "GET", "/ok").status)
        print(json.dumps(statuses))
    """, workspace="sales")
    assert result.code == 0, result.err
    assert set(json.loads(result.out)) == {200}
    assert all(call.status == 200 for call in idp.api_calls)
    assert len(idp.token_calls) >= 2
    first_expiry = min(expires for _, expires in idp.issued.values())
    assert idp.token_calls[1].at < first_expiry  # refreshed while the first token was still valid


def test_a_rotated_refresh_token_is_written_back_to_the_keyring(world: World, idp: IdentityProvider) -> None:
    _oauth2(world, idp)
    first = idp.refresh_token
    statuses, _, err = _run(world, [("GET", "/ok")])
    assert statuses == [200]
    assert idp.refresh_token != first  # the endpoint rotated it, and the old one is dead now
    # The tests' keyring is a plaintext file: the rotated token is kept (refusing would lose it), but not silently.
    assert "WARNING" in err and "stored UNENCRYPTED" in err and "PlaintextFileKeyring" in err
    # The document is written back whole, as one line of JSON like every keyring value.
    stored = json.loads(keyring_value(world, "sales", "sf") or "")
    assert stored == {"refresh_token": idp.refresh_token, "client_secret": idp.client_secret}
    # The next run starts from the rotated token: it would be refused with the old one.
    assert _run(world, [("GET", "/ok")])[0] == [200]
    assert [call.ok for call in idp.token_calls] == [True, True]
    _assert_child_saw_no_token(world, idp)


def test_a_rotation_the_source_cannot_store_is_a_warning_in_the_summary(world: World, idp: IdentityProvider) -> None:
    path = world.home / "sf.toml"
    path.write_text(f'refresh_token = "{idp.refresh_token}"\nclient_secret = "{idp.client_secret}"\n')
    path.chmod(0o600)
    _oauth2(world, idp, secret=f"file:{path}")
    statuses, _, err = _run(world, [("GET", "/ok")])
    assert statuses == [200]
    assert "WARNING" in err and "rotated the refresh token" in err and "cannot be written" in err
    _assert_child_saw_no_token(world, idp, err)


def test_a_401_gets_one_refresh_and_retry_for_idempotent_methods_only(world: World, idp: IdentityProvider) -> None:
    _oauth2(world, idp)
    # /revoke kills the token it is called with, so the next call meets a 401 from the API.
    result = world.run_loop("""
        import json
        from outloop_cli.client import Outloop
        client = Outloop()
        calls = [("GET", "/ok", None), ("GET", "/revoke", None), ("GET", "/ok", None), ("GET", "/revoke", None),
                 ("PUT", "/ok", b'{"name": "Ada"}'), ("GET", "/revoke", None), ("POST", "/ok", b"{}")]
        print(json.dumps([client.request("sf", method, path, body=body).status for method, path, body in calls]))
    """, workspace="sales")
    assert json.loads(result.out) == [200, 200, 200, 200, 200, 200, 401], result.err
    assert [(call.method, call.path, call.status) for call in idp.api_calls] == [
        ("GET", "/api/ok", 200), ("GET", "/api/revoke", 200),
        ("GET", "/api/ok", 401), ("GET", "/api/ok", 200),  # one refresh, one retry
        ("GET", "/api/revoke", 200),
        ("PUT", "/api/ok", 401), ("PUT", "/api/ok", 200),  # a small body is held, so PUT is retried with it
        ("GET", "/api/revoke", 200), ("POST", "/api/ok", 401),  # POST is not retried
    ]
    assert idp.bodies == [b'{"name": "Ada"}', b'{"name": "Ada"}', b"{}"]
    assert len(idp.token_calls) == 3
    triggers = [json.loads(str(event["detail"]))["trigger"] for event in world.events(kind="token")]
    assert triggers == ["first_use", "after_401", "after_401"]


def test_a_token_endpoint_that_is_down_gives_502_with_a_clear_reason(world: World, idp: IdentityProvider) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/token"
    _oauth2(world, idp, token_url=dead)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        response = Outloop().request("sf", "GET", "/ok")
        print(response.status)
        print(response.text)
    """, workspace="sales")
    assert result.code == 0, result.err
    status, body = result.out.split("\n", 1)
    assert status == "502"
    assert "upstream_error" in body and "token endpoint" in body and "cannot be reached" in body
    assert idp.api_calls == []  # nothing went to the API without a token
    (event,) = world.events(kind="token")
    assert event["error"] == "token_endpoint_unreachable"


def test_a_refused_refresh_token_gives_502_naming_the_oauth_error(world: World, idp: IdentityProvider) -> None:
    _oauth2(world, idp)
    idp.refresh_token = "rt-someone-else-rotated-it"
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        response = Outloop().request("sf", "GET", "/ok")
        print(response.status, response.text)
    """, workspace="sales")
    assert result.out.startswith("502") and "invalid_grant" in result.out
    assert "stale or unknown" not in result.out  # the endpoint's free text stays out
    _assert_child_saw_no_token(world, idp, result.out)


def test_client_credentials_with_http_basic_client_authentication(world: World, idp: IdentityProvider) -> None:
    _oauth2(world, idp, grant="client_credentials", extra=', client_auth = "basic", scopes = ["api", "refresh"]')
    statuses, env, err = _run(world, [("GET", "/ok")])
    assert statuses == [200]
    (call,) = idp.token_calls
    assert call.ok and call.form == {"grant_type": "client_credentials", "scope": "api refresh"}
    _assert_child_saw_no_token(world, idp, env, err)


def test_an_upstream_echoing_the_minted_token_is_masked(world: World, idp: IdentityProvider) -> None:
    _oauth2(world, idp)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        print(Outloop().request("sf", "GET", "/echo-auth").text)
    """, workspace="sales")
    (token,) = idp.all_access_tokens()
    assert token not in result.out and "Bearer " + "*" * len(token) in result.out


def test_a_document_field_pasted_into_the_childs_environment_stops_the_run(world: World,
                                                                          idp: IdentityProvider) -> None:
    _oauth2(world, idp)
    profile = world.profiles / "sales.toml"
    profile.write_text(profile.read_text().replace(
        "version = 1\n", f'version = 1\n[run]\nenv_set = {{ SF_REFRESH = "{idp.refresh_token}" }}\n', 1))
    result = world.run("true", workspace="sales")
    assert result.code == 125
    assert "SF_REFRESH would hold the secret of credential 'sf'" in result.err
    assert idp.token_calls == []
    world.assert_no_canary(result.err)


def test_concurrent_first_requests_share_one_token_exchange(world: World, idp: IdentityProvider) -> None:
    _oauth2(world, idp)
    result = world.run_loop("""
        import json
        from concurrent.futures import ThreadPoolExecutor
        from outloop_cli.client import Outloop
        with ThreadPoolExecutor(8) as pool:
            print(json.dumps(list(pool.map(lambda _: Outloop().request("sf", "GET", "/ok").status, range(16)))))
    """, workspace="sales")
    assert json.loads(result.out) == [200] * 16, result.err
    assert len(idp.token_calls) == 1


def test_a_tool_without_a_base_url_switch_gets_the_same_tokens_and_retry_through_the_egress_proxy(
        world: World, idp: IdentityProvider) -> None:
    """The proxy's absolute-form requests take the /v1/http/ path to the upstream: minted token, one refresh and
    retry after a 401. The token endpoint, outside the credential's base_url, is not the child's to call."""
    require_layer("network_isolation")  # the proxy is on where the network is isolated
    _oauth2(world, idp)
    result = world.run_loop(f"""
        import json, requests
        calls = [("GET", "/api/ok"), ("GET", "/api/revoke"), ("GET", "/api/ok"), ("POST", "/token")]
        answers = [requests.request(method, {idp.base_url!r} + path) for method, path in calls]
        print(json.dumps([[a.status_code, a.headers.get("Outloop-Reason")] for a in answers]))
    """, workspace="sales")
    assert result.code == 0, result.err
    assert json.loads(result.out.splitlines()[-1]) == [[200, None], [200, None], [200, None], [403, "egress_denied"]]
    assert [(call.method, call.path, call.status) for call in idp.api_calls] == [
        ("GET", "/api/ok", 200), ("GET", "/api/revoke", 200), ("GET", "/api/ok", 401), ("GET", "/api/ok", 200)]
    assert len(idp.token_calls) == 2
    _assert_child_saw_no_token(world, idp, result.out, result.err)
