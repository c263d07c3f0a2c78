"""`outloop policy lint`: rules that cannot do what they seem to, rules nothing used, rules that allow too much.

Findings are warnings (exit 1); hints are advice that depends on the API (exit 0).
"""

from __future__ import annotations

import ipaddress
import sqlite3
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from outloop_cli.policy import Rule
from outloop_cli.policytools.globs import covers
from outloop_cli.profiles import Credential, Profile

WRITE_METHODS = frozenset({"*", "POST", "PUT", "PATCH", "DELETE"})
DESTRUCTIVE = "DELETE"
# Host labels that name a non-production environment; any other non-loopback host is treated as production.
NON_PRODUCTION_LABELS = frozenset({"sandbox", "staging", "stage", "test", "testing", "dev", "demo", "localhost"})


@dataclass(frozen=True)
class Finding:
    kind: Literal["shadowed", "unused", "over_broad", "hint"]
    credential: str
    rule: str | None
    message: str


def lint(profile: Profile, usage: dict[tuple[str, str], int] | None) -> list[Finding]:
    """`usage` counts audited requests per (credential, rule) in the window; None skips the unused check."""
    findings: list[Finding] = []
    for name, credential in sorted(profile.credentials.items()):
        findings += _shadowed(name, credential)
        if usage is not None:
            findings += [Finding("unused", name, rule.text, "no request in the audit window matched it")
                         for rule in (*credential.allow, *credential.deny) if not usage.get((name, rule.text))]
        findings += _over_broad(name, credential)
        deletes = [Rule(rule.text, DESTRUCTIVE, rule.segments) for rule in credential.allow
                   if rule.method in ("*", DESTRUCTIVE)]
        if any(not any(covers(deny, delete) for deny in credential.deny) for delete in deletes):
            findings.append(Finding("hint", name, None, "allow rules admit DELETE where no deny rule stops it; "
                                    "consider e.g. \"DELETE /**\" in deny unless the loop must delete"))
    return findings


def rule_usage(conn: sqlite3.Connection, workspace: str, since: float) -> dict[tuple[str, str], int] | None:
    """Requests per (credential, rule) since `since`; None when the workspace has no run in the window at all."""
    runs = conn.execute("SELECT count(*) FROM runs WHERE workspace = ? AND started_at >= ?",
                        (workspace, since)).fetchone()[0]
    if not runs:
        return None
    rows = conn.execute("SELECT credential, rule, count(*) FROM events WHERE workspace = ? AND kind = 'request' "
                        "AND ts >= ? AND rule IS NOT NULL GROUP BY credential, rule", (workspace, since)).fetchall()
    return {(str(credential), str(rule)): int(count) for credential, rule, count in rows}


def _shadowed(name: str, credential: Credential) -> list[Finding]:
    findings = []
    for allow in credential.allow:
        deny = next((deny for deny in credential.deny if covers(deny, allow)), None)
        if deny is not None:
            findings.append(Finding("shadowed", name, allow.text, f"deny rule {deny.text!r} matches everything "
                                    "it allows (deny wins), so it allows nothing"))
    return findings


def _over_broad(name: str, credential: Credential) -> list[Finding]:
    findings = []
    production = is_production(credential.base_url)
    for rule in credential.allow:
        if rule.method == "*" and rule.segments == ("**",):
            findings.append(Finding("over_broad", name, rule.text, "allows every method on every path"))
        elif production and rule.method in WRITE_METHODS and "**" in rule.segments:
            findings.append(Finding("over_broad", name, rule.text, f"a write under '**' on production host "
                                    f"{urlsplit(credential.base_url).hostname}: name the paths the loop writes"))
    return findings


def is_production(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return False
    except ValueError:
        pass
    return not NON_PRODUCTION_LABELS.intersection(host.replace("-", ".").split("."))
