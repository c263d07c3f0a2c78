"""The fuzzing child: random and malformed HTTP requests at the broker over several connections, fixed seed.

Standard library only; tests/adversarial/test_fuzz_broker.py copies it (and rawhttp.py) next to the loop, which
runs it inside `outloop run`. It prints one JSON report.

Every message is complete by construction: the head always ends at the generator's own CRLFCRLF, and the body
is framed exactly as the framing mode says (or framed in a way the broker must refuse). Random mutations never
insert CR or LF, and never touch the framing headers; CR/LF tricks come from fixed templates instead. So each
message must be answered, or discarded because an earlier message on the same connection ended it (refused as
malformed, or HTTP/1.0, or `Connection: close`: the broker then closes it); a stall (no answer, no close) means
the broker and the generator disagree on where a message ends, and is reported.

A message that may end its connection is always the last of its batch: bytes behind it in the same read make
aiohttp's parser refuse the read as a whole ("data after close"), and whether the first message was already
served then depends on how the kernel split the reads. Both outcomes are audited, but they make exact counts
depend on timing, so the generator does not go there. And CONNECT never carries a body: the bytes after its head
are the tunnel, which the broker reads (and judges) as the next request.
"""

from __future__ import annotations

import json
import random
import select
import socket
import sys
import threading
from dataclasses import dataclass, field

import rawhttp

ALLOWED_PATHS = ["/v1/http/crm/crm/items", "/v1/http/crm/crm/items/1", "/v1/http/crm/crm/a/b/c"]
METHODS = ["GET"] * 6 + ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "PURGE", "TRACE", "M-SEARCH", "CONNECT",
                         "get", "Get", "G%T", "GE T", "\x00GET", "GET\x7f", "é", ""]
PREFIXES = ["/v1/http/crm", "/v1/http/crm", "/v1/http/crm", "/v1/http/llm", "/v1/http/billing", "/v1/http/globex",
            "/v1/http/CRM", "/v1/http/%63rm", "/v1/http/crm%2F..", "/v1/http/", "/v1/http", "/v1/secret/crm",
            "/v1/secret/billing", "/v1/secret/", "/v1/run", "/v1/run/x", "/", "", "*", "//v1/http/crm",
            "http://evil.example/v1/http/crm", "evil.example:443", "/V1/http/crm"]
SEGMENTS = ["crm"] * 6 + ["items"] * 4 + [
    "admin", "1", "42", "a", "b", "..", ".", "%2e%2e", "%2E", "%2F", "%2f", "%252F", "%25", "%5C", "\\", ";x", "%3B",
    "%00", "%0d%0a", "%7F", "%C0%AE", "%C2%85", "%EF%BC%8F", "%E2%80%8B", "%", "%zz", "%4", "@evil.example", "~",
    "a" * 300, "é", "%C3%A9", "#frag", "", "*", "**", "merge", "MERGE", "%20", "%41", "x:y", "$", "'", "(", "[", "{",
]  # fmt: skip
QUERIES = ["", "", "", "?a=1", "?hapikey=stolen", "?key=stolen", "?a=%zz", "?a=%0d%0a", "?a=1&a=2&", "?&&",
           "?" + "q" * 3000, "?x=" + "%41" * 50, "?a=[1]", "?a=é", "?a=\\", "??", "?a=\"x\""]
VERSIONS = ["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/9.9", "http/1.1", "HTTP/1.1 x", "HTTP/",
                                "HTTP/1", "", "HTTP/1.1\x00"]
HEADER_NAMES = ["Authorization", "authorization", "X-Api-Key", "Content-Type", "Accept", "Accept-Encoding",
                "X-Forwarded-For", "X-Forwarded-Host", "Forwarded", "X-Real-IP", "Proxy-Authorization",
                "Connection", "Keep-Alive", "TE", "Trailer", "Upgrade", "Expect", "Cookie", "Cookie2",
                "Outloop-Decision", "Outloop-Token", "X-Custom", "X-" + "n" * 100, "Bad Name", "X\x00", "Host ",
                "Range", "If-None-Match", "Via", "Max-Forwards", "Origin", "Referer", "User-Agent"]
HEADER_VALUES = ["x", "Bearer attacker", "Basic YTpi", "close", "keep-alive", "Upgrade", "websocket",
                 "100-continue", "trailers", "application/json", "gzip, br", "\xff\xfe", "", " ", "\t", "x" * 200,
                 "x" * 9000, "a\x00b", "a\x7fb", "cnry-not-a-real-secret", "bytes=0-1", "*", "for=1.2.3.4"]
# Complete messages that break the grammar with CR/LF or framing on purpose (the broker must refuse each).
TEMPLATES = [
    "GET {p} HTTP/1.1\r\nHost: b\r\nX-A: a\r\n folded\r\n\r\n",
    "GET {p} HTTP/1.1\r\nHost: b\r\nX-A: a\rX-B: b\r\n\r\n",
    "GET {p} HTTP/1.1\r\nHost: b\r\nX-A: a\nX-B: b\r\n\r\n",
    "GET {p} HTTP/1.1\nHost: b\n\n",
    "GET {p} HTTP/1.1\r\nHost: b\r\nHost: c\r\n\r\n",
    "GET {p} HTTP/1.1\r\n\r\n",
    "POST {p} HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST {p} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "POST {p} HTTP/1.1\r\nHost: b\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "POST {p} HTTP/1.1\r\nHost: b\r\nContent-Length: -1\r\n\r\n",
    "POST {p} HTTP/1.1\r\nHost: b\r\nContent-Length: 1x\r\n\r\nab",
    "POST {p} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "POST {p} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "POST {p} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n",
    "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "\r\nGET {p} HTTP/1.1\r\nHost: b\r\n\r\n",  # a blank line first, which parsers skip
    " GET {p} HTTP/1.1\r\nHost: b\r\n\r\n",
    "GET  {p} HTTP/1.1\r\nHost: b\r\n\r\n",
    "GET {p}  HTTP/1.1\r\nHost: b\r\n\r\n",
    "GET {p} HTTP/1.1\r\nHost: b\r\n" + "X-F: v\r\n" * 200 + "\r\n",
]
DOCUMENTED = {(400, "bad_request"), (401, "unauthenticated"), (403, "denied"), (404, "unknown_credential"),
              (413, "bad_request"), (429, "rate_limited"), (429, "budget_exhausted"), (502, "upstream_error"),
              (503, "audit_unavailable"), (504, "upstream_timeout")}


@dataclass
class Message:
    raw: bytes

    @property
    def may_close(self) -> bool:
        """Whether the broker may close the connection after answering (see the module docstring)."""
        head = self.raw.split(b"\r\n\r\n", 1)[0]
        first_line = head.split(b"\r\n", 1)[0]
        return not first_line.endswith(b" HTTP/1.1") or b"onnection" in head.lower() or b"\n" in first_line


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    discarded: int = 0  # sent behind a message whose answer closed the connection: never read by the broker
    stalled: int = 0
    closed_unanswered: int = 0
    connections: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    undocumented: list[str] = field(default_factory=list)
    stalls: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # answers nobody asked for


def _mutate(rng: random.Random, text: str) -> str:
    """Replace, insert or delete a few characters, never CR or LF (see the module docstring)."""
    chars = list(text)
    for _ in range(rng.randint(1, 3)):
        position = rng.randrange(len(chars) + 1)
        choice = rng.random()
        new = chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x00, 0x20), rng.randrange(0x80, 0x100)]))
        new = " " if new in "\r\n" else new
        if choice < 0.4 and position < len(chars):
            chars[position] = new
        elif choice < 0.8:
            chars.insert(position, new)
        elif position < len(chars):
            del chars[position]
    return "".join(chars)


def _target(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(ALLOWED_PATHS)
    segments = [rng.choice(SEGMENTS) for _ in range(rng.randint(0, 5))]
    return rng.choice(PREFIXES) + ("/" + "/".join(segments) if segments else "") + rng.choice(QUERIES)


def generate(rng: random.Random) -> Message:
    roll = rng.random()
    if roll < 0.08:
        return Message(rng.choice(TEMPLATES).replace("{p}", _target(rng)).encode("latin-1"))
    if roll < 0.2:  # a clean, allowed request, so the upstream path is exercised as much as the refusals
        method, target, version, headers = "GET", rng.choice(ALLOWED_PATHS), "HTTP/1.1", [("Host", "b")]
    else:
        method = rng.choice(METHODS)
        target, version = _target(rng), rng.choice(VERSIONS)
        headers = [] if rng.random() < 0.05 else [("Host", "b")]
        headers += [(rng.choice(HEADER_NAMES), rng.choice(HEADER_VALUES)) for _ in range(rng.randint(0, 6))]
    line = f"{method} {target} {version}"
    if rng.random() < 0.25:
        line = _mutate(rng, line)
    lines = [line] + [_mutate(rng, f"{n}: {v}") if rng.random() < 0.1 else f"{n}: {v}" for n, v in headers]
    body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 1, 10, 100, 2000])))
    if line.startswith("CONNECT "):
        body = b""  # bytes after a CONNECT head are the tunnel, read (and judged) as the next request: no body
    framing = rng.choice(["none", "none", "length", "chunked"]) if body else "none"
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        cut = rng.randint(0, len(body))
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:cut], body[cut:]) if part) + b"0\r\n\r\n"
    else:
        body = b""
    return Message(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


class Connection:
    """One keep-alive connection to the broker, reopened whenever the broker closes it."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.sock: socket.socket | None = None

    def send(self, batch: list[Message]) -> None:
        if self.sock is None:
            self.sock = rawhttp.connect()
            self.tally.connections += 1
        self.tally.sent += len(batch)
        exchange = rawhttp.Exchange()
        try:
            self.sock.sendall(b"".join(message.raw for message in batch))
        except OSError:
            exchange.closed = True
        if not exchange.closed:
            rawhttp.read_answers(self.sock, exchange, timeout=5, want=len(batch))
            if not exchange.closed and select.select([self.sock], [], [], 0.0)[0]:
                surplus = self.sock.recv(65536)
                if surplus:
                    self.tally.extra.append(f"{surplus[:80]!r} after {b''.join(m.raw for m in batch)[:300]!r}")
                else:
                    exchange.closed = True
        for answer in exchange.answers:
            key = f"{answer.status} {answer.error()}"
            self.tally.statuses[key] = self.tally.statuses.get(key, 0) + 1
            denied = (answer.header("outloop-decision") or "").lower() == "deny"
            if (denied and (answer.status, answer.error()) not in DOCUMENTED) or (not denied and answer.status != 200):
                self.tally.undocumented.append(f"{key}: {batch[0].raw[:200]!r}")
        self.tally.answered += len(exchange.answers)
        missing = len(batch) - len(exchange.answers)
        sent = b"".join(m.raw for m in batch)[:300]
        if missing < 0:
            self.tally.extra.append(f"{-missing} more answers than requests for {sent!r}")
        if missing > 0:
            if exchange.closed and exchange.answers and not exchange.leftover:
                # The broker answered in full, then closed (a malformed message, HTTP/1.0, Connection: close):
                # what followed on this connection was never read as a request.
                self.tally.discarded += missing
            elif exchange.closed:
                self.tally.closed_unanswered += missing
                self.tally.stalls.append(f"closed: {sent!r}")
            else:
                self.tally.stalled += missing
                self.tally.stalls.append(f"stalled: {sent!r}")
        last = exchange.answers[-1] if exchange.answers else None
        refused = last is not None and last.status == 400 and b"malformed HTTP request" in last.body
        if exchange.closed or missing or refused or batch[-1].may_close:
            self.sock.close()  # the broker closes these; a new request on it would race that close
            self.sock = None


def worker(seed: str, count: int, tally: Tally) -> None:
    rng = random.Random(seed)
    connection = Connection(tally)
    sent = 0
    try:
        while sent < count:
            size = 1 if rng.random() < 0.85 else rng.randint(2, 4)  # sometimes pipelined
            batch: list[Message] = []
            while len(batch) < min(size, count - sent) and not (batch and batch[-1].may_close):
                batch.append(generate(rng))
            connection.send(batch)
            sent += len(batch)
    except Exception as exc:  # reported, so a crashed worker fails the test instead of shrinking it
        tally.stalls.append(f"worker {seed} crashed after {sent} messages: {exc!r}")
        tally.closed_unanswered += count - sent


def main() -> None:
    seed, total, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tallies = [Tally() for _ in range(threads)]
    share = [total // threads + (1 if n < total % threads else 0) for n in range(threads)]
    workers = [threading.Thread(target=worker, args=(f"{seed}-{n}", share[n], tallies[n])) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    final = rawhttp.Exchange()
    with rawhttp.connect() as sock:
        sock.sendall(b"GET /v1/http/crm/crm/items/final HTTP/1.1\r\nHost: b\r\n\r\n")
        rawhttp.read_answers(sock, final, timeout=10, want=1)
    report = {key: sum(getattr(t, key) for t in tallies)
              for key in ("sent", "answered", "discarded", "stalled", "closed_unanswered", "connections")}
    statuses: dict[str, int] = {}
    for tally in tallies:
        for key, value in tally.statuses.items():
            statuses[key] = statuses.get(key, 0) + value
    report.update(statuses=statuses, undocumented=[u for t in tallies for u in t.undocumented][:20],
                  extra=[e for t in tallies for e in t.extra][:20],
                  stalls=[s for t in tallies for s in t.stalls][:20],
                  final=final.answers[0].status if final.answers else None)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
