"""What a profile's author sees: typos in rules caught with a suggestion, bases that never run, and
`workspace show` printing the profile back as the TOML that was written, inheritance marked."""

from __future__ import annotations

import json
import tomllib

from conftest import World

BASE = """
    version = 1
    abstract = true
    description = "Shared base"

    [run]
    timeout = "2h"
    env_set = { FROM_BASE = "1" }

    [credentials.llm]
    secret = "keyring"
    base_url = "{UPSTREAM}/llm"
    inject = { header = "X-Api-Key", value = "{secret}" }
    allow = ["POST /v1/chat/completions"]
"""

CLIENT = """
    version = 1
    description = "A client"
    extends = "base"

    [run]
    max_requests = 50
    env_set = { LOOP_CLIENT = "client" }

    [credentials.crm]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    allow = ["GET /crm/**"]
    connect_timeout = "5s"
"""


def test_a_misspelt_rule_method_stops_the_run_with_a_suggestion(world: World) -> None:
    marker = world.work / "started"
    world.write_profile("acme", """
        version = 1
        [credentials.crm]
        secret = "keyring"
        base_url = "{UPSTREAM}"
        allow = ["GET /items/*", "DELET /items/*"]
    """)
    result = world.run("touch", str(marker))
    assert result.code == 125 and not marker.exists()
    assert "acme.toml: credentials.crm.allow[1]: bad rule 'DELET /items/*'" in result.err
    assert "did you mean DELETE?" in result.err
    check = world.outloop("workspace", "check", "acme")
    assert check.code == 1 and "did you mean DELETE?" in check.out


def test_a_custom_verb_runs_once_declared_in_custom_methods(world: World) -> None:
    world.write_profile("acme", """
        version = 1
        [credentials.crm]
        secret = "keyring"
        base_url = "{UPSTREAM}"
        custom_methods = ["PROPFIND"]
        allow = ["PROPFIND /dav/*"]
    """)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        print(Outloop().request("crm", "PROPFIND", "/dav/x").status)
    """)
    assert (result.code, result.out.strip()) == (0, "200"), result.combined
    assert [request.method for request in world.upstream.requests] == ["PROPFIND"]


def test_an_abstract_base_is_refused_by_run_hidden_from_lists_and_completion_but_checked(world: World) -> None:
    world.write_profile("base", BASE)
    world.write_profile("client", CLIENT)
    marker = world.work / "started"
    result = world.run("touch", str(marker), workspace="base")
    assert result.code == 125 and not marker.exists()
    assert "abstract = true: workspace 'base' is a base for `extends`, not run itself" in result.err
    assert "(e.g. client)" in result.err
    listed = [entry["name"] for entry in json.loads(world.outloop("workspace", "list", "--json").out)]
    assert "base" not in listed and "client" in listed
    everything = json.loads(world.outloop("workspace", "list", "--all", "--json").out)
    assert {entry["name"]: entry["abstract"] for entry in everything}["base"] is True
    completed = world.outloop("__complete", "workspaces").out.split()
    assert "base" not in completed and "client" in completed
    check = json.loads(world.outloop("workspace", "check", "base", "--json").out)
    assert check["workspaces"][0]["workspace"] == "base" and check["workspaces"][0]["secrets"][0]["credential"] == "llm"
    world.set_keyring("base", "llm", world.canaries["agency"])
    world.set_keyring("client", "crm", world.canaries["acme"])
    assert world.run("true", workspace="client").code == 0  # what extends a base runs


def test_workspace_show_prints_the_toml_that_was_written_with_inherited_keys_marked(world: World) -> None:
    world.write_profile("base", BASE)
    world.write_profile("client", CLIENT)
    shown = world.outloop("workspace", "show", "client")
    assert shown.code == 0, shown.err
    lines = shown.out.splitlines()
    assert 'timeout = "2h"  # from base' in lines
    assert "max_requests = 50" in lines
    assert 'env_set = { FROM_BASE = "1", LOOP_CLIENT = "client" }  # from base + client' in lines
    assert "[credentials.llm]  # from base" in lines
    assert 'inject = { header = "X-Api-Key", value = "{secret}" }' in lines
    assert 'connect_timeout = "5s"' in lines
    assert 'secret = "keyring"  # missing' in lines
    assert not any("7200" in line or "{'" in line for line in lines)
    parsed = tomllib.loads(shown.out)  # what it prints is TOML a profile could hold
    assert parsed["run"]["timeout"] == "2h" and parsed["credentials"]["crm"]["allow"] == ["GET /crm/**"]
    as_json = json.loads(world.outloop("workspace", "show", "client", "--json").out)
    assert as_json["run"]["timeout"] == 7200.0  # machine-readable stays numeric
