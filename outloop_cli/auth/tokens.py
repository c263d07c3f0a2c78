"""Access tokens from a token endpoint: minted by the broker, cached per run, refreshed before they expire.

Every exchange is an audit event of kind `token` (no values), and every token minted is a `Secret` the broker masks.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from yarl import URL

from outloop_cli.auth.schemes import (
    IDEMPOTENT_METHODS,
    REPLAYABLE_BODY,
    AuthContext,
    AuthFailed,
    Outgoing,
    Scheme,
    held_body,
)
from outloop_cli.errors import AuditError
from outloop_cli.secrets import Secret

if TYPE_CHECKING:
    from outloop_cli.profiles import Credential


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
        asked = time.monotonic()  # the lifetime counts from here: the token may be older than its answer
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
        return _Token(secret, asked + lifetime - early)

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
            body = b""
            async for chunk in response.content.iter_any():  # read(n) may stop at what has arrived so far
                body += chunk
                if len(body) > MAX_TOKEN_ANSWER:
                    break
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
