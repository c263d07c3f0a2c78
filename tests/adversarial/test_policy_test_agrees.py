"""`outloop policy test` against the live broker: the hostile suite's request table, sent by a hostile child to a
real run and given to `policy test --all`, gets the same decision, reason and status from both."""

from __future__ import annotations

import json

from conftest import World

from adversarial.conftest import run_hostile
from adversarial.test_hostile_child_requests import ATTEMPT_LOOP, ATTEMPTS


def test_policy_test_agrees_with_the_live_broker_on_every_row_of_the_request_table(world: World) -> None:
    attempts = world.work / "attempts.json"
    attempts.write_text(json.dumps([attempt for attempt, *_ in ATTEMPTS]))
    live = run_hostile(world, ATTEMPT_LOOP, str(attempts))
    assert live.code == 0, live.err
    events = [event for event in world.events() if event["path"] != "/v1/run" or event["decision"] == "deny"]
    assert len(events) == len(ATTEMPTS)
    lines = world.work / "requests.txt"
    lines.write_text("".join(f"{method} {target}\n" for (method, target), *_ in ATTEMPTS))
    tested = world.outloop("policy", "test", "acme", "--all", str(lines), "--json")
    assert tested.code == 1, tested.combined  # some rows are denied
    verdicts = json.loads(tested.out)
    disagreements = []
    for ((method, target), *_), event, verdict in zip(ATTEMPTS, events, verdicts, strict=True):
        broker = (event["decision"], event["reason"], event["status"] or 200)
        tool = ("allow" if verdict["allowed"] else "deny", verdict["reason"], verdict["status"])
        if broker != tool:
            disagreements.append((method, target[:80], broker, tool))
    assert disagreements == [], "\n".join(map(str, disagreements))
