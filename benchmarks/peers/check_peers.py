"""Check the peer servers' wire behaviour: what the load generator relies on.

For each kind (or the ones named on the command line): start
``serve_peer.py KIND`` on a free loopback port and wait for its ``ready``
line, connect 3 WebSocket clients (``websockets``' sync client; for
``socketio`` the engine.io v4 handshake by hand: ``0{...}`` open, ``40``,
``40{"sid":...}``), publish 5 messages from one client and check that all 3
receive all 5, verbatim and in order; then SIGTERM the server with the clients
still connected and check it exits with status 0.

Run: ``python benchmarks/peers/check_peers.py [KIND ...]``. Prints one line per
kind; exits with status 1 if any check fails.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from websockets.sync.client import ClientConnection, connect

KINDS = ("channels", "socketio", "starlette", "hypercorn-naive")
SERVE_PEER = Path(__file__).with_name("serve_peer.py")
CLIENTS = 3
MESSAGES = 5
TIMEOUT = 10.0


class CheckFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[str], kind: str, port: int) -> None:
    """Wait for the one ``ready KIND http://HOST:PORT`` line on the server's stdout."""
    assert proc.stdout is not None
    expected = f"ready {kind} http://127.0.0.1:{port}"
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=TIMEOUT):
            raise CheckFailed(f"no ready line within {TIMEOUT:.0f} s")
    line = proc.stdout.readline().rstrip("\n")
    if line != expected:
        raise CheckFailed(f"expected {expected!r} on stdout, got {line!r} (exit status {proc.poll()})")


def recv_text(ws: ClientConnection) -> str:
    frame = ws.recv(timeout=TIMEOUT)
    if not isinstance(frame, str):
        raise CheckFailed(f"expected a text frame, got {frame!r}")
    return frame


def url(kind: str, port: int) -> str:
    if kind == "socketio":
        return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
    return f"ws://127.0.0.1:{port}/ws?client=check"  # the query string is ignored


def handshake(kind: str, ws: ClientConnection) -> None:
    """The engine.io v4 and Socket.IO connect, by hand: ``0{...}`` open, ``40``, ``40{"sid":...}``."""
    if kind != "socketio":
        return
    opening = recv_text(ws)
    if not opening.startswith("0{") or "sid" not in json.loads(opening[1:]):
        raise CheckFailed(f"expected the engine.io open packet 0{{...}}, got {opening!r}")
    ws.send("40")
    connected = recv_text(ws)
    if not connected.startswith("40{") or "sid" not in json.loads(connected[2:]):
        raise CheckFailed(f'expected the Socket.IO connect answer 40{{"sid":...}}, got {connected!r}')


def publish(kind: str, ws: ClientConnection, text: str) -> None:
    ws.send(f'42["msg","{text}"]' if kind == "socketio" else text)


def receive(kind: str, ws: ClientConnection) -> str:
    """The next broadcast text a client receives (engine.io pings are answered on the way)."""
    while True:
        frame = recv_text(ws)
        if kind != "socketio":
            return frame
        if frame == "2":
            ws.send("3")
            continue
        prefix = '42["msg","'
        if not (frame.startswith(prefix) and frame.endswith('"]')):
            raise CheckFailed(f'expected 42["msg","<text>"], got {frame!r}')
        return frame[len(prefix) : -2]


def check(kind: str) -> str:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SERVE_PEER), kind, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        with ExitStack() as stack:
            wait_ready(proc, kind, port)
            clients = [stack.enter_context(connect(url(kind, port), open_timeout=TIMEOUT, compression=None)) for _ in range(CLIENTS)]
            for ws in clients:
                handshake(kind, ws)
            # channels and socketio subscribe a client before its handshake
            # completes; starlette and hypercorn-naive just after accepting it.
            texts = [f"check-{kind}-{i}-" + "x" * 80 for i in range(MESSAGES)]
            for text in texts:
                publish(kind, clients[0], text)
            for n, ws in enumerate(clients):
                got = [receive(kind, ws) for _ in texts]
                if got != texts:
                    raise CheckFailed(f"client {n} received {got!r}, expected {texts!r}")
            started = time.perf_counter()
            proc.send_signal(signal.SIGTERM)  # the clients are still connected
            try:
                status = proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                raise CheckFailed(f"still running {TIMEOUT:.0f} s after SIGTERM") from None
            stopped = time.perf_counter() - started
        if status != 0:
            raise CheckFailed(f"exit status {status} after SIGTERM")
        assert proc.stderr is not None
        if err := proc.stderr.read().strip():
            raise CheckFailed(f"the server wrote to stderr:\n{err}")
        return f"{kind}: ok ({CLIENTS} clients x {MESSAGES} messages, verbatim and in order; SIGTERM -> exit 0 in {stopped:.2f} s)"
    except Exception as exc:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read().strip()
        return f"{kind}: FAILED: {exc}" + (f"\n  server stderr:\n{err}" if err else "")
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def main(argv: list[str]) -> int:
    kinds = argv or list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        print(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}", file=sys.stderr)
        return 2
    failed = False
    for kind in kinds:
        line = check(kind)
        print(line, flush=True)
        failed |= ": FAILED" in line
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
