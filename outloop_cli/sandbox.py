"""Decide which sandbox layers a run gets on this machine, and report them honestly.

The plan lists every layer with its state, so the summary and the audit say what was (and was not) in force.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from outloop_cli.errors import SandboxError
from outloop_cli.linux import set_not_dumpable
from outloop_cli.profiles import Profile


@dataclass(frozen=True)
class Plan:
    layers: dict[str, str]
    argv_prefix: list[str] = field(default_factory=list)


def plan(profile: Profile, network: str, *, home: Path, run_dir: Path) -> Plan:
    layers = {"environment": "stripped", "supervision": "process group + subreaper"}
    layers["broker_memory"] = "not dumpable" if set_not_dumpable() else "dumpable (PR_SET_DUMPABLE unavailable)"
    if network == "broker-only":
        raise SandboxError("network = \"broker-only\" needs network isolation, which this build cannot provide "
                           "yet; use --network auto or open")
    layers["network"] = "open (by profile)" if network == "open" else "NOT isolated"
    return Plan(layers=layers)
