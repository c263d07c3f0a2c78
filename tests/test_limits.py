"""Spec for outloop_cli.broker.limits: token-bucket rates and request budgets, per run and per credential."""

from __future__ import annotations

import pytest

from outloop_cli.broker.limits import Budget, Limits, LimitVerdict, TokenBucket
from outloop_cli.units import Rate, parse_rate


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def take_all(bucket: TokenBucket) -> int:
    taken = 0
    while bucket.try_take() == 0.0:
        taken += 1
    return taken


# ----- TokenBucket -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "burst"), [("1/s", 1), ("10/s", 10), ("600/min", 600), ("5/10s", 5)])
def test_bucket_starts_full_allowing_a_burst_of_count(clock: FakeClock, rate: str, burst: int) -> None:
    assert take_all(TokenBucket(parse_rate(rate), clock)) == burst


@pytest.mark.parametrize(("rate", "retry_after"), [("1/s", 1.0), ("10/s", 0.1), ("600/min", 0.1), ("5/10s", 2.0),
                                                    ("3600/h", 1.0)])
def test_bucket_reports_seconds_until_the_next_token_when_empty(clock: FakeClock, rate: str,
                                                                retry_after: float) -> None:
    bucket = TokenBucket(parse_rate(rate), clock)
    take_all(bucket)
    assert bucket.try_take() == pytest.approx(retry_after)


def test_bucket_retry_after_shrinks_as_time_passes(clock: FakeClock) -> None:
    bucket = TokenBucket(Rate(1, 4.0), clock)
    bucket.try_take()
    clock.advance(1.0)
    assert bucket.try_take() == pytest.approx(3.0)
    clock.advance(2.5)
    assert bucket.try_take() == pytest.approx(0.5)


def test_bucket_gives_a_token_exactly_when_retry_after_has_passed(clock: FakeClock) -> None:
    bucket = TokenBucket(Rate(2, 1.0), clock)
    take_all(bucket)
    wait = bucket.try_take()
    clock.advance(wait)
    assert bucket.try_take() == 0.0
    assert bucket.try_take() > 0.0


@pytest.mark.parametrize(("elapsed", "refilled"), [(0.1, 1), (0.25, 2), (0.5, 5), (0.99, 9)])
def test_bucket_refills_continuously_at_the_rate(clock: FakeClock, elapsed: float, refilled: int) -> None:
    bucket = TokenBucket(Rate(10, 1.0), clock)
    take_all(bucket)
    clock.advance(elapsed + 1e-9)
    assert take_all(bucket) == refilled


@pytest.mark.parametrize("idle", [1.0, 60.0, 86400.0])
def test_bucket_never_refills_beyond_its_burst(clock: FakeClock, idle: float) -> None:
    bucket = TokenBucket(Rate(3, 1.0), clock)
    take_all(bucket)
    clock.advance(idle)
    assert take_all(bucket) == 3


def test_bucket_denial_does_not_spend_a_token(clock: FakeClock) -> None:
    bucket = TokenBucket(Rate(1, 1.0), clock)
    bucket.try_take()
    for _ in range(5):
        assert bucket.try_take() > 0.0  # hammering while empty must not push the next token further away
    clock.advance(1.0)
    assert bucket.try_take() == 0.0


def test_bucket_sustains_exactly_its_rate_over_time(clock: FakeClock) -> None:
    bucket = TokenBucket(Rate(5, 1.0), clock)
    granted = 0
    for _ in range(1000):  # 10 seconds in 10 ms steps
        clock.advance(0.01)
        granted += bucket.try_take() == 0.0
    assert 5 + 50 - 1 <= granted <= 5 + 50  # the initial burst plus 5/s for 10 s (float rounding: -1)


# ----- Budget ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "used", "remaining", "exhausted"), [
    (None, 0, None, False),
    (None, 10**9, None, False),
    (3, 0, 3, False),
    (3, 2, 1, False),
    (3, 3, 0, True),
    (3, 7, 0, True),
])
def test_budget_reports_remaining_and_exhaustion(limit: int | None, used: int, remaining: int | None,
                                                  exhausted: bool) -> None:
    budget = Budget(limit, used)
    assert (budget.remaining, budget.exhausted) == (remaining, exhausted)


# ----- Limits ------------------------------------------------------------------------------------------------


def admit_n(limits: Limits, credential: str, n: int) -> list[LimitVerdict]:
    return [limits.admit(credential) for _ in range(n)]


def test_limits_without_any_limit_admit_everything() -> None:
    limits = Limits(None, {"crm": (None, None)})
    assert all(v.ok for v in admit_n(limits, "crm", 1000))
    assert limits.run_budget.used == 1000
    assert limits.credential_budgets["crm"].remaining is None


def test_limits_admitted_verdict_is_plain_ok() -> None:
    assert Limits(None, {"crm": (None, 1)}).admit("crm") == LimitVerdict(True)


def test_limits_credential_budget_is_exhausted_after_its_max_requests() -> None:
    limits = Limits(None, {"crm": (None, 3)})
    verdicts = admit_n(limits, "crm", 4)
    assert [v.ok for v in verdicts] == [True, True, True, False]
    assert verdicts[-1] == LimitVerdict(False, "budget_exhausted", "crm")
    assert limits.credential_budgets["crm"].remaining == 0


def test_limits_credential_budgets_are_independent() -> None:
    limits = Limits(None, {"crm": (None, 1), "mail": (None, 2)})
    assert limits.admit("crm").ok
    assert not limits.admit("crm").ok
    assert [v.ok for v in admit_n(limits, "mail", 3)] == [True, True, False]


def test_limits_run_budget_counts_all_credentials_together() -> None:
    limits = Limits(3, {"crm": (None, None), "mail": (None, None)})
    assert [limits.admit(name).ok for name in ("crm", "mail", "crm")] == [True, True, True]
    verdict = limits.admit("mail")
    assert verdict == LimitVerdict(False, "budget_exhausted", "run")
    assert limits.run_budget.remaining == 0


def test_limits_run_budget_is_checked_before_the_credential_budget() -> None:
    limits = Limits(1, {"crm": (None, 1)})
    limits.admit("crm")
    assert limits.admit("crm").scope == "run"


def test_limits_rate_limit_names_the_credential_and_retry_after() -> None:
    limits = Limits(None, {"crm": (Rate(1, 3600.0), None)})
    assert limits.admit("crm").ok
    verdict = limits.admit("crm")
    assert (verdict.ok, verdict.reason, verdict.scope) == (False, "rate_limited", "crm")
    assert 3590.0 < verdict.retry_after <= 3600.0


def test_limits_rates_are_per_credential() -> None:
    limits = Limits(None, {"crm": (Rate(1, 3600.0), None), "mail": (None, None)})
    limits.admit("crm")
    assert not limits.admit("crm").ok
    assert all(v.ok for v in admit_n(limits, "mail", 10))


def test_limits_rate_limited_requests_do_not_consume_budgets() -> None:
    limits = Limits(10, {"crm": (Rate(2, 3600.0), 5)})
    verdicts = admit_n(limits, "crm", 20)
    assert sum(v.ok for v in verdicts) == 2
    assert limits.run_budget.used == 2
    assert limits.credential_budgets["crm"].used == 2


def test_limits_budget_denials_do_not_consume_rate_tokens() -> None:
    limits = Limits(None, {"crm": (Rate(5, 3600.0), 1)})
    limits.admit("crm")
    for _ in range(10):
        assert limits.admit("crm").reason == "budget_exhausted"
    limits.credential_budgets["crm"].limit = None  # lift the budget: the bucket still holds its 4 tokens
    assert [v.ok for v in admit_n(limits, "crm", 5)] == [True, True, True, True, False]


def test_limits_credential_denials_do_not_consume_the_run_budget() -> None:
    limits = Limits(2, {"crm": (None, 1), "mail": (None, None)})
    limits.admit("crm")
    for _ in range(5):
        assert limits.admit("crm").scope == "crm"
    assert limits.run_budget.used == 1
    assert limits.admit("mail").ok


def test_limits_run_budget_denial_does_not_consume_the_credential_budget() -> None:
    limits = Limits(1, {"crm": (None, None), "mail": (None, 5)})
    limits.admit("crm")
    for _ in range(3):
        assert limits.admit("mail").scope == "run"
    assert limits.credential_budgets["mail"].used == 0
