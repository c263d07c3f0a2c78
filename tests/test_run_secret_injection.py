"""Acceptance 1 of the run path: the upstream gets the secret, the child never sees it."""

from __future__ import annotations

import json

from conftest import World


def test_upstream_receives_the_acme_secret_in_the_configured_header(world: World) -> None:
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        response = Outloop().request("crm", "GET", "/crm/v3/objects/contacts/42")
        print(response.status)
    """)
    assert result.code == 0, result.err
    assert result.out.strip() == "200"
    (request,) = world.upstream.requests
    assert request.path == "/crm/v3/objects/contacts/42"
    assert request.header("Authorization") == f"Bearer {world.canaries['acme']}"


def test_child_environment_argv_and_output_never_hold_a_secret(world: World) -> None:
    result = world.run_loop("""
        import json, os, sys
        from outloop_cli.client import Outloop
        client = Outloop()
        client.request("crm", "GET", "/crm/v3/objects/contacts")
        with open(f"/proc/{os.getpid()}/environ", "rb") as handle:
            raw_environ = handle.read().decode("utf-8", "replace")
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            parent_cmdline = handle.read().decode("utf-8", "replace")
        print(json.dumps({"env": dict(os.environ), "argv": sys.argv, "raw": raw_environ,
                          "parent": parent_cmdline}))
        print(json.dumps(dict(os.environ)), file=sys.stderr)
    """)
    assert result.code == 0, result.err
    seen = json.loads(result.out.splitlines()[-1])
    assert "AWS_SECRET_ACCESS_KEY" not in seen["env"]
    assert "ACME_CRM_TOKEN" not in seen["env"]
    assert seen["env"]["OUTLOOP_WORKSPACE"] == "acme"
    assert seen["env"]["LOOP_CLIENT"] == "acme"
    assert set(seen["env"]) >= {"OUTLOOP_SOCKET", "OUTLOOP_RUN_ID", "PATH"}
    world.assert_no_canary(result.out, result.err)


def test_only_env_keep_and_env_set_reach_the_child(world: World) -> None:
    world.extra_env = {"SOME_RANDOM_VAR": "x", "LC_TIME": "C"}
    result = world.run_loop("""
        import json, os
        print(json.dumps(sorted(os.environ)))
    """)
    names = set(json.loads(result.out))
    assert "SOME_RANDOM_VAR" not in names
    assert "LC_TIME" in names  # env_keep globs: LC_*
    assert "PYTHON_KEYRING_BACKEND" not in names and "XDG_DATA_HOME" not in names


def test_audit_records_the_request_without_the_secret(world: World) -> None:
    world.run_loop("""
        from outloop_cli.client import Outloop
        Outloop().request("crm", "GET", "/crm/v3/objects/contacts", params={"email": "a@b.c"})
    """)
    (event,) = world.events()
    assert event["decision"] == "allow"
    assert event["credential"] == "crm"
    assert event["path"] == "/crm/v3/objects/contacts"
    world.assert_no_canary()
    assert b"a@b.c" not in world.audit_bytes()  # query values are never stored


def test_secret_echoed_by_the_upstream_reaches_the_child_masked(world: World) -> None:
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        client = Outloop()
        echoed = client.request("crm", "GET", "/echo-headers")
        split = client.request("crm", "GET", "/echo-auth-in-header")
        print(echoed.body.decode())
        print(split.headers.get("x-echo"))
        print(split.body.decode())
    """)
    assert result.code == 0, result.err
    assert "Bearer ****" in result.out
    world.assert_no_canary(result.out)


def test_sdk_style_query_and_basic_injection(world: World) -> None:
    world.write_profile("acme", """
        version = 1
        [credentials.q]
        secret = "keyring"
        base_url = "{UPSTREAM}"
        inject = { query = "hapikey" }
        allow = ["GET /**"]
        [credentials.b]
        secret = "keyring"
        base_url = "{UPSTREAM}"
        inject = { basic = "api" }
        allow = ["GET /**"]
    """)
    world.set_keyring("acme", "q", world.canaries["acme"])
    world.set_keyring("acme", "b", world.canaries["acme"])
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        client = Outloop()
        print(client.request("q", "GET", "/x?a=1&hapikey=stolen").status)
        print(client.request("b", "GET", "/y", headers={"Authorization": "Bearer mine"}).status)
    """)
    assert result.code == 0, result.err
    query_request, basic_request = world.upstream.requests
    assert query_request.path == f"/x?a=1&hapikey={world.canaries['acme']}"
    import base64

    expected = base64.b64encode(f"api:{world.canaries['acme']}".encode()).decode()
    assert basic_request.header("Authorization") == f"Basic {expected}"


def test_reveal_is_refused_unless_the_profile_allows_it(world: World) -> None:
    result = world.run_loop("""
        from outloop_cli.client import Outloop, OutloopClientError
        try:
            Outloop().secret("crm")
        except OutloopClientError as exc:
            print("refused", exc.response.status if exc.response else None)
    """)
    assert "refused 403" in result.out
    (event,) = world.events()
    assert event["decision"] == "deny" and event["reason"] == "reveal_not_allowed"
