"""`outloop audit`: listing, show, events, tail, verify, export and prune, through the installed binary.

The DB comes from real runs (20 concurrent, one killed with SIGKILL); tampering is done with sqlite3 on copies.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import subprocess

import pytest
from conftest import OUTLOOP, World
from operator_support import AuditedWorld, copy_home, run_in_terminal, start_run, tamper, wait_for

from outloop_cli.audit.export import write_events
from outloop_cli.audit.store import EventRow


def run_json(audited: AuditedWorld, *args: str) -> object:
    result = audited.world.outloop(*args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def env_for(world: World, home: object) -> dict[str, str]:
    return {**world.env, "OUTLOOP_HOME": str(home)}


# -- audit (recent runs) -------------------------------------------------------------------------------


def test_recent_runs_come_newest_first_with_counts_exit_codes_and_a_no_end_mark(audited_world: AuditedWorld) -> None:
    runs = run_json(audited_world, "audit", "--limit", "50")
    assert isinstance(runs, list)
    assert [run["run_id"] for run in runs] == [audited_world.killed, *reversed(audited_world.finished)]
    assert runs[0]["state"] == "no end" and runs[0]["exit_code"] is None
    by_workspace = {(run["workspace"], run["exit_code"], run["allowed"], run["denied"]) for run in runs[1:]}
    assert by_workspace == {("acme", 0, 3, 2), ("globex", 3, 1, 1)}
    assert all(run["state"] == "ended" and run["sandbox_status"] for run in runs[1:])


def test_recent_runs_plain_listing_is_limited_and_marks_the_killed_run(audited_world: AuditedWorld) -> None:
    result = audited_world.world.outloop("audit", "--limit", "3")
    lines = result.out.splitlines()
    assert result.code == 0 and len(lines) == 4  # header + 3
    assert lines[0].split()[0] == "started" and lines[0].split()[2:4] == ["run", "workspace"]
    assert audited_world.killed.startswith(lines[1].split()[2]) and "NO END" in lines[1]
    assert "\x1b[" not in result.out  # NO_COLOR and a pipe: plain text


@pytest.mark.parametrize("columns", [80, 120])
def test_the_listing_fits_the_terminal_with_every_exit_code_and_state_whole(audited_world: AuditedWorld,
                                                                            columns: int) -> None:
    runs = run_json(audited_world, "audit", "--limit", "50")
    assert isinstance(runs, list)
    code, screen = run_in_terminal(audited_world.world, "audit", "--limit", "50", columns=columns)
    lines = [line for line in screen.splitlines() if line.strip()]
    assert code == 0 and len(lines) == 1 + len(runs), screen
    assert all(len(line) <= columns for line in lines), screen
    header = lines[0].split()
    assert header[0] == "started" and {"run", "exit", "err", "deny", "state"} <= set(header)
    for run, line in zip(runs, lines[1:], strict=True):
        cells = line.split()
        assert run["run_id"].startswith(cells[2]) and len(cells[2]) >= 8
        if run["exit_code"] is None:
            assert "NO END" in line
        else:
            assert cells[4] == str(run["exit_code"]) and " ended " in line


def test_short_ids_are_unique_prefixes_accepted_wherever_a_run_id_is(audited_world: AuditedWorld) -> None:
    world = audited_world.world
    lines = world.outloop("audit", "--limit", "50").out.splitlines()[1:]
    shown = [line.split()[2] for line in lines]
    assert len(set(map(len, shown))) == 1 and len(set(shown)) == len(shown) == 21
    run_id = audited_world.finished[0]
    short = next(prefix for prefix in shown if run_id.startswith(prefix))
    assert json.loads(world.outloop("audit", "show", short, "--json").out)["run_id"] == run_id
    assert json.loads(world.outloop("audit", "show", short.lower(), "--json").out)["run_id"] == run_id
    assert json.loads(world.outloop("audit", "verify", short, "--json").out)["verdicts"][0]["run_id"] == run_id
    exported = world.outloop("audit", "export", "--run", short).out.splitlines()
    assert exported and {json.loads(line)["run_id"] for line in exported} == {run_id}
    tailed = world.outloop("audit", "tail", short, "-n", "100")
    assert tailed.code == 0 and f"run {run_id} ended" in tailed.err


def test_an_ambiguous_prefix_lists_the_runs_it_could_mean(audited_world: AuditedWorld) -> None:
    prefix = audited_world.finished[0][:5]  # runs started within a second or two share their first characters
    for args in (["show", prefix], ["verify", prefix], ["tail", prefix], ["export", "--run", prefix]):
        result = audited_world.world.outloop("audit", *args)
        assert result.code == 3, (args, result)
        assert f"run id {prefix!r} is ambiguous" in result.err and audited_world.finished[0] in result.err
        assert "Traceback" not in result.err
    short = audited_world.world.outloop("audit", "show", "01")
    assert short.code == 2 and "at least 4 characters" in short.err


def test_recent_runs_filter_by_workspace(audited_world: AuditedWorld) -> None:
    runs = run_json(audited_world, "audit", "--workspace", "globex")
    assert isinstance(runs, list) and len(runs) == 10
    assert {run["workspace"] for run in runs} == {"globex"}


# -- audit show ----------------------------------------------------------------------------------------


def test_show_gives_the_header_and_every_event_in_order(audited_world: AuditedWorld) -> None:
    run_id = audited_world.finished[0]
    shown = run_json(audited_world, "audit", "show", run_id)
    assert isinstance(shown, dict)
    kinds = [event["kind"] for event in shown["events"]]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and "response" not in kinds
    outcomes = [event["outcome"]["seq"] for event in shown["events"] if event.get("outcome")]
    seqs = [event["seq"] for event in shown["events"]]
    assert seqs == sorted(seqs) and sorted(seqs + outcomes) == list(range(shown["events_total"]))
    assert shown["failure"] == ([] if shown["exit_code"] == 0 else [f"the command exited with {shown['exit_code']}"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[0-9:.]+[+-]\d\d:\d\d", shown["started"])
    plain = audited_world.world.outloop("audit", "show", run_id)
    assert plain.code == 0 and f"run        {run_id}" in plain.out and "run_start" in plain.out
    assert re.search(r"^started    \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Z+-]", plain.out, re.MULTILINE)


def test_show_last_is_the_newest_run_and_limit_says_what_was_left_out(audited_world: AuditedWorld) -> None:
    result = audited_world.world.outloop("audit", "show", "last", "--limit", "1")
    assert result.code == 0
    assert audited_world.killed in result.out and "no end" in result.out
    assert "more events not shown" in result.err


def test_show_last_of_a_workspace(audited_world: AuditedWorld) -> None:
    newest_globex = next(run for run in run_json(audited_world, "audit", "-w", "globex"))  # type: ignore[call-overload]
    shown = run_json(audited_world, "audit", "show", "last", "-w", "globex")
    assert isinstance(shown, dict) and shown["run_id"] == newest_globex["run_id"]
    assert shown["failure"] == ["the command exited with 3"]
    assert audited_world.world.outloop("audit", "show", "last", "-w", "initech").code == 2


def test_show_of_an_unknown_run_is_a_clear_usage_error(audited_world: AuditedWorld) -> None:
    result = audited_world.world.outloop("audit", "show", "01NOSUCHRUN")
    assert result.code == 2
    assert "no run '01NOSUCHRUN'" in result.err and "Traceback" not in result.err


# -- audit events --------------------------------------------------------------------------------------


def test_events_filter_by_workspace_decision_and_time(audited_world: AuditedWorld) -> None:
    denied = run_json(audited_world, "audit", "events", "--workspace", "acme", "--decision", "deny", "--since", "1h")
    assert isinstance(denied, list) and len(denied) == 20  # 10 acme runs x 2 denials
    assert {(e["workspace"], e["decision"], e["kind"]) for e in denied} == {("acme", "deny", "request")}
    reasons = {(str(e["path"]).rsplit("/contacts/", 1)[1], e["reason"]) for e in denied}
    assert reasons == {("1/merge", "denied_by_rule"), ("1", "no_matching_rule")}
    times = [e["ts"] for e in denied]
    assert times == sorted(times, reverse=True)
    assert run_json(audited_world, "audit", "events", "--until", "1h") == []


def test_events_filter_by_credential_and_limit(audited_world: AuditedWorld) -> None:
    billing = run_json(audited_world, "audit", "events", "--credential", "billing")
    assert isinstance(billing, list) and len(billing) == 10
    assert {(e["workspace"], e["decision"]) for e in billing} == {("globex", "deny")}
    result = audited_world.world.outloop("audit", "events", "--limit", "3")
    assert len(result.out.splitlines()) == 4 and "showing the newest 3" in result.err


@pytest.mark.parametrize(("flag", "value"), [("--since", "yesterday"), ("--until", "7x"), ("--since", "-1d")])
def test_a_malformed_time_is_a_usage_error_naming_the_flag(audited_world: AuditedWorld, flag: str,
                                                           value: str) -> None:
    result = audited_world.world.outloop("audit", "events", flag, value)
    assert result.code == 2
    assert f"{flag}: {value!r} is not a time" in result.err and "Traceback" not in result.err


def test_listings_on_a_new_machine_are_empty_not_failures(world: World) -> None:
    for args in (["audit"], ["audit", "events"], ["audit", "--failed"]):
        assert (world.outloop(*args, "--json").code, world.outloop(*args, "--json").out) == (0, "[]\n")
    human = world.outloop("audit")
    assert human.code == 0 and human.out == "" and "no runs recorded yet" in human.err
    verified = world.outloop("audit", "verify")
    assert verified.code == 0 and verified.out == "0 runs: 0 ok, 0 incomplete, 0 pruned, 0 broken\n"
    assert world.outloop("audit", "export").code == 0
    last = world.outloop("audit", "show", "last")
    assert last.code == 2 and "holds no runs yet" in last.err and "Traceback" not in last.err
    tail = world.outloop("audit", "tail", "last")
    assert tail.code != 0 and "no audit database" in tail.err and "run `outloop run` first" in tail.err
    assert not world.audit_db.exists()  # reading created nothing


def test_show_last_leads_with_why_a_run_never_started(world: World) -> None:
    world.write_profile("nokey", """
        version = 1
        [credentials.crm]
        secret = "keyring"
        base_url = "{UPSTREAM}"
        allow = ["GET /**"]
    """)
    assert world.run("true", workspace="nokey").code == 125
    shown = world.outloop("audit", "show", "last")
    first = shown.out.splitlines()[0]
    assert shown.code == 0 and first.startswith("FAILED     never started: ") and "crm" in first, shown.out
    listed = world.outloop("audit").out.splitlines()
    assert listed[1].split()[4] == "125"


def test_a_database_from_a_newer_outloop_is_refused_untouched(audited_world: AuditedWorld) -> None:
    home = copy_home(audited_world.world, "newer")
    tamper(home, "PRAGMA user_version = 99")
    before = (home / "audit.db").read_bytes()
    for args in (["audit"], ["audit", "verify"], ["audit", "prune", "--older-than", "1d"]):
        result = audited_world.world.outloop(*args, env=env_for(audited_world.world, home))
        assert result.code != 0
        assert "newer outloop (schema 99" in result.err and "Traceback" not in result.err
    assert (home / "audit.db").read_bytes() == before


# -- audit verify --------------------------------------------------------------------------------------


def test_an_untouched_db_of_20_concurrent_runs_verifies(audited_world: AuditedWorld) -> None:
    result = audited_world.world.outloop("audit", "verify")
    assert result.code == 0, result.out
    assert result.out.splitlines()[-1] == "21 runs: 20 ok, 1 incomplete, 0 pruned, 0 broken"
    assert f"incomplete  run {audited_world.killed}: 3 events" in result.out
    one = audited_world.world.outloop("audit", "verify", audited_world.finished[0])
    assert one.out.splitlines()[-1] == "1 run: 1 ok, 0 incomplete, 0 pruned, 0 broken"


def test_a_killed_run_is_incomplete_not_tampered(audited_world: AuditedWorld) -> None:
    verdict = run_json(audited_world, "audit", "verify", audited_world.killed)
    assert isinstance(verdict, dict)
    assert (verdict["broken"], verdict["incomplete"]) == (0, 1)


@pytest.mark.parametrize(("name", "statement", "seq", "words"), [
    ("edit", "UPDATE events SET path = '/crm/v3/objects/contacts/666' WHERE run_id = '{run}' AND seq = 2", 2,
     "altered"),
    ("delete", "DELETE FROM events WHERE run_id = '{run}' AND seq = 3", 3, "missing"),
    ("truncate", "DELETE FROM events WHERE run_id = '{run}' AND seq >= 4", 4, "deleted"),
    ("rehash", "UPDATE events SET decision = 'allow', hash = prev_hash WHERE run_id = '{run}' AND seq = 5", 5,
     "altered"),
])
def test_tampering_fails_verify_naming_the_run_and_first_broken_event(
    audited_world: AuditedWorld, name: str, statement: str, seq: int, words: str
) -> None:
    run_id = next(run for run in audited_world.finished  # an acme run: it has events up to seq 10
                  if sqlite3.connect(audited_world.world.audit_db).execute(
                      "SELECT workspace FROM runs WHERE run_id = ?", (run,)).fetchone()[0] == "acme")
    home = copy_home(audited_world.world, name)
    tamper(home, statement.format(run=run_id))
    result = audited_world.world.outloop("audit", "verify", env=env_for(audited_world.world, home))
    assert result.code == 1
    broken = [line for line in result.out.splitlines() if line.startswith("BROKEN")]
    assert len(broken) == 1
    assert f"run {run_id} at event {seq}:" in broken[0] and words in broken[0]
    assert result.out.splitlines()[-1] == "21 runs: 19 ok, 1 incomplete, 0 pruned, 1 broken"


def test_verify_json_names_the_first_bad_seq(audited_world: AuditedWorld) -> None:
    run_id = audited_world.finished[1]
    home = copy_home(audited_world.world, "json")
    tamper(home, f"UPDATE events SET status = 500 WHERE run_id = '{run_id}' AND seq = 2")
    result = audited_world.world.outloop("audit", "verify", run_id, "--json", env=env_for(audited_world.world, home))
    assert result.code == 1
    verdicts = json.loads(result.out)["verdicts"]
    assert [(v["run_id"], v["status"], v["first_bad_seq"]) for v in verdicts] == [(run_id, "broken", 2)]


# -- audit tail ----------------------------------------------------------------------------------------


def test_tail_follows_a_live_run_from_another_process_and_ends_with_it(world: World) -> None:
    go = world.work / "go"
    process = start_run(world, f"""
        import os, time
        from outloop_cli.client import Outloop
        client = Outloop()
        client.request("crm", "GET", "/crm/v3/objects/contacts/1")
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        client.request("crm", "GET", "/crm/v3/objects/contacts/2")
        client.request("crm", "POST", "/crm/v3/objects/contacts/2/merge")
    """)
    wait_for(lambda: world.audit_db.exists() and len(world.events()) == 1)
    run_id = world.last_run_id()
    tails = [subprocess.Popen([OUTLOOP, "audit", "tail", *args], env=world.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in ([run_id], ["--json"])]
    for tail in tails:  # both are following the live run (a slow start must not find it already ended)
        assert tail.stderr is not None
        assert tail.stderr.readline().startswith(f"following run {run_id} ")
    assert all(tail.poll() is None for tail in tails), "tail must keep following a live run"
    go.touch()
    assert process.wait(timeout=30) == 0
    by_id, newest = (tail.communicate(timeout=15) for tail in tails)
    assert [tail.returncode for tail in tails] == [0, 0]
    assert "/crm/v3/objects/contacts/2/merge" in by_id[0] and "run_end" in by_id[0]
    assert f"run {run_id} ended: exit 0" in by_id[1]
    kinds = [json.loads(line)["kind"] for line in newest[0].splitlines()]
    assert kinds[-1] == "run_end" and kinds.count("request") == 3
    world.assert_no_canary(by_id[0], newest[0])


def test_tail_of_a_killed_run_stops_and_says_so(audited_world: AuditedWorld) -> None:
    result = audited_world.world.outloop("audit", "tail", audited_world.killed, timeout=20)
    assert result.code == 1
    assert "stopped without an end record" in result.err
    assert "/crm/v3/objects/contacts/99" in result.out


def test_tail_lines_are_aligned_when_piped(audited_world: AuditedWorld) -> None:
    lines = audited_world.world.outloop("audit", "tail", audited_world.finished[0], "-n", "50").out.splitlines()
    kinds = [line[21:30].strip() for line in lines]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and {"request", "response"} <= set(kinds), lines
    assert len({line.index(kind) for line, kind in zip(lines, kinds, strict=True)}) == 1
    statuses = {line[51:54].strip() for line in lines if " response " in line}
    assert statuses == {"200"}, lines


# -- audit export and prune ----------------------------------------------------------------------------


def test_export_jsonl_holds_every_event_exactly(audited_world: AuditedWorld) -> None:
    result = audited_world.world.outloop("audit", "export", "--format", "jsonl")
    events = [json.loads(line) for line in result.out.splitlines()]
    with sqlite3.connect(audited_world.world.audit_db) as conn:
        total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        first_hash = conn.execute("SELECT hash FROM events ORDER BY ts, rowid LIMIT 1").fetchone()[0]
    assert result.code == 0 and len(events) == total
    assert events[0]["hash"] == first_hash and events[0]["kind"] == "run_start"
    stamps = [float(str(e["ts"])) for e in events]
    assert stamps == sorted(stamps)


def test_export_csv_has_a_header_and_respects_since(audited_world: AuditedWorld) -> None:
    result = audited_world.world.outloop("audit", "export", "--format", "csv", "--since", "1h")
    rows = list(csv.DictReader(io.StringIO(result.out)))
    assert result.code == 0 and rows and {"time", "run_id", "seq", "hash", "decision"} <= set(rows[0])
    later = audited_world.world.outloop("audit", "export", "--format", "csv", "--since", "2099-01-01")
    assert later.out.splitlines() == [result.out.splitlines()[0]]


def test_csv_cells_that_a_spreadsheet_would_run_as_formulas_are_defused() -> None:
    event = EventRow("R", 1, 1.0, "request", "acme", "crm", "GET", "h", "=HYPERLINK(\"x\")", "deny",
                     "no_rule_matched", None, 403, None, None, None, None, None, None, "0", "1")
    out = io.StringIO()
    assert write_events([event], out, "csv") == 1
    assert "'=HYPERLINK" in out.getvalue()


def test_prune_leaves_markers_that_verify_accepts(audited_world: AuditedWorld) -> None:
    world = audited_world.world
    home = copy_home(world, "prune")
    env = env_for(world, home)
    assert world.outloop("audit", "prune", "--older-than", "90d", env=env).out.startswith("pruned 0 runs")
    pruned = world.outloop("audit", "prune", "--older-than", "1ms", "--json", env=env)
    assert pruned.code == 0 and json.loads(pruned.out)["pruned_runs"] == 20
    remaining = json.loads(world.outloop("audit", "--json", env=env).out)
    assert [run["run_id"] for run in remaining] == [audited_world.killed]  # maybe live: never pruned
    verified = world.outloop("audit", "verify", env=env)
    assert verified.code == 0
    assert verified.out.splitlines()[-1] == "21 runs: 0 ok, 1 incomplete, 20 pruned, 0 broken"
    bad = world.outloop("audit", "prune", "--older-than", "ninety days", env=env)
    assert bad.code == 2 and "--older-than" in bad.err and "Traceback" not in bad.err
