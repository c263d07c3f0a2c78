"""The broker's HTTP routes: authenticate the caller, decide, audit, forward, and answer.

One handler per listener on the broker's own HTTP/1.1 server (`wire.py`), which hands it the target raw.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from multidict import CIMultiDict
from yarl import URL

from outloop_cli.audit.writer import RequestRecord, ResponseRecord, RunLog
from outloop_cli.auth.schemes import IDEMPOTENT_METHODS, AuthContext, AuthFailed, Outgoing, build_scheme, secret_forms
from outloop_cli.broker.admission import (
    HTTP_PREFIX,
    MAX_AUDITED_PATH,
    RUN_INFO,
    Admitted,
    Denial,
    admit,
    admit_credential,
    foreign_identifier,
    short,
)
from outloop_cli.broker.egress import Authority, EgressPolicy, Intercept, credential_hosts
from outloop_cli.broker.forward import (
    DECODABLE_ENCODINGS,
    BodyTooLarge,
    Injector,
    child_response_headers,
    counted,
    rewrite_location,
    upstream_headers,
    upstream_query,
)
from outloop_cli.broker.guard import (
    FLAG_REASON,
    GUARD_REASON,
    TOO_LARGE_REASON,
    UNREADABLE_REASON,
    StreamScanner,
    body_texts,
    held_body,
)
from outloop_cli.broker.intercept import ToBroker, route_absolute, route_intercepted
from outloop_cli.broker.limits import Limits
from outloop_cli.broker.listeners import BACKLOG, HandOverRefused, Listeners, take_over
from outloop_cli.broker.peer import is_in_run_tree, peer_pid
from outloop_cli.broker.proxy import EgressProxy
from outloop_cli.broker.redact import StreamRedactor, basic_auth_variant, redact_text, secret_variants
from outloop_cli.broker.upstream_pool import Timeouts, UpstreamError, UpstreamPool, UpstreamResponse
from outloop_cli.broker.wire import (
    Connection,
    Handler,
    HttpServer,
    MalformedRequest,
    Request,
    Response,
    StreamResponse,
    json_response,
)
from outloop_cli.errors import AuditError
from outloop_cli.guard import Guard, Identifier
from outloop_cli.profiles import Credential, Profile
from outloop_cli.secret_admin import write_back_document
from outloop_cli.secrets import Secret

if TYPE_CHECKING:  # cryptography loads only with a run that intercepts (runner makes the CA), aiohttp only for
    # the token endpoints of `auth` credentials
    import aiohttp

    from outloop_cli.broker.ca import RunCA

MAX_REQUEST_BODY = 256 * 1024 * 1024
SMALL_BODY = 64 * 1024  # responses up to this size (with a Content-Length) are answered in one write
# close() runs once the child's tree is gone, so no one waits for an answer any more: a handler still waiting on
# a slow upstream must not hold the run's exit (`--timeout` would not cover it).
SHUTDOWN_GRACE = 1.0


class Broker:
    """Serves one run. Holds the secrets; everything it writes anywhere is redacted first."""

    def __init__(
        self,
        *,
        run_id: str,
        profile: Profile,
        secrets: Mapping[str, Secret],
        audit: RunLog,
        run_token: str | None = None,
        timeout: float | None = None,
        guard: Guard | None = None,
        ca: RunCA | None = None,
        own_url: str | None = None,
        child_pid: int | None = None,
    ) -> None:
        """`timeout` is the run's effective one (--timeout wins over the profile), as /v1/run reports it.

        `guard` holds the other workspaces' identifiers; None when nobody declared any. `ca` is the run's CA when
        the egress proxy intercepts; `own_url` is OUTLOOP_URL as the child sees it, so an SDK sending base-URL
        requests through the proxy (NO_PROXY is empty) reaches the broker itself. `child_pid` roots the process
        tree whose members may use the broker's socket; without it nobody may."""
        self.run_id = run_id
        self.guard = guard
        self.timeout = timeout
        self.profile = profile
        self.audit = audit
        self.child_pid = child_pid
        self.supervisor_pid = os.getpid()
        self.run_token = run_token
        self.limits = Limits(
            profile.run.max_requests,
            {name: (cred.rate, cred.max_requests) for name, cred in profile.credentials.items()},
        )
        self._secrets = dict(secrets)
        self._injectors = {name: Injector.for_credential(cred, secrets[name])
                           for name, cred in profile.credentials.items()}
        self.warnings: list[str] = []  # for the run summary, e.g. a rotated refresh token that could not be stored
        self._auth_context = AuthContext(audit=audit, learn=self._learn_secret, warn=self.warnings.append,
                                         write_back=partial(write_back_document,
                                                            warn=self.warnings.append))
        self._schemes = {name: build_scheme(cred, secrets[name], self._auth_context)
                         for name, cred in profile.credentials.items() if cred.auth is not None}
        self._variants = secret_variants(self._all_secret_forms())
        self._timeouts = {name: Timeouts(connect=cred.connect_timeout, read=cred.read_timeout)
                          for name, cred in profile.credentials.items()}
        self._upstream_tls = {name: _upstream_tls(cred) for name, cred in profile.credentials.items()}
        self.ca = ca
        base_urls = {name: cred.base_url for name, cred in profile.credentials.items()}
        self.egress = EgressPolicy(credential_hosts(base_urls), profile.run.egress)
        self._own_authority = _authority_of(own_url) if own_url else None
        self._proxy: EgressProxy | None = None
        self._peer_cache: weakref.WeakKeyDictionary[Connection, bool] = weakref.WeakKeyDictionary()
        self._pool = UpstreamPool()
        self._session: aiohttp.ClientSession | None = None  # token endpoints of `auth` credentials only
        self._servers: list[HttpServer] = []
        self._hand_overs: list[asyncio.Future[None]] = []
        self._in_flight: set[asyncio.Task[Any]] = set()  # forwards under way, so close() can end and audit them
        self._deciding = 0  # requests whose decision is being committed

    def _all_secret_forms(self) -> list[str]:
        forms = []
        for name, cred in self.profile.credentials.items():
            if name in self._schemes:  # each field of its document, and every token it minted
                forms += secret_forms(self._schemes[name])
                continue
            value = self._secrets[name].reveal()
            forms.append(value)
            if cred.inject.style == "basic":
                forms.append(basic_auth_variant(cred.inject.name, value))
        return forms

    def _learn_secret(self, value: str) -> None:
        """A scheme minted a token (or got a rotated one): from now on it is masked in every answer."""
        self._variants = secret_variants(self._all_secret_forms())

    # ----- lifecycle -------------------------------------------------------------------------------------

    async def serve(self, listeners: Listeners) -> None:
        """Serve on sockets bound before the child started; connections made meanwhile wait in the backlog.

        The relay's listeners inside the child's network namespace arrive on their hand-over sockets (already
        waiting there, sent before the loop started); they are taken over on their own tasks, so a hand-over that
        never comes can hold up nothing else.
        """
        if self._schemes:
            self._session = self._auth_context.session = self._new_session()
        await self._serve(listeners.broker, self.handle)
        if listeners.loopback is not None:
            await self._serve(listeners.loopback, self.handle_loopback)
        if listeners.relay is not None and listeners.relay_port is not None:
            # Only the child's network namespace reaches this listener; the token is still required, as on loopback.
            self._take_over(listeners.relay, listeners.relay_port, partial(self._serve, handler=self.handle_loopback))
        if listeners.proxy is not None and listeners.proxy_port is not None:
            self._proxy = EgressProxy(
                policy=self.egress, ca=self.ca, audit=self.audit, intercepted=self._intercepted_handler,
                plain=HttpServer(self.handle_proxied, self._protocol_error), on_error=self._protocol_error,
                error_body=lambda status, code, reason, message: _error_response(status, code, message, None, None,
                                                                                 reason=reason))
            self._take_over(listeners.proxy, listeners.proxy_port, self._proxy.serve)

    def _take_over(self, channel: socket.socket, port: int,
                   serve: Callable[[socket.socket], Awaitable[None]]) -> None:
        async def take_over_and_serve() -> None:
            try:
                listener = await take_over(channel, port, self._in_run)
            except (HandOverRefused, OSError, TimeoutError) as exc:
                self.warnings.append(f"the loop's listener on 127.0.0.1:{port} was not served: {exc}")
                return
            await serve(listener)

        self._hand_overs.append(asyncio.ensure_future(take_over_and_serve()))

    async def _serve(self, sock: socket.socket, handler: Handler) -> None:
        server = HttpServer(handler, self._protocol_error)
        await server.listen(sock, BACKLOG)
        self._servers.append(server)

    def _new_session(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=300, keepalive_timeout=30,
                                         enable_cleanup_closed=True)
        return aiohttp.ClientSession(
            connector=connector, auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        for hand_over in self._hand_overs:
            hand_over.cancel()
        await asyncio.gather(*self._hand_overs, return_exceptions=True)
        for server in self._servers:
            await server.shutdown(SHUTDOWN_GRACE)
        if self._proxy is not None:
            await self._proxy.close(SHUTDOWN_GRACE)
        # A forward still waiting on its upstream after SHUTDOWN_GRACE is cancelled here, so its outcome is
        # audited before the run's log is closed.
        pending = [task for task in self._in_flight if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._pool.close()
        if self._session is not None:
            await self._session.close()
        for secret in self._secrets.values():
            secret.wipe()
        for scheme in self._schemes.values():
            scheme.wipe()
        self._injectors.clear()
        self._variants = ()

    # ----- entry points ----------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response | StreamResponse:
        if not self._peer_allowed(request):
            return await self._deny(request, None, 401, "unauthenticated", "peer_not_in_run",
                                    "only the run's command and its descendants may use this broker")
        return await self._route(request)

    async def handle_loopback(self, request: Request) -> Response | StreamResponse:
        if not self._token_presented(request):
            return await self._deny(request, None, 401, "unauthenticated", "bad_token",
                                    "present the run token (OUTLOOP_TOKEN) in a header")
        return await self._route(request)

    def _peer_allowed(self, request: Request) -> bool:
        """SO_PEERCRED names who connected, so one check per connection covers every request on it."""
        transport, connection = request.transport, request.connection
        if transport is None or self.child_pid is None:
            return False
        allowed = self._peer_cache.get(connection)
        if allowed is None:
            sock = transport.get_extra_info("socket")  # asyncio's TransportSocket: it has getsockopt
            pid = peer_pid(sock) if sock is not None else None
            allowed = self._peer_cache[connection] = pid is not None and self._in_run(pid)
        return allowed

    def _in_run(self, pid: int) -> bool:
        return self.child_pid is not None and is_in_run_tree(pid, self.child_pid, self.supervisor_pid)

    def _token_presented(self, request: Request) -> bool:
        token = self.run_token
        if not token:
            return False
        # SDKs send the key as "Bearer <key>", "<key>" or ?key=<key>; compare candidates in constant time.
        candidates = [part for _, value in request.raw_headers for part in value.decode("latin-1").split()]
        candidates += [value for _, _, value in (pair.partition("=") for pair in
                                                 request.raw_path.partition("?")[2].split("&"))]
        return any(hmac.compare_digest(candidate, token) for candidate in candidates)

    async def _route(self, request: Request) -> Response | StreamResponse:
        admitted = admit(request.method, request.raw_path, self.profile, self.guard)
        if isinstance(admitted, Denial):
            return await self._refuse(request, admitted)
        if admitted.route == "http":
            assert admitted.credential is not None
            return await self._http(request, admitted, HTTP_PREFIX + admitted.credential.name)
        if admitted.route == "reveal":
            assert admitted.credential is not None
            return await self._reveal(request, admitted.credential)
        try:  # every broker request is an event, this harmless one too, so counts reconcile
            await self._audit_request(request, None, RUN_INFO, "allow", "run_info", None, 200)
        except AuditError:
            return _error_response(503, "audit_unavailable", "the audit log cannot be written", None, None)
        return json_response(self.run_info())

    # ----- /v1/run ---------------------------------------------------------------------------------------

    def run_info(self) -> dict[str, Any]:
        credentials = []
        for name, cred in self.profile.credentials.items():
            credentials.append({
                "name": name,
                "base_url": cred.base_url,
                "allow": [rule.text for rule in cred.allow],
                "deny": [rule.text for rule in cred.deny],
                "rate": str(cred.rate) if cred.rate else None,
                "remaining": self.limits.credential_budgets[name].remaining,
                "reveal": cred.reveal,
            })
        return {
            "run_id": self.run_id,
            "workspace": self.profile.workspace,
            "credentials": credentials,
            "limits": {"max_requests": self.profile.run.max_requests,
                       "remaining": self.limits.run_budget.remaining,
                       "timeout": self.timeout},
        }

    # ----- /v1/secret/<credential> -----------------------------------------------------------------------

    async def _reveal(self, request: Request, credential: Credential) -> Response | StreamResponse:
        name = credential.name
        try:
            await self._audit_request(request, credential, f"/v1/secret/{name}", "allow", "revealed", None, 200)
        except AuditError:
            return _error_response(503, "audit_unavailable", "the audit log cannot be written; refusing to "
                                   "reveal (fail closed)", name, None)
        return Response(body=self._secrets[name].reveal().encode(), content_type="text/plain; charset=utf-8",
                            headers={"Cache-Control": "no-store"})

    # ----- /v1/http/<credential>/<path> ------------------------------------------------------------------

    async def _http(self, request: Request, admitted: Admitted, location_prefix: str
                    ) -> Response | StreamResponse:
        """Admitted by policy; what remains needs the live request: body size, the body's guard scan, limits.

        Every route to a credential's upstream ends here. `location_prefix` is where the child addressed the
        credential, so an on-host redirect points back there."""
        credential, upstream_path, decision = admitted.credential, admitted.path, admitted.decision
        assert credential is not None and decision is not None
        name = credential.name
        if request.content_length is not None and request.content_length > MAX_REQUEST_BODY:
            # Refused before anything goes upstream; a chunked body is cut at the same size while it streams.
            return await self._deny(request, credential, 413, "bad_request", "body_too_large",
                                    f"request body larger than {MAX_REQUEST_BODY} bytes", rule=decision.rule,
                                    path=upstream_path)
        held: bytes | None = None
        if self.guard is not None and request.body_exists:
            scanned = await self._scan_body(request, credential, upstream_path)
            if isinstance(scanned, Denial):
                return await self._refuse(request, scanned)
            held = scanned
        query = upstream_query(admitted.raw_query, self._injectors[name], self.run_token)
        verdict = self.limits.admit(name)
        if not verdict.ok:
            scope = "this run" if verdict.scope == "run" else f"credential {name!r}"
            message = (f"rate limit of {credential.rate} reached for {scope}" if verdict.reason == "rate_limited"
                       else f"max_requests reached for {scope}")
            headers = {"Retry-After": str(max(1, round(verdict.retry_after)))} if verdict.retry_after else {}
            return await self._deny(request, credential, 429, verdict.reason, verdict.reason, message,
                                    rule=decision.rule, headers=headers, path=upstream_path)
        try:
            seq = await self._audit_request(request, credential, upstream_path, "allow", decision.reason,
                                            decision.rule, None)
        except AuditError:
            return _error_response(503, "audit_unavailable", "the audit log cannot be written; refusing "
                                   "to forward (fail closed)", name, decision.rule)
        return await self._forward(request, credential, upstream_path, query, seq, held, location_prefix)

    async def _scan_body(self, request: Request, credential: Credential, path: str) -> bytes | Denial:
        """Hold the body back and scan it before anything goes upstream; too large or unreadable is refused."""
        assert self.guard is not None
        limit = self.guard.settings.max_body
        too_large = Denial(413, "bad_request", TOO_LARGE_REASON, f"request body larger than guard.max_body "
                           f"({limit} bytes): the wrong-client guard must read a body before it goes upstream",
                           credential, path=path)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return Denial(400, "bad_request", UNREADABLE_REASON, f"request body with Content-Encoding {encoding!r}: "
                          "the wrong-client guard reads bodies as sent, so send it uncompressed", credential,
                          path=path)
        if request.content_length is not None and request.content_length > limit:
            return too_large
        body = await held_body(request.body.chunks(), limit)
        if body is None:
            return too_large
        found = self.guard.search(body_texts(body))
        return body if found is None else foreign_identifier(credential, found, path)

    # ----- the egress proxy's requests -------------------------------------------------------------------

    def _intercepted_handler(self, intercept: Intercept, target: Authority
                             ) -> Handler:
        return partial(self.handle_intercepted, intercept=intercept, target=target)

    async def handle_intercepted(self, request: Request, *, intercept: Intercept, target: Authority
                                 ) -> Response | StreamResponse:
        """A request inside TLS the proxy terminated for `target`."""
        routed = route_intercepted(request.raw_path, request.headers.getall("Host", []), intercept, target)
        if isinstance(routed, Denial):
            return await self._refuse(request, routed)
        return await self._admit_routed(request, routed.credential, routed.path, routed.query)

    async def handle_proxied(self, request: Request) -> Response | StreamResponse:
        """An absolute-form request to the proxy (`GET http://host/path`); only the child's network namespace
        reaches the proxy's listener."""
        routed = route_absolute(request.raw_path, self.egress, self._own_authority)
        if isinstance(routed, Denial):
            return await self._refuse(request, routed)
        if isinstance(routed, ToBroker):
            return await self.handle_loopback(request.with_target(routed.target))
        return await self._admit_routed(request, routed.credential, routed.path, routed.query)

    async def _admit_routed(self, request: Request, name: str, path: str, raw_query: str
                            ) -> Response | StreamResponse:
        """The proxy's request, judged by the same chain as /v1/http/<credential>/; on-host redirects point at
        the upstream itself, which the child reaches through the proxy again."""
        admitted = admit_credential(request.method, name, path, raw_query, self.profile, self.guard)
        if isinstance(admitted, Denial):
            return await self._refuse(request, admitted)
        return await self._http(request, admitted, self.profile.credentials[name].base_url)

    async def _forward(self, request: Request, credential: Credential, path: str, query: str,
                       seq: int, held: bytes | None, location_prefix: str) -> Response | StreamResponse:
        """Stream the request up and the answer back; the outcome is audited whatever happens.

        `held` is the body when the guard already read it; otherwise the body streams."""
        outcome = _Outcome(started=time.perf_counter())
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            return await self._exchange(request, credential, path, query, outcome, held, location_prefix)
        except BodyTooLarge as exc:
            return outcome.fail(413, "bad_request", str(exc), credential, request)
        except AuthFailed as exc:  # the token endpoint or signing failed; nothing went upstream
            return outcome.fail(exc.status, exc.code, exc.message, credential, request, reason=exc.reason)
        except TimeoutError:
            return outcome.fail(504, "upstream_timeout", f"{credential.host} did not answer in time", credential,
                                request)
        except ConnectionResetError:  # the child's connection, while its body streamed up or its answer down
            return outcome.fail(499, "client_disconnected", "the client went away", credential, request)
        except asyncio.CancelledError:
            outcome.error = "run_ended"  # close() cancelled it: the child's tree is gone
            raise
        except UpstreamError as exc:
            return outcome.fail(502, "upstream_error", f"{credential.host}: {exc}", credential, request)
        except MalformedRequest:  # the body turned out unparseable while it streamed up: the upstream got no end
            return outcome.fail(400, "bad_request", "malformed HTTP request body", credential, request,
                                reason="malformed_http")
        finally:
            if task is not None:
                self._in_flight.discard(task)
            self.audit.record_response(ResponseRecord(
                request_seq=seq, status=outcome.status,
                latency_ms=(time.perf_counter() - outcome.started) * 1000,
                bytes_in=outcome.received[0], bytes_out=outcome.sent, error=outcome.error,
                reason=FLAG_REASON if outcome.flagged is not None else None, rule=outcome.rule))

    async def _exchange(self, request: Request, credential: Credential, path: str, query: str,
                        outcome: _Outcome, held: bytes | None, location_prefix: str) -> Response | StreamResponse:
        name = credential.name
        url = URL(credential.base_url + path + (f"?{query}" if query else ""), encoded=True)
        headers = upstream_headers(request.raw_headers, self._injectors[name], self.run_token)
        body: AsyncIterator[bytes] | bytes | None = None
        if held is not None:
            body, outcome.received[0] = held, len(held)
            headers["Content-Length"] = str(len(held))
        elif request.body_exists:
            body = counted(request.body.chunks(), outcome.received, MAX_REQUEST_BODY)
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        async with await self._send(request, credential, url, headers, body) as upstream:
            outcome.status = upstream.status
            # One coding at most: with several (or the header twice) the body would reach the redactor still
            # encoded, and the length the child is told would not be what the upstream meant.
            codings = [token.strip().lower() for value in upstream.headers.getall("Content-Encoding", ())
                       for token in value.split(",")]
            encoding = codings[0] if len(codings) == 1 else ("" if not codings else "multiple")
            if encoding not in DECODABLE_ENCODINGS:
                return outcome.fail(502, "upstream_error", "upstream used a content-encoding outloop cannot "
                                    "inspect for secrets", credential, reason="unsupported_encoding")
            location = None
            if "Location" in upstream.headers and 300 <= upstream.status < 400:
                location = rewrite_location(upstream.headers["Location"], credential.base_url, location_prefix)
                if location is None:
                    return outcome.fail(403, "denied", "upstream redirected outside the credential's base_url; "
                                        "outloop neither follows nor returns such redirects", credential,
                                        reason="redirect_off_host")
            reason = redact_text(upstream.reason, self._variants) if upstream.reason else None  # may echo a key
            child_headers = child_response_headers(upstream.raw_headers, self._variants, location)
            guarding = self.guard is not None and request.method != "HEAD"
            if guarding and self.guard is not None and self.guard.settings.responses == "deny":
                # Held back whole and scanned before the child sees a byte of it.
                data = await held_body(upstream.iter_any(), self.guard.settings.max_body)
                if data is None:
                    return outcome.fail(502, "upstream_error", "the response is larger than guard.max_body, so "
                                        "the wrong-client guard cannot check it", credential,
                                        reason=TOO_LARGE_REASON)
                found = self.guard.search(body_texts(data))
                if found is not None:
                    outcome.rule = found.rule
                    return outcome.fail(403, "denied", "the response carries an identifier that another workspace "
                                        "declared in its [guard]; outloop withheld it", credential,
                                        reason=GUARD_REASON)
                return self._answer(upstream.status, reason, child_headers, data, outcome)
            if (encoding in ("", "identity") and upstream.content_length is not None
                    and upstream.content_length <= SMALL_BODY and request.method != "HEAD"
                    and upstream.status not in (204, 304)):
                # Small and complete: read it, mask it once, answer in one write instead of three.
                data = await upstream.read()
                if guarding and self.guard is not None:
                    outcome.flag(self.guard.search(body_texts(data)))
                return self._answer(upstream.status, reason, child_headers, data, outcome)
            response = StreamResponse(status=upstream.status, reason=reason, headers=child_headers)
            if encoding in ("", "identity") and upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            outcome.prepared = response
            redactor = StreamRedactor(self._variants)
            scanner = StreamScanner(self.guard) if guarding and self.guard is not None else None
            async for chunk in upstream.iter_any():
                if scanner is not None:
                    scanner.feed(chunk)
                    outcome.flag(scanner.found)
                out = redactor.feed(chunk)
                if out:
                    await response.write(out)
                    outcome.sent += len(out)
            tail = redactor.flush()
            if tail:
                await response.write(tail)
                outcome.sent += len(tail)
            await response.write_eof()
            return response

    def _answer(self, status: int, reason: str | None, headers: CIMultiDict[str], data: bytes,
                outcome: _Outcome) -> Response:
        """A whole body, masked once and answered in one write."""
        redactor = StreamRedactor(self._variants)
        masked = redactor.feed(data) + redactor.flush()
        outcome.sent = len(masked)
        return Response(status=status, reason=reason, headers=headers, body=masked)

    async def _send(self, request: Request, credential: Credential, url: URL, headers: CIMultiDict[str],
                    body: AsyncIterator[bytes] | bytes | None) -> UpstreamResponse:
        """Send upstream; an `auth` credential authorizes the request first and, after a 401 to a replayable
        idempotent request, gets one chance to refresh and retry."""
        scheme = self._schemes.get(credential.name)
        out = Outgoing(method=request.method, url=url, headers=headers, body=body,
                       length=len(body) if isinstance(body, bytes) else request.content_length)
        if scheme is not None:
            await scheme.authorize(out)
        response = await self._request(out, credential)
        if (response.status == 401 and scheme is not None and scheme.refreshable and out.replayable
                and out.method in IDEMPOTENT_METHODS):
            response.release()
            await scheme.refresh_after_401()
            await scheme.authorize(out)
            response = await self._request(out, credential)
        return response

    async def _request(self, out: Outgoing, credential: Credential) -> UpstreamResponse:
        return await self._pool.request(out.method, out.url, headers=out.headers, data=out.body,
                                        timeout=self._timeouts[credential.name],
                                        ssl=self._upstream_tls[credential.name])

    def _protocol_error(self, method: str, target: str, status: int, exc: BaseException | None) -> Response:
        """A request the parser refused (or a broker bug): answer in the broker's format, audit it."""
        if status >= 500:
            code, reason, message = "upstream_error", "broker_error", "the broker failed on this request"
        else:
            code, reason = "bad_request", "malformed_http"
            message = f"malformed HTTP request ({type(exc).__name__ if exc else 'unparseable'})"
        record = RequestRecord(credential=None, method=short(method, 32), host=None,
                               path=short(target.partition("?")[0], MAX_AUDITED_PATH), decision="deny", reason=reason,
                               rule=None, status=status)
        try:
            self.audit.record_request(record)  # blocking but rare; the answer must not precede the audit row
        except AuditError:
            return _error_response(503, "audit_unavailable", "the audit log cannot be written", None, None)
        return _error_response(status, code, message, None, None, reason=reason)

    # ----- denials ---------------------------------------------------------------------------------------

    async def _refuse(self, request: Request, denial: Denial) -> Response:
        return await self._deny(request, denial.credential, denial.status, denial.code, denial.reason,
                                denial.message, rule=denial.rule, asked_for=denial.asked_for,
                                headers=denial.headers, path=denial.path, rule_to_child=denial.identifier is None)

    async def _deny(self, request: Request, credential: Credential | None, status: int, code: str,
                    reason: str, message: str, *, rule: str | None = None, asked_for: str | None = None,
                    headers: Mapping[str, str] | None = None, path: str | None = None,
                    rule_to_child: bool = True) -> Response:
        """Audit the refusal (committed first), count it, answer it. `path` is the upstream path when known, so
        a request is recorded under the same spelling whether it was allowed or denied. `rule_to_child` is False
        where the rule names another client (the guard's identifier rules)."""
        name = credential.name if credential else asked_for
        path = path if path is not None else request.raw_path.partition("?")[0]
        try:
            await self._audit_request(request, credential, path, "deny", reason, rule, status,
                                      credential_name=name)
        except AuditError:
            return _error_response(503, "audit_unavailable", "the audit log cannot be written", name,
                                   rule if rule_to_child else None)
        return _error_response(status, code, message, name, rule if rule_to_child else None, headers, reason=reason)

    async def _audit_request(self, request: Request, credential: Credential | None, path: str,
                             decision: str, reason: str, rule: str | None, status: int | None,
                             credential_name: str | None = None) -> int:
        record = RequestRecord(
            credential=(credential.name if credential else short(credential_name or "", 64) or None),
            method=short(request.method, 32), host=credential.host if credential else None,
            path=short(path, MAX_AUDITED_PATH), decision=decision, reason=reason, rule=rule, status=status)
        # With no other request deciding or forwarding, no other decision can share this one's commit: the audit
        # commits it on this thread, sparing two thread hand-offs (the single-client case).
        alone = not self._in_flight and not self._deciding
        self._deciding += 1
        try:
            return await self.audit.record_request_async(record, alone=alone)
        finally:
            self._deciding -= 1


@dataclass
class _Outcome:
    """What happened to one forwarded request, filled in as it goes and audited at the end."""

    started: float
    status: int = 0
    sent: int = 0
    error: str | None = None
    rule: str | None = None  # the guard's identifier rule, when it withheld or flagged the response
    flagged: Identifier | None = None
    prepared: StreamResponse | None = None
    received: list[int] = field(default_factory=lambda: [0])

    def flag(self, found: Identifier | None) -> None:
        if found is not None and self.flagged is None:
            self.flagged, self.rule = found, found.rule

    def fail(self, status: int, code: str, message: str, credential: Credential,
             request: Request | None = None, reason: str | None = None) -> Response | StreamResponse:
        """The error response, or, when the child already has headers, a cut connection."""
        self.error = reason or code
        if self.prepared is not None:
            # Too late for a clean error: cutting the connection tells the child the body is incomplete.
            if request is not None and request.transport is not None:
                request.transport.close()
            return self.prepared
        self.status = status
        return _error_response(status, code, message, credential.name, None, reason=self.error)


def _upstream_tls(credential: Credential) -> ssl.SSLContext | bool:
    """System roots, plus the credential's own `ca_file` for a private upstream; always verified."""
    if credential.ca_file is None:
        return True
    context = ssl.create_default_context()
    context.load_verify_locations(credential.ca_file)
    return context


def _authority_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 80


def _error_response(status: int, code: str, message: str, credential: str | None, rule: str | None,
                    headers: Mapping[str, str] | None = None, *, reason: str | None = None) -> Response:
    """The nested `{"error": {...}}` shape is the one OpenAI- and Anthropic-style SDKs read `message` from, so an
    agent behind an unmodified SDK learns why it was refused, not just the status. `reason` defaults to `code`."""
    reason = reason or code
    body = {"error": {"type": code, "reason": reason, "message": message, "credential": credential, "rule": rule}}
    return Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json",
        headers={"Outloop-Decision": "deny", "Outloop-Reason": reason, **(headers or {})})
