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
        exchange = rawhttp.exchange(line, timeout=10)
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
    (("G%45T", f"{C}/1"), 403, "denied", {"no_matching_rule"}),
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
        elif status != 400 or reasons != {"malformed_http"}:
            # The connection stayed in step: the sentinel behind the attempt was answered too.
            if len(answers) != 2 or answers[1]["status"] != 200:
                wrong.append((attempt, "sentinel not answered", answers))
    assert wrong == []
    # Only the two controls went out, each with its own credential's secret and nothing else's.
    crm, llm = world.upstream.requests
    assert (crm.path, crm.header("Authorization")) == ("/crm/v3/objects/contacts/1",
                                                       f"Bearer {world.canaries['acme']}")
    assert (llm.path, llm.header("X-Api-Key"), llm.header("Authorization")) == (
        "/llm/v1/models", world.canaries["agency"], None)
    assert world.other.requests == []
