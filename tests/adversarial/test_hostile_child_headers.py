"""Hostile child, headers: its own credentials, spoofed hosts and forwarding headers, malformed and oversized
headers. The upstream must see exactly one credential header, the injected one, and nothing the child forged."""

from __future__ import annotations

import json

from conftest import World

from adversarial.conftest import json_lines, run_hostile

HEADER_LOOP = """
    import json, sys
    import rawhttp
    attacks = json.load(open(sys.argv[1]))
    for raw in attacks["malformed"]:
        print(json.dumps({"malformed": rawhttp.exchange(raw.encode("latin-1")).summary()}), flush=True)
    for target, headers in attacks["spoofed"]:
        answer = rawhttp.exchange(rawhttp.request("GET", target, headers)).answers[0]
        print(json.dumps({"spoofed": answer.summary(), "headers": answer.headers}), flush=True)
"""

C = "/v1/http/crm/crm/v3/objects/contacts"
HEAD = f"GET {C} HTTP/1.1\r\nHost: broker\r\n"
MALFORMED = [
    HEAD + "X-A: a\r\n folded\r\n\r\n",  # obs-fold
    HEAD + "X-A: a\r\n Authorization: Bearer attacker\r\n\r\n",  # a header hidden in a fold
    HEAD + "X-A: a\rAuthorization: Bearer attacker\r\n\r\n",  # bare CR
    HEAD + "X-A: a\nAuthorization: Bearer attacker\r\n\r\n",  # bare LF
    HEAD + "X-A: a\x00b\r\n\r\n",
    HEAD + "X-A: a\x7fb\r\n\r\n",
    HEAD + "Authorization : Bearer attacker\r\n\r\n",  # whitespace before the colon
    HEAD + "X(A): 1\r\n\r\n",
    HEAD + ": nameless\r\n\r\n",
    HEAD + "Host: evil.example\r\n\r\n",  # a second Host
    HEAD + "X-Big: " + "a" * 20000 + "\r\n\r\n",  # one line over the 16 KiB limit
    HEAD + "".join(f"X-{n}: {n}\r\n" for n in range(300)) + "\r\n",  # more headers than the parser takes
    f"GET {C} HTTP/1.1\r\n\r\n",  # no Host at all
]
SPOOFED_CRM = [
    ("Authorization", "Bearer attacker"),
    ("authorization", "Basic YXR0YWNrZXI6eA=="),
    ("AUTHORIZATION", "token attacker"),
    ("Proxy-Authorization", "Basic eDp4"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Port", "80"),
    ("X-Forwarded-Prefix", "/admin"),
    ("Forwarded", "for=203.0.113.9;host=evil.example"),
    ("X-Real-IP", "203.0.113.9"),
    ("Connection", "X-Hop, keep-alive"),
    ("X-Hop", "dropped because Connection lists it"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Late"),
    ("Proxy-Connection", "keep-alive"),
    ("Outloop-Decision", "allow"),
    ("Outloop-Credential", "globex/crm"),
    ("Cookie2", "$Version=1"),
    ("Accept-Encoding", "br, zstd"),
    ("X-Keep", "kept"),
]
SPOOFED_LLM = [("X-Api-Key", "attacker"), ("x-api-key", "attacker2"), ("Authorization", "Bearer attacker")]
DROPPED = {"proxy-authorization", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
           "x-forwarded-prefix", "forwarded", "x-real-ip", "connection", "x-hop", "keep-alive", "te", "trailer",
           "proxy-connection", "outloop-decision", "outloop-credential", "cookie2"}


def test_header_tricks_are_refused_or_stripped_and_never_override_the_injection(world: World) -> None:
    attacks = world.work / "attacks.json"
    attacks.write_text(json.dumps({"malformed": MALFORMED, "spoofed": [
        (C, SPOOFED_CRM), ("/v1/http/llm/v1/models", SPOOFED_LLM)]}))
    result = run_hostile(world, HEADER_LOOP, str(attacks))
    assert result.code == 0, result.err
    lines = json_lines(result.out)
    malformed = [line["malformed"] for line in lines if "malformed" in line]
    # Unparseable: 400 from the broker, then the connection is closed (the sentinel behind it is never read).
    assert [(m["answers"][0]["status"], m["answers"][0]["error"], len(m["answers"]), m["closed"])  # type: ignore[index]
            for m in malformed] == [(400, "bad_request", 1, True)] * len(MALFORMED)
    events = world.events()
    assert [e["reason"] for e in events[:len(MALFORMED)]] == ["malformed_http"] * len(MALFORMED)
    assert all(e["status"] == 400 and e["decision"] == "deny" for e in events[:len(MALFORMED)])

    spoofed = [line for line in lines if "spoofed" in line]
    assert [line["spoofed"]["status"] for line in spoofed] == [200, 200]  # type: ignore[index]
    crm, llm = world.upstream.requests
    names = [name.lower() for name, _ in crm.headers]
    assert names.count("authorization") == 1
    assert crm.header("Authorization") == f"Bearer {world.canaries['acme']}"
    assert crm.header("Host") == f"127.0.0.1:{world.upstream.port}"
    assert crm.header("Accept-Encoding") == "gzip, deflate"  # only what the broker can inspect for secrets
    assert crm.header("X-Keep") == "kept"
    assert DROPPED.isdisjoint(names), DROPPED.intersection(names)
    llm_names = [name.lower() for name, _ in llm.headers]
    assert llm_names.count("x-api-key") == 1 and llm.header("X-Api-Key") == world.canaries["agency"]
    assert "authorization" not in llm_names  # the child's own credential for another scheme goes nowhere
    assert world.other.requests == []
