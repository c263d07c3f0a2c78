"""The relay's listener hand-over, on real sockets: the broker takes exactly one connection on the hand-over socket,
and serves what it carries only if that is one TCP listener on the expected 127.0.0.1 port from the run's tree.

The sender here is `relay_start.hand_over` itself, the code the relay runs inside the sandbox.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from outloop_cli.broker.listeners import HandOverRefused, bind_unix, take_over
from outloop_cli.runner import _event_loop_factory
from outloop_cli.sandbox.relay_start import hand_over, listen


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _send_raw(path: Path, descriptors: list[int]) -> None:
    with socket.socket(socket.AF_UNIX) as channel:
        channel.connect(str(path))
        channel.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", descriptors))])


def _take(path: Path, port: int, send: Callable[[], None], in_run: Callable[[int], bool] = lambda pid: True
          ) -> socket.socket:
    async def main() -> socket.socket:
        channel = bind_unix(path)
        send()
        return await take_over(channel, port, in_run)

    return asyncio.run(main())


def test_the_relays_listener_arrives_and_serves(tmp_path: Path) -> None:
    path, port = tmp_path / "hand.sock", _free_port()
    listener = _take(path, port, lambda: hand_over(listen(port), str(path)))
    with listener:
        assert listener.getsockname() == ("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            accepted, _ = listener.accept()  # the broker's copy is the only one: the relay closed its own
            accepted.close()
    assert not path.exists()  # one connection, then the socket is gone


def test_the_listener_taken_over_is_close_on_exec(tmp_path: Path) -> None:
    """Like every descriptor outloop holds (PEP 446, which the supervisor's fd hygiene counts on): nothing outloop
    starts may inherit a listener of the loop's namespace, whatever way it is started."""
    path, port = tmp_path / "hand.sock", _free_port()
    with _take(path, port, lambda: hand_over(listen(port), str(path))) as listener:
        assert not os.get_inheritable(listener.fileno())


def test_a_hand_over_that_never_comes_is_cancelled_with_the_run(tmp_path: Path) -> None:
    """The relay died before connecting (or never started): closing the broker cancels the wait, on the event loop
    the broker runs on, and leaves neither the socket nor its file behind."""
    path = tmp_path / "hand.sock"

    async def main() -> socket.socket:
        channel = bind_unix(path)
        waiting = asyncio.ensure_future(take_over(channel, _free_port(), lambda pid: True))
        await asyncio.sleep(0)  # let it start waiting for the connection
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return channel

    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        channel = runner.run(main())
    assert channel.fileno() == -1 and not path.exists()


def test_a_second_connection_is_never_read(tmp_path: Path) -> None:
    path, port = tmp_path / "hand.sock", _free_port()
    planted = socket.create_server(("127.0.0.1", 0))

    def relay_then_plant() -> None:
        hand_over(listen(port), str(path))
        _send_raw(path, [planted.fileno()])  # queued behind the relay: cut off when the broker closes the socket

    with planted, _take(path, port, relay_then_plant) as listener:
        assert listener.getsockname() == ("127.0.0.1", port)


@pytest.mark.parametrize("what", ["two listeners", "wrong port", "udp", "not listening", "nothing"])
def test_anything_but_one_listener_on_the_expected_address_is_refused(tmp_path: Path, what: str) -> None:
    path, port = tmp_path / "hand.sock", _free_port()
    made: list[socket.socket] = []

    def send() -> None:
        if what == "two listeners":
            made.extend([socket.create_server(("127.0.0.1", port)), socket.create_server(("127.0.0.1", 0))])
        elif what == "wrong port":
            made.append(socket.create_server(("127.0.0.1", 0)))
        elif what == "udp":
            made.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            made[0].bind(("127.0.0.1", port))
        elif what == "not listening":
            made.append(socket.socket())
            made[0].bind(("127.0.0.1", port))
        if what == "nothing":
            with socket.socket(socket.AF_UNIX) as channel:
                channel.connect(str(path))
                channel.sendall(b"L")
        else:
            _send_raw(path, [sock.fileno() for sock in made])

    try:
        with pytest.raises(HandOverRefused, match="not one listener"):
            _take(path, port, send)
    finally:
        for sock in made:
            sock.close()


@pytest.mark.parametrize("with_listener", [False, True])
def test_a_descriptor_that_is_no_socket_is_refused_and_closed(tmp_path: Path, with_listener: bool) -> None:
    path, port = tmp_path / "hand.sock", _free_port()
    read_end, write_end = os.pipe()
    listener = socket.create_server(("127.0.0.1", port))
    try:
        with pytest.raises(HandOverRefused, match="not one listener"):
            _take(path, port, lambda: _send_raw(path, [read_end, *([listener.fileno()] if with_listener else [])]))
        os.close(read_end)
        with pytest.raises(BrokenPipeError):  # no read end is left anywhere: the broker closed what it received
            os.write(write_end, b"x")
    finally:
        os.close(write_end)
        listener.close()


def test_a_sender_outside_the_run_is_dropped_and_the_relay_still_gets_through(tmp_path: Path) -> None:
    """Another process of the operator's that reaches the socket first can neither plant a listener nor knock
    the run's out: its connection is dropped unread, and the relay's, queued behind it, is served."""
    path, port = tmp_path / "hand.sock", _free_port()
    planted = socket.create_server(("127.0.0.1", 0))
    asked: list[int] = []

    def in_run(pid: int) -> bool:  # the first sender plays the outsider (SO_PEERCRED names this process for both)
        asked.append(pid)
        return len(asked) > 1

    def outsider_then_relay() -> None:
        _send_raw(path, [planted.fileno()])
        hand_over(listen(port), str(path))

    with planted, _take(path, port, outsider_then_relay, in_run) as listener:
        assert listener.getsockname() == ("127.0.0.1", port)
    assert asked == [os.getpid(), os.getpid()]
