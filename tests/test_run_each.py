"""`outloop run --each`: one separate run per workspace, a combined summary, a batch exit code, a batch id."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import World

from outloop_cli.batch import BatchRun, batch_exit_code

INITECH_PROFILE = """
    version = 1
    description = "Initech test profile"
    tags = ["crm"]

    [credentials.crm]
    secret = "keyring"
    base_url = "{UPSTREAM}"
    allow = ["GET /crm/v3/objects/contacts/*"]
"""

# Every run calls its CRM once, globex's then fails; with BARRIER set, each waits (bounded) until all three have
# started, so with --parallel 3 their recorded lifetimes must overlap, and run one by one they must not.
LOOP = """
    import os, pathlib, sys, time
    from outloop_cli.client import Outloop
    me = os.environ["OUTLOOP_WORKSPACE"]
    response = Outloop().request("crm", "GET", "/crm/v3/objects/contacts/1")
    print(me, response.status, flush=True)
    if len(sys.argv) > 1:
        barrier = pathlib.Path(sys.argv[1])
        (barrier / me).touch()
        deadline = time.monotonic() + 20
        while len(list(barrier.iterdir())) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    sys.exit(3 if me == "globex" else 0)
"""


def _three(world: World) -> str:
    world.write_profile("initech", INITECH_PROFILE)
    world.set_keyring("initech", "crm", world.canaries["acme"] + "-initech")
    for name in ("acme", "globex"):
        path = world.profiles / f"{name}.toml"
        path.write_text(path.read_text().replace('extends = "agency"', 'extends = "agency"\ntags = ["crm"]'))
    script = world.work / "sync.py"
    script.write_text(textwrap.dedent(LOOP))
    return str(script)


@pytest.mark.parametrize("parallel", [1, 3])
def test_a_failing_workspace_does_not_stop_the_others_and_sets_the_batch_exit_code(world: World,
                                                                                 parallel: int) -> None:
    from conftest import PYTHON

    script = _three(world)
    barrier = world.work / "barrier"
    barrier.mkdir()
    command = [PYTHON, script, *(["barrier"] if parallel > 1 else [])]
    summary = world.work / "batch.json"
    result = world.outloop("run", "--each", "acme,globex,initech", "--parallel", str(parallel), "--profiles",
                           str(world.profiles), "--summary-json", str(summary), "--", *command, timeout=120)
    assert result.code == 1, result.combined  # one workspace did not succeed
    batch = json.loads(summary.read_text())
    runs = {run["workspace"]: run for run in batch["runs"]}
    assert list(runs) == ["acme", "globex", "initech"]
    assert {name: (run["state"], run["exit_code"]) for name, run in runs.items()} == {
        "acme": ("ok", 0), "globex": ("failed", 3), "initech": ("ok", 0)}
    assert all(run["allowed"] == 1 and run["denied"] == 0 and run["chain"] == "ok" for run in runs.values())
    assert sorted(result.out.split("\n")) == ["", "acme 200", "globex 200", "initech 200"]
    # Each run is its own run: own id, own audit chain, all under the batch's id.
    ids = {run["run_id"] for run in runs.values()}
    assert len(ids) == 3 and all(run["report"]["batch_id"] == batch["batch_id"] for run in runs.values())
    for line in ("acme", "globex", "initech", "batch exit 1"):
        assert line in result.err
    verify = world.outloop("audit", "verify")
    assert verify.code == 0 and "3 runs: 3 ok" in verify.out, verify.combined
    listed = world.outloop("audit", "--batch", batch["batch_id"], "--json")
    assert sorted(run["run_id"] for run in json.loads(listed.out)) == sorted(ids)
    spans = sorted((run["started_at"], run["ended_at"]) for run in runs.values())
    overlap = max(start for start, _ in spans) < min(end for _, end in spans)
    sequential = all(spans[i][1] <= spans[i + 1][0] for i in range(2))
    assert (overlap, sequential) == ((True, False) if parallel > 1 else (False, True)), spans
    # Each loop got its own workspace's secret, and only that.
    tokens = sorted(str(request.header("Authorization")) for request in world.upstream.requests)
    assert tokens == sorted(f"Bearer {secret}" for secret in (world.canaries["acme"], world.canaries["globex"],
                                                               world.canaries["acme"] + "-initech"))
    world.assert_no_canary()


def test_fail_fast_stops_the_rest_and_counts_them(world: World) -> None:
    from conftest import PYTHON

    script = _three(world)
    summary = world.work / "batch.json"
    result = world.outloop("run", "--each", "globex,acme,initech", "--fail-fast", "--profiles",
                           str(world.profiles), "--summary-json", str(summary), "--", PYTHON, script, timeout=120)
    batch = json.loads(summary.read_text())
    assert [(run["workspace"], run["state"]) for run in batch["runs"]] == [
        ("globex", "failed"), ("acme", "skipped"), ("initech", "skipped")]
    assert result.code == 3 == batch["exit_code"]


def test_tags_and_all_select_workspaces_and_a_bad_selection_fails_before_any_run(world: World) -> None:
    _three(world)
    tagged = world.outloop("run", "--each", "@crm", "--profiles", str(world.profiles), "--", "true")
    assert tagged.code == 0, tagged.combined
    assert [line.split()[0] for line in tagged.err.splitlines()[2:5]] == ["acme", "globex", "initech"]
    everyone = world.outloop("run", "--each", "all", "--profiles", str(world.profiles), "--", "true")
    assert everyone.code == 0 and "4 runs, 0 not ok" in everyone.err, everyone.combined
    for selection, message in (("@nosuch", "no workspace has"), ("acme,nosuch", "no profile for workspace"),
                               ("acme,,globex", "empty item")):
        bad = world.outloop("run", "--each", selection, "--profiles", str(world.profiles), "--", "true")
        assert bad.code == 125 and message in bad.err, bad.combined
    both = world.outloop("run", "-w", "acme", "--each", "all", "--", "true")
    assert both.code == 125 and "exclude each other" in both.err


def test_a_workspace_that_cannot_start_is_reported_with_its_error(world: World) -> None:
    world.write_profile("initech", INITECH_PROFILE)  # no secret stored for it
    summary = world.work / "batch.json"
    result = world.outloop("run", "--each", "acme,initech", "--profiles", str(world.profiles), "--summary-json",
                           str(summary), "--", "true")
    assert result.code == 1, result.combined
    initech = json.loads(summary.read_text())["runs"][1]
    assert (initech["state"], initech["exit_code"], initech["chain"]) == ("not_started", 125, "ok")
    assert "initech" in initech["error"] and initech["run_id"]


def test_batch_exit_code_counts_what_did_not_succeed_and_never_reaches_the_run_codes() -> None:
    ok, failed = BatchRun("a", state="ok"), BatchRun("b", state="failed")
    assert batch_exit_code([ok, ok]) == 0
    assert batch_exit_code([ok, failed, BatchRun("c", state="skipped")]) == 2
    assert batch_exit_code([failed] * 150) == 100


STOPPABLE_LOOP = """
    import os, pathlib, sys, time
    me, barrier = os.environ["OUTLOOP_WORKSPACE"], pathlib.Path(sys.argv[1])
    (barrier / me).touch()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if me == "globex" and len(list(barrier.iterdir())) == 3:
            sys.exit(3)  # fails once the other two are running
        time.sleep(0.02)
"""


def test_fail_fast_in_parallel_stops_the_running_runs_and_records_them(world: World) -> None:
    from conftest import PYTHON

    _three(world)
    script = world.work / "stoppable.py"
    script.write_text(textwrap.dedent(STOPPABLE_LOOP))
    (world.work / "barrier").mkdir()
    summary = world.work / "batch.json"
    result = world.outloop("run", "--each", "acme,globex,initech", "--parallel", "3", "--fail-fast", "--profiles",
                           str(world.profiles), "--summary-json", str(summary), "--", PYTHON, str(script), "barrier",
                           timeout=120)
    batch = json.loads(summary.read_text())
    assert [(run["workspace"], run["state"], run["exit_code"]) for run in batch["runs"]] == [
        ("acme", "stopped", 143), ("globex", "failed", 3), ("initech", "stopped", 143)], result.combined
    assert result.code == 3
    assert batch["duration"] < 30  # stopped, not left to run out their minute
    assert all(run["chain"] == "ok" for run in batch["runs"])  # each run recorded its end
