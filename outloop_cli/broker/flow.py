"""asyncio's write back-pressure (pause_writing / resume_writing) as an awaitable drain, for the broker's protocols.

A protocol that streams a body must stop writing while the socket's buffer is full, or a slow reader would make the
broker hold the whole body in memory; asyncio only calls back, so each connection keeps one waiter for it.
"""

from __future__ import annotations

import asyncio


class WriteFlow:
    """Mixed into an `asyncio.Protocol`; `start_flow` in its `__init__`, `await drained()` after each write."""

    def start_flow(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flow_loop = loop
        self._paused_writing = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail_drain(self, error: BaseException) -> None:
        """The connection is gone: a writer waiting for room gets `error` instead."""
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    async def drained(self) -> None:
        if not self._paused_writing:
            return
        self._drain_waiter = self._flow_loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None
