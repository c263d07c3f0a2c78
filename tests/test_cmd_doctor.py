"""`outloop doctor`: every section reported, each problem with its fix, exit 1 only when runs cannot work."""

from __future__ import annotations

import json
import sqlite3

from conftest import World
from operator_support import AuditedWorld

from outloop_cli.audit.schema import SCHEMA_VERSION
from outloop_cli.sandbox.probe import capabilities


def test_doctor_reports_keyring_sandbox_paths_audit_and_versions(audited_world: AuditedWorld) -> None:
    world = audited_world.world
    result = world.outloop("doctor")
    assert result.code == 0, result.out
    for section in ("paths", "keyring", "sandbox", "audit", "versions"):
        assert f"\n{section}\n" in f"\n{result.out}"
    assert "PlaintextFileKeyring: set/get/delete of a test entry works" in result.out
    assert "PlaintextFileKeyring works headless but stores secrets UNENCRYPTED" in result.out
    assert f"OUTLOOP_HOME: {world.home}" in result.out
    assert f"schema {SCHEMA_VERSION}, journal wal, quick_check ok, 21 runs" in result.out
    report = json.loads(world.outloop("doctor", "--json").out)
    assert report["usable"] is True and report["problems"] == 0
    assert {"outloop", "python", "aiohttp", "keyring", "kernel"} <= set(report["versions"])
    sandbox = {f["name"]: f for f in report["findings"] if f["section"] == "sandbox"}
    for cap in capabilities():
        assert sandbox[cap.name]["status"] == ("ok" if cap.available else "warn")
        assert sandbox[cap.name]["fix"] == cap.fix


def test_doctor_exits_1_listing_every_problem_with_its_fix(world: World) -> None:
    with sqlite3.connect(world.audit_db) as conn:
        conn.execute("PRAGMA user_version = 7")
    env = {**world.env, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    result = world.outloop("doctor", env=env)
    assert result.code == 1
    problems = [line for line in result.out.splitlines() if "PROBLEM" in line]
    assert any("keyring" in line or "Keyring" in line for line in problems)
    assert any("schema 7 was written by a newer outloop" in line for line in problems)
    assert result.out.count("fix: ") >= 2 and "outloop cannot run here: 2 problems" in result.out
    assert "Traceback" not in result.combined


def test_a_broken_keyring_is_only_a_warning_when_no_profile_uses_it(world: World) -> None:
    for name in ("acme", "globex", "agency"):
        (world.profiles / f"{name}.toml").unlink()
    world.write_profile("plain", 'version = 1\n[credentials.crm]\nsecret = "env:TOKEN"\nbase_url = "{UPSTREAM}"\n')
    env = {**world.env, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    result = world.outloop("doctor", "--json", env=env)
    assert result.code == 0
    keyring = [f for f in json.loads(result.out)["findings"] if f["section"] == "keyring"]
    assert keyring[0]["status"] == "warn" and "no profile uses" in keyring[0]["detail"]


# ----- doctor -w: a no-op run of one workspace, as the nightly run would get it ------------------------------


def preflight_section(result_out: str, workspace: str) -> list[dict[str, object]]:
    return [f for f in json.loads(result_out)["findings"] if f["section"] == f"workspace {workspace} (no-op run)"]


def test_doctor_w_runs_the_workspace_for_real_without_calling_upstream(world: World) -> None:
    result = world.outloop("doctor", "-w", "acme", "--json")
    assert result.code == 0, result.out
    findings = preflight_section(result.out, "acme")
    assert findings[0]["status"] == "ok" and "secrets resolved (crm, llm), sandbox started" in str(
        findings[0]["detail"])
    assert {f["name"] for f in findings} >= {"run", "network", "environment"}
    assert world.upstream.requests == []
    assert "workspace acme (no-op run)" in world.outloop("doctor", "-w", "acme").out
    world.assert_no_canary()


def test_doctor_w_names_a_secret_the_keyring_cannot_give(world: World) -> None:
    env = {**world.env, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    result = world.outloop("doctor", "-w", "acme", "--json", env=env)
    assert result.code == 1
    (finding,) = preflight_section(result.out, "acme")
    assert finding["status"] == "problem" and "no usable keyring backend" in str(finding["detail"])
    assert "workspace 'agency', credential 'llm'" in str(finding["detail"])


def test_doctor_w_names_a_missing_keyring_entry_and_a_failing_cmd_source(world: World) -> None:
    world.write_profile("initech", """
        version = 1
        [credentials.mail]
        secret = "keyring"
        base_url = "{UPSTREAM}"
    """)
    world.write_profile("hooli", """
        version = 1
        [credentials.vault]
        secret = "cmd:sh -c 'echo vault is sealed >&2; exit 3'"
        base_url = "{UPSTREAM}"
    """)
    result = world.outloop("doctor", "-w", "initech", "-w", "hooli", "-w", "acme", "--json")
    assert result.code == 1
    (missing,) = preflight_section(result.out, "initech")
    assert "credential 'mail': no secret in the keyring" in str(missing["detail"])
    (failing,) = preflight_section(result.out, "hooli")
    assert "'sh' exited with code 3: vault is sealed" in str(failing["detail"])
    assert preflight_section(result.out, "acme")[0]["status"] == "ok"


def test_doctor_w_names_a_sandbox_the_profile_requires_but_cannot_get(world: World) -> None:
    world.write_profile("acme", """
        version = 1
        [run]
        network = "broker-only"
        [credentials.crm]
        secret = "keyring"
        base_url = "{UPSTREAM}"
    """)
    env = {**world.env, "OUTLOOP_SANDBOX": "bwrap", "PATH": "/nonexistent"}  # bubblewrap cannot be found
    result = world.outloop("doctor", "-w", "acme", "--json", env=env)
    assert result.code == 1
    (finding,) = preflight_section(result.out, "acme")
    assert "OUTLOOP_SANDBOX=bwrap but bubblewrap is missing" in str(finding["detail"])
