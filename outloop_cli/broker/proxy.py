"""The egress proxy the child's HTTP(S)_PROXY points at: CONNECT is intercepted, tunnelled or refused.

Each connection starts in `_Front`, which reads only far enough to know what it is:
- `CONNECT` to a credential's host: answered 200, then TLS is terminated on the broker's own event loop with a
  leaf from the run's CA, and the decrypted requests go to the broker's HTTP server, whose handler judges them like
  `/v1/http/<credential>/...` (so streaming, SSE and redaction behave as they do there);
- `CONNECT` to an `egress` host: spliced to the upstream, counted, audited when it closes;
- anything else: 403 `egress_denied`, audited, closed; the target never hears of it.
Any other method is an absolute-form proxy request (`GET http://host/...`) and goes, bytes and all, to the
broker's HTTP parser, whose handler judges it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from outloop_cli.audit.writer import RequestRecord, ResponseRecord, RunLog
from outloop_cli.broker.connect import MAX_HEAD, BadConnect, head_end, is_connect, parse_connect, raw_response
from outloop_cli.broker.egress import Authority, EgressPolicy, Intercept, Refuse, Tunnel
from outloop_cli.broker.listeners import BACKLOG
from outloop_cli.broker.tunnel import Counts, TunnelRefused, connect_first, resolve_target, splice
from outloop_cli.broker.wire import ErrorHook, Handler, HttpServer, Response
from outloop_cli.errors import AuditError

if TYPE_CHECKING:  # cryptography loads only with a run that intercepts (runner makes the CA)
    from outloop_cli.broker.ca import RunCA

HANDSHAKE_TIMEOUT = 10.0
TUNNEL_CONNECT_TIMEOUT = 10.0
ErrorBody = Callable[[int, str, str, str], Response]  # (status, code, reason, message): the broker's error
# response, to be written raw


class EgressProxy:
    """One per run; `serve` adds a listener, `close` ends every tunnel and intercepted connection."""

    def __init__(self, *, policy: EgressPolicy, ca: RunCA | None, audit: RunLog,
                 intercepted: Callable[[Intercept, Authority], Handler], plain: HttpServer,
                 on_error: ErrorHook, error_body: ErrorBody) -> None:
        self.policy = policy
        self.ca = ca
        self.audit = audit
        self._intercepted = intercepted
        self._plain = plain
        self._decrypted = HttpServer(None, on_error)  # each connection with the handler of its CONNECT target
        self._error_body = error_body
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(lambda: _Front(self), sock=sock, backlog=BACKLOG))

    async def close(self, grace: float) -> None:
        for server in self._servers:
            server.close()
        await asyncio.gather(self._plain.shutdown(grace), self._decrypted.shutdown(grace))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- one connection --------------------------------------------------------------------------------

    def start(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(transport, head, rest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def hand_to_http(self, transport: asyncio.Transport, data: bytes) -> None:
        protocol = self._plain()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    async def _guarded(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        """A failure of ours ends this connection only, audited as `broker_error`, never printed (outloop's stderr
        belongs to the run summary)."""
        try:
            await self._connect(transport, head, rest)
        except Exception:
            transport.close()
            with contextlib.suppress(Exception):
                await self._record(None, "deny", "broker_error", None, None)

    async def _connect(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        try:
            parsed = parse_connect(head)
        except BadConnect as exc:
            await self._refuse(transport, None, 400, "bad_request", "malformed_connect", str(exc))
            return
        target = parsed.target
        decision = self.policy.decide(target)
        if isinstance(decision, Refuse):
            await self._refuse(transport, target, 403, "denied", decision.reason, decision.message)
        elif isinstance(decision, Intercept):
            await self._intercept(transport, target, decision, rest)
        elif isinstance(decision, Tunnel):
            await self._tunnel(transport, target, decision, rest)

    async def _refuse(self, transport: asyncio.Transport, target: Authority | None, status: int, code: str,
                      reason: str, message: str) -> None:
        """Audit first (a refusal that cannot be recorded is still a refusal, answered 503), then answer, close."""
        try:
            await self._record(target, "deny", reason, None, status)
        except AuditError:
            status, code, reason = 503, "audit_unavailable", "audit_unavailable"
            message = "the audit log cannot be written"
        self._answer(transport, status, code, reason, message)

    def _answer(self, transport: asyncio.Transport, status: int, code: str, reason: str, message: str) -> None:
        """The broker's error response, written raw (there is no HTTP server on this connection yet), then close."""
        response = self._error_body(status, code, reason, message)
        assert isinstance(response.body, bytes)
        headers = [(name, value) for name, value in response.headers.items() if name.lower() != "content-length"]
        with contextlib.suppress(Exception):
            transport.write(raw_response(status, headers, response.body))
            transport.close()

    async def _record(self, target: Authority | None, decision: str, reason: str, rule: str | None,
                      status: int | None) -> int:
        # The path column holds the request-target, which for CONNECT is the authority: `audit show` lists it.
        authority = str(target) if target else None
        return await self.audit.record_request_async(RequestRecord(
            credential=None, method="CONNECT", host=authority, path=authority or "",
            decision=decision, reason=reason, rule=rule, status=status))

    async def _intercept(self, transport: asyncio.Transport, target: Authority, decision: Intercept,
                         rest: bytes) -> None:
        if self.ca is None or target.host not in self.ca.names:  # the policy and the CA come from the same hosts
            await self._refuse(transport, target, 403, "denied", "egress_denied", f"{target} cannot be intercepted")
            return
        if rest:
            # Bytes before our 200 would be a ClientHello sent blind, or a request smuggled behind the CONNECT.
            await self._refuse(transport, target, 400, "bad_request", "data_before_connect_reply",
                               "wait for the proxy's 200 before starting TLS")
            return
        protocol = self._decrypted.connection(self._intercepted(decision, target))
        loop = asyncio.get_running_loop()
        transport.write(raw_response(200))
        try:
            tls = await loop.start_tls(transport, protocol, self.ca.server_context(target.host), server_side=True,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            # A wrong SNI, no TLS at all, or a client that does not trust the run's CA: nothing was forwarded.
            transport.close()
            with contextlib.suppress(AuditError):
                await self._record(target, "deny", "tls_handshake_failed", None, None)
            return
        if tls is None:
            transport.close()
            return
        protocol.connection_made(tls)

    async def _tunnel(self, transport: asyncio.Transport, target: Authority, decision: Tunnel, rest: bytes) -> None:
        try:
            addresses = await resolve_target(target, self.policy.credential_authorities())
        except TunnelRefused as exc:
            await self._refuse(transport, target, 403, "denied", exc.reason, exc.message)
            return
        try:
            seq = await self._record(target, "allow", "egress_tunnel", decision.rule.text, None)
        except AuditError:
            await self._refuse(transport, target, 503, "audit_unavailable", "audit_unavailable",
                               "the audit log cannot be written; refusing to tunnel (fail closed)")
            return
        started = time.perf_counter()
        counts = Counts()
        error: str | None = None
        status = 200
        try:
            try:
                upstream = await connect_first(addresses, target.port, TUNNEL_CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                status, error = 502, "upstream_error"
                self._answer(transport, 502, "upstream_error", "upstream_error", f"cannot reach {target}")
                return
            transport.write(raw_response(200))
            await splice(_streams(transport, rest), upstream, counts)
        except asyncio.CancelledError:
            error = "run_ended"
            raise
        finally:
            transport.close()
            self.audit.record_response(ResponseRecord(
                request_seq=seq, status=status, latency_ms=(time.perf_counter() - started) * 1000,
                bytes_in=counts.up, bytes_out=counts.down, error=error))


class _Front(asyncio.Protocol):
    """Reads the first bytes of a proxy connection, then gives the connection to whoever handles its kind."""

    def __init__(self, proxy: EgressProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are Transports without subclassing them

    def data_received(self, data: bytes) -> None:
        if self.handed_over or self.transport is None:
            return
        self.buffer += data
        prefix = bytes(self.buffer[:8])
        if not b"CONNECT ".startswith(prefix) and not is_connect(prefix):
            self.handed_over = True
            self.proxy.hand_to_http(self.transport, bytes(self.buffer))
            return
        end = head_end(bytes(self.buffer))
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self.handed_over = True
                self.transport.pause_reading()
                self.proxy.start(self.transport, b"", b"")  # refused as an incomplete head
            return
        self.handed_over = True
        self.transport.pause_reading()
        self.proxy.start(self.transport, bytes(self.buffer[:end]), bytes(self.buffer[end:]))


def _streams(transport: asyncio.Transport, rest: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The child's side of a tunnel as streams, with whatever it sent right after the CONNECT head."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if rest:
        reader.feed_data(rest)
    transport.resume_reading()
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
