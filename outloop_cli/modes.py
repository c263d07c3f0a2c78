"""The network mode, on its own so `outloop run --help` can offer its choices without loading the profile schema."""

from __future__ import annotations

from enum import StrEnum


class NetworkMode(StrEnum):
    """`[run] network` and `outloop run --network`, spelt once (see DESIGN: Sandbox layers)."""

    AUTO = "auto"
    BROKER_ONLY = "broker-only"
    OPEN = "open"
