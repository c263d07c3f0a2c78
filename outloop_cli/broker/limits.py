"""Per-run and per-credential budgets and token-bucket rates.

The broker counts only requests that policy allowed, so a hostile child cannot spend the budget on denials.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from outloop_cli.units import Rate


class TokenBucket:
    """Classic token bucket: starts full (a burst of `rate.count`), refills continuously."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(rate.count)
        self._refill_per_second = rate.per_second
        self._tokens = self._capacity
        self._clock = clock
        self._last = clock()

    def try_take(self) -> float:
        """0.0 when a token was taken, else the seconds until one will be available."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._refill_per_second)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._refill_per_second


@dataclass
class Budget:
    limit: int | None
    used: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit


@dataclass(frozen=True)
class LimitVerdict:
    ok: bool
    reason: str = ""  # "rate_limited" | "budget_exhausted"
    scope: str = ""  # "run" or the credential name
    retry_after: float = 0.0


class Limits:
    """All budgets of one run. Not thread-safe: the broker calls it from its event loop only."""

    def __init__(self, run_max: int | None, credentials: dict[str, tuple[Rate | None, int | None]]) -> None:
        self.run_budget = Budget(run_max)
        self.credential_budgets = {name: Budget(limit) for name, (_, limit) in credentials.items()}
        self._buckets = {name: TokenBucket(rate) for name, (rate, _) in credentials.items() if rate}

    def admit(self, credential: str) -> LimitVerdict:
        """Check and, when admitted, consume one request from every applicable budget."""
        if self.run_budget.exhausted:
            return LimitVerdict(False, "budget_exhausted", "run")
        budget = self.credential_budgets[credential]
        if budget.exhausted:
            return LimitVerdict(False, "budget_exhausted", credential)
        bucket = self._buckets.get(credential)
        if bucket is not None:
            wait = bucket.try_take()
            if wait > 0:
                return LimitVerdict(False, "rate_limited", credential, retry_after=wait)
        self.run_budget.used += 1
        budget.used += 1
        return LimitVerdict(True)
