"""`outloop policy`: test, suggest (and --apply), replay and lint, through the installed binary."""

from __future__ import annotations

import json

from conftest import World

INITECH = """
    # Initech: nightly sync. Keep the comments: people read this file.
    version = 1
    description = "Initech"

    [credentials.crm]
    secret = "keyring"   # stored with `outloop secret set initech crm`
    base_url = "{UPSTREAM}"
    allow = [
        "GET /crm/v3/objects/companies/*",  # the company list
    ]
    deny = ["* /crm/v3/objects/contacts/*/merge"]
"""

DENIED_LOOP = """
    from outloop_cli.client import Outloop
    client = Outloop()
    for path in ("/crm/v3/objects/contacts/123", "/crm/v3/objects/contacts/456", "/crm/v3/objects/companies/7"):
        print(client.request("crm", "GET", path).status)
"""


def _initech(world: World) -> None:
    world.write_profile("initech", INITECH)
    world.set_keyring("initech", "crm", world.canaries["acme"] + "-initech")


def test_policy_test_prints_path_decision_rule_and_limits_and_exits_by_decision(world: World) -> None:
    allowed = world.outloop("policy", "test", "acme", "GET /v1/http/crm/crm/v3/objects/contacts/%C3%A9?limit=5")
    assert allowed.code == 0, allowed.combined
    for line in ("credential  crm", "path        /crm/v3/objects/contacts/é", "decision    allow (allowed)",
                 "rule        GET /crm/v3/objects/contacts/**", "limits      none"):
        assert line in allowed.out, allowed.out
    denied = world.outloop("policy", "test", "acme", "-c", "crm", "DELETE /crm/v3/objects/contacts/1/merge", "--json")
    assert denied.code == 1
    verdict = json.loads(denied.out)
    assert (verdict["allowed"], verdict["reason"], verdict["rule"], verdict["status"]) == (
        False, "denied_by_rule", "* /crm/v3/objects/contacts/*/merge", 403)
    refused = world.outloop("policy", "test", "acme", "GET /v1/http/crm/a/../b")
    assert refused.code == 1 and "refused (dot_segment)" in refused.out
    assert world.outloop("policy", "test", "acme", "GET").code == 2
    assert not world.audit_db.exists()  # a dry run leaves no trace


def test_suggest_drafts_a_glob_from_denials_and_apply_keeps_comments_and_the_next_run_is_allowed(
        world: World) -> None:
    _initech(world)
    first = world.run_loop(DENIED_LOOP, workspace="initech")
    assert first.out.split() == ["403", "403", "200"], first.combined
    drafted = world.outloop("policy", "suggest", "initech", "--from", "last", "--profiles", str(world.profiles))
    assert drafted.code == 0, drafted.combined
    assert '"GET /crm/v3/objects/contacts/*",  # 2 denied' in drafted.out
    assert "[credentials.crm]" in drafted.out
    before = (world.profiles / "initech.toml").read_text()
    applied = world.outloop("policy", "suggest", "initech", "--since", "1h", "--apply",
                            "--profiles", str(world.profiles))
    assert applied.code == 0 and "added 1 allow rules" in applied.err, applied.combined
    after = (world.profiles / "initech.toml").read_text()
    kept = '    "GET /crm/v3/objects/companies/*",  # the company list\n'
    assert kept in before
    assert after == before.replace(kept, kept + '    "GET /crm/v3/objects/contacts/*",\n')
    second = world.run_loop(DENIED_LOOP, workspace="initech")
    assert second.out.split() == ["200", "200", "200"], second.combined
    again = world.outloop("policy", "suggest", "initech", "--from", "last", "--profiles", str(world.profiles))
    assert again.code == 0 and "nothing to suggest" in again.err


def test_suggest_never_offers_a_rule_a_deny_rule_overrides(world: World) -> None:
    _initech(world)
    assert world.run_loop(DENIED_LOOP, workspace="initech").code == 0
    path = world.profiles / "initech.toml"
    path.write_text(path.read_text().replace('deny = ["* /crm/v3/objects/contacts/*/merge"]',
                                             'deny = ["GET /crm/v3/objects/contacts/**"]'))
    drafted = world.outloop("policy", "suggest", "initech", "--from", "last", "--json",
                            "--profiles", str(world.profiles))
    result = json.loads(drafted.out)
    assert result["rules"] == []
    assert {item["why"] for item in result["skipped"]} == {
        "deny rule 'GET /crm/v3/objects/contacts/**' matches it: deny wins"}


def test_replay_reports_what_a_draft_would_decide_differently_and_the_recorded_policy(world: World) -> None:
    _initech(world)
    assert world.run_loop(DENIED_LOOP, workspace="initech").code == 0
    unchanged = world.outloop("policy", "replay", "initech", "--since", "1h", "--profiles", str(world.profiles))
    assert unchanged.code == 0, unchanged.combined
    assert "replayed        3 requests" in unchanged.out
    recorded = json.loads(world.outloop("audit", "show", "last", "--json").out)["policy_hash"]
    assert f"{recorded[:23]} (1 runs)" in unchanged.out
    draft = world.work / "initech-draft.toml"
    draft.write_text((world.profiles / "initech.toml").read_text().replace(
        '"GET /crm/v3/objects/companies/*",', '"GET /crm/v3/objects/contacts/*",'))
    changed = world.outloop("policy", "replay", "initech", "--since", "1h", "--profile", str(draft),
                            "--profiles", str(world.profiles), "--json")
    assert changed.code == 1, changed.combined
    result = json.loads(changed.out)
    assert [(c["request"], c["count"]) for c in result["now_allowed"]] == [
        ("GET /crm/v3/objects/contacts/123", 1), ("GET /crm/v3/objects/contacts/456", 1)]
    assert [(c["request"], c["after"]) for c in result["now_denied"]] == [
        ("GET /crm/v3/objects/companies/7", "deny: no_matching_rule")]
    assert result["policy_hash"] != recorded


def test_lint_finds_shadowed_unused_and_over_broad_rules_and_hints_at_deletes(world: World) -> None:
    world.write_profile("wide", """
        version = 1
        [credentials.crm]
        secret = "keyring"
        base_url = "https://api.hubapi.com"
        allow = ["* /**", "POST /crm/**", "GET /crm/v3/objects/contacts/*/merge", "GET /crm/v3/objects/*"]
        deny = ["* /crm/v3/objects/contacts/*/merge"]
    """)
    linted = world.outloop("policy", "lint", "wide", "--json")
    assert linted.code == 1, linted.combined
    result = json.loads(linted.out)
    assert result["unused_checked"] is False
    assert [(f["kind"], f["rule"]) for f in result["findings"]] == [
        ("shadowed", "GET /crm/v3/objects/contacts/*/merge"),
        ("over_broad", "* /**"), ("over_broad", "POST /crm/**"),
        ("hint", None)]
    assert world.run_loop(DENIED_LOOP, workspace="acme").code == 0
    acme = json.loads(world.outloop("policy", "lint", "acme", "--json").out)
    unused = {f["rule"] for f in acme["findings"] if f["kind"] == "unused"}
    assert "GET /crm/v3/objects/contacts/**" not in unused and "GET /sse" in unused
