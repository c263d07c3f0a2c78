"""Hostile child, message framing: request smuggling, chunked oddities, pipelining, upgrades and huge bodies.

The attack to fear is a desync: a request the broker's policy never judged riding to the upstream inside or
behind an allowed one (with the injected secret on the pooled connection). So every ambiguous framing must be
refused before anything goes upstream, and afterwards the upstream must have received exactly the requests
the audit allowed, each with exactly the body the broker read.
"""

from __future__ import annotations

import json

from conftest import World

from adversarial.conftest import json_lines, run_hostile

SMUGGLE_LOOP = """
    import json, sys
    import rawhttp
    for name, raw, sentinel in json.load(open(sys.argv[1])):
        exchange = rawhttp.exchange(raw.encode("latin-1"), sentinel=sentinel, timeout=10)
        print(json.dumps({"name": name, **exchange.summary()}), flush=True)
"""

POST = "POST /v1/http/crm/crm/v3/objects/contacts HTTP/1.1\r\nHost: broker\r\n"
# What a smuggled request would ask for: a path the policy forbids. It must never show up upstream.
INNER = "GET /crm/v3/objects/companies/1 HTTP/1.1\r\nHost: x\r\n\r\n"
INNER_BROKER = "GET /v1/http/crm/crm/v3/objects/companies/1 HTTP/1.1\r\nHost: x\r\n\r\n"

# name, bytes: each must be refused as malformed (400, connection closed) before reaching the upstream.
REFUSED = [
    ("CL.TE", POST + "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + INNER_BROKER),
    ("TE.CL", POST + "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" + INNER + "\r\n0\r\n\r\n"),
    ("CL.CL different", POST + "Content-Length: 4\r\nContent-Length: 40\r\n\r\n" + INNER_BROKER),
    ("CL.CL same", POST + "Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd"),
    ("CL list", POST + "Content-Length: 4, 4\r\n\r\nabcd"),
    ("CL plus", POST + "Content-Length: +4\r\n\r\nabcd"),
    ("CL hex", POST + "Content-Length: 0x4\r\n\r\nabcd"),
    ("CL negative", POST + "Content-Length: -1\r\n\r\n"),
    ("TE twice", POST + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("TE chunked, identity", POST + "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    ("TE xchunked", POST + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    ("TE space before colon", POST + "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
    ("TE vertical tab", POST + "Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n"),
    ("chunk size overflow", POST + "Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nabcd\r\n0\r\n\r\n"),
    ("chunk size negative", POST + "Transfer-Encoding: chunked\r\n\r\n-4\r\nabcd\r\n0\r\n\r\n"),
    ("chunk size 0x", POST + "Transfer-Encoding: chunked\r\n\r\n0x4\r\nabcd\r\n0\r\n\r\n"),
    ("chunk bare LF", POST + "Transfer-Encoding: chunked\r\n\r\n4\nabcd\n0\n\n"),
    ("chunk data too long", POST + "Transfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n"),
    ("lower-case method", "post" + POST[4:] + "Content-Length: 0\r\n\r\n"),
    ("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("HTTP/0.9", "GET /v1/http/crm/crm/v3/objects/contacts\r\n\r\n"),
    ("bad version", "GET /v1/http/crm/crm/v3/objects/contacts HTTP/1.2.3\r\nHost: x\r\n\r\n"),
]
BODY_WITH_A_REQUEST = INNER * 2
# name, bytes, upstream bodies expected: each is accepted as exactly these requests, never more. After each the
# sentinel must be answered too (the connection stayed in step), except after HTTP/1.0, which closes it.
ACCEPTED = [
    ("body holding a request", POST + f"Content-Length: {len(BODY_WITH_A_REQUEST)}\r\n\r\n" + BODY_WITH_A_REQUEST,
     [BODY_WITH_A_REQUEST]),
    ("chunked with extension and trailer",
     POST + "Transfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nAuthorization: Bearer x\r\n\r\n",
     ["abcdef"]),
    ("chunked upper case", POST + "Transfer-Encoding: Chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n", ["xyz"]),
    ("upgrade with a request behind it",
     POST + "Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n" + INNER_BROKER, [""]),
    ("pipelined allowed, denied, allowed",
     POST + "Content-Length: 1\r\n\r\n1" + INNER_BROKER + POST + "Content-Length: 1\r\n\r\n2", ["1", "2"]),
    ("expect 100-continue", POST + "Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc", ["abc"]),
    # Chunked on HTTP/1.0 is read as chunked, re-framed upstream, and the connection closes behind it.
    ("TE on HTTP/1.0", POST.replace("HTTP/1.1", "HTTP/1.0") + "Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     ["ok"]),
]


def test_ambiguous_framing_is_refused_and_the_upstream_sees_exactly_what_was_allowed(world: World) -> None:
    attacks = [(name, raw, True) for name, raw in REFUSED] + [(name, raw, "HTTP/1.0" not in raw)
                                                               for name, raw, _ in ACCEPTED]
    (world.work / "attacks.json").write_text(json.dumps(attacks))
    result = run_hostile(world, SMUGGLE_LOOP, str(world.work / "attacks.json"))
    assert result.code == 0, result.err
    seen = {line["name"]: line for line in json_lines(result.out)}
    wrong = []
    for name, _ in REFUSED:
        answers = seen[name]["answers"]
        assert isinstance(answers, list)
        if [(a["status"], a["error"]) for a in answers] != [(400, "bad_request")] or not seen[name]["closed"]:
            wrong.append((name, seen[name]))
    for name, _, bodies in ACCEPTED:
        answers = seen[name]["answers"]
        assert isinstance(answers, list)
        statuses = [a["status"] for a in answers]
        expected = [200] * len(bodies) + ([] if "HTTP/1.0" in name else [200])  # each allowed one, the sentinel
        if "denied" in name or "request behind" in name:
            expected.insert(1, 403)  # the smuggled request was read as a request, and judged
        if statuses != expected:
            wrong.append((name, statuses))
    assert wrong == [], "\n".join(map(str, wrong))
    upstream = world.upstream.requests
    assert [r.body.decode() for r in upstream] == [body for _, _, bodies in ACCEPTED for body in bodies]
    assert {(r.method, r.path) for r in upstream} == {("POST", "/crm/v3/objects/contacts")}
    assert all(r.header("Authorization") == f"Bearer {world.canaries['acme']}" for r in upstream)
    allowed = [e for e in world.events() if e["decision"] == "allow" and e["path"] != "/v1/run"]
    assert len(allowed) == len(upstream)
    malformed = [e for e in world.events() if e["reason"] == "malformed_http"]
    assert len(malformed) == len(REFUSED)


OVERSIZED_LOOP = """
    import json, sys
    import rawhttp
    sock = rawhttp.connect()
    sock.sendall(rawhttp.request("POST", "/v1/http/crm/crm/v3/objects/contacts",
                                 [("Content-Length", str(256 * 1024 * 1024 + 1))]))
    exchange = rawhttp.Exchange()
    rawhttp.read_answers(sock, exchange, timeout=10, want=1)  # no body sent: the answer must not wait for it
    print(json.dumps(exchange.summary()))
"""


def test_a_declared_oversized_body_is_413_before_anything_goes_upstream(world: World) -> None:
    result = run_hostile(world, OVERSIZED_LOOP)
    assert json_lines(result.out)[0]["answers"] == [{"status": 413, "error": "bad_request", "decision": "deny"}]
    (event,) = world.events()
    assert (event["decision"], event["reason"], event["status"]) == ("deny", "body_too_large", 413)
    assert world.upstream.requests == []


HTTP09_ALONE_LOOP = """
    import json
    import rawhttp
    exchange = rawhttp.exchange(b"GET /v1/http/crm/crm/v3/objects/contacts\\r\\n\\r\\n", sentinel=False, timeout=10)
    print(json.dumps(exchange.summary()))
"""


def test_an_http_0_9_request_arriving_alone_is_refused_not_forwarded(world: World) -> None:
    """llhttp parses a version-less line as HTTP/0.9 when nothing follows it in the same read (in the table above
    the sentinel usually arrives with it and makes the parse fail): that request must be refused the same way."""
    result = run_hostile(world, HTTP09_ALONE_LOOP)
    (line,) = json_lines(result.out)
    assert [(a["status"], a["error"]) for a in line["answers"]] == [(400, "bad_request")] and line["closed"], line
    assert world.upstream.requests == []
    (event,) = world.events()
    assert (event["decision"], event["reason"], event["status"]) == ("deny", "malformed_http", 400)
