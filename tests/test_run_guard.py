"""The wrong-client guard in a real run: acme's loop cannot send globex's data to acme's CRM.

Each attack has its control: the same request without the identifier, and the same request when nobody declared
identifiers, both go through.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import PYTHON, World

GLOBEX_GUARD = '\n[guard]\nidentifiers = ["globex.example", "GLX-"]\n'

POST_LOOP = """
    import json, sys
    from outloop_cli.client import Outloop
    client = Outloop()
    for body in json.load(open(sys.argv[1])):
        answer = client.request("crm", "POST", "/crm/v3/objects/contacts", body=body,
                                headers={"Content-Type": "application/json"})
        error = answer.error or {}
        print(json.dumps([answer.status, error.get("type")] + ([error.get("rule")] if error.get("rule") else [])),
              flush=True)
"""


def _declare(world: World, workspace: str, text: str) -> None:
    path = world.profiles / f"{workspace}.toml"
    path.write_text(path.read_text() + text)


def _post(world: World, bodies: list[str]) -> list[list[object]]:
    """The bodies travel in a file: as arguments they would be in the audit's record of the command."""
    script = world.work / "post.py"
    script.write_text(textwrap.dedent(POST_LOOP))
    (world.work / "leads.json").write_text(json.dumps(bodies))
    result = world.run(PYTHON, str(script), str(world.work / "leads.json"))
    assert result.code == 0, result.combined
    return [json.loads(line) for line in result.out.splitlines()]


ACME_LEAD = '{"properties": {"email": "jane@acme.example", "company": "Acme"}}'
# The last spells "globex.example" with a JSON escape; the guard reads the body as the server would.
GLOBEX_LEADS = ['{"properties": {"email": "bob@GLOBEX.example"}}', '{"properties": {"ref": "glx-0042"}}',
                '{"properties": {"email": "bob@globex\\u002eexample"}}']


def test_a_post_carrying_another_clients_identifier_is_refused_before_the_upstream_sees_it(world: World) -> None:
    _declare(world, "globex", GLOBEX_GUARD)
    answers = _post(world, [ACME_LEAD, *GLOBEX_LEADS])
    assert answers == [[200, None]] + [[403, "denied"]] * 3
    # Only acme's own lead went out.
    assert [request.body.decode() for request in world.upstream.requests] == [ACME_LEAD]
    denied = [event for event in world.events() if event["decision"] == "deny"]
    assert [(event["reason"], event["rule"]) for event in denied] == [
        ("foreign_identifier", "globex: guard.identifiers[0]"), ("foreign_identifier", "globex: guard.identifiers[1]"),
        ("foreign_identifier", "globex: guard.identifiers[0]")]
    # The audit names the declaration, never the matched data.
    assert b"globex.example" not in world.audit_bytes().lower() and b"glx-0042" not in world.audit_bytes().lower()
    world.assert_no_canary()


def test_control_without_declared_identifiers_the_same_posts_go_through(world: World) -> None:
    answers = _post(world, [ACME_LEAD, *GLOBEX_LEADS])
    assert answers == [[200, None]] * 4
    assert len(world.upstream.requests) == 4


def test_identifiers_in_the_path_and_query_are_refused_and_masked_in_the_audit(world: World) -> None:
    _declare(world, "globex", GLOBEX_GUARD)
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        client = Outloop()
        for path, params in (("/crm/v3/objects/contacts/glx-7", None),
                             ("/crm/v3/objects/contacts", {"q": "x@globex.example"}),
                             ("/crm/v3/objects/contacts", {"q": "X@Globex.Example"}),
                             ("/crm/v3/objects/contacts/7", None)):
            print(client.request("crm", "GET", path, params=params).status)
    """)
    assert result.out.split() == ["403", "403", "403", "200"], result.combined
    paths = [event["path"] for event in world.events() if event["decision"] == "deny"]
    assert paths == ["/crm/v3/objects/contacts/[guarded]", "/crm/v3/objects/contacts",
                     "/crm/v3/objects/contacts"]
    assert [request.path for request in world.upstream.requests] == ["/crm/v3/objects/contacts/7"]


def test_a_workspace_is_never_guarded_against_its_own_or_its_bases_identifiers(world: World) -> None:
    _declare(world, "acme", '\n[guard]\nidentifiers = ["acme.example"]\n')
    _declare(world, "agency", '\n[guard]\nidentifiers = ["agency-internal"]\n')
    answers = _post(world, [ACME_LEAD, '{"owner": "agency-internal"}'])
    assert answers == [[200, None], [200, None]]


@pytest.mark.parametrize("mode", ["flag", "deny"])
def test_a_response_carrying_another_clients_identifier_is_flagged_or_withheld(world: World, mode: str) -> None:
    _declare(world, "globex", GLOBEX_GUARD)
    _declare(world, "acme", f'\n[guard]\nresponses = "{mode}"\n')
    summary = world.work / "summary.json"
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        client = Outloop()
        leaked = client.request("crm", "GET", "/echo-headers", headers={"X-Note": "lead for bob@globex.example"})
        clean = client.request("crm", "GET", "/echo-headers", headers={"X-Note": "lead for jane@acme.example"})
        print(leaked.status, "globex.example" in leaked.text.lower(), clean.status)
    """, flags=["--summary-json", str(summary)])
    assert result.code == 0, result.combined
    responses = [event for event in world.events(kind="response")]
    report = json.loads(summary.read_text())
    if mode == "flag":
        assert result.out.split() == ["200", "True", "200"]
        assert [(event["reason"], event["rule"]) for event in responses] == [
            ("foreign_identifier_flagged", "globex: guard.identifiers[0]"), (None, None)]
        assert report["flagged"] == [{"credential": "crm", "reason": "foreign_identifier_flagged",
                                      "rule": "globex: guard.identifiers[0]", "count": 1}]
        assert "flagged    1 x foreign_identifier_flagged (rule globex: guard.identifiers[0])" in result.err
    else:
        assert result.out.split() == ["403", "False", "200"]
        assert [(event["error"], event["rule"]) for event in responses] == [
            ("foreign_identifier", "globex: guard.identifiers[0]"), (None, None)]
        # The policy allowed the request; its answer was withheld, so it counts among the errors.
        assert report["errors"] == [{"credential": "crm", "status": 403, "error": "foreign_identifier", "count": 1}]


def test_a_body_over_guard_max_body_is_refused_with_a_clear_reason_when_the_guard_is_on(world: World) -> None:
    _declare(world, "globex", GLOBEX_GUARD)
    _declare(world, "acme", '\n[guard]\nmax_body = "1K"\n')
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        answer = Outloop().request("crm", "POST", "/crm/v3/objects/contacts", body=b"x" * 2048)
        print(answer.status, answer.error["message"])
    """)
    status, message = result.out.split(" ", 1)
    assert status == "413" and "guard.max_body" in message, result.combined
    assert world.upstream.requests == []
