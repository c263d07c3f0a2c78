"""Acceptance 2 of the run path: a hostile acme loop cannot reach globex, other hosts, or denied routes."""

from __future__ import annotations

import json

from conftest import World

HOSTILE_LOOP = """
    import json, sys
    from outloop_cli.client import Outloop
    client = Outloop()
    attempts = json.loads(sys.argv[1])
    for credential, method, path in attempts:
        response = client.request(credential, method, path)
        print(json.dumps({"status": response.status, "error": (response.error or {}).get("type"),
                          "decision": response.headers.get("outloop-decision")}))
"""

CASES = [
    # (credential, method, path), expected status, expected error code, audited reason
    (("globex", "GET", "/crm/v3/objects/contacts/1"), 404, "unknown_credential", "unknown_credential"),
    (("billing", "GET", "/anything"), 404, "unknown_credential", "unknown_credential"),
    (("crm2", "GET", "/crm/v3/objects/contacts/1"), 404, "unknown_credential", "unknown_credential"),
    (("CRM", "GET", "/crm/v3/objects/contacts/1"), 404, "unknown_credential", "unknown_credential"),
    (("crm", "DELETE", "/crm/v3/objects/contacts/1"), 403, "denied", "no_matching_rule"),
    (("crm", "POST", "/crm/v3/objects/contacts/1/merge"), 403, "denied", "denied_by_rule"),
    (("crm", "get", "/crm/v3/objects/contacts/1"), 400, "bad_request", "malformed_http"),
    (("crm", "PURGE", "/crm/v3/objects/contacts/1"), 403, "denied", "no_matching_rule"),
    (("crm", "HEAD", "/crm/v3/objects/contacts/1"), 403, None, "no_matching_rule"),  # HEAD: no body
    (("crm", "GET", "/crm/v3/objects/companies/1"), 403, "denied", "no_matching_rule"),
    (("crm", "GET", "/crm/v3/objects/contacts/../companies"), 400, "bad_request", "dot_segment"),
    (("crm", "GET", "/crm/v3/objects/contacts/%2e%2e/companies"), 400, "bad_request", None),
    (("crm", "GET", "/crm/v3/objects/contacts%2F..%2Fcompanies"), 400, "bad_request", None),
    (("crm", "GET", "/crm/v3/objects/contacts/1%252Fmerge"), 400, "bad_request", None),
    (("crm", "GET", "/crm/v3/objects/contacts/1\\merge"), 400, "bad_request", None),
    (("crm", "GET", "/crm/v3/objects//contacts/1"), 400, "bad_request", "empty_segment"),
    (("crm", "GET", "/crm/v3/objects/contacts/1;x=merge"), 400, "bad_request", None),
    (("crm", "PATCH", "/crm/v3/objects/contacts/1/merge"), 403, "denied", "denied_by_rule"),
    (("crm", "GET", "/@evil.example/x"), 403, "denied", "no_matching_rule"),
]


def test_every_attack_fails_with_the_documented_status_and_is_audited(world: World) -> None:
    attempts = [case[0] for case in CASES]
    script = world.work / "hostile.py"
    import textwrap

    script.write_text(textwrap.dedent(HOSTILE_LOOP))
    from conftest import PYTHON

    result = world.run(PYTHON, str(script), json.dumps(attempts))
    assert result.code == 0, result.err
    answers = [json.loads(line) for line in result.out.splitlines()]
    events = world.events()
    assert len(answers) == len(events) == len(CASES)
    wrong = []
    for (attempt, status, error, reason), answer, event in zip(CASES, answers, events, strict=True):
        expected = {"status": status, "error": error, "decision": "deny"}
        audited = (event["decision"], event["status"], event["reason"] if reason else bool(event["reason"]))
        if answer != expected or audited != ("deny", status, reason or True):
            wrong.append((attempt, answer, audited))
    assert wrong == []
    assert world.upstream.requests == []
    assert world.other.requests == []
    world.assert_no_canary()


def test_unknown_credential_answer_is_identical_for_other_workspaces_and_nonsense(world: World) -> None:
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        client = Outloop()
        a = client.request("globex", "GET", "/x")
        b = client.request("zzz", "GET", "/x")
        print(a.status, b.status, a.error["message"].replace("globex", "N") == b.error["message"].replace("zzz", "N"))
    """)
    assert result.out.split() == ["404", "404", "True"]


def test_redirect_to_another_host_is_refused_and_not_followed(world: World) -> None:
    result = world.run_loop(f"""
        from outloop_cli.client import Outloop
        response = Outloop().request("crm", "GET", "/redirect?to={world.other.base_url}/steal")
        print(response.status, response.error["type"])
    """)
    assert result.out.split() == ["403", "denied"]
    assert world.other.requests == []
    request_event, response_event = world.events(kind=None)[1:3]
    assert request_event["decision"] == "allow"
    assert response_event["kind"] == "response"
    assert "redirect_off_host" in json.dumps(response_event)
    world.assert_no_canary()


def test_same_host_redirect_is_returned_through_the_broker(world: World) -> None:
    result = world.run_loop(f"""
        from outloop_cli.client import Outloop
        response = Outloop().request("crm", "GET", "/redirect?to={world.upstream.base_url}/crm/v3/objects/contacts")
        print(response.status, response.headers["location"])
    """)
    assert result.out.split() == ["302", "/v1/http/crm/crm/v3/objects/contacts"]


def test_child_cannot_override_the_injected_header_or_spoof_forwarding_headers(world: World) -> None:
    world.run_loop("""
        from outloop_cli.client import Outloop
        Outloop().request("crm", "GET", "/crm/v3/objects/contacts", headers={
            "Authorization": "Bearer attacker", "X-Forwarded-For": "1.2.3.4", "Host": "evil.example",
            "Proxy-Authorization": "x", "Connection": "X-Custom", "X-Custom": "dropped", "X-Keep": "kept"})
    """)
    (request,) = world.upstream.requests
    assert request.header("Authorization") == f"Bearer {world.canaries['acme']}"
    assert request.header("X-Forwarded-For") is None
    assert request.header("Proxy-Authorization") is None
    assert request.header("X-Custom") is None
    assert request.header("X-Keep") == "kept"
    assert request.header("Host") == f"127.0.0.1:{world.upstream.port}"
