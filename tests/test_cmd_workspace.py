"""`outloop workspace`: list, show, use, current, new and check, through the installed binary."""

from __future__ import annotations

import json
import tomllib

from conftest import World


def test_list_shows_every_workspace_its_credentials_file_and_the_current_one(world: World) -> None:
    assert world.outloop("workspace", "use", "acme").code == 0
    listed = json.loads(world.outloop("workspace", "list", "--json").out)
    by_name = {entry["name"]: entry for entry in listed}
    assert sorted(by_name) == ["acme", "agency", "globex"]
    assert by_name["acme"]["current"] and not by_name["globex"]["current"]
    assert by_name["acme"]["credentials"] == ["crm", "llm"]  # llm comes from agency through `extends`
    assert by_name["globex"]["path"] == str(world.profiles / "globex.toml")
    plain = world.outloop("workspace", "list")
    assert plain.code == 0
    assert [line.split()[:2] for line in plain.out.splitlines() if line.startswith("*")] == [["*", "acme"]]


def test_list_keeps_going_past_a_broken_profile(world: World) -> None:
    world.write_profile("broken", "version = 1\n[credentials.x]\nsecret = 'keyring'\n")
    result = world.outloop("workspace", "list", "--json")
    assert result.code == 0
    broken = next(entry for entry in json.loads(result.out) if entry["name"] == "broken")
    assert "credentials.x.base_url: missing" in broken["error"]


def test_show_resolves_extends_and_gives_secrets_only_as_present_or_missing(world: World) -> None:
    world.write_profile("initech", """
        version = 1
        extends = "acme"
        [credentials.mail]
        secret = "keyring"
        base_url = "{UPSTREAM}"
        allow = ["POST /send"]
    """)
    shown = json.loads(world.outloop("workspace", "show", "initech", "--json").out)
    credentials = shown["credentials"]
    assert {name: (c["owner"], c["secret_state"]) for name, c in credentials.items()} == {
        "crm": ("acme", "present"), "llm": ("agency", "present"), "mail": ("initech", "missing")}
    assert credentials["crm"]["allow"][0] == "GET /crm/v3/objects/contacts"
    assert shown["sources"] == [str(world.profiles / f"{n}.toml") for n in ("initech", "acme", "agency")]
    plain = world.outloop("workspace", "show", "initech")
    assert plain.code == 0 and "[credentials.llm]  # from agency" in plain.out
    assert 'secret = "keyring"  # missing' in plain.out
    world.assert_no_canary()


def test_use_writes_config_atomically_keeping_other_keys_and_current_reads_it(world: World) -> None:
    (world.home / "config.toml").write_text('workspace = "acme"\n[defaults]\nnetwork = "auto"\n')
    result = world.outloop("workspace", "use", "globex")
    assert result.code == 0 and "current workspace: globex" in result.out
    config = tomllib.loads((world.home / "config.toml").read_text())
    assert config == {"workspace": "globex", "defaults": {"network": "auto"}}
    assert sorted(p.name for p in world.home.iterdir() if p.name.startswith(".config")) == []  # no temp left
    current = world.outloop("workspace", "current")
    assert (current.code, current.out) == (0, "globex\n") and "config.toml" in current.err
    overridden = world.outloop("workspace", "current", "--json", env={**world.env, "OUTLOOP_WORKSPACE": "acme"})
    assert json.loads(overridden.out) == {"workspace": "acme", "source": "OUTLOOP_WORKSPACE"}


def test_current_with_no_choice_exits_1_saying_how_to_choose(world: World) -> None:
    result = world.outloop("workspace", "current")
    assert result.code == 1 and "outloop workspace use NAME" in result.err


def test_unknown_or_invalid_workspaces_are_clear_errors(world: World) -> None:
    for args in (("workspace", "use", "nope"), ("workspace", "show", "nope"), ("workspace", "check", "nope"),
                 ("secret", "list", "nope")):
        result = world.outloop(*args)
        assert result.code != 0, args
        assert "unknown workspace 'nope'" in result.err and "Known workspaces: acme, agency, globex" in result.err
        assert "Traceback" not in result.err
    invalid = world.outloop("workspace", "use", "Bad Name")
    assert invalid.code != 0 and "not a valid workspace name" in invalid.err
    assert not (world.home / "config.toml").exists()


def test_new_writes_a_commented_starter_that_checks_clean_and_is_never_overwritten(world: World) -> None:
    created = world.outloop("workspace", "new", "initech", "--extends", "agency")
    path = world.profiles / "initech.toml"
    assert created.code == 0 and str(path) in created.out
    text = path.read_text()
    assert text.count("\n# ") >= 10 and 'extends = "agency"' in text
    assert world.outloop("workspace", "check", "initech").code == 0
    shown = json.loads(world.outloop("workspace", "show", "initech", "--json").out)
    assert list(shown["credentials"]) == ["llm"]
    for name in ("initech", "acme"):
        again = world.outloop("workspace", "new", name)
        assert again.code == 2 and "already exists" in again.err
    assert path.read_text() == text
    assert world.outloop("workspace", "new", "x", "--extends", "nope").code != 0


def test_check_lists_every_problem_at_once_without_printing_secrets(world: World) -> None:
    assert world.outloop("secret", "rm", "globex", "billing").code == 0
    world.write_profile("typo", "version = 1\n[run]\ntimeot = '1h'\n")
    world.write_profile("viaenv", """
        version = 1
        [credentials.crm]
        secret = "env:NOT_SET_ANYWHERE"
        base_url = "{UPSTREAM}"
        [credentials.mail]
        secret = "cmd:printf %s {CANARY}"
        base_url = "{UPSTREAM}"
        [credentials.fails]
        secret = "cmd:false"
        base_url = "{UPSTREAM}"
    """.replace("{CANARY}", world.canaries["env"]))
    result = world.outloop("workspace", "check")
    assert result.code == 1
    for expected in ("globex", "billing", "outloop secret set globex billing", "typo.toml: run.timeot: unknown key",
                     "NOT_SET_ANYWHERE is not set", "'false' exited with code 1"):
        assert expected in result.out, expected
    assert result.out.splitlines()[-1] == "5 workspaces checked, 4 problems"
    data = json.loads(world.outloop("workspace", "check", "--json").out)
    states = {s["credential"]: s["state"] for w in data["workspaces"] if w["workspace"] == "viaenv"
              for s in w["secrets"]}
    assert states == {"crm": "missing", "fails": "missing", "mail": "present"}
    assert world.outloop("workspace", "check", "acme").code == 0
    world.assert_no_canary()


def test_check_flags_a_profile_others_can_write_and_a_current_workspace_with_no_profile(world: World) -> None:
    (world.profiles / "acme.toml").chmod(0o666)
    (world.home / "config.toml").write_text('workspace = "gone"\n')
    result = world.outloop("workspace", "check")
    assert result.code == 1
    assert "acme.toml is writable by group or others" in result.out
    assert "the current workspace 'gone'" in result.out


def test_check_warns_when_two_workspaces_declare_overlapping_guard_identifiers(world: World) -> None:
    for name, identifiers in (("acme", '["acme.example", "ACME-"]'), ("globex", '["globex.example", "acme-corp"]')):
        path = world.profiles / f"{name}.toml"
        path.write_text(path.read_text() + f"\n[guard]\nidentifiers = {identifiers}\n")
    result = world.outloop("workspace", "check")
    assert result.code == 0, result.combined  # a warning, not a problem
    warning = ("warning: guard identifiers overlap: acme: guard.identifiers[1] and globex: guard.identifiers[1] "
               "(one contains the other, ignoring case)")
    assert result.out.count(warning) == 2, result.out
    checked = json.loads(world.outloop("workspace", "check", "--json").out)
    assert [len(w["warnings"]) for w in checked["workspaces"]] == [1, 0, 1]
