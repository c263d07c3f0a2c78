"""The [notify] hook: after the run, outside the sandbox, the summary JSON on stdin and nothing else; its own
failure is recorded and never changes the run's exit code."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import PYTHON, World

from outloop_cli.notify import triggers

# A real hook: writes what it got (stdin, environment) to a file, then fails when told to.
HOOK = """
    import json, os, sys
    with open(sys.argv[1], "w") as out:
        json.dump({"stdin": sys.stdin.read(), "env": dict(os.environ)}, out)
    if len(sys.argv) > 2:
        print("warming up", file=sys.stderr)
        print(sys.argv[2], file=sys.stderr)
        sys.exit(7)
"""


def notify_profile(world: World, on: list[str], *extra: str, credential: str = "crm") -> Path:
    """acme with a [notify] hook; `credential` names its one credential (acme has no keyring entry for "mail")."""
    hook = world.work / "hook.py"
    hook.write_text(textwrap.dedent(HOOK))
    seen = world.work / "hook-saw.json"
    command = [PYTHON, str(hook), str(seen), *extra]
    world.write_profile("acme", f"""
        version = 1
        [notify]
        on = {json.dumps(on)}
        command = {json.dumps(command)}

        [credentials.{credential}]
        secret = "keyring"
        base_url = "{{UPSTREAM}}"
        allow = ["GET /crm/**", "GET /status/*"]
    """)
    return seen


def notify_outcomes(world: World) -> list[object]:
    """What the hook did, per run, as each run's end record holds it."""
    ends = [json.loads(str(event["detail"])) for event in world.events(kind="run_end")]
    return [end["notify"] for end in ends if end.get("notify")]


def test_a_failed_run_sends_the_summary_json_and_nothing_else_to_the_hook(world: World) -> None:
    seen = notify_profile(world, ["failure"])
    result = world.run(PYTHON, "-c", "raise SystemExit(3)")
    assert result.code == 3
    got = json.loads(seen.read_text())
    summary = json.loads(got["stdin"])
    assert (summary["exit_code"], summary["workspace"], summary["run_id"]) == (3, "acme", world.last_run_id())
    assert not any(name.startswith(("OUTLOOP_", "PYTHON", "AWS_", "ACME_", "XDG_")) for name in got["env"])
    assert set(got["env"]) <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ"} | {
        name for name in got["env"] if name.startswith("LC_")}
    assert "notify     python" in result.err and "ran (failure)" in result.err
    assert notify_outcomes(world) == [{"triggers": ["failure"], "command": Path(PYTHON).name, "exit_code": 0,
                                     "error": None}]
    world.assert_no_canary(seen.read_text())
    assert world.outloop("audit", "verify", world.last_run_id()).code == 0


def test_a_run_that_meets_no_condition_does_not_call_the_hook(world: World) -> None:
    seen = notify_profile(world, ["failure", "denied"])
    assert world.run("true").code == 0
    assert not seen.exists() and notify_outcomes(world) == []


def test_a_failing_hook_is_recorded_and_leaves_the_exit_code_alone(world: World) -> None:
    seen = notify_profile(world, ["denied"], "webhook answered 500")
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        print(Outloop().request("crm", "DELETE", "/crm/1").status)
    """)
    assert result.code == 0 and result.out.strip() == "403"
    assert json.loads(json.loads(seen.read_text())["stdin"])["denials"]
    assert "notify     FAILED: python" in result.err and "(denied): webhook answered 500" in result.err
    assert notify_outcomes(world) == [{"triggers": ["denied"], "command": Path(PYTHON).name, "exit_code": 7,
                                     "error": "webhook answered 500"}]


def test_an_upstream_error_calls_a_hook_armed_for_errors(world: World) -> None:
    seen = notify_profile(world, ["errors"])
    result = world.run_loop("""
        from outloop_cli.client import Outloop
        print(Outloop().request("crm", "GET", "/status/401").status)
    """)
    assert (result.code, result.out.strip()) == (0, "401")
    summary = json.loads(json.loads(seen.read_text())["stdin"])
    assert summary["requests"]["errors"] == 1 and summary["errors"][0]["status"] == 401
    assert notify_outcomes(world)[0] == {"triggers": ["errors"], "command": Path(PYTHON).name, "exit_code": 0,
                                          "error": None}


def test_a_hook_that_cannot_start_is_recorded_and_leaves_the_exit_code_alone(world: World) -> None:
    world.write_profile("acme", """
        version = 1
        [notify]
        command = ["/nonexistent/notify-team"]
    """)
    result = world.run(PYTHON, "-c", "raise SystemExit(4)")
    assert result.code == 4
    assert "FAILED: notify-team (failure): '/nonexistent/notify-team' was not found" in result.err


def test_a_run_that_never_started_still_notifies(world: World) -> None:
    seen = notify_profile(world, ["failure"], credential="mail")
    result = world.run("true")
    assert result.code == 125 and "credential 'mail': no secret in the keyring" in result.err
    summary = json.loads(json.loads(seen.read_text())["stdin"])
    assert (summary["exit_code"], summary["started"]) == (125, False)
    assert "no secret in the keyring" in summary["error"]
    assert notify_outcomes(world)[0]["triggers"] == ["failure"]


def test_notify_settings_are_checked_naming_the_key(world: World) -> None:
    world.write_profile("acme", """
        version = 1
        [notify]
        on = ["failures"]
        command = ["mail"]
    """)
    result = world.outloop("workspace", "check", "acme")
    assert result.code == 1 and "notify.on: 'failures' is not a condition; did you mean 'failure'?" in result.out


def test_doctor_w_never_calls_the_hook(world: World) -> None:
    seen = notify_profile(world, ["failure"], credential="mail")
    result = world.outloop("doctor", "-w", "acme")
    assert result.code == 1 and "credential 'mail': no secret in the keyring" in result.out
    assert not seen.exists()


@pytest.mark.parametrize(("summary", "met"), [
    ({"exit_code": 0, "denials": {}, "errors": []}, []),
    ({"exit_code": 2, "denials": {}}, ["failure"]),
    ({"exit_code": 125, "started": False, "error": "no secret"}, ["failure"]),
    ({"exit_code": 0, "denials": {"no_matching_rule": 1}}, ["denied"]),
    ({"exit_code": 0, "denials": [{"reason": "rate_limited", "count": 3}]}, ["denied"]),
    ({"exit_code": 0, "errors": [{"status": 401, "count": 1}]}, ["errors"]),
    ({"exit_code": 1, "denials": {"x": 1}, "errors": [{"status": 502, "count": 1}]}, ["failure", "denied", "errors"]),
])
def test_triggers_name_the_conditions_a_summary_meets_in_the_profiles_order(summary: dict[str, object],
                                                                             met: list[str]) -> None:
    assert triggers(["failure", "denied", "errors"], summary) == met
    assert triggers(["errors", "failure"], summary) == [c for c in ["errors", "failure"] if c in met]
