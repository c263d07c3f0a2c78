"""The broker's admission chain in-process: the hostile suite's request table, judged without sockets.

The live run of the same table (tests/adversarial) proves the broker answers this way; this proves, fast, that the
one function both it and `outloop policy test` call does.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from adversarial.test_hostile_child_requests import ATTEMPTS
from conftest import ACME_PROFILE, AGENCY_PROFILE, GLOBEX_PROFILE

from outloop_cli.policytools.check import check_request
from outloop_cli.profiles import Profile, load_profile


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Profile:
    directory: Path = tmp_path_factory.mktemp("profiles")
    for name, text in (("acme", ACME_PROFILE), ("agency", AGENCY_PROFILE), ("globex", GLOBEX_PROFILE)):
        (directory / f"{name}.toml").write_text(textwrap.dedent(text).replace("{UPSTREAM}", "http://127.0.0.1:9")
                                                .replace("{OTHER}", "http://127.0.0.1:10"))
    return load_profile("acme", [directory])


@pytest.mark.parametrize(("attempt", "status", "reasons"), [(a, s, r) for a, s, _, r in ATTEMPTS],
                         ids=[f"{method} {target[:60]}" for (method, target), *_ in ATTEMPTS])
def test_every_row_of_the_request_table_gets_its_documented_status_and_reason(
        acme: Profile, attempt: tuple[str, str], status: int, reasons: set[str]) -> None:
    verdict = check_request(acme, None, *attempt)
    assert verdict.status == status
    assert verdict.reason in reasons
    assert verdict.allowed is (status == 200)


def test_a_presigned_url_is_refused_for_a_sigv4_credential_only(tmp_path: Path) -> None:
    # The refusal lives in the query check admit() shares with the forwarder, so `policy test` reports it too.
    (tmp_path / "sales.toml").write_text(textwrap.dedent("""
        version = 1
        [credentials.s3]
        secret = "env:S3_DOC"
        base_url = "http://127.0.0.1:9"
        auth = { aws_sigv4 = { service = "s3", region = "eu-west-1" } }
        allow = ["GET /**"]
        [credentials.plain]
        secret = "env:PLAIN"
        base_url = "http://127.0.0.1:9"
        inject = { header = "Authorization", value = "Bearer {secret}" }
        allow = ["GET /**"]
    """))
    profile = load_profile("sales", [tmp_path])
    query = "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=abc"
    refused = check_request(profile, None, "GET", f"/v1/http/s3/bucket/key{query}")
    assert (refused.allowed, refused.status, refused.reason) == (False, 400, "bad_query")
    # Control: the same query for a credential outloop does not sign is only a query.
    assert check_request(profile, None, "GET", f"/v1/http/plain/bucket/key{query}").allowed
