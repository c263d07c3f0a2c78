"""The wrong-client guard's cost per request with 500 identifiers, next to the alternatives it was chosen over.

In-process and single-threaded: it times exactly what the broker adds to one request when the guard is on
(scanning the path, the query and a held-back JSON body), with the matcher built once per run as the broker does.

    .venv/bin/python bench/guard.py [--identifiers 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt

from outloop_cli.broker.guard import body_texts, request_texts
from outloop_cli.guard import Guard, Identifier, fold
from outloop_cli.policy import normalise_path
from outloop_cli.profiles import GuardSettings

BODY_SIZES = (1024, 64 * 1024)


def identifiers(count: int, seed: int = 7) -> list[Identifier]:
    """Domains, prefixes and customer ids, the shapes agencies declare, spread over 50 workspaces."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 10)))
        text = rng.choice([f"{word}.com", f"{word.upper()[:5]}-", f"cus_{word.capitalize()}"])
        out.append(Identifier(f"client{index % 50}", index // 50, text))
    return out


def request(size: int, seed: int = 11) -> tuple[str, str, bytes]:
    """A CRM upsert: a path with an id, a short query, a JSON body of about `size` bytes matching nothing."""
    rng = random.Random(seed)
    leads: list[dict[str, Any]] = []
    while len(json.dumps(leads)) < size:
        leads.append({"email": f"{rng.randint(1, 10**6)}@acme-lead.example", "name": "Jane Q. Prospect",
                      "notes": "met at the trade fair; wants a demo in spring"})
    return "/crm/v3/objects/contacts/12345", "archived=false&limit=100", json.dumps(leads).encode()


def _regex(items: list[Identifier]) -> Callable[[str], object]:
    pattern = re.compile("|".join(re.escape(fold(item.text)) for item in items))
    return pattern.search


def _naive(items: list[Identifier]) -> Callable[[str], object]:
    keys = [fold(item.text) for item in items]
    return lambda text: next((key for key in keys if key in text), None)


def _per_request_us(search: Callable[[str], object], path: str, query: str, body: bytes, loops: int) -> float:
    normalised = normalise_path(path)
    started = time.perf_counter()
    for _ in range(loops):
        for text in (*request_texts(normalised, query), *body_texts(body)):
            if search(fold(text)):
                raise AssertionError("the bench request must match no identifier")
    return (time.perf_counter() - started) / loops * 1e6


def run(count: int = 500, rounds: int = 5, log: Callable[[str], None] = print) -> dict[str, Any]:
    items = identifiers(count)
    started = time.perf_counter()
    guard = Guard(items, GuardSettings())
    build_ms = (time.perf_counter() - started) * 1000
    # (label, matcher, share of the loops: the slow alternatives get fewer, so a round stays short)
    matchers = [("ahocorasick-rs DFA (outloop)", guard.find, 1), ("regex alternation", _regex(items), 50),
                ("`in` per identifier", _naive(items), 10)]
    rows = []
    for size in BODY_SIZES:
        path, query, body = request(size)
        loops = max(20, 2_000_000 // size)
        for label, search, divisor in matchers:
            samples = [_per_request_us(search, path, query, body, max(2, loops // divisor)) for _ in range(rounds)]
            rows.append({"body_bytes": len(body), "matcher": label, "us_per_request": statistics.median(samples)})
            log(f"guard: {label}, {len(body)} B body: {rows[-1]['us_per_request']:.1f} us")
    return {"identifiers": count, "build_ms": build_ms, "rows": rows}


def render(result: dict[str, Any]) -> str:
    lines = [f"CPU per request the guard adds with {result['identifiers']} identifiers (path, query and a JSON body "
             f"scanned; median of rounds, one core). Building the matcher once per run: "
             f"{fmt(result['build_ms'], 2)} ms.", "", "| body | matcher | µs per request |", "|---:|---|---:|"]
    lines += [f"| {row['body_bytes']} B | {row['matcher']} | {fmt(row['us_per_request'], 1)} |"
              for row in result["rows"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identifiers", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(render(run(args.identifiers, args.rounds, log=lambda message: print(message, file=sys.stderr))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
