"""`outloop policy`: test a request against a workspace's policy, draft rules from denials, replay, lint.

Parsing and printing only; outloop_cli.policytools does the work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from outloop_cli.commands.options import JsonFlag, ProfilesOption, WorkspaceArgument
from outloop_cli.commands.output import print_json
from outloop_cli.commands.tables import note, print_pairs, print_table
from outloop_cli.errors import EXIT_PROBLEMS_FOUND, UsageError
from outloop_cli.home import profile_dirs

app = typer.Typer(help="Test requests against a workspace's policy, draft allow rules from denials, replay the "
                       "audit against a draft, and lint the rules.", no_args_is_help=True, rich_markup_mode=None)
CredentialOption = Annotated[str | None, typer.Option(
    "--credential", "-c", help="The request is an upstream path of this credential, not /v1/http/<credential>/...",
    show_default=False)]
SinceOption = Annotated[str | None, typer.Option("--since", help="Audit window: \"7d\" (ago) or a date.",
                                                 show_default=False)]


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="policy")


# --------------------------------------------------------------------------------------------------
# policy test


@app.command("test")
def test_command(
    workspace: WorkspaceArgument,
    request: Annotated[str | None, typer.Argument(metavar="\"METHOD /path?query\"", show_default=False,
                                                  help="As the loop sends it: \"GET /v1/http/crm/v3/contacts?limit=5\" "
                                                       "(or the upstream path with --credential).")] = None,
    credential: CredentialOption = None,
    all_file: Annotated[Path | None, typer.Option("--all", metavar="FILE", show_default=False,
                                                  help="Test every line of FILE (blank lines and # comments "
                                                       "skipped).")] = None,
    profiles: ProfilesOption = None,
    as_json: JsonFlag = False,
) -> None:
    """What a run's broker would do with a request: normalised path or why it is refused, decision, rule, limits.

    Exit 0 when every request would be allowed, 1 when any would be denied.
    """
    from outloop_cli.guard import load_guard
    from outloop_cli.policytools.check import check_request, split_line
    from outloop_cli.profiles import load_profile

    if (request is None) == (all_file is None):
        raise UsageError("give one request, or --all FILE with one request per line")
    lines = [request] if request is not None else _request_lines(all_file)
    dirs = profile_dirs(profiles)
    profile = load_profile(workspace, dirs)
    guard = load_guard(profile, dirs)
    verdicts = [check_request(profile, guard, *split_line(line, credential)) for line in lines]
    if as_json:
        print_json(verdicts[0].to_json() if request is not None else [v.to_json() for v in verdicts])
    elif request is not None:
        verdict = verdicts[0]
        limits = verdict.limits or {}
        print_pairs([
            ("request", verdict.request),
            ("credential", verdict.credential),
            ("path", verdict.path if verdict.refused is None else f"refused ({verdict.refused}): {verdict.message}"),
            ("decision", f"{'allow' if verdict.allowed else 'deny'} ({verdict.reason}), broker answers "
                         f"{'upstream' if verdict.allowed else verdict.status}"),
            ("rule", verdict.rule or "none"),
            ("limits", _limits_text(limits) if verdict.limits is not None else "not reached (denied first)"),
            *([] if verdict.allowed or verdict.refused else [("why", verdict.message)]),
        ])
    else:
        print_table(("decision", "status", "reason", "rule", "request"),
                    [["allow" if v.allowed else "deny", v.status, v.reason, v.rule, v.request] for v in verdicts])
    if not all(verdict.allowed for verdict in verdicts):
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


def _request_lines(path: Path | None) -> list[str]:
    assert path is not None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--all: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise UsageError(f"--all: {path} holds no requests; write one \"METHOD /path\" per line")
    return lines


def _limits_text(limits: dict[str, object]) -> str:
    parts = []
    if limits.get("rate"):
        parts.append(f"rate {limits['rate']}")
    if limits.get("credential_max_requests"):
        parts.append(f"max_requests {limits['credential_max_requests']} (credential)")
    if limits.get("run_max_requests"):
        parts.append(f"max_requests {limits['run_max_requests']} (run)")
    if limits.get("body_scanned_by_guard"):
        parts.append("body scanned by the guard")
    return ", ".join(parts) if parts else "none"


# --------------------------------------------------------------------------------------------------
# policy suggest


@app.command("suggest")
def suggest_command(
    workspace: WorkspaceArgument,
    from_run: Annotated[str | None, typer.Option("--from", metavar="RUN|last", show_default=False,
                                                 help="Draft from this run's denials.")] = None,
    since: SinceOption = None,
    apply: Annotated[bool, typer.Option("--apply", help="Write the rules into the profile, keeping its comments "
                                                        "and layout.")] = False,
    profiles: ProfilesOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Draft allow rules from `no_matching_rule` denials; prints TOML to review (or --apply it)."""
    from outloop_cli.audit.queries import find_run, operator_database
    from outloop_cli.policytools.apply import apply_rules
    from outloop_cli.policytools.suggest import denied_requests, render_toml, suggest
    from outloop_cli.profiles import load_profile
    from outloop_cli.timespec import parse_point

    if (from_run is None) == (since is None):
        raise UsageError("give --from RUN|last or --since DUR (e.g. 7d)")
    dirs = profile_dirs(profiles)
    profile = load_profile(workspace, dirs)
    with operator_database() as conn:
        run_id = None
        if from_run is not None:
            run = find_run(conn, from_run).run
            if run.workspace != workspace:
                raise UsageError(f"run {run.run_id} belongs to workspace {run.workspace!r}, not {workspace!r}")
            run_id = run.run_id
        denials = denied_requests(conn, workspace, run_id=run_id,
                                  since=parse_point("--since", since) if since else None)
    result = suggest(profile, denials)
    source = f"run {run_id}" if run_id else f"the last {since}"
    if as_json:
        print_json({"considered": result.considered,
                    "rules": [vars(s) for s in result.rules], "skipped": [vars(s) for s in result.skipped]})
    elif result.rules:
        sys.stdout.write(render_toml(result, f"outloop policy suggest {workspace}: {result.considered} requests "
                                             f"denied with no matching rule in {source}"))
    for skipped in result.skipped if not as_json else ():
        note(f"skipped {skipped.request} ({skipped.credential}): {skipped.why}")
    if not result.rules:
        note(f"nothing to suggest: {result.considered} requests denied with no matching rule in {source}")
        return
    if apply:
        rules: dict[str, list[str]] = {}
        for suggestion in result.rules:
            rules.setdefault(suggestion.credential, []).append(suggestion.rule)
        added = apply_rules(profile, rules, dirs)
        count = sum(len(texts) for texts in added.values())
        note(f"added {count} allow rules to {profile.path}" if count else f"{profile.path} already has these rules")


# --------------------------------------------------------------------------------------------------
# policy replay


@app.command("replay")
def replay_command(
    workspace: WorkspaceArgument,
    since: Annotated[str, typer.Option("--since", help="Replay requests from this window: \"7d\" (ago) or a date.")]
    = "7d",
    profile_file: Annotated[Path | None, typer.Option("--profile", metavar="FILE", show_default=False,
                                                      help="Judge by this draft profile instead of the live one.")]
    = None,
    profiles: ProfilesOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Judge the audit's past requests by the current profile (or a draft): what would now be decided differently.

    Exit 1 when any decision would change.
    """
    from outloop_cli.audit.queries import operator_database
    from outloop_cli.policytools.replay import replay
    from outloop_cli.profiles import load_draft, load_profile
    from outloop_cli.timespec import parse_point

    dirs = profile_dirs(profiles)
    profile = load_draft(profile_file, workspace, dirs) if profile_file else load_profile(workspace, dirs)
    with operator_database() as conn:
        result = replay(conn, profile, since=parse_point("--since", since))
    changes = (*result.now_denied, *result.now_allowed, *result.changed_rule)
    if as_json:
        print_json({"policy_hash": result.policy_hash, "replayed": result.replayed,
                    "not_replayable": result.not_replayable, "recorded_policies": result.recorded_policies,
                    "now_denied": [vars(c) for c in result.now_denied],
                    "now_allowed": [vars(c) for c in result.now_allowed],
                    "changed_rule": [vars(c) for c in result.changed_rule]})
    else:
        recorded = ", ".join(f"{digest[:23]} ({runs} runs)" for digest, runs in result.recorded_policies.items())
        print_pairs([("policy", f"{result.policy_hash[:23]} ({profile_file or profile.path})"),
                     ("recorded under", recorded or "no runs in the window"),
                     ("replayed", f"{result.replayed} requests since {since} ({result.not_replayable} not "
                                  "replayable: limits, sizes, guard, unparsable)"),
                     ("now denied", len(result.now_denied)), ("now allowed", len(result.now_allowed)),
                     ("other rule", len(result.changed_rule))])
        if changes:
            sys.stdout.write("\n")
            print_table(("count", "credential", "request", "before", "after"),
                        [[c.count, c.credential, c.request, c.before, c.after] for c in changes],
                        right=("count",))
    if changes:
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


# --------------------------------------------------------------------------------------------------
# policy lint


@app.command("lint")
def lint_command(
    workspace: WorkspaceArgument,
    since: Annotated[str, typer.Option("--since", help="Audit window for unused rules: \"30d\" (ago) or a date.")]
    = "30d",
    profiles: ProfilesOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Shadowed allow rules, rules unmatched in the audit window, over-broad rules; hints for destructive methods.

    Exit 1 on any finding; hints alone exit 0.
    """
    from outloop_cli.audit.queries import operator_database
    from outloop_cli.errors import AuditError
    from outloop_cli.policytools.lint import lint, rule_usage
    from outloop_cli.profiles import load_profile
    from outloop_cli.timespec import parse_point

    profile = load_profile(workspace, profile_dirs(profiles))
    usage = None
    try:
        with operator_database() as conn:
            usage = rule_usage(conn, workspace, parse_point("--since", since))
    except AuditError:
        pass  # no audit yet: the unused check is skipped, and said so below
    findings = lint(profile, usage)
    if as_json:
        print_json({"unused_checked": usage is not None, "findings": [vars(f) for f in findings]})
    else:
        for finding in findings:
            where = f"{finding.credential}: {finding.rule}" if finding.rule else finding.credential
            sys.stdout.write(f"{finding.kind:<10} {where}: {finding.message}\n")
        if usage is None:
            note(f"no run of {workspace} in the last {since}: unused rules not checked")
        warnings = sum(1 for f in findings if f.kind != "hint")
        sys.stdout.write(f"{warnings} findings, {len(findings) - warnings} hints\n")
    if any(finding.kind != "hint" for finding in findings):
        raise typer.Exit(EXIT_PROBLEMS_FOUND)
