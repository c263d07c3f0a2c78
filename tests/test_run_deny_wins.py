"""End to end, when an allow rule and a deny rule both match a request, the deny rule decides: 403, nothing
upstream, and the audit row names the deny rule (not the allow rule that also matched)."""

from __future__ import annotations

import json

from conftest import World

PROFILE = """
    version = 1
    [credentials.items]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    allow = ["GET /v1/items/**", "* /v1/items/*", "GET /v1/exact"]
    deny = ["* /v1/items/*/delete", "GET /v1/exact", "DELETE /v1/items/*"]
"""

LOOP = """
    import json
    from outloop_cli.client import Outloop
    client = Outloop()
    for method, path in json.loads(sys.argv[1]):
        print(json.dumps({"status": client.request("items", method, path).status}))
"""

# (method, path), the decision, the rule that decides it.
CASES = [
    (("GET", "/v1/items/1/delete"), "deny", "* /v1/items/*/delete"),  # a ** allow and a more specific deny
    (("POST", "/v1/items/1/delete"), "deny", "* /v1/items/*/delete"),
    (("GET", "/v1/items/1/DELETE"), "deny", "* /v1/items/*/delete"),  # deny also matches ignoring ASCII case
    (("GET", "/v1/items/1/delete/"), "deny", "* /v1/items/*/delete"),  # and one trailing slash
    (("GET", "/v1/exact"), "deny", "GET /v1/exact"),  # the same rule text in both lists
    (("DELETE", "/v1/items/7"), "deny", "DELETE /v1/items/*"),  # a * method allow and a DELETE deny
    (("POST", "/v1/items/7"), "allow", "* /v1/items/*"),  # controls: only an allow rule matches
    (("GET", "/v1/items/1/update"), "allow", "GET /v1/items/**"),
]


def test_when_an_allow_and_a_deny_rule_both_match_the_deny_rule_decides_and_is_audited(world: World) -> None:
    world.write_profile("overlap", PROFILE)
    world.set_keyring("overlap", "items", world.canaries["acme"])
    requests = json.dumps([list(request) for request, _, _ in CASES])
    result = world.run_loop(LOOP.replace("sys.argv[1]", repr(requests)), workspace="overlap")
    assert result.code == 0, result.err
    statuses = [json.loads(line)["status"] for line in result.out.splitlines()]
    assert statuses == [403 if decision == "deny" else 200 for _, decision, _ in CASES]
    rows = world.events(world.last_run_id())
    assert [(row["method"], row["path"], row["decision"], row["reason"], row["rule"]) for row in rows] == [
        (method, path, decision, "denied_by_rule" if decision == "deny" else "allowed", rule)
        for (method, path), decision, rule in CASES
    ]
    allowed = [request for request, decision, _ in CASES if decision == "allow"]
    assert [(request.method, request.path) for request in world.upstream.requests] == allowed
    world.assert_no_canary(result.out)
