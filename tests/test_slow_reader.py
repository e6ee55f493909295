"""A client that stops reading cannot pin a connection task: ``limits.write_timeout``.

Hypercorn writes to a socket in a shielded cancel scope. Once a client that
never reads has filled its receive window and the server's send buffer, the
write (and the ASGI call behind it) would wait forever: the peer ACKs the
zero-window probes, so the kernel never gives up. ``limits.write_timeout``
is ``TCP_USER_TIMEOUT`` on the listening sockets; the kernel aborts such a
connection, the write fails and the task ends.

Time is real here (sockets); every wait is bounded, nothing asserts a duration.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import trio
from test_asgi_server import make_config, open_websocket_url, receive_json, request, running_server

from ensemble.server._serve import hypercorn_config

HANDSHAKE = (
    b"GET /ws?token=alice HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)

needs_user_timeout = pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="no TCP_USER_TIMEOUT on this platform")


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds (bound it with ``trio.fail_after``)."""
    while True:
        if predicate():
            return
        await trio.sleep(0.02)


async def read_to_the_end(stream: trio.SocketStream) -> None:
    """Read until the end of the stream (or an error)."""
    while await stream.receive_some(1 << 20):
        pass


@needs_user_timeout
def test_the_listening_sockets_have_the_write_timeout() -> None:
    option = socket.TCP_USER_TIMEOUT
    for host in ("127.0.0.1", "::1"):
        config = make_config(host=host, limits__write_timeout=2.5)
        try:
            sockets = hypercorn_config(config).create_sockets()
        except OSError:
            assert host == "::1", "no loopback address"
            continue  # no IPv6 here
        try:
            assert sockets.insecure_sockets
            for sock in sockets.insecure_sockets:
                assert sock.getsockopt(socket.IPPROTO_TCP, option) == 2500
        finally:
            for sock in sockets.insecure_sockets:
                sock.close()


@needs_user_timeout
async def test_a_client_that_never_reads_does_not_pin_its_connection_task() -> None:
    """Closed as a slow consumer (4008), its ASGI call still waits in hypercorn's
    shielded write; the kernel aborts the connection after ``write_timeout``,
    so the call ends while the client has still read nothing."""
    config = make_config(hub__outbox_max_events=20, limits__write_timeout=1.0)
    async with running_server(config) as server, open_websocket_url(server.ws_url("token=bob")) as bob:
        await receive_json(bob)
        hub, app = server.hub, server.app
        calls_before = app.websocket_calls
        # Alice's client does the handshake, then never reads a byte.
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        try:
            await stream.send_all(HANDSHAKE)
            with trio.fail_after(10):
                await wait_until(lambda: hub.is_online("alice"))
            assert app.websocket_calls == calls_before + 1
            assert app.registry.get_sample_value("ensemble_websocket_calls") == calls_before + 1
            pad = "x" * 60_000
            with trio.fail_after(30):
                while hub.is_online("alice"):
                    await hub.connections.send_to_user("alice", {"pad": pad})
                    await trio.sleep(0.001)
            assert hub.connections.statistics().slow_consumers == 1
            # The stuck write fails once the kernel aborts the connection, and the call ends.
            with trio.fail_after(30):
                await wait_until(lambda: app.websocket_calls == calls_before)
            assert (await request(bob, 1, type="ping"))["type"] == "pong"
            # It was the kernel's abort: the client reads what was delivered, then a reset.
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
                await read_to_the_end(stream)
        finally:
            await trio.aclose_forcefully(stream)
