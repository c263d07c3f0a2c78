"""Upstream failures are counted as errors, apart from success, everywhere an operator looks.

One real run meets an upstream 401, an unreachable host (the broker's 502), a denial, two rate-limited requests and
an unknown credential; the summary, `--summary-json`, `outloop audit` and `audit events` must all tell the same
story, each request counted once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from conftest import World, make_world

OUTCOMES_PROFILE = """
    version = 1

    [credentials.crm]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    allow = ["GET /status/*", "GET /crm/**"]
    rate = "3/m"

    [credentials.down]
    secret = "keyring"
    base_url = "http://127.0.0.1:9"
    allow = ["GET /**"]
"""

OUTCOMES_LOOP = """
    from outloop_cli.client import Outloop
    client = Outloop()
    assert client.request("crm", "GET", "/status/401").status == 401       # an expired token, say
    assert client.request("crm", "GET", "/crm/1").status == 200
    assert client.request("crm", "DELETE", "/crm/1").denied                 # no rule allows it
    assert client.request("crm", "GET", "/crm/2").status == 200             # the third: the rate is spent
    assert client.request("crm", "GET", "/crm/3").status == 429
    assert client.request("crm", "GET", "/crm/4").status == 429
    assert client.request("nope", "GET", "/x").status == 404                # no such credential
    assert client.request("down", "GET", "/ping").status == 502             # nobody listens on port 9
"""
SNAKE_CASE = re.compile(r"[a-z][a-z0-9_]*")


@pytest.fixture(scope="module")
def outcomes() -> Iterator[tuple[World, str, str, dict[str, object]]]:
    """The world, the run's id, its plain summary, and its --summary-json."""
    with make_world() as world:
        world.write_profile("outcomes", OUTCOMES_PROFILE)
        world.set_keyrings([("outcomes", "crm", world.canaries["acme"]), ("outcomes", "down", world.canaries["aws"])])
        summary_path = world.work / "summary.json"
        result = world.run_loop(OUTCOMES_LOOP, workspace="outcomes", flags=["--summary-json", str(summary_path)])
        assert result.code == 0, result.err
        yield world, world.last_run_id(), result.err, json.loads(summary_path.read_text())


def machine_keys(value: object, skip: frozenset[str] = frozenset({"credentials", "sandbox"})) -> set[str]:
    """Every key in a JSON document, except those naming credentials or sandbox layers (taken from elsewhere)."""
    keys: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            keys.add(key)
            if key in skip and isinstance(inner, dict):
                for each in inner.values():
                    keys |= machine_keys(each, skip)
            else:
                keys |= machine_keys(inner, skip)
    elif isinstance(value, list):
        for item in value:
            keys |= machine_keys(item, skip)
    return keys


def test_the_summary_counts_each_request_once_and_says_why(outcomes: tuple[World, str, str, dict[str, object]]) -> None:
    world, _, summary, _ = outcomes
    lines = summary.splitlines()
    assert "  crm        allowed 3 (1 error)  denied 3 (2 rate-limited)  sent 0B  received" in summary
    assert "  down       allowed 1 (1 error)  denied 0  sent 0B  received 0B" in lines
    other = next(line for line in lines if line.startswith("  other "))
    assert "allowed 0  denied 1" in other and "unknown credential" in other
    breakdown = sorted(line.split(None, 1)[1] for line in lines if line.startswith(("  denied ", "  error ")))
    assert breakdown == ["1 x no_matching_rule, credential crm", "1 x unknown_credential, credential nope",
                         "1 x upstream answered 401, credential crm", "1 x upstream_error 502, credential down",
                         "2 x rate_limited (rule GET /crm/**), credential crm"]
    assert re.search(r"^  started    \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Z+-]", summary, re.MULTILINE)
    world.assert_no_canary(summary)


def test_summary_json_has_machine_keys_and_the_same_counts(outcomes: tuple[World, str, str, dict[str, object]]) -> None:
    _, run_id, _, data = outcomes
    assert all(SNAKE_CASE.fullmatch(key) for key in machine_keys(data)), sorted(machine_keys(data))
    assert data["run_id"] == run_id
    assert data["requests"] == {"requests": 8, "allowed": 4, "errors": 2, "denied": 4, "rate_limited": 2,
                                "bytes_sent": 0, "bytes_received": data["requests"]["bytes_received"]}  # type: ignore[index]
    credentials = data["credentials"]
    assert isinstance(credentials, dict) and set(credentials) == {"crm", "down"}
    assert {key: credentials["crm"][key] for key in ("allowed", "errors", "denied", "rate_limited")} == {
        "allowed": 3, "errors": 1, "denied": 3, "rate_limited": 2}
    assert credentials["crm"]["bytes_received"] > 0
    assert data["unattributed"] == {"requests": 1, "allowed": 0, "errors": 0, "denied": 1, "rate_limited": 0,
                                    "bytes_sent": 0, "bytes_received": 0}
    assert sorted((e["credential"], e["status"], e["error"], e["count"]) for e in data["errors"]) == [  # type: ignore[union-attr]
        ("crm", 401, None, 1), ("down", 502, "upstream_error", 1)]
    assert sorted((d["credential"], d["reason"], d["status"], d["count"]) for d in data["denials"]) == [  # type: ignore[union-attr]
        ("crm", "no_matching_rule", 403, 1), ("crm", "rate_limited", 429, 2), ("nope", "unknown_credential", 404, 1)]


def test_outloop_audit_shows_the_errors_and_filters_on_them(
    outcomes: tuple[World, str, str, dict[str, object]],
) -> None:
    world, run_id, _, _ = outcomes
    [run] = json.loads(world.outloop("audit", "--json").out)
    assert (run["run_id"], run["exit_code"], run["allowed"], run["errors"], run["denied"]) == (run_id, 0, 4, 2, 4)
    plain = world.outloop("audit").out.splitlines()
    header, row = plain[0].split(), plain[1].split()
    assert row[header.index("err")] == "2"  # "started UTC" and "12-07 15:42" are two words each
    for flags in (["--failed"], ["--status", "401"], ["--status", "4xx,5xx"], ["--status", "404"]):
        assert [r["run_id"] for r in json.loads(world.outloop("audit", *flags, "--json").out)] == [run_id], flags
    assert json.loads(world.outloop("audit", "--status", "503", "--json").out) == []
    bad = world.outloop("audit", "--status", "4x")
    assert bad.code == 2 and "--status: '4x' is not an HTTP status" in bad.err


def test_audit_events_put_the_outcome_on_the_requests_row(outcomes: tuple[World, str, str, dict[str, object]]) -> None:
    world, run_id, _, _ = outcomes
    failed = json.loads(world.outloop("audit", "events", "--failed", "--json").out)
    assert sorted((e["path"], e["result"], e["outcome"]["status"], e["outcome"]["error"]) for e in failed) == [
        ("/ping", "error", 502, "upstream_error"), ("/status/401", "error", 401, None)]
    every = json.loads(world.outloop("audit", "events", "--json").out)
    assert len(every) == 8 and all(e["kind"] == "request" and e["run_id"] == run_id for e in every)
    ok = next(e for e in every if e["path"] == "/crm/1" and e["method"] == "GET")
    assert ok["result"] == "ok" and ok["outcome"]["status"] == 200 and ok["outcome"]["latency_ms"] is not None
    assert ok["outcome"]["bytes_out"] > 0
    assert [e["result"] for e in json.loads(world.outloop("audit", "events", "--status", "429", "--json").out)] == [
        "rate_limited", "rate_limited"]
    plain = world.outloop("audit", "events", "--failed")
    rows = plain.out.splitlines()[1:]
    assert len(rows) == 2 and any("GET /status/401" in row and " error " in row and " 401 " in row for row in rows)
    listed = world.outloop("audit", "events").out
    assert not re.search(r"GET /crm/1 +ok +- ", listed)  # the status of an allowed request is shown, not "-"
    assert re.search(r"GET /crm/1 +ok +200 +\d+ ", listed)


def test_show_and_verify_agree_with_the_counts(outcomes: tuple[World, str, str, dict[str, object]]) -> None:
    world, run_id, _, _ = outcomes
    shown = world.outloop("audit", "show", "last")
    assert shown.out.startswith("FAILED ") and "2 of 4 allowed requests failed" in shown.out.splitlines()[0]
    assert "requests   4 allowed (2 errors), 4 denied" in shown.out
    data = json.loads(world.outloop("audit", "show", run_id, "--json").out)
    requests = [e for e in data["events"] if e["kind"] == "request"]
    seqs = sorted([e["seq"] for e in data["events"]] + [e["outcome"]["seq"] for e in requests if e["outcome"]])
    assert seqs == list(range(data["events_total"]))  # every event shown once: outcomes on their request
    assert world.outloop("audit", "verify").out.splitlines()[-1] == "1 run: 1 ok, 0 incomplete, 0 pruned, 0 broken"
