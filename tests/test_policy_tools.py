"""The policy tools' pure parts: glob containment and how denied paths become globs."""

from __future__ import annotations

import pytest

from outloop_cli.policy import parse_rule
from outloop_cli.policytools.globs import covers
from outloop_cli.policytools.lint import is_production
from outloop_cli.policytools.suggest import generalise


@pytest.mark.parametrize(("outer", "inner", "expected"), [
    ("* /a/**", "GET /a/b/*", True),
    ("GET /a/**", "POST /a/b", False),
    ("* /a/*/merge", "GET /a/*/merge", True),
    ("* /a/*/merge", "GET /a/**", False),
    ("* /a/*", "GET /a/**", False),
    ("* /**", "DELETE /**", True),
    ("GET /a/*", "GET /a/b", True),
    ("GET /a/b", "GET /a/*", False),
    ("GET /**/x", "GET /a/*/x", True),
    ("GET /a/**/x", "GET /a/x", True),
])
def test_covers_is_containment_of_everything_the_inner_rule_matches(outer: str, inner: str, expected: bool) -> None:
    assert covers(parse_rule(outer), parse_rule(inner)) is expected


def test_variable_segments_become_stars() -> None:
    paths = [("crm", "contacts", "123"), ("crm", "contacts", "456"),
             ("crm", "deals", "3f2b8c1e-1c2d-4e5f-8a9b-0c1d2e3f4a5b", "notes"),
             ("files", "deadbeef00112233"), ("crm", "contacts"), ("crm", "companies")]
    assert generalise(paths) == [("crm", "contacts", "*"), ("crm", "contacts", "*"), ("crm", "deals", "*", "notes"),
                                 ("files", "*"), ("crm", "contacts"), ("crm", "companies")]


def test_ids_that_repeat_with_different_values_become_stars_but_names_do_not() -> None:
    paths = [("users", "u_a1", "orders"), ("users", "u_b2", "orders"), ("v1", "lists"), ("v1", "items")]
    assert generalise(paths) == [("users", "*", "orders"), ("users", "*", "orders"), ("v1", "lists"),
                                 ("v1", "items")]


def test_production_hosts_are_everything_but_loopback_and_named_test_environments() -> None:
    assert is_production("https://api.hubapi.com")
    assert not is_production("http://127.0.0.1:8080")
    assert not is_production("https://api.sandbox.example.com")
    assert not is_production("https://staging-api.example.com")
