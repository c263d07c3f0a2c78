"""AWS SigV4 for a credential: each admitted request is signed with the broker's keys just before it goes upstream.

The payload hash is signed whenever the body can be held (up to SIGNED_BODY_LIMIT); a larger S3 upload streams as
UNSIGNED-PAYLOAD, which S3 accepts over TLS. Presigned URLs are refused: they carry a signature the broker did not
make, with keys it does not know (the forwarder refuses them with the query's other checks).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from outloop_cli.auth.config import SIGV4_CHILD_HEADERS, AwsSigV4
from outloop_cli.auth.documents import AwsKeys, document_secrets
from outloop_cli.auth.schemes import AuthContext, AuthFailed, Outgoing, Scheme, hold
from outloop_cli.auth.sigv4 import EMPTY_SHA256, UNSIGNED_PAYLOAD, sign
from outloop_cli.secrets import Secret

if TYPE_CHECKING:
    from outloop_cli.profiles import Credential

SIGNED_BODY_LIMIT = 8 * 1024 * 1024
# The child's SDK may frame an upload as aws-chunked without chunk signatures; that declaration is kept.
KEPT_PAYLOAD_DECLARATIONS = frozenset({"STREAMING-UNSIGNED-PAYLOAD-TRAILER"})


class SigV4Scheme(Scheme):
    def __init__(self, credential: Credential, document: Secret, context: AuthContext, auth: AwsSigV4,
                 parsed: AwsKeys) -> None:
        super().__init__(credential, document, context)
        self.auth = auth
        self.parsed = parsed

    async def authorize(self, out: Outgoing) -> None:
        for name in [name for name in out.headers if name.lower() in SIGV4_CHILD_HEADERS]:
            del out.headers[name]  # the forwarder dropped them already; a scheme stands on its own
        payload = await self._payload_hash(out, out.headers.pop("x-amz-content-sha256", None))
        out.headers["Host"] = self.credential.host
        out.headers["X-Amz-Date"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out.headers["X-Amz-Content-Sha256"] = payload
        if self.parsed.session_token is not None:
            out.headers["X-Amz-Security-Token"] = self.parsed.session_token.reveal()
        signed = sign(out.method, out.url.raw_path, out.url.raw_query_string, list(out.headers.items()), payload,
                      access_key=self.parsed.access_key_id.reveal(), secret_key=self.parsed.secret_access_key.reveal(),
                      region=self.auth.region, service=self.auth.service, amz_date=out.headers["X-Amz-Date"])
        out.headers["Authorization"] = signed.authorization

    async def _payload_hash(self, out: Outgoing, declared: str | None) -> str:
        if declared is not None and declared.startswith("STREAMING-") and declared not in KEPT_PAYLOAD_DECLARATIONS:
            raise AuthFailed(400, "bad_request", "child_signed_payload",
                             "the body carries chunk signatures made with the SDK's own key; outloop signs with the "
                             "workspace's key: configure the SDK for unsigned payloads")
        if out.body is None or isinstance(out.body, bytes):
            return hashlib.sha256(out.body or b"").hexdigest() if out.body else EMPTY_SHA256
        if declared in KEPT_PAYLOAD_DECLARATIONS:
            return declared
        s3 = self.auth.service == "s3"
        if out.length is not None and out.length > SIGNED_BODY_LIMIT:
            if s3:
                return UNSIGNED_PAYLOAD
            raise _too_large(self.auth.service)
        held, rest = await hold(out.body, SIGNED_BODY_LIMIT)
        if rest is None:
            out.body = held
            out.headers["Content-Length"] = str(len(held))
            return hashlib.sha256(held).hexdigest()
        if not s3:
            raise _too_large(self.auth.service)
        out.body = _chain(held, rest)
        return UNSIGNED_PAYLOAD

    def secrets(self) -> list[Secret]:
        return [*super().secrets(), *document_secrets(self.parsed)]


def _too_large(service: str) -> AuthFailed:
    return AuthFailed(413, "bad_request", "body_too_large_to_sign",
                      f"{service} requests are signed with their body's hash, so outloop holds bodies of at most "
                      f"{SIGNED_BODY_LIMIT} bytes for them")


async def _chain(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield head
    async for chunk in rest:
        yield chunk
