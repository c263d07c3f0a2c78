"""Per-run counters the summary reports; kept apart from the server so a run that never needed it can report."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CredentialStats:
    allowed: int = 0
    denied: int = 0
    rate_limited: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class BrokerStats:
    """Updated from the broker's event loop only."""

    per_credential: dict[str, CredentialStats] = field(default_factory=dict)
    denials: dict[str, int] = field(default_factory=dict)  # "reason (rule)" -> count
    warnings: list[str] = field(default_factory=list)  # for the summary, e.g. a rotated token not stored

    def credential(self, name: str) -> CredentialStats:
        return self.per_credential.setdefault(name, CredentialStats())
