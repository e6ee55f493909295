"""The transport benchmarks' peer servers: what a Python user would pick instead of Ensemble.

Each peer is the idiomatic "broadcast to everyone in one room" server for its
library, as a competent user would write it: neither sabotaged nor tuned beyond
normal practice. Every connected client is subscribed; any text a client sends
is broadcast verbatim to every connected client, the sender included.

Kinds:

``channels``
    Django Channels 4, ``AsyncWebsocketConsumer`` at ``/ws`` on the in-memory
    channel layer (``group_add`` / ``group_send``), on uvicorn.
``socketio``
    python-socketio 5, ``AsyncServer(async_mode="asgi")`` in ``socketio.ASGIApp``
    on uvicorn; clients join room ``bench`` and publish with event ``msg``
    (engine.io v4 over WebSocket at ``/socket.io/?EIO=4&transport=websocket``).
``starlette``
    A Starlette WebSocket endpoint at ``/ws`` on uvicorn: a module-level set of
    sockets and a naive ``for ws in list(clients): await ws.send_text(text)``.
``hypercorn-naive``
    A raw ASGI 3 app (no framework) at ``/ws`` on hypercorn's trio worker:
    a set of the connections' ``send`` callables and the same naive loop.

Run: ``python benchmarks/peers/serve_peer.py KIND [--host 127.0.0.1] [--port 8000]``.
It prints exactly one line, ``ready KIND http://HOST:PORT``, once the server
accepts connections, and runs in the foreground until SIGTERM or SIGINT, after
which it exits with status 0. The peer libraries are imported only for the
chosen kind; they come with the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

KINDS = ("channels", "socketio", "starlette", "hypercorn-naive")

GROUP = "bench"
"""The one room (channel-layer group, Socket.IO room) every client is in."""

BACKLOG = 4096
"""The listen backlog for every peer (as Ensemble's own transports): a 1,000-client connect burst must not overflow it."""

GRACEFUL_SHUTDOWN_S = 3
"""How long a peer waits for open connections on SIGTERM before it closes them (hypercorn's default)."""

urlpatterns: list[Any] = []
"""Django's ``ROOT_URLCONF`` for the ``channels`` peer (this module): no HTTP views, every HTTP path is a 404."""


def _ready(kind: str, host: str, port: int) -> None:
    print(f"ready {kind} http://{host}:{port}", flush=True)


def _missing(exc: ImportError) -> NoReturn:
    sys.exit(f"serve_peer: {exc}; the peer servers need the bench extra: pip install -e '.[bench]'")


# -- uvicorn (channels, socketio, starlette) ----------------------------------------------


def _run_uvicorn(kind: str, app: Any, host: str, port: int) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        """``uvicorn.Server`` that announces readiness once its sockets listen."""

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if _stop_requested:  # SIGTERM/SIGINT came before uvicorn listened for it
                self.should_exit = True
            if not self.should_exit:
                _ready(kind, host, port)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        # The WebSocket implementation: websockets' Sans-I/O protocol, which is
        # uvicorn's own default ("auto") when websockets is installed (since
        # uvicorn 0.50). ws="websockets" selects the legacy websockets protocol,
        # which uvicorn deprecates (it warns on import); wsproto is slower.
        ws="websockets-sansio",
        # The event loop and HTTP parser stay uvicorn's "auto": uvloop and
        # httptools, which `uvicorn[standard]` (the documented install) brings.
        loop="auto",
        http="auto",
        lifespan="auto",
        backlog=BACKLOG,
        # No protocol-level keepalive pings (uvicorn's default is every 20 s with
        # a 20 s deadline): hypercorn's default, and Ensemble's transports, send
        # none, and a pong delayed by a saturated load generator must not drop
        # idle clients in the memory scenario. (The socketio peer still has
        # engine.io's own heartbeat, set far apart below.)
        ws_ping_interval=None,
        ws_ping_timeout=None,
        timeout_keep_alive=300,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    Server(config).run()


_stop_requested = False


def _request_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def _capture_stop_signals() -> None:
    """Record SIGINT/SIGTERM instead of dying of them (the uvicorn peers).

    uvicorn captures both while it serves and, after its graceful shutdown,
    raises the captured signal again under the handler that was installed
    before it. Python's default handlers would turn that clean stop into
    KeyboardInterrupt or death by SIGTERM; this one lets the process exit 0.
    It is installed before the app is built, so an early signal is not lost.
    """
    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)


def _channels_app() -> Any:
    import django  # type: ignore[import-untyped]
    from django.conf import settings  # type: ignore[import-untyped]

    settings.configure(
        DEBUG=False,
        SECRET_KEY="ensemble-benchmark-peer",  # only to satisfy Django: no sessions, no signing
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=["channels"],
        DATABASES={},
        ROOT_URLCONF=__name__,
        CHANNEL_LAYERS={
            "default": {
                "BACKEND": "channels.layers.InMemoryChannelLayer",
                "CONFIG": {
                    # The in-memory layer holds at most `capacity` (default 100)
                    # undelivered messages per channel and silently drops the rest
                    # on a group_send (ChannelFull is swallowed). A 1,000-message
                    # burst must not be cut at 100, so room for 10,000. `expiry`
                    # (a queued message's life, 60 s) stays the default.
                    "capacity": 10_000,
                },
            }
        },
    )
    django.setup()

    from channels.generic.websocket import AsyncWebsocketConsumer  # type: ignore[import-untyped]
    from channels.routing import ProtocolTypeRouter, URLRouter  # type: ignore[import-untyped]
    from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]
    from django.urls import path  # type: ignore[import-untyped]

    class BroadcastConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
        async def connect(self) -> None:
            await self.channel_layer.group_add(GROUP, self.channel_name)
            await self.accept()

        async def disconnect(self, code: int) -> None:
            await self.channel_layer.group_discard(GROUP, self.channel_name)

        async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
            if text_data is not None:
                await self.channel_layer.group_send(GROUP, {"type": "broadcast", "text": text_data})

        async def broadcast(self, event: dict[str, Any]) -> None:
            await self.send(text_data=event["text"])

    return ProtocolTypeRouter(
        {
            "http": get_asgi_application(),
            "websocket": URLRouter([path("ws", BroadcastConsumer.as_asgi())]),
        }
    )


def _socketio_app() -> Any:
    import socketio  # type: ignore[import-untyped]

    sio = socketio.AsyncServer(
        async_mode="asgi",
        # engine.io's heartbeat (defaults: a ping every 25 s, 20 s to answer):
        # far apart, so that idle clients of the memory scenario, whose pongs a
        # busy load generator may delay, are not dropped.
        ping_interval=300,
        ping_timeout=300,
        # The load generator may send any Origin (or none); engine.io's default
        # is to reject an Origin other than the Host.
        cors_allowed_origins="*",
    )

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        await sio.enter_room(sid, GROUP)

    @sio.on("msg")  # type: ignore[untyped-decorator]
    async def msg(sid: str, data: Any) -> None:
        await sio.emit("msg", data, room=GROUP)

    return socketio.ASGIApp(sio)


def _starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    clients: set[WebSocket] = set()

    async def broadcast(websocket: WebSocket) -> None:
        await websocket.accept()
        clients.add(websocket)
        try:
            while True:
                text = await websocket.receive_text()
                for ws in list(clients):
                    try:
                        await ws.send_text(text)
                    except (WebSocketDisconnect, RuntimeError):  # closed meanwhile
                        clients.discard(ws)
        except WebSocketDisconnect:
            pass
        finally:
            clients.discard(websocket)

    return Starlette(routes=[WebSocketRoute("/ws", broadcast)])


# -- hypercorn (trio worker) ---------------------------------------------------------------


Send = Callable[[dict[str, Any]], Any]
Receive = Callable[[], Any]


def _hypercorn_app() -> Any:
    clients: set[Send] = set()

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"not found"})
            return
        message = await receive()  # websocket.connect
        if scope["path"] != "/ws":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        clients.add(send)
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    continue
                for peer in list(clients):
                    try:
                        await peer({"type": "websocket.send", "text": text})
                    except Exception:  # a connection that closed meanwhile
                        clients.discard(peer)
        finally:
            clients.discard(send)

    return app


def _run_hypercorn(kind: str, app: Any, host: str, port: int) -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.backlog = BACKLOG  # hypercorn's default is 100
    config.websocket_ping_interval = None  # hypercorn's default: no keepalive pings
    config.keep_alive_timeout = 300
    config.graceful_timeout = GRACEFUL_SHUTDOWN_S
    config.accesslog = None
    config.loglevel = "WARNING"  # as the uvicorn peers' log_level: errors still reach stderr

    async def main() -> None:
        stop = trio.Event()

        async def shutdown_trigger() -> None:
            await stop.wait()

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status))
                _ready(kind, host, port)
                async for _ in signals:
                    stop.set()
                    break

    trio.run(main)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one of the transport benchmarks' peer servers.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    if args.kind == "hypercorn-naive":
        try:
            import hypercorn.trio  # noqa: F401  (a clear message if the install is broken; it is a runtime dependency)
        except ImportError as exc:
            _missing(exc)
        _run_hypercorn(args.kind, _hypercorn_app(), args.host, args.port)
        return
    factory = {"channels": _channels_app, "socketio": _socketio_app, "starlette": _starlette_app}[args.kind]
    _capture_stop_signals()
    try:
        import uvicorn  # noqa: F401

        app = factory()
    except ImportError as exc:
        _missing(exc)
    _run_uvicorn(args.kind, app, args.host, args.port)


if __name__ == "__main__":
    main()
