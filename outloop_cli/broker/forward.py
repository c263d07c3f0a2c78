"""Build the upstream request (headers, injection, URL) and stream the answer back, redacted.

The URL is always base_url + the validated raw path, so no request path can change the host.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

from multidict import CIMultiDict

from outloop_cli.auth.config import AwsSigV4, child_signing_headers
from outloop_cli.auth.sigv4 import is_presigned
from outloop_cli.broker.redact import basic_auth_variant, redact_text
from outloop_cli.profiles import Credential
from outloop_cli.secrets import Secret

# RFC 7230 section 6.1 hop-by-hop headers, plus headers a child must never be able to set upstream.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "proxy-connection",
})
NEVER_FROM_CHILD = frozenset({
    "host", "authorization", "cookie2", "forwarded", "x-forwarded-for", "x-forwarded-host",
    "x-forwarded-proto", "x-forwarded-port", "x-forwarded-prefix", "x-real-ip", "expect", "content-length",
    "accept-encoding",
}) | HOP_BY_HOP
NEVER_TO_CHILD = HOP_BY_HOP | {"content-length", "content-encoding"}
DECODABLE_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})
UPSTREAM_ACCEPT_ENCODING = "gzip, deflate"
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_QUERY_OK = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")


class BadQuery(ValueError):
    """The query string holds bytes that would be ambiguous upstream (spaces, CR/LF, bad escapes)."""


@dataclass(frozen=True)
class Injector:
    """What one credential adds to each upstream request, prepared once per run."""

    header: tuple[str, str] | None
    query: tuple[str, str] | None  # (name, url-encoded secret)
    drop: frozenset[str] = frozenset()  # more child headers to drop (lower case): an auth scheme's signing headers
    refuse_presigned: bool = False  # a SigV4 credential: a query carrying its own signature is refused

    @classmethod
    def for_credential(cls, credential: Credential, secret: Secret) -> Injector:
        if credential.auth is not None:  # its scheme authorizes each request (outloop_cli.auth)
            return cls(header=None, query=None, drop=child_signing_headers(credential.auth),
                       refuse_presigned=refuses_presigned(credential))
        value = secret.reveal()
        style = credential.inject.style
        if style == "header":
            return cls(header=(credential.inject.name, credential.inject.template.replace("{secret}", value)),
                       query=None)
        if style == "basic":
            return cls(header=("Authorization", "Basic " + basic_auth_variant(credential.inject.name, value)),
                       query=None)
        return cls(header=None, query=(credential.inject.name, quote(value, safe="")))


def upstream_headers(
    raw_headers: Iterable[tuple[bytes, bytes]], injector: Injector, drop_values_containing: str | None
) -> CIMultiDict[str]:
    """The child's headers minus hop-by-hop and auth headers, plus the injected one.

    `drop_values_containing` is the run's placeholder token: any header carrying it is the SDK's auth header.
    """
    headers: CIMultiDict[str] = CIMultiDict()
    connection_listed: set[str] = set()
    decoded = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw_headers]
    for name, value in decoded:
        if name.lower() == "connection":
            connection_listed.update(token.strip().lower() for token in value.split(","))
    injected_name = injector.header[0].lower() if injector.header else None
    for name, value in decoded:
        lower = name.lower()
        if lower in NEVER_FROM_CHILD or lower in connection_listed or lower == injected_name or lower in injector.drop:
            continue
        if lower.startswith("outloop-"):
            continue
        if drop_values_containing and drop_values_containing in value:
            continue
        headers.add(name, value)
    if injector.header:
        headers[injector.header[0]] = injector.header[1]
    headers["Accept-Encoding"] = UPSTREAM_ACCEPT_ENCODING
    return headers


def refuses_presigned(credential: Credential) -> bool:
    """A SigV4 credential signs every request itself, so a query carrying its own signature is refused."""
    return isinstance(credential.auth, AwsSigV4)


def check_query(raw_query: str, refuse_presigned: bool) -> None:
    """The checks the admission chain and the forwarder share, so `policy test` and the broker agree."""
    if not _QUERY_OK.fullmatch(raw_query):
        raise BadQuery("the query string holds characters that must be percent-encoded")
    if refuse_presigned and is_presigned(raw_query):
        raise BadQuery("presigned URLs carry their own signature; outloop signs every request for this credential "
                       "itself: drop the X-Amz-* (or Signature) query parameters")


def upstream_query(raw_query: str, injector: Injector, drop_values_containing: str | None) -> str:
    """Keep the child's query byte for byte, except a parameter named like the injected one."""
    check_query(raw_query, injector.refuse_presigned)
    pairs = [pair for pair in raw_query.split("&") if pair] if raw_query else []
    if injector.query:
        name = injector.query[0]
        pairs = [pair for pair in pairs if unquote(pair.split("=", 1)[0]) != name]
    if drop_values_containing:
        pairs = [pair for pair in pairs if drop_values_containing not in unquote(pair)]
    if injector.query:
        pairs.append(f"{quote(injector.query[0], safe='')}={injector.query[1]}")
    return "&".join(pairs)


def child_response_headers(
    raw_headers: Iterable[tuple[bytes, bytes]], variants: tuple[bytes, ...], location: str | None
) -> CIMultiDict[str]:
    """The upstream's headers as the child may see them, with `location` (the rewritten redirect) in place.

    Names are masked as well as values, and so is the rewritten Location: an upstream that echoes a query-injected
    key into its redirect would otherwise hand it to the child. `Outloop-*` headers are the broker's own; an
    upstream must not be able to forge a broker decision.
    """
    headers: CIMultiDict[str] = CIMultiDict()
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1")
        lower = name.lower()
        if lower in NEVER_TO_CHILD or lower.startswith("outloop-"):
            continue
        value = location if lower == "location" and location is not None else raw_value.decode("latin-1")
        headers.add(redact_text(name, variants), redact_text(value, variants))
    return headers


async def counted(body: AsyncIterator[bytes], counter: list[int], limit: int) -> AsyncIterator[bytes]:
    """Pass the child's request body through, counting bytes and stopping at `limit`."""
    async for chunk in body:
        counter[0] += len(chunk)
        if counter[0] > limit:
            raise BodyTooLarge(limit)
        yield chunk


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def rewrite_location(location: str, base_url: str, broker_prefix: str) -> str | None:
    """Map an upstream redirect target onto the broker, or None when it leaves the credential's base URL.

    Following it is left to the child, through the broker again, so policy judges the new path too.
    """
    from urllib.parse import urljoin, urlsplit

    base = urlsplit(base_url)
    if not location.startswith("/") and not _URL_SCHEME.match(location):
        # Relative to the current path, so it already points back through the broker, unless ".." climbs out
        # of this credential's prefix (the broker does not know how far), or a lenient client would read
        # backslashes or leading blanks as "//other-host".
        path = re.split(r"[?#]", location, maxsplit=1)[0]
        if ".." in path.split("/") or re.search(r"[\\\s\x00-\x1f\x7f]", location):
            return None
        return location
    target = urlsplit(urljoin(base_url + "/", location))
    if (target.scheme, target.netloc.lower()) != (base.scheme, base.netloc.lower()):
        return None
    prefix = base.path.rstrip("/")
    if prefix and not (target.path == prefix or target.path.startswith(prefix + "/")):
        return None
    rest = target.path[len(prefix):] or "/"
    return broker_prefix + rest + (f"?{target.query}" if target.query else "")
