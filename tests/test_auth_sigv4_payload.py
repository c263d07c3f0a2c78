"""How the SigV4 scheme treats a body, in process: hashed when it can be held, UNSIGNED-PAYLOAD for a large S3 upload,
refused where signing would need what cannot be held, and the signature is over what is sent."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from multidict import CIMultiDict
from yarl import URL

from outloop_cli.audit.writer import RunLog
from outloop_cli.auth.aws import SIGNED_BODY_LIMIT
from outloop_cli.auth.config import AwsSigV4
from outloop_cli.auth.schemes import AuthContext, AuthFailed, Outgoing, Scheme, build_scheme
from outloop_cli.auth.sigv4 import UNSIGNED_PAYLOAD, sign
from outloop_cli.policy import parse_rule
from outloop_cli.profiles import Credential, Injection
from outloop_cli.secrets import Secret

DOCUMENT = 'access_key_id = "AKIATEST"\nsecret_access_key = "sk-test"\nsession_token = "st-test"\n'


@pytest.fixture
def log(tmp_path: Path) -> Iterator[RunLog]:
    run_log = RunLog.start(tmp_path / "audit.db", run_id="01TEST", workspace="w", command=["x"], detail={})
    yield run_log
    run_log.finish(exit_code=0, duration=0.0, detail={})


def _scheme(log: RunLog, service: str) -> Scheme:
    credential = Credential(name="aws", owner="w", secret_ref="keyring", base_url="https://bucket.example.com",
                            inject=Injection(style="header", name="Authorization"), allow=(parse_rule("* /**"),),
                            deny=(), auth=AwsSigV4(service=service, region="eu-west-1"))
    context = AuthContext(audit=log, learn=lambda value: None, warn=lambda line: None,
                          write_back=lambda cred, text: False)
    return build_scheme(credential, Secret(DOCUMENT), context)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _authorize(scheme: Scheme, body: bytes | AsyncIterator[bytes] | None, length: int | None,
               headers: dict[str, str] | None = None) -> Outgoing:
    out = Outgoing(method="PUT", url=URL("https://bucket.example.com/k%20ey?partNumber=1", encoded=True),
                   headers=CIMultiDict(headers or {}), body=body, length=length)
    asyncio.run(scheme.authorize(out))
    return out


def test_a_chunked_body_is_held_hashed_and_sent_with_its_length(log: RunLog) -> None:
    out = _authorize(_scheme(log, "s3"), _chunks(b"a,b\n", b"1,2\n"), None)
    assert out.body == b"a,b\n1,2\n" and out.headers["Content-Length"] == "8"
    assert out.headers["X-Amz-Content-Sha256"] == hashlib.sha256(b"a,b\n1,2\n").hexdigest()


def test_the_signature_covers_the_request_as_sent(log: RunLog) -> None:
    out = _authorize(_scheme(log, "s3"), b"body", 4, {"Content-Type": "text/csv", "X-Amz-Meta-Owner": "loop"})
    headers = [(name, value) for name, value in out.headers.items() if name != "Authorization"]
    expected = sign("PUT", "/k%20ey", "partNumber=1", headers, hashlib.sha256(b"body").hexdigest(),
                    access_key="AKIATEST", secret_key="sk-test", region="eu-west-1", service="s3",
                    amz_date=out.headers["X-Amz-Date"])
    assert out.headers["Authorization"] == expected.authorization
    assert "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-owner;x-amz-security-token" \
        in expected.authorization
    assert out.headers["Host"] == "bucket.example.com" and out.headers["X-Amz-Security-Token"] == "st-test"


def test_a_large_s3_upload_streams_unhashed_as_unsigned_payload(log: RunLog) -> None:
    body = _chunks(b"x")
    out = _authorize(_scheme(log, "s3"), body, SIGNED_BODY_LIMIT + 1)
    assert out.body is body and out.headers["X-Amz-Content-Sha256"] == UNSIGNED_PAYLOAD


def test_a_chunked_s3_upload_past_the_limit_streams_on_as_unsigned_payload(log: RunLog) -> None:
    block = b"z" * (1024 * 1024)
    out = _authorize(_scheme(log, "s3"), _chunks(*[block] * 9), None)
    assert out.headers["X-Amz-Content-Sha256"] == UNSIGNED_PAYLOAD
    assert not isinstance(out.body, bytes | None)

    async def drain(body: AsyncIterator[bytes]) -> int:
        return sum([len(chunk) async for chunk in body])

    assert asyncio.run(drain(out.body)) == 9 * len(block)  # nothing held back is lost


def test_other_services_refuse_a_body_too_large_to_hash(log: RunLog) -> None:
    with pytest.raises(AuthFailed) as caught:
        _authorize(_scheme(log, "lambda"), _chunks(b"x"), SIGNED_BODY_LIMIT + 1)
    assert caught.value.status == 413 and caught.value.reason == "body_too_large_to_sign"


def test_chunk_signatures_made_with_the_childs_key_are_refused_and_unsigned_framing_is_kept(log: RunLog) -> None:
    with pytest.raises(AuthFailed) as caught:
        _authorize(_scheme(log, "s3"), _chunks(b"x"), 1,
                   {"X-Amz-Content-Sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"})
    assert caught.value.status == 400 and caught.value.reason == "child_signed_payload"
    out = _authorize(_scheme(log, "s3"), _chunks(b"x"), 1,
                     {"X-Amz-Content-Sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER"})
    assert out.headers["X-Amz-Content-Sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"


def test_the_forwarder_refuses_a_presigned_query_for_a_sigv4_credential_only() -> None:
    from outloop_cli.broker.forward import BadQuery, Injector, upstream_query

    presigned = "X-Amz-Credential=AKIAX%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=ab"
    sigv4 = Injector(header=None, query=None, refuse_presigned=True)
    with pytest.raises(BadQuery, match="presigned URLs carry their own signature"):
        upstream_query(presigned, sigv4, None)
    assert upstream_query(presigned, Injector(header=None, query=None), None) == presigned
    assert upstream_query("list-type=2", sigv4, None) == "list-type=2"


def test_wiping_the_scheme_wipes_every_field_of_its_document(log: RunLog) -> None:
    scheme = _scheme(log, "s3")
    held = scheme.secrets()
    assert {secret.reveal() for secret in held} >= {"AKIATEST", "sk-test", "st-test"}
    scheme.wipe()
    assert all(len(secret) == 0 for secret in held)
