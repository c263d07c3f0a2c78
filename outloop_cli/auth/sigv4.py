"""AWS Signature Version 4 (header form), small and dependency-free, checked against AWS's published test suite.

The broker signs the request exactly as it will send it: the canonical URI is the path on the wire (encoded once
more for services other than S3, as SigV4 asks), the query is re-encoded in AWS's form, every header it sends bar a
few that proxies may change is signed.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Not signed: hop-by-hop or rewritten on the way (botocore leaves out the same few).
UNSIGNED_HEADERS = frozenset({"user-agent", "expect", "transfer-encoding", "connection", "x-amzn-trace-id",
                              "content-length", "accept-encoding", "authorization"})
# Query parameters that make a URL carry its own signature (a presigned URL); the broker refuses them.
PRESIGN_PARAMETERS = frozenset({"x-amz-signature", "x-amz-credential", "x-amz-algorithm", "x-amz-security-token",
                                "x-amz-date", "x-amz-signedheaders", "x-amz-expires", "awsaccesskeyid", "signature"})


@dataclass(frozen=True)
class Signed:
    canonical_request: str
    string_to_sign: str
    authorization: str


def canonical_uri(path: str, *, s3: bool) -> str:
    """S3 takes the path as sent; other services normalise it and encode it again (so %20 becomes %2520)."""
    if s3:
        return path or "/"
    normalised = posixpath.normpath(path) if path else "/"
    if normalised.startswith("//"):  # normpath keeps a leading "//" (POSIX allows it); SigV4 does not
        normalised = "/" + normalised.lstrip("/")
    if path.endswith("/") and normalised != "/":
        normalised += "/"
    return quote(normalised, safe="/~")


def canonical_query(raw_query: str) -> str:
    pairs = []
    for part in raw_query.split("&") if raw_query else ():
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((_aws_quote(unquote(name)), _aws_quote(unquote(value))))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(canonical header block, signed header list); values trimmed and inner runs of spaces folded, as AWS does."""
    grouped: dict[str, list[str]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in UNSIGNED_HEADERS:
            continue
        grouped.setdefault(lower, []).append(" ".join(value.split()))
    names = sorted(grouped)
    block = "".join(f"{name}:{','.join(grouped[name])}\n" for name in names)
    return block, ";".join(names)


def sign(method: str, path: str, query: str, headers: Sequence[tuple[str, str]], payload_hash: str, *,
         access_key: str, secret_key: str, region: str, service: str, amz_date: str) -> Signed:
    """Sign a request whose headers already include host and x-amz-date (and x-amz-security-token, if any)."""
    block, signed_headers = canonical_headers(headers)
    creq = "\n".join((method, canonical_uri(path, s3=service == "s3"), canonical_query(query), block,
                      signed_headers, payload_hash))
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    sts = "\n".join((ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()))
    key = _hmac(("AWS4" + secret_key).encode(), amz_date[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    authz = f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    return Signed(canonical_request=creq, string_to_sign=sts, authorization=authz)


def is_presigned(raw_query: str) -> bool:
    names = {unquote(part.partition("=")[0]).lower() for part in raw_query.split("&") if part}
    return bool(names & PRESIGN_PARAMETERS)


def _aws_quote(text: str) -> str:
    return quote(text, safe="-_.~")


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()
