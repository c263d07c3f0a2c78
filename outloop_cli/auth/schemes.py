"""What the forwarder asks of an `auth` credential: authorize each request, and react to a 401.

One `Scheme` per credential, built once per run by `build_scheme`; it keeps every secret it holds in `Secret`s and
hands the broker each minted token (`AuthContext.learn`) so echoes of it are masked like any other secret.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from multidict import CIMultiDict
from yarl import URL

from outloop_cli.auth.config import AwsSigV4, OAuth2
from outloop_cli.auth.documents import AwsKeys, OAuth2Secret, ServiceAccountKey, parse_document
from outloop_cli.secrets import Secret

if TYPE_CHECKING:
    import aiohttp

    from outloop_cli.audit.writer import RunLog
    from outloop_cli.profiles import Credential

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
REPLAYABLE_BODY = 64 * 1024  # an idempotent request's body up to this size is held, so a 401 retry can resend it


class AuthFailed(Exception):
    """The request cannot be authorized; the broker answers `status` with this code and message (no value in it)."""

    def __init__(self, status: int, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.reason, self.message = status, code, reason, message


@dataclass
class Outgoing:
    """The upstream request as the forwarder will send it; a scheme may rewrite headers and buffer the body."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes | AsyncIterator[bytes] | None
    length: int | None  # the child's Content-Length, when it sent one

    @property
    def replayable(self) -> bool:
        return self.body is None or isinstance(self.body, bytes)


@dataclass
class AuthContext:
    """What schemes need from the run: its audit log, and hooks into the broker's redaction and summary."""

    audit: RunLog
    learn: Callable[[str], None]  # a new secret form (a minted token) the redactor must mask from now on
    warn: Callable[[str], None]  # a line for the run summary
    write_back: Callable[[Credential, str], bool]  # store an updated secret document; False: source not writable
    session: aiohttp.ClientSession | None = None  # the broker's pooled session, set when it starts serving


async def hold(body: AsyncIterator[bytes], limit: int) -> tuple[bytes, AsyncIterator[bytes] | None]:
    """Read up to `limit` bytes; (all of it, None) when the body ended, else (what was read, the rest)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in body:
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts), body
    return b"".join(parts), None


async def held_body(out: Outgoing) -> bytes:
    """The whole body of a request whose Content-Length is known to be small."""
    assert out.body is not None and not isinstance(out.body, bytes)
    data, _ = await hold(out.body, max(out.length or 0, 0))
    return data


class Scheme:
    """Base: a scheme that needs nothing beyond authorizing each request."""

    refreshable = False  # True: a 401 may mean a stale token, so refresh_after_401 and one retry are worth it

    def __init__(self, credential: Credential, document: Secret, context: AuthContext) -> None:
        self.credential = credential
        self.document = document  # the whole secret text, replaced (and written back) when a token rotates
        self.context = context

    async def authorize(self, out: Outgoing) -> None:
        raise NotImplementedError

    async def refresh_after_401(self) -> None:
        """Called once when the upstream answered 401 to a replayable, idempotent request, before the retry."""

    def secrets(self) -> list[Secret]:
        return [self.document]

    def wipe(self) -> None:
        for secret in self.secrets():
            secret.wipe()


def build_scheme(credential: Credential, document: Secret, context: AuthContext) -> Scheme:
    """The scheme for an `auth` credential; its document was checked when the run resolved it."""
    from outloop_cli.auth.aws import SigV4Scheme
    from outloop_cli.auth.google import GoogleScheme
    from outloop_cli.auth.oauth2 import OAuth2Scheme

    auth = credential.auth
    assert auth is not None
    parsed = parse_document(auth, document.reveal(), f"credential {credential.name!r}")
    if isinstance(auth, OAuth2):
        assert isinstance(parsed, OAuth2Secret)
        return OAuth2Scheme(credential, document, context, auth, parsed)
    if isinstance(auth, AwsSigV4):
        assert isinstance(parsed, AwsKeys)
        return SigV4Scheme(credential, document, context, auth, parsed)
    assert isinstance(parsed, ServiceAccountKey)
    return GoogleScheme(credential, document, context, auth, parsed)


def secret_forms(scheme: Scheme) -> list[str]:
    return [secret.reveal() for secret in scheme.secrets() if len(secret)]

