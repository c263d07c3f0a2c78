"""Acceptance 4: no operator command ever prints a secret value, with `--json` or without.

Every command runs against a world whose keyring, environment and audit DB are full of canaries.
"""

from __future__ import annotations

import pytest
from operator_support import AuditedWorld

LISTINGS = [
    ["audit"], ["audit", "show", "last"], ["audit", "events"], ["audit", "verify"],
    ["workspace", "list"], ["workspace", "show", "acme"], ["workspace", "show", "globex"], ["workspace", "check"],
    ["secret", "list", "globex"], ["secret", "check", "acme"], ["doctor"],
]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_no_command_prints_a_secret(audited_world: AuditedWorld, as_json: bool) -> None:
    world = audited_world.world
    outputs = []
    for args in LISTINGS:
        result = world.outloop(*args, *(["--json"] if as_json else []))
        assert result.code == 0, (args, result.err)
        outputs.append(result.combined)
    tail = world.outloop("audit", "tail", audited_world.finished[0], *(["--json"] if as_json else []))
    export = world.outloop("audit", "export", "--format", "jsonl" if as_json else "csv")
    assert (tail.code, export.code) == (0, 0)
    # Storing a canary (the same value it already has) must not echo it either.
    stored = world.outloop("secret", "set", "--allow-plaintext", "acme", "crm", "--stdin",
                           stdin=world.canaries["acme"] + "\n")
    assert stored.code == 0
    world.assert_no_canary(*outputs)
