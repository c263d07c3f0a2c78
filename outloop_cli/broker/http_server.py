"""aiohttp's low-level server, adjusted so even requests it cannot parse get a broker answer and an audit row.

Without this, a malformed request would get aiohttp's plain-text 400 and a log line, and leave no trace in the audit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
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


class BrokerHTTPServer(web.Server):
    """A `web.Server` whose protocol reports parse failures and handler crashes to `on_error`."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 on_error: ErrorHook, **kwargs: Any) -> None:
        super().__init__(handler, access_log=None, logger=_quiet, auto_decompress=False,
                         max_field_size=16 * 1024, max_line_size=16 * 1024, **kwargs)
        self.on_error = on_error

    def __call__(self) -> RequestHandler:
        return _BrokerProtocol(self, loop=self._loop, **self._kwargs)
