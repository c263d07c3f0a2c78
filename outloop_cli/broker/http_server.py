"""aiohttp's low-level server, adjusted so even requests it cannot parse get a broker answer and an audit row.

Without this, a malformed request would get aiohttp's plain-text 400 and a log line, and leave no trace in the audit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestHandler

ErrorHook = Callable[[web.BaseRequest, int, BaseException | None], web.StreamResponse]

# aiohttp logs handler errors at ERROR; with no logging configured Python would print them to outloop's stderr.
_quiet = logging.getLogger("outloop.broker.http")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


class _BrokerProtocol(RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        manager = self._manager
        if request.writer.output_size > 0 or not isinstance(manager, BrokerHTTPServer):
            return super().handle_error(request, status, exc, message)
        response = manager.on_error(request, status, exc)
        response.force_close()
        return response


MAX_LINE_SIZE = 16 * 1024
MAX_FIELD_SIZE = 16 * 1024


_SPOKEN_VERSIONS = (HttpVersion10, HttpVersion11)


class BrokerHTTPServer(web.Server):
    """A `web.Server` whose protocol reports parse failures and handler crashes to `on_error`."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 on_error: ErrorHook, **kwargs: Any) -> None:
        super().__init__(self._spoken_only(handler), access_log=None, logger=_quiet, auto_decompress=False,
                         max_field_size=MAX_FIELD_SIZE, max_line_size=MAX_LINE_SIZE, **kwargs)
        self.on_error = on_error

    def _spoken_only(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
                     ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """llhttp reads `GET /path` with no version as an HTTP/0.9 request: a request without headers whose
        answer has no framing. The broker speaks 1.0 and 1.1 only, so anything else is malformed, like a line the
        parser refuses (whether the next request arrived in the same read decided which of the two it was)."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            if request.version in _SPOKEN_VERSIONS:
                return await handler(request)
            major, minor = request.version
            response = self.on_error(request, 400, BadHttpMessage(f"HTTP/{major}.{minor} is not spoken here"))
            response.force_close()
            return response

        return handle

    def __call__(self) -> RequestHandler:
        return _BrokerProtocol(self, loop=self._loop, **self._kwargs)


def parse_request_line(method: str, target: str) -> tuple[str, str] | None:
    """What the broker's own HTTP parser makes of `METHOD TARGET HTTP/1.1`: (method, raw target), or None where it
    refuses the line (the broker answers those 400 `malformed_http`).

    `outloop policy test` goes through this, so a method or target the parser rejects is judged as a run would.
    """
    import asyncio

    from aiohttp.http_exceptions import HttpProcessingError
    from aiohttp.http_parser import HttpRequestParser

    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(cast(Any, _Unread()), loop, 2 ** 16, max_line_size=MAX_LINE_SIZE,
                                   max_field_size=MAX_FIELD_SIZE)
        line = f"{method} {target} HTTP/1.1\r\nHost: broker\r\n\r\n".encode("utf-8", "surrogateescape")
        messages, _, _ = parser.feed_data(line)
    except HttpProcessingError:
        return None
    finally:
        loop.close()
    message = messages[0][0]
    return str(message.method), str(message.path)


class _Unread:
    """Stands in for the connection: the parser asks it to pause or resume reading a body nobody reads here."""

    def pause_reading(self, *args: Any, **kwargs: Any) -> None:
        pass

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        pass
