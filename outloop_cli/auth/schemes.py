"""What the forwarder asks of an `auth` credential: authorize each request, and react to a 401.

One `Scheme` per credential, built once per run by `build_scheme`; it keeps every secret it holds in `Secret`s and
hands the broker each minted token (`AuthContext.learn`) so echoes of it are masked like any other secret.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from multidict import CIMultiDict
from yarl import URL

from outloop_cli.auth.config import AwsSigV4, OAuth2
from outloop_cli.auth.documents import AwsKeys, OAuth2Secret, ServiceAccountKey, parse_document
from outloop_cli.errors import AuditError
from outloop_cli.secrets import Secret

if TYPE_CHECKING:
    import aiohttp

    from outloop_cli.audit.store import RunLog
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

    def __init__(self, credential: Credential, document: Secret, context: AuthContext) -> None:
        self.credential = credential
        self.document = document  # the whole secret text, replaced (and written back) when a token rotates
        self.context = context

    async def authorize(self, out: Outgoing) -> None:
        raise NotImplementedError

    refreshable = False  # True: a 401 may mean a stale token, so refresh_after_401 and one retry are worth it

    async def refresh_after_401(self) -> None:
        """Called once when the upstream answered 401 to a replayable, idempotent request, before the retry."""

    def secrets(self) -> list[Secret]:
        return [self.document]

    def wipe(self) -> None:
        for secret in self.secrets():
            secret.wipe()


@dataclass
class _Token:
    value: Secret
    expires_at: float


@dataclass
class TokenCall:
    """One token endpoint exchange, audited as its own event."""

    url: str
    form: dict[str, str]
    trigger: str  # first_use | expiring | after_401
    detail: dict[str, object] = field(default_factory=dict)
    basic: tuple[str, str] | None = None


class BearerScheme(Scheme):
    """Mints access tokens at a token endpoint, caches one per run, refreshes it before it expires.

    One mint at a time: concurrent requests that find the token expiring wait for the same exchange.
    """

    EARLY_SECONDS = 60.0  # refresh this long before expiry (at most a quarter of the token's life)
    DEFAULT_LIFETIME = 3600.0

    def __init__(self, credential: Credential, document: Secret, context: AuthContext) -> None:
        super().__init__(credential, document, context)
        self._token: _Token | None = None
        self._lock = asyncio.Lock()
        self._minted: list[Secret] = []

    async def authorize(self, out: Outgoing) -> None:
        if (not out.replayable and out.method in IDEMPOTENT_METHODS and out.length is not None
                and out.length <= REPLAYABLE_BODY):
            out.body = await held_body(out)  # small enough to keep, so a 401 can be retried with it
        token = await self._current()
        out.headers["Authorization"] = "Bearer " + token.reveal()

    refreshable = True

    async def refresh_after_401(self) -> None:
        stale = self._token
        async with self._lock:
            if self._token is stale:  # nobody refreshed meanwhile
                self._token = await self._mint("after_401")

    async def _current(self) -> Secret:
        token = self._token
        if token is None or time.monotonic() >= token.expires_at:
            async with self._lock:
                token = self._token
                if token is None or time.monotonic() >= token.expires_at:
                    token = self._token = await self._mint("first_use" if token is None else "expiring")
        return token.value

    def _token_call(self, trigger: str) -> TokenCall:
        raise NotImplementedError

    async def _rotated(self, refresh_token: str) -> None:
        """The endpoint issued a new refresh token (only OAuth2 refresh grants do)."""

    async def _mint(self, trigger: str) -> _Token:
        call = self._token_call(trigger)
        answer = await exchange(self.credential, call, self.context)
        value = str(answer["access_token"])  # exchange() checked it is a non-empty string
        lifetime = _lifetime(answer.get("expires_in"), self.DEFAULT_LIFETIME)
        secret = Secret(value)
        self._minted.append(secret)
        self.context.learn(value)
        rotated = answer.get("refresh_token")
        if isinstance(rotated, str) and rotated:
            self.context.learn(rotated)
            await self._rotated(rotated)
        early = min(self.EARLY_SECONDS, lifetime / 4)
        return _Token(secret, time.monotonic() + lifetime - early)

    def secrets(self) -> list[Secret]:
        return [*super().secrets(), *self._minted]


def _lifetime(value: object, default: float) -> float:
    try:
        seconds = float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else default
    except ValueError:
        seconds = default
    return seconds if 0 < seconds < 10 * 365 * 86400 else default


MAX_TOKEN_ANSWER = 256 * 1024
TOKEN_TIMEOUT_SECONDS = 30.0


async def exchange(credential: Credential, call: TokenCall, context: AuthContext) -> dict[str, object]:
    """POST the form to the token endpoint; audit it (no values); AuthFailed with a reason the operator can act on."""
    import aiohttp

    assert context.session is not None
    host = URL(call.url).host or "?"
    started = time.perf_counter()
    status: int | None = None
    auth = aiohttp.BasicAuth(*call.basic) if call.basic else None
    try:
        async with context.session.post(call.url, data=call.form, auth=auth, allow_redirects=False,
                                        headers={"Accept": "application/json"},
                                        timeout=aiohttp.ClientTimeout(total=TOKEN_TIMEOUT_SECONDS)) as response:
            status = response.status
            body = await response.content.read(MAX_TOKEN_ANSWER)
    except (aiohttp.ClientError, TimeoutError) as exc:
        await _audit(context, credential, call, status, started, "token_endpoint_unreachable")
        raise AuthFailed(502, "upstream_error", "token_endpoint_unreachable",
                         f"credential {credential.name!r}: the token endpoint {host} cannot be reached "
                         f"({type(exc).__name__}); nothing was sent upstream") from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str) \
            or not answer["access_token"]:
        code = answer.get("error") if isinstance(answer, dict) else None
        # The OAuth2 error code is a fixed token such as invalid_grant; anything else the endpoint said stays out.
        shown = f" ({code})" if isinstance(code, str) and code.replace("_", "").isalnum() and len(code) < 64 else ""
        await _audit(context, credential, call, status, started, "token_refused")
        raise AuthFailed(502, "upstream_error", "token_refused",
                         f"credential {credential.name!r}: the token endpoint {host} answered HTTP {status}{shown} "
                         "and issued no access token; check the secret with `outloop secret check`")
    call.detail["rotated"] = isinstance(answer.get("refresh_token"), str)
    await _audit(context, credential, call, status, started, None)
    return answer


async def _audit(context: AuthContext, credential: Credential, call: TokenCall, status: int | None,
                 started: float, error: str | None) -> None:
    url = URL(call.url)
    try:
        await asyncio.to_thread(
            context.audit.record_event, "token", credential=credential.name, method="POST",
            host=url.raw_authority, path=url.raw_path, status=status,
            latency_ms=(time.perf_counter() - started) * 1000, error=error,
            detail={"scheme": credential.auth.scheme if credential.auth else None, "trigger": call.trigger,
                    **call.detail})
    except AuditError:
        raise AuthFailed(503, "audit_unavailable", "audit_unavailable",
                         "the audit log cannot be written; refusing to use the token (fail closed)") from None


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

