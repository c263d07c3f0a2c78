"""Hostile child, request line: other workspaces' credentials, look-alike names, path and method tricks.

The child speaks raw HTTP over $OUTLOOP_SOCKET, so requests the client library would refuse to build reach the
broker as written. Every attempt must get its documented status and exactly one audit row, and nothing but the
allowed controls may reach an upstream.
"""

from __future__ import annotations

import json

from conftest import World

from adversarial.conftest import json_lines, run_hostile

ATTEMPT_LOOP = """
    import json, sys
    import rawhttp
    for method, target in json.load(open(sys.argv[1])):
        line = f"{method} {target} HTTP/1.1\\r\\nHost: broker\\r\\n\\r\\n".encode("latin-1")
        exchange = rawhttp.exchange(line, timeout=10, head=method == "HEAD")
        print(json.dumps(exchange.summary()), flush=True)
"""

C = "/v1/http/crm/crm/v3/objects/contacts"
# (method, target), status, broker error code (None: the upstream answered), audited reasons accepted
ATTEMPTS: list[tuple[tuple[str, str], int, str | None, set[str]]] = [
    # Controls: the run's own credentials, one of them inherited from the agency base profile.
    (("GET", f"{C}/1"), 200, None, {"allowed"}),
    (("GET", "/v1/http/llm/v1/models"), 200, None, {"allowed"}),
    # Another workspace's credentials, and look-alikes of our own: one answer for all, no oracle.
    (("GET", "/v1/http/globex/crm/v3/objects/contacts/1"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/http/billing/anything"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/http/CRM/crm/v3/objects/contacts/1"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/http/%63rm/crm/v3/objects/contacts/1"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/http/crm%20/crm/v3/objects/contacts/1"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/http/crm%E2%80%8B/crm/v3/objects/contacts/1"), 404, "unknown_credential",
     {"unknown_credential"}),
    (("GET", "/v1/http/globex:crm/x"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/http/globex%2Fcrm/x"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/http/../v1/http/crm/crm/v3/objects/contacts/1"), 404, "unknown_credential",
     {"unknown_credential"}),
    (("GET", "/v1/http/./crm/crm/v3/objects/contacts/1"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/http//crm/crm/v3/objects/contacts/1"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/secret/globex"), 404, "unknown_credential", {"unknown_credential"}),
    # Route tricks: anything but the three routes is a 400, including absolute and authority forms.
    (("GET", "/v1/HTTP/crm/crm/v3/objects/contacts/1"), 400, "bad_request", {"unknown_route"}),
    (("GET", "/v1/http"), 400, "bad_request", {"unknown_route"}),
    (("GET", "//v1/http/crm/crm/v3/objects/contacts/1"), 400, "bad_request", {"unknown_route"}),
    (("GET", f"http://evil.example{C}/1"), 400, "bad_request", {"unknown_route"}),
    (("CONNECT", "evil.example:443"), 400, "bad_request", {"unknown_route"}),
    (("OPTIONS", "*"), 400, "bad_request", {"unknown_route"}),
    # Path tricks: refused, never cleaned, each with its own reason code.
    (("GET", f"{C}/../../companies/1"), 400, "bad_request", {"dot_segment"}),
    (("GET", f"{C}/./1"), 400, "bad_request", {"dot_segment"}),
    (("GET", f"{C}/%2e%2e/%2e%2e/companies/1"), 400, "bad_request", {"encoded_dot"}),
    (("GET", f"{C}/%252e%252e/companies"), 400, "bad_request", {"double_encoding"}),
    (("GET", f"{C}%2F..%2F..%2Fcompanies"), 400, "bad_request", {"encoded_slash"}),
    (("GET", f"{C}/1%2fmerge"), 400, "bad_request", {"encoded_slash"}),
    (("GET", f"{C}/1%5Cmerge"), 400, "bad_request", {"backslash"}),
    (("GET", f"{C}/1\\merge"), 400, "bad_request", {"backslash", "malformed_http"}),
    (("GET", "/v1/http/crm//crm/v3/objects/contacts/1"), 400, "bad_request", {"empty_segment"}),
    (("GET", "/v1/http/crm/crm/v3//objects/contacts/1"), 400, "bad_request", {"empty_segment"}),
    (("GET", f"{C}/1;merge"), 400, "bad_request", {"path_parameter"}),
    (("GET", f"{C}/1%3bmerge"), 400, "bad_request", {"path_parameter"}),
    (("GET", f"{C}/%6Derge"), 400, "bad_request", {"encoded_unreserved"}),
    (("GET", f"{C}/1%00"), 400, "bad_request", {"control_char"}),
    (("GET", f"{C}/%C0%AE%C0%AE"), 400, "bad_request", {"invalid_utf8"}),
    (("GET", f"{C}/%EF%BC%8Fmerge"), 400, "bad_request", {"ambiguous_unicode"}),
    (("GET", f"{C}/1%"), 400, "bad_request", {"bad_percent_encoding"}),
    (("GET", f"{C}/{'a' * 5000}"), 400, "bad_request", {"path_too_long"}),
    (("GET", f"{C}/{'a' * 20000}"), 400, "bad_request", {"malformed_http"}),
    (("GET", f"{C}/1?x=a%zz"), 400, "bad_request", {"bad_query"}),
    # '@' is an ordinary segment character, not a user-info separator: the base URL's host cannot change.
    (("GET", "/v1/http/crm/@evil.example/x"), 403, "denied", {"no_matching_rule"}),
    # Deny rules catch the spellings a lenient upstream folds together (case, trailing slash).
    (("GET", f"{C}/1/merge"), 403, "denied", {"denied_by_rule"}),
    (("GET", f"{C}/1/merge/"), 403, "denied", {"denied_by_rule"}),
    (("GET", f"{C}/1/MERGE"), 403, "denied", {"denied_by_rule"}),
    # Method tricks against GET-only rules.
    (("get", f"{C}/1"), 400, "bad_request", {"malformed_http"}),
    (("Get", f"{C}/1"), 400, "bad_request", {"malformed_http"}),
    (("HEAD", f"{C}/1"), 403, None, {"no_matching_rule"}),  # HEAD: the 403 has no body to carry the code
    (("OPTIONS", f"{C}/1"), 403, "denied", {"no_matching_rule"}),
    (("TRACE", f"{C}/1"), 403, "denied", {"no_matching_rule"}),
    (("PURGE", f"{C}/1"), 403, "denied", {"no_matching_rule"}),
    (("DELETE", f"{C}/1"), 403, "denied", {"no_matching_rule"}),
    (("G%45T", f"{C}/1"), 400, "bad_request", {"malformed_http"}),
    (("POST", "/v1/run"), 400, "bad_request", {"bad_method"}),
    # Reveal is off for every spelling.
    (("GET", "/v1/secret/crm"), 403, "denied", {"reveal_not_allowed"}),
    (("POST", "/v1/secret/crm"), 400, "bad_request", {"bad_method"}),
    (("GET", "/v1/secret/crm?raw=1"), 403, "denied", {"reveal_not_allowed"}),
    (("GET", "/v1/secret/crm/"), 404, "unknown_credential", {"unknown_credential"}),
    (("GET", "/v1/secret/llm"), 403, "denied", {"reveal_not_allowed"}),
]


def test_every_name_path_and_method_trick_gets_its_documented_answer_and_one_audit_row(world: World) -> None:
    attempts = world.work / "attempts.json"
    attempts.write_text(json.dumps([attempt for attempt, *_ in ATTEMPTS]))
    result = run_hostile(world, ATTEMPT_LOOP, str(attempts))
    assert result.code == 0, result.err
    seen = json_lines(result.out)
    # Each attempt is followed by the sentinel GET /v1/run: one audit row each, in order.
    events = [event for event in world.events() if event["path"] != "/v1/run" or event["decision"] == "deny"]
    assert len(seen) == len(ATTEMPTS) == len(events)
    wrong = []
    for (attempt, status, error, reasons), exchange, event in zip(ATTEMPTS, seen, events, strict=True):
        answers = exchange["answers"]
        assert isinstance(answers, list)
        answer = answers[0] if answers else None
        got = (answer and answer["status"], answer and answer["error"], event["reason"], event["status"])
        expected_status = None if status == 200 else status  # allowed rows carry no broker status
        if got[:2] != (status, error) or got[2] not in reasons or got[3] != expected_status:
            wrong.append((attempt, got))
        elif reasons != {"malformed_http"} and (len(answers) != 2 or answers[1]["status"] != 200):
            # Unless the request was unparseable, the connection stayed in step: the sentinel was answered too.
            wrong.append((attempt, "sentinel not answered", answers))
    assert wrong == [], "\n".join(map(str, wrong))
    # Only the two controls went out, each with its own credential's secret and nothing else's.
    crm, llm = world.upstream.requests
    assert (crm.path, crm.header("Authorization")) == ("/crm/v3/objects/contacts/1",
                                                       f"Bearer {world.canaries['acme']}")
    assert (llm.path, llm.header("X-Api-Key"), llm.header("Authorization")) == (
        "/llm/v1/models", world.canaries["agency"], None)
    assert world.other.requests == []


PROPERTY_LOOP = """
    import json, sys
    from urllib.parse import quote
    from hypothesis import HealthCheck, given, settings, strategies as st
    import rawhttp
    import policy_properties as props
    from outloop_cli.policy import REJECTION_REASONS, PathRejected, normalise_path, parse_rule

    allow = [parse_rule(text) for text in json.loads(sys.argv[1])]
    deny = [parse_rule(text) for text in json.loads(sys.argv[2])]
    state = {"sock": None}
    outcomes = []

    def ask(method, target):
        for _ in range(2):
            if state["sock"] is None:
                state["sock"] = rawhttp.connect()
            request = f"{method} {target} HTTP/1.1\\r\\nHost: broker\\r\\n\\r\\n".encode("ascii")
            result = rawhttp.Exchange()
            try:
                state["sock"].sendall(request)
                rawhttp.read_answers(state["sock"], result, timeout=10, want=1)
            except OSError:
                pass
            if result.answers:
                if result.closed:
                    state["sock"].close()
                    state["sock"] = None
                return result.answers[0]
            state["sock"].close()  # the broker closed an idle connection: once more on a new one
            state["sock"] = None
        raise SystemExit("no answer for " + target)

    @settings(max_examples=int(sys.argv[3]), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["GET", "POST", "DELETE"]), st.one_of(props.tricky_paths, props.accepted_paths))
    def check(method, raw):
        # Only bytes a request line can carry are sent raw; the rest are percent-encoded first.
        raw = quote(raw, safe="".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "?#%")
                    + "%")
        answer = ask(method, "/v1/http/p" + raw)
        body = json.loads(answer.body) if answer.body else {}
        try:
            normalise_path(raw)
        except PathRejected as rejected:
            expected = (400, "bad_request", f"request path refused: {REJECTION_REASONS[rejected.reason]}")
            got = (answer.status, answer.error(), (body.get("error") or {}).get("message"))
            outcomes.append(["refused", raw, got == expected, got])
            return
        decision = props._reference_decide(method, raw, allow, deny)
        if decision.allowed:
            got = (answer.status, body.get("path"))
            outcomes.append(["allowed", raw, got == (200, "/p" + raw), got])
        else:
            got = (answer.status, answer.error())
            outcomes.append(["denied", raw, got == (403, "denied"), got])

    check()
    print(json.dumps(outcomes))
"""
PROPERTY_PROFILE = """
    version = 1
    [credentials.p]
    secret = "keyring"
    base_url = "{UPSTREAM}/p"
    allow = %s
    deny = %s
"""
PROPERTY_ALLOW = ["GET /**", "POST /a/*", "POST /ab/**", "DELETE /b", "DELETE /é/*"]
PROPERTY_DENY = ["* /a/b/**", "GET /x/**", "* /é/a", "POST /ab/x", "GET /b/"]


def test_policy_properties_hold_through_a_live_broker(world: World) -> None:
    """tests/test_policy_properties.py's strategies and reference matcher, run against the real broker: every
    path the normaliser refuses gets 400 with its reason, every other path gets the reference decision, and an
    allowed path reaches the upstream byte for byte as it was matched."""
    import shutil
    from pathlib import Path

    world.write_profile("acme", PROPERTY_PROFILE % (json.dumps(PROPERTY_ALLOW), json.dumps(PROPERTY_DENY)))
    world.set_keyring("acme", "p", world.canaries["acme"])
    shutil.copy(Path(__file__).parent.parent / "test_policy_properties.py", world.work / "policy_properties.py")
    result = run_hostile(world, PROPERTY_LOOP, json.dumps(PROPERTY_ALLOW), json.dumps(PROPERTY_DENY), "400")
    assert result.code == 0, result.err
    outcomes = json.loads(result.out.splitlines()[-1])
    wrong = [outcome for outcome in outcomes if not outcome[2]]
    assert wrong == [], "\n".join(map(str, wrong))
    kinds = {kind: sum(1 for outcome in outcomes if outcome[0] == kind) for kind in ("refused", "allowed", "denied")}
    assert min(kinds.values()) >= 20, kinds  # every branch of the property was exercised
    allowed = ["/p" + raw for kind, raw, _, _ in outcomes if kind == "allowed"]
    assert [request.path for request in world.upstream.requests] == allowed
    assert len(world.events()) == len(outcomes)

