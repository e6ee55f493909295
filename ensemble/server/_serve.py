"""``ensemble serve``: hypercorn's trio worker, run programmatically.

:func:`serve` builds the ASGI app (:func:`ensemble.transport._asgi.create_app`;
this module is the composition root, the one place of ``ensemble.server``
that knows a transport, imported when ``serve`` runs), configures hypercorn
from the :class:`ServerConfig` and runs it until SIGTERM or SIGINT (or the
``shutdown_trigger``).

A graceful shutdown, within ``config.shutdown_timeout`` (T):

1. the app stops accepting (``/readyz`` answers 503, a new WebSocket is
   closed with 1001) and closes its clients with 1001 (at most T/2);
2. hypercorn stops listening and waits for the connections to end (at most
   T/4; they are closed already, so this is quick);
3. the lifespan ends: the hub closes whatever is left and stops its actors
   in reverse start order (at most T/4).

A second signal cancels whatever is left at once.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from hypercorn.config import Config as HypercornConfig, Sockets

from ._config import ServerConfig

if TYPE_CHECKING:
    from ..transport._asgi import EnsembleApp

logger = logging.getLogger("ensemble.server")

MIN_BACKLOG: Final = 1024
"""The smallest listen backlog (reconnect storms; the kernel caps it at somaxconn)."""
ACCESS_LOG_FORMAT: Final = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'
"""Hypercorn's access log line: ``%(r)s`` is the path without the query
string, so a ``?token=`` never reaches the log."""
_MAX_USER_TIMEOUT_MS: Final = 2**31 - 1


@attrs.frozen(kw_only=True)
class Listening:
    """Where :func:`serve` listens (given to ``task_status.started``).

    Attributes:
        urls: Hypercorn's bound addresses (``http://127.0.0.1:8000``).
        host: The host of the first.
        port: The port of the first (the real one when ``config.port`` is 0).
    """

    urls: tuple[str, ...]
    host: str
    port: int

    @classmethod
    def from_urls(cls, urls: list[str]) -> Listening:
        """Parse hypercorn's bound addresses."""
        first = urls[0].split("://", 1)[-1]
        host, _, port = first.rpartition(":")
        return cls(urls=tuple(urls), host=host.strip("[]"), port=int(port))


def set_write_timeout(sock: socket.socket, seconds: float) -> bool:
    """Set ``TCP_USER_TIMEOUT`` on a TCP socket: how long written data may stay
    unacknowledged before the kernel aborts the connection.

    On a listening socket it is inherited by every accepted connection
    (Linux copies the listener's options into the new socket). It bounds the
    retransmissions to a vanished peer and, on current Linux kernels, the
    zero-window probes to a peer that stopped reading (its probes are ACKed,
    so without it the kernel never gives up): the pending write then fails
    (``ETIMEDOUT``) instead of waiting forever. It needs no keepalive
    (hypercorn does not turn keepalive on), and an idle connection (nothing
    in flight) is never affected.

    Args:
        sock: The socket (anything but an IPv4 or IPv6 stream socket is left
            alone).
        seconds: The timeout (rounded up to whole milliseconds).

    Returns:
        Whether the option was set (``False`` where the platform lacks it).
    """
    option: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return False
    if option is None:
        logger.debug("TCP_USER_TIMEOUT is not available on this platform: limits.write_timeout is not applied")
        return False
    milliseconds = min(max(1, math.ceil(seconds * 1000)), _MAX_USER_TIMEOUT_MS)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, milliseconds)
    except OSError as exc:
        logger.debug("TCP_USER_TIMEOUT cannot be set here (%s): limits.write_timeout is not applied", exc)
        return False
    return True


class _Config(HypercornConfig):
    """Hypercorn's configuration, with ``TCP_USER_TIMEOUT`` on its listening sockets.

    Attributes:
        write_timeout: Seconds (``limits.write_timeout``), or ``None`` to
            leave the sockets as hypercorn makes them.
    """

    write_timeout: float | None = None

    def create_sockets(self) -> Sockets:
        """Hypercorn's sockets, with the write timeout set on the TCP ones."""
        sockets = super().create_sockets()
        if self.write_timeout is not None:
            for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
                set_write_timeout(sock, self.write_timeout)
        return sockets


def hypercorn_config(config: ServerConfig) -> HypercornConfig:
    """Hypercorn's configuration for an Ensemble server.

    The limits that protect the handshake live in hypercorn: the handshake's
    bytes (``h11_max_incomplete_size``), its time (``keep_alive_timeout``:
    a connection that has not sent a whole request by then is closed) and
    the largest WebSocket message (``websocket_max_message_size``: 1009
    beyond). WebSocket-level pings are off (the server's heartbeat pings in
    the protocol instead).

    Hypercorn writes to a socket in a shielded cancel scope, so a client
    that stops reading would hold its connection task forever once the
    buffers are full: ``limits.write_timeout`` becomes ``TCP_USER_TIMEOUT``
    on the listening sockets (:func:`set_write_timeout`), and the kernel
    aborts such a connection, which ends the write and the task.
    """
    hyper = _Config()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hyper.bind = [f"{host}:{config.port}"]
    limits = config.limits
    hyper.backlog = max(MIN_BACKLOG, min(limits.max_connections, 65535))
    hyper.websocket_max_message_size = limits.max_message_size
    hyper.h11_max_incomplete_size = limits.max_handshake_bytes
    hyper.write_timeout = limits.write_timeout
    hyper.keep_alive_timeout = limits.handshake_timeout
    hyper.websocket_ping_interval = None
    hyper.graceful_timeout = config.shutdown_timeout / 4
    hyper.shutdown_timeout = config.shutdown_timeout / 4
    if config.tls_certfile is not None:
        hyper.certfile = config.tls_certfile
        hyper.keyfile = config.tls_keyfile
    hyper.accesslog = logging.getLogger("hypercorn.access")
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.access_log_format = ACCESS_LOG_FORMAT
    return hyper


async def serve(
    config: ServerConfig,
    *,
    authenticator: Any = None,
    app: EnsembleApp | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an Ensemble server until a shutdown is asked for, then stop gracefully.

    Args:
        config: The configuration (``config.transport``: ``"hypercorn"``,
            the ASGI app under hypercorn's trio worker, or ``"native"``,
            WebSocket directly on trio streams).
        authenticator: An authenticator or function passed in code (see
            ``ensemble.server._auth.build_authenticator``).
        app: An app built already (default: ``create_app(config,
            authenticator=authenticator)``).
        shutdown_trigger: Awaited; when it returns the server shuts down
            (as on SIGTERM).
        handle_signals: Shut down on SIGTERM and SIGINT (only in the main
            thread).
        task_status: Given a :class:`Listening` once the server listens
            (``await nursery.start(serve, config)`` with ``port=0``).

    Raises:
        ValueError: The authentication configuration is not usable.
        OSError: The address cannot be bound.
    """
    from hypercorn.trio import serve as hypercorn_serve

    from ..transport._asgi import create_app
    from ..transport._native import serve_native

    if app is None:
        app = create_app(config, authenticator=authenticator)
    shutdown = trio.Event()
    timeout = config.shutdown_timeout

    async with trio.open_nursery() as nursery:
        if shutdown_trigger is not None:

            async def external() -> None:
                await shutdown_trigger()
                shutdown.set()

            nursery.start_soon(external)
        if handle_signals and threading.current_thread() is threading.main_thread():
            await nursery.start(_watch_signals, shutdown, nursery.cancel_scope)

        async def trigger() -> None:
            await shutdown.wait()
            logger.info("shutting down: closing clients with 1001 (within %.1f s)", timeout)
            # Everything must be over within the timeout (plus a little slack).
            nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline, trio.current_time() + timeout + 1.0)
            with trio.move_on_after(timeout / 2):
                await app.drain()

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                if config.transport == "native":
                    await serve_native(app, shutdown_trigger=trigger, task_status=task_status)
                else:
                    await hypercorn_serve(app, hypercorn_config(config), shutdown_trigger=trigger, task_status=task_status)  # type: ignore[arg-type]
            finally:
                nursery.cancel_scope.cancel()

        urls = await nursery.start(run)
        listening = Listening.from_urls(urls)
        logger.info("Ensemble listening on %s (WebSocket at /ws)", ", ".join(listening.urls))
        task_status.started(listening)
    logger.info("Ensemble stopped")


async def _watch_signals(
    shutdown: trio.Event,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            if shutdown.is_set():
                logger.warning("%s again: stopping now", signal.Signals(signum).name)
                scope.cancel()
                return
            logger.info("%s received: shutting down gracefully", signal.Signals(signum).name)
            shutdown.set()
