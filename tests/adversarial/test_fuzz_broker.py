"""10,000 random and malformed HTTP requests at a live broker (one `outloop run`, 8 connections, fixed seed).

What counts: a request is a message the broker read off a connection. The child tallies every message it sent
as answered (a complete response came back), discarded (it followed, on the same connection, a message whose
answer closed the connection: a malformed request, HTTP/1.0, `Connection: close`; the broker never read it),
closed unanswered, or stalled. The claims:
- the broker stays up: a normal request after the storm gets 200;
- every answer is documented: broker-made answers carry one of the documented status/code pairs, and every
  other answer is the upstream's 200;
- none closed unanswered and none stalled, so sent == answered + discarded;
- every request is audited: request events == answers, one for one (allowed ones == requests upstream);
- the canary never leaves for another host (world.other stays empty, though `billing` points there), and at the
  credential's own host only in the injected header (the session's canary collector checks the rest).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from conftest import World

from adversarial.conftest import json_lines, run_hostile

SEED = "outloop-fuzz-2026"
REQUESTS = 10_000
CONNECTIONS = 8

FUZZ_PROFILE = """
    version = 1
    extends = "agency"
    [credentials.crm]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    allow = ["GET /crm/**", "POST /crm/items"]
    deny = ["* /crm/admin/**", "* /crm/*/merge"]
    [credentials.billing]
    secret = "keyring"
    base_url = "{OTHER}"
    deny = ["* /**"]
"""


def test_ten_thousand_hostile_requests_leave_the_broker_up_documented_and_fully_audited(world: World) -> None:
    world.write_profile("acme", FUZZ_PROFILE)
    world.set_keyring("acme", "billing", world.canaries["globex"] + "-billing")
    shutil.copy(Path(__file__).with_name("fuzz_child.py"), world.work / "fuzz_child.py")
    result = run_hostile(world, "import fuzz_child\nfuzz_child.main()\n", SEED, str(REQUESTS), str(CONNECTIONS),
                         timeout=240)
    assert result.code == 0, result.err[-3000:]
    (report,) = json_lines(result.out)

    assert report["final"] == 200
    assert report["undocumented"] == []
    assert report["extra"] == [], "\n".join(report["extra"])
    assert (report["stalled"], report["closed_unanswered"]) == (0, 0), "\n".join(report["stalls"])
    assert report["sent"] == REQUESTS == report["answered"] + report["discarded"], (report, result.err[-3000:])
    statuses = report["statuses"]
    assert isinstance(statuses, dict)
    # The storm reached every part of the broker, not just the parser.
    for key in ("200 None", "400 bad_request", "403 denied", "404 unknown_credential"):
        assert statuses.get(key, 0) >= 100, statuses

    events = world.events()
    fuzz_events = events[:-1]  # the last one is the final normal request
    assert len(fuzz_events) == report["answered"]
    allowed = [e for e in events if e["decision"] == "allow" and e["credential"] == "crm"]
    upstream = world.upstream.requests
    assert len(upstream) == len(allowed)
    assert Counter(r.path.split("?")[0] for r in upstream) == Counter(str(e["path"]) for e in allowed)
    assert all(r.header("Authorization") == f"Bearer {world.canaries['acme']}" for r in upstream)
    assert world.other.requests == []
    world.seen_output.append(json.dumps(report))
