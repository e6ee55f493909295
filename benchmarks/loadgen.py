"""A WebSocket load generator cheap enough not to be the bottleneck on the server's machine.

Several worker processes each drive many client connections with plain
non-blocking sockets and ``select.epoll``: no asyncio, no trio and no
WebSocket library in the hot path. The client handshake is written by hand
(HTTP upgrade, a random ``Sec-WebSocket-Key``, the ``101`` and its
``Sec-WebSocket-Accept`` checked), client frames are masked (RFC 6455), and
server frames are parsed from each connection's bytes by a tight loop over
their headers (7, 16 and 64-bit lengths; ping answered with pong; close
recorded with its code and reason; fragmented messages reassembled).

Counting is cheap: every published payload starts with a marker that cannot
appear in a frame header, followed by the publish time and a sequence number
(``@LoadGen#T<monotonic_ns:019d>S<seq:09d>xxx...``, 100 bytes by default). A run of
ordinary text frames is counted with one ``bytes.count`` of the marker (every
delivery is counted exactly, batched frames too); the latency (receive time
minus the embedded time, both ``time.monotonic_ns``, one clock for every
process of the machine) is computed for every delivery of runs under 200,000
deliveries, else for 1 in 4, or fewer so that about 100,000 are kept (1 in 10
for a million deliveries; a systematic sample; ``--sample`` overrides). No
frame is JSON-decoded once a client is ready.

Wire adapters (``--kind``):

* ``ensemble``: ``/ws?token=u<i>`` (development mode: the token is the
  guest's user id), waits for ``welcome``, joins the room (``join``, ref 1),
  ready on its ``reply``; publishes with ``send`` commands (their replies are
  not waited for); answers the server's ``{"type":"ping"}`` heartbeat.
  ``--batch`` also asks for batched frames (``options``).
* ``plain`` (starlette, hypercorn-naive, channels peers): ``/ws``, ready after
  the handshake; the payload is published as a text frame and broadcast.
* ``socketio``: ``/socket.io/?EIO=4&transport=websocket``; ``40`` after the
  server's ``0{...}``, ready on ``40{...}``; pings ``2`` answered ``3``;
  publishes ``42["msg","<payload>"]``.

Scenarios (the server is already running; ``--server-pid`` adds its CPU from
``/proc/<pid>/stat``):

* ``fanout``: N clients get ready (setup rate), one publisher writes K
  messages as fast as the server takes them (pipelined); deliveries/s from
  the first publish to the last client's K-th delivery, latency, the
  generator's and the server's CPU per delivery.
* ``openloop``: a publisher at a fixed rate R for D seconds; latency is
  measured from each message's *scheduled* time (no coordinated omission).
* ``idle``: N idle clients (not joined); prints ``connected N`` once they are
  open and holds them until stdin closes, or for ``--hold`` seconds, so that
  an orchestrator can sample the server's memory meanwhile.
* ``slow``: a baseline fanout of N - 1 clients, then one more client that
  stops reading once ready (``SO_RCVBUF`` 4096) and K more messages: the
  others' latency against the baseline, and the slow client's fate (closed,
  with which code, or still open).
* ``echo``: one connection, M sequential round trips (ensemble: ``ping`` with
  a ref; the others: a message broadcast back to its only client).

Server settings a benchmark of Ensemble must lift (TOML, as in
``benchmarks/bench_hypercorn.py``), or the server refuses or throttles the
load and the run times out with a partial result:

* ``[hub.room] rate_limit = 0`` (the per-user limit: 30 messages per minute)
  and ``max_members`` above the clients (default 100);
* ``[hub.rate_limit]`` ``messages_per_second``, ``messages_per_minute`` and
  ``burst_size`` (every connection's inbound limit: 10/s, 120/min, burst 20;
  the publisher's sends and echo's pings count), or the publisher is refused
  and, after ``max_rate_violations``, closed with 4029;
* ``[limits] max_connections`` (default 10,000) above the clients (each
  client is its own user, ``u<i>``, so ``max_connections_per_user`` holds);
* ``[hub] outbox_max_events`` (default 1,000) and ``outbox_max_bytes`` (1 MiB)
  above one burst (K plus the join traffic), except in ``slow``, where the
  defaults are what closes the slow client (4008) once K exceeds them (K =
  3,000 with 100 clients did, and no fast client was closed);
* ``[heartbeat] interval``/``timeout``: for long setups (the N joins make
  N²/2 member events) the default 20 + 20 s may close busy clients.

Reading a result: ``generator.us_per_delivery`` is each worker's CPU time
(user + system, from arming to its last client's K-th delivery) per delivery,
and ``generator.deliveries_per_read`` how many deliveries one ``recv``
brought. When the server writes many frames at once (Ensemble's native
transport: about 170 per read at 1,000 clients) a delivery costs the
generator 0.35 µs (100-byte frames) to 0.7 µs (Ensemble's ~450-byte message
events). When it writes one frame per syscall, each delivery costs one
``recv`` and one wake-up, 8-15 µs (two thirds of it in the kernel), but then
such a server delivers fewer messages per second than the generator could
read: compare the generator's CPU with the server's (``server``). ``--tick``
(seconds between a worker's polls while counting) trades latency resolution
for fewer wake-ups; it helps little at 1,000 clients, since each client
receives few messages per tick.

Run: ``python benchmarks/loadgen.py fanout --kind ensemble --url ws://127.0.0.1:8000
[--clients 1000] [--messages 100] [--workers 2] [--server-pid PID] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import attrs
from _common import machine_info, write_json

KINDS = ("ensemble", "plain", "socketio")
SCENARIOS = ("fanout", "openloop", "idle", "slow", "echo")

MARKER = b"@LoadGen#"
"""Starts every published payload. Printable and without a border (no prefix of
it is also a suffix), it never occurs in, or across, a frame header; long, so
that ``bytes.count`` skips quickly over the rest of a frame."""
_ENSEMBLE_REPLY = b'"type":"reply"'  # a reply to a command (a send's echoes the content)
_TS_START = len(MARKER) + 1  # after "T"
_TS_END = _TS_START + 19  # the publish time: 19 digits
SAMPLE_ALL_BELOW = 200_000
"""Latency of every delivery for runs expecting fewer deliveries, else of 1 in
max(4, expected // SAMPLES_WANTED) (a sample costs about 1 µs)."""
SAMPLES_WANTED = 100_000

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Client states.
CONNECTING, HANDSHAKE, OPENING, JOINING, READY, CLOSED = range(6)
_ALL = 1 << 62  # a client's ``small`` while every frame takes the slow path
# Ready clients: text frames shorter than this take the slow path (heartbeats:
# ensemble's {"type":"ping"} has 15 bytes, socket.io's "2" one).
_SMALL = {"ensemble": 16, "plain": 0, "socketio": 2}
_ENSEMBLE_PING = b'{"type":"ping"}'
_ENSEMBLE_PONG = b'{"type":"pong"}'

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_BAD = select.EPOLLERR | select.EPOLLHUP


def payload(t_ns: int, seq: int, size: int = 100) -> str:
    """A published payload: marker, time (ns), sequence number, padding to ``size`` bytes."""
    head = f"@LoadGen#T{t_ns:019d}S{seq:09d}"
    return head + "x" * (size - len(head))


# -- frames -----------------------------------------------------------------------------


def _header(first: int, mask_bit: int, n: int) -> bytes:
    if n < 126:
        return bytes((first, mask_bit | n))
    if n < 65536:
        return struct.pack("!BBH", first, mask_bit | 126, n)
    return struct.pack("!BBQ", first, mask_bit | 127, n)


def client_frame(data: bytes, opcode: int = OP_TEXT, key: bytes | None = None) -> bytes:
    """A masked client frame (RFC 6455 5.3), FIN set; a random key unless given."""
    n = len(data)
    key = key if key is not None else random.randbytes(4)
    if n:
        stream = (key * (n // 4 + 1))[:n]
        data = (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")
    return _header(0x80 | opcode, 0x80, n) + key + data


def unmask(frame: bytes) -> tuple[int, bytes]:
    """The opcode and payload of one masked client frame (for tests)."""
    n = frame[1] & 0x7F
    at = 2
    if n == 126:
        n, at = struct.unpack_from("!H", frame, 2)[0], 4
    elif n == 127:
        n, at = struct.unpack_from("!Q", frame, 2)[0], 10
    key, data = frame[at : at + 4], frame[at + 4 : at + 4 + n]
    stream = (key * (n // 4 + 1))[:n]
    return frame[0] & 0x0F, (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def server_frame(data: bytes, opcode: int = OP_TEXT, fin: bool = True) -> bytes:
    """An unmasked server frame (for tests)."""
    return _header((0x80 if fin else 0) | opcode, 0, len(data)) + data


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


# -- the wire adapters ---------------------------------------------------------------------


def resource_path(kind: str, token: str | None, path: str | None = None) -> str:
    """The request target of a client of ``kind`` (``token``: ensemble's guest name)."""
    if path is None:
        path = {"ensemble": "/ws", "plain": "/ws", "socketio": "/socket.io/?EIO=4&transport=websocket"}[kind]
    if kind == "ensemble" and token is not None:
        path += ("&" if "?" in path else "?") + f"token={token}"
    return path


def publish_text(kind: str, room: str, ref: int, body: str) -> bytes:
    """What a publisher sends to publish ``body`` (a payload)."""
    if kind == "ensemble":
        return f'{{"type":"send","ref":{ref},"room":"{room}","content":"{body}"}}'.encode()
    if kind == "socketio":
        return f'42["msg","{body}"]'.encode()
    return body.encode()


def _has_ref(data: bytes, ref: int) -> bool:
    return (b'"ref":%d,' % ref) in data or (b'"ref":%d}' % ref) in data


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (as in bench_hypercorn.py)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(samples: Iterable[int]) -> dict[str, Any]:
    """p50/p99/max in µs of latencies in ns."""
    ordered = sorted(samples)
    if not ordered:
        return {"samples": 0, "p50_us": None, "p99_us": None, "max_us": None}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return {"samples": len(ordered), "p50_us": at(0.5), "p99_us": at(0.99), "max_us": ordered[-1] / 1000}


# -- one connection ---------------------------------------------------------------------------


class Client:
    """One WebSocket client connection and its parsing state."""

    __slots__ = (
        "close_code",
        "close_reason",
        "count",
        "fate",
        "fd",
        "frag",
        "frag_op",
        "hit",
        "key",
        "left",
        "need",
        "out",
        "registered",
        "role",
        "small",
        "sock",
        "state",
        "token",
        "tries",
        "wait",
    )

    def __init__(self, sock: Any, token: str | None, role: str = "client") -> None:
        self.sock = sock
        self.fd: int = sock.fileno()
        self.token = token
        self.role = role
        self.state = CONNECTING
        self.left: bytes | bytearray = b""  # unparsed bytes (a partial frame)
        self.out = bytearray()  # bytes not yet written
        self.count = 0  # deliveries since the last arm
        self.need = 0  # deliveries still expected in the current run
        self.small = _ALL
        self.frag: bytearray | None = None
        self.frag_op = 0
        self.key = ""
        self.close_code: int | None = None
        self.close_reason = ""
        self.fate = ""  # why it is closed: "close" (a close frame), "eof", "reset", "error: ..."
        self.registered = False
        self.tries = 0
        self.wait: bytes | None = None  # echo: what the round trip waits for
        self.hit = 0  # echo: when it arrived (ns)


# -- the engine: many clients on one epoll ----------------------------------------------------


class Engine:
    """Clients of one process on one ``epoll``: connects them, parses, counts and answers.

    Args:
        kind: The wire adapter (:data:`KINDS`).
        host, port: The server.
        path: The request target, or ``None`` for the kind's default.
        room: The room ensemble clients join.
        join: Whether ensemble clients join ``room`` to be ready (else
            ready on ``welcome``).
        batch: Whether ensemble clients ask for batched frames.
        concurrency: Most connections being set up at once.
        retries: Set-up attempts per client beyond the first.
        rcvbuf: ``SO_RCVBUF`` of new sockets, or ``None``.
    """

    def __init__(
        self,
        kind: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        path: str | None = None,
        room: str = "bench",
        join: bool = True,
        batch: bool = False,
        concurrency: int = 64,
        retries: int = 2,
        rcvbuf: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.host, self.port, self.path = host, port, path
        self.room, self.join, self.batch = room, join, batch
        self.concurrency, self.retries, self.rcvbuf = concurrency, retries, rcvbuf
        self.ep = select.epoll()
        self.clients: dict[int, Client] = {}
        self.extra: set[int] = set()  # other fds watched (pipes): poll returns them
        self.rbuf = bytearray(1 << 18)
        self.rview = memoryview(self.rbuf)
        self.half = len(self.rbuf) // 2
        self.ping_text = kind == "ensemble" and batch  # a heartbeat may be joined to other events: look for it in every frame
        # set-up
        self.pending: deque[tuple[str | None, str, int]] = deque()  # token, role, tries
        self.inflight = 0
        self.ready = 0
        self.failed = 0
        self.ready_ns = 0
        self.tcp_connected = 0  # TCP connections established (accepted by the server's kernel)
        self.tcp_ns = 0  # when the last one was
        self.errors: Counter[str] = Counter()
        # the current run
        self.delivered = 0
        self.completed = 0
        self.lost = 0
        self.armed = False
        self.last_ns = 0
        self.sample_every = 1
        self.phase = 0
        self.lat = array("q")
        self.rx_bytes = 0
        self.reads = 0  # recv calls that returned data (while armed: deliveries per read tells how the server batches)
        self.closes: Counter[str] = Counter()  # close codes (and fates) of clients the server closed
        self.pub_errors = 0
        self.first_error = ""

    # -- connecting ------------------------------------------------------------------------

    def open(self, tokens: Iterable[str | None], role: str = "client") -> None:
        """Queue clients to connect (at most ``concurrency`` being set up at once)."""
        self.pending.extend((t, role, 0) for t in tokens)
        self._start_more()

    def _start_more(self) -> None:
        """Connect queued clients. Never called while :meth:`poll` handles events: a new
        socket could take the number of one closed in the same batch, and its events."""
        while self.pending and self.inflight < self.concurrency:
            token, role, tries = self.pending.popleft()
            self.inflight += 1
            self._connect(token, role, tries)

    def _connect(self, token: str | None, role: str, tries: int) -> Client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        c = Client(sock, token, role)
        c.tries = tries
        self.clients[c.fd] = c
        err = sock.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            self._setup_failed(c, errno.errorcode.get(err, str(err)))
            return c
        self.ep.register(c.fd, _OUT)
        c.registered = True
        return c

    def _connected(self, c: Client) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._setup_failed(c, errno.errorcode.get(err, str(err)))
            return
        self.tcp_connected += 1
        self.tcp_ns = time.monotonic_ns()
        c.key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {resource_path(self.kind, c.token, self.path)} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {c.key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        c.state = HANDSHAKE
        self.ep.modify(c.fd, _IN)
        self._send(c, request.encode())

    def _read_handshake(self, c: Client, now: int) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._setup_failed(c, errno.errorcode.get(e.errno or 0, str(e)))
            return
        if not data:
            self._setup_failed(c, "eof in handshake")
            return
        c.left += data
        head, sep, rest = bytes(c.left).partition(b"\r\n\r\n")
        if not sep:
            if len(c.left) > 65536:
                self._setup_failed(c, "handshake too long")
            return
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101"):
            self._setup_failed(c, "status " + lines[0].decode("latin-1")[9:40])
            return
        expected = base64.b64encode(hashlib.sha1(c.key.encode() + _WS_GUID).digest())
        accept = next((line.split(b":", 1)[1].strip() for line in lines[1:] if line.lower().startswith(b"sec-websocket-accept:")), b"")
        if accept != expected:
            self._setup_failed(c, "bad Sec-WebSocket-Accept")
            return
        c.left = b""
        if self.kind == "plain":
            self._ready(c, now)
        else:
            c.state = OPENING
        if rest:
            self.feed(c, rest, now)

    def _setup_failed(self, c: Client, why: str) -> None:
        self.errors[why] += 1
        self._drop(c)
        self.inflight -= 1
        if c.tries < self.retries and c.role == "client":
            self.pending.appendleft((c.token, c.role, c.tries + 1))
        else:
            self.failed += 1

    def _ready(self, c: Client, now: int) -> None:
        c.state = READY
        c.small = _SMALL[self.kind] if c.role == "client" else _ALL
        self.ready += 1
        self.inflight -= 1
        self.ready_ns = now

    def _setup_message(self, c: Client, data: bytes, now: int) -> None:
        """A message to a client not ready yet: the adapter's opening steps."""
        if self.kind == "ensemble":
            if data == _ENSEMBLE_PING:
                self._send(c, client_frame(_ENSEMBLE_PONG))
            elif c.state == OPENING:
                if b'"type":"welcome"' in data:
                    if self.batch:
                        self._send(c, client_frame(b'{"type":"options","ref":2,"batch":true}'))
                    if self.join:
                        self._send(c, client_frame(f'{{"type":"join","ref":1,"room":"{self.room}"}}'.encode()))
                        c.state = JOINING
                    else:
                        self._ready(c, now)
            elif _has_ref(data, 1):
                if b'"type":"reply"' in data:
                    self._ready(c, now)
                else:
                    self._setup_failed(c, "join refused: " + data[:160].decode(errors="replace"))
        elif self.kind == "socketio":
            if data == b"2":
                self._send(c, client_frame(b"3"))
            elif c.state == OPENING and data.startswith(b"0"):
                self._send(c, client_frame(b"40"))
                c.state = JOINING
            elif c.state == JOINING and data.startswith(b"40"):
                self._ready(c, now)
            elif data.startswith(b"44"):
                self._setup_failed(c, "socket.io connect refused: " + data[:160].decode(errors="replace"))

    # -- writing ---------------------------------------------------------------------------

    def _send(self, c: Client, data: bytes) -> None:
        if c.state == CLOSED:
            return
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            return  # the read side sees the reset
        if n < len(data):
            c.out += data[n:]
            if c.registered:
                self.ep.modify(c.fd, _IN | _OUT)

    def send_text(self, c: Client, text: bytes) -> None:
        """Send one text message (a masked frame)."""
        self._send(c, client_frame(text))

    def _flush(self, c: Client) -> None:
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            return
        del c.out[:n]
        if not c.out and c.registered:
            self.ep.modify(c.fd, _IN)

    # -- reading ----------------------------------------------------------------------------

    def _read(self, c: Client, now: int) -> None:
        left = c.left
        size = len(left)
        try:
            if not size:
                n = c.sock.recv_into(self.rview)
                buf: bytes | bytearray = self.rbuf
            elif size <= self.half:
                self.rbuf[:size] = left
                n = c.sock.recv_into(self.rview[size:])
                buf = self.rbuf
            else:  # a frame larger than the buffer: grow this client's own
                data = c.sock.recv(1 << 20)
                n = len(data)
                if n:
                    big = left if isinstance(left, bytearray) else bytearray(left)
                    big += data
                    self.rx_bytes += n
                    self.reads += 1
                    pos = self._consume(c, big, len(big), now)
                    if c.state != CLOSED:
                        del big[:pos]
                        c.left = big if big else b""
                    return
        except BlockingIOError:
            return
        except OSError as e:
            self._lose(c, "reset" if e.errno in (errno.ECONNRESET, errno.EPIPE) else f"error: {e}")
            return
        if not n:
            self._lose(c, "eof")
            return
        self.rx_bytes += n
        self.reads += 1
        end = size + n
        pos = self._consume(c, buf, end, now)
        if c.state != CLOSED:
            c.left = buf[pos:end] if pos < end else b""

    def feed(self, c: Client, data: bytes, now: int | None = None) -> None:
        """Parse ``data`` as the next bytes from the server (the handshake's tail; tests)."""
        now = time.monotonic_ns() if now is None else now
        buf = bytes(c.left) + data if c.left else data
        pos = self._consume(c, buf, len(buf), now)
        if c.state != CLOSED:
            c.left = buf[pos:]

    def _consume(self, c: Client, buf: bytes | bytearray, end: int, now: int) -> int:
        """Parse the complete frames of ``buf[:end]``; the bytes consumed.

        The hot loop: a ready client's ordinary text frames (FIN, text, not
        smaller than ``c.small``) are only stepped over; each run of them is
        counted at once (:meth:`_run`). Other frames take :meth:`_special`.
        """
        pos = run = 0
        small = c.small
        while True:
            start = pos + 2
            if start > end:
                break
            n = buf[pos + 1]
            if n == 126:
                start = pos + 4
                if start > end:
                    break
                n = buf[pos + 2] << 8 | buf[pos + 3]
            elif n > 125:
                if n != 127:
                    self._protocol_error(c, "masked server frame")
                    return end
                start = pos + 10
                if start > end:
                    break
                n = int.from_bytes(buf[pos + 2 : start], "big")
            stop = start + n
            if stop > end:
                break
            if n < small or buf[pos] != 0x81:
                if run < pos:
                    self._run(c, buf, run, pos, now)
                self._special(c, buf[pos], buf, start, stop, now)
                if c.state == CLOSED:
                    return end
                small = c.small
                run = stop
            pos = stop
        if run < pos:
            self._run(c, buf, run, pos, now)
        return pos

    def _run(self, c: Client, buf: bytes | bytearray, a: int, b: int, now: int) -> None:
        """A run of ordinary text frames of a ready client: count its deliveries."""
        k = buf.count(MARKER, a, b)
        if k:
            self._deliver(c, k, buf, a, b, now)
        if self.ping_text and buf.find(_ENSEMBLE_PING, a, b) >= 0:
            self._send(c, client_frame(_ENSEMBLE_PONG))

    def _deliver(self, c: Client, k: int, buf: bytes | bytearray, a: int, b: int, now: int) -> None:
        c.count += k
        self.delivered += k
        self.last_ns = now
        if c.need > 0:
            c.need -= k
            if c.need <= 0:
                self.completed += 1
        every = self.sample_every
        if not every:
            return
        lat = self.lat
        if every == 1:
            i = buf.find(MARKER, a, b)
            while i >= 0:
                lat.append(now - int(buf[i + _TS_START : i + _TS_END]))
                i = buf.find(MARKER, i + _TS_END, b)
            return
        # 1 in ``every``: the deliveries numbered phase, phase + every, ...
        # of the run, located by their share of its bytes.
        j = self.phase
        span = b - a
        low = a
        while j < k:
            i = buf.find(MARKER, max(low, a + span * j // k), b)
            if i < 0:
                break
            lat.append(now - int(buf[i + _TS_START : i + _TS_END]))
            low = i + _TS_END
            j += every
        self.phase = j - k if j >= k else 0

    def _special(self, c: Client, b0: int, buf: bytes | bytearray, start: int, stop: int, now: int) -> None:
        """Any frame but a ready client's ordinary text frame."""
        op = b0 & 0x0F
        fin = b0 & 0x80
        if b0 & 0x70:
            self._protocol_error(c, "reserved bits set")
            return
        if op >= 8:
            if not fin or stop - start > 125:
                self._protocol_error(c, "bad control frame")
            elif op == OP_PING:
                self._send(c, client_frame(bytes(buf[start:stop]), OP_PONG))
            elif op == OP_CLOSE:
                code = (buf[start] << 8) | buf[start + 1] if stop - start >= 2 else 1005
                reason = bytes(buf[start + 2 : stop]).decode(errors="replace") if stop - start > 2 else ""
                self._send(c, client_frame(close_payload(code) if code != 1005 else b"", OP_CLOSE))
                c.close_code, c.close_reason = code, reason
                self._lose(c, "close")
            elif op != OP_PONG:
                self._protocol_error(c, f"opcode {op}")
            return
        if op == OP_CONT:
            if c.frag is None:
                self._protocol_error(c, "continuation without a message")
                return
            c.frag += buf[start:stop]
            if fin:
                data, op = bytes(c.frag), c.frag_op
                c.frag = None
                self._message(c, op, data, now)
            return
        if op not in (OP_TEXT, OP_BINARY):
            self._protocol_error(c, f"opcode {op}")
            return
        if c.frag is not None:
            self._protocol_error(c, "new message inside a fragmented one")
            return
        if not fin:
            c.frag = bytearray(buf[start:stop])
            c.frag_op = op
            return
        self._message(c, op, bytes(buf[start:stop]), now)

    def _message(self, c: Client, op: int, data: bytes, now: int) -> None:
        """A whole message that took the slow path."""
        if c.state != READY:
            self._setup_message(c, data, now)
            return
        k = data.count(MARKER)
        if k and c.role != "pub":
            self._deliver(c, k, data, 0, len(data), now)
        elif k:
            # The publisher's own copies of the fan-out (its window). Not the
            # replies to its sends: they echo the content, but they say only
            # that the server took a message, not that it was delivered.
            if self.kind == "ensemble":
                k -= data.count(_ENSEMBLE_REPLY)
            c.count += max(k, 0)
        if self.kind == "ensemble":
            if _ENSEMBLE_PING in data:
                self._send(c, client_frame(_ENSEMBLE_PONG))
            if c.role == "pub" and b'"type":"error"' in data:
                self.pub_errors += 1
                self.first_error = self.first_error or data[:200].decode(errors="replace")
        elif self.kind == "socketio" and data == b"2":
            self._send(c, client_frame(b"3"))
        if c.wait is not None and c.wait in data:
            c.hit = now
            c.wait = None

    # -- closing ---------------------------------------------------------------------------

    def _protocol_error(self, c: Client, why: str) -> None:
        self.errors[f"protocol: {why}"] += 1
        self._lose(c, f"error: {why}")

    def _drop(self, c: Client) -> None:
        if c.registered:
            self.ep.unregister(c.fd)
            c.registered = False
        self.clients.pop(c.fd, None)
        with contextlib.suppress(OSError):
            c.sock.close()
        c.state = CLOSED

    def _lose(self, c: Client, fate: str) -> None:
        """The connection ended (``fate``: close, eof, reset, error)."""
        if c.state < READY:
            if fate == "close":
                fate = f"closed {c.close_code} {c.close_reason}"[:120]
            self._setup_failed(c, fate)
            return
        c.fate = fate
        self.closes[str(c.close_code) if fate == "close" else fate] += 1
        if c.need > 0:
            self.lost += 1
        c.need = 0
        self._drop(c)

    def close_all(self) -> None:
        for c in list(self.clients.values()):
            if c.state != CLOSED:
                with contextlib.suppress(OSError):
                    c.sock.send(client_frame(close_payload(1000), OP_CLOSE))
                self._drop(c)
        self.ep.close()

    # -- the loop ----------------------------------------------------------------------------

    def watch(self, fd: int) -> None:
        """Also watch ``fd`` for reading (a pipe): :meth:`poll` returns it when readable."""
        self.ep.register(fd, _IN)
        self.extra.add(fd)

    def pause(self, c: Client) -> None:
        """Stop reading ``c`` (the slow client)."""
        if c.registered:
            self.ep.unregister(c.fd)
            c.registered = False

    def resume(self, c: Client) -> None:
        if not c.registered and c.state != CLOSED:
            self.ep.register(c.fd, _IN | (_OUT if c.out else 0))
            c.registered = True

    def poll(self, timeout: float) -> list[int]:
        """Handle what is ready within ``timeout`` seconds; the watched extra fds that are readable."""
        try:
            events = self.ep.poll(timeout)
        except InterruptedError:
            return []
        clients = self.clients
        others: list[int] = []
        for fd, ev in events:
            c = clients.get(fd)
            if c is None:
                if fd in self.extra:
                    others.append(fd)
                continue
            st = c.state
            if st > HANDSHAKE:  # opening, joining or ready (the hot path first)
                if ev & (_IN | _BAD):
                    self._read(c, time.monotonic_ns())
                if ev & _OUT and c.state != CLOSED:
                    self._flush(c)
            elif st == CONNECTING:
                self._connected(c)
            elif st == HANDSHAKE:
                if ev & _OUT and c.out:
                    self._flush(c)
                if ev & (_IN | _BAD):
                    self._read_handshake(c, time.monotonic_ns())
        if self.pending and self.inflight < self.concurrency:
            self._start_more()
        return others

    def setting_up(self) -> bool:
        return bool(self.pending or self.inflight)

    # -- runs --------------------------------------------------------------------------------

    def arm(self, target: int, sample_every: int) -> None:
        """Start counting a run: every ready client expects ``target`` more deliveries."""
        self.delivered = self.completed = self.lost = self.reads = 0
        self.last_ns = 0
        self.lat = array("q")
        self.sample_every = sample_every
        self.phase = 0
        self.armed = True
        for c in self.clients.values():
            if c.state == READY and c.role == "client":
                c.count = 0
                c.need = target

    def run_clients(self) -> int:
        return sum(1 for c in self.clients.values() if c.role == "client" and c.state == READY) + self.lost

    def attach(self, sock: Any, role: str = "client") -> Client:
        """A ready client over a WebSocket whose handshake is done: not watched by :meth:`poll`,
        bytes are given to :meth:`feed` (tests)."""
        c = Client(sock, None, role)
        c.state = READY
        c.small = _SMALL[self.kind] if role == "client" else _ALL
        return c

    def connect_one(self, token: str | None, role: str, timeout: float) -> Client:
        """Connect one client and wait until it is ready (RuntimeError otherwise)."""
        failed = self.failed
        before = self.errors.copy()
        self.inflight += 1
        c = self._connect(token, role, self.retries)
        deadline = time.monotonic() + timeout
        while c.state != READY:
            if self.failed != failed or c.state == CLOSED:
                raise RuntimeError(f"{role} client failed: {dict(self.errors - before)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{role} client not ready after {timeout} s")
            self.poll(0.05)
        return c


# -- worker processes ---------------------------------------------------------------------------


@attrs.frozen
class Target:
    """The server under test and how to load it."""

    kind: str
    url: str = "ws://127.0.0.1:8000"
    path: str | None = None  # the request target; None: the kind's default
    room: str = "bench"
    batch: bool = False
    size: int = 100  # payload bytes
    workers: int = 2
    concurrency: int = 64  # connections being set up at once, per worker
    timeout: float = 120.0  # per run
    setup_timeout: float = 300.0
    server_pid: int | None = None
    tick: float = 0.0  # while a run is counted, a worker polls at most once per tick (s); 0: at once
    start_method: str | None = None  # None: fork when single-threaded, else spawn

    def where(self) -> tuple[str, int, str | None]:
        """Host, port and request target (``path``, else the URL's, else ``None``: the kind's default)."""
        parts = urlsplit(self.url)
        if parts.scheme != "ws":
            raise ValueError(f"only ws:// URLs, got {self.url!r}")
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return parts.hostname or "127.0.0.1", parts.port or 80, self.path or (path if path not in ("", "/") else None)

    def engine(self, *, join: bool = True, rcvbuf: int | None = None) -> Engine:
        host, port, path = self.where()
        return Engine(
            self.kind, host, port, path=path, room=self.room, join=join, batch=self.batch, concurrency=self.concurrency, rcvbuf=rcvbuf
        )


def _worker_main(target: Target, tokens: list[str], join: bool, pipe: Any) -> None:
    """One load-generator process: connect ``tokens``' clients, then obey the controller."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops it
    raise_nofile_limit()
    eng = target.engine(join=join)
    eng.watch(pipe.fileno())
    start = time.monotonic_ns()
    eng.open(tokens)
    deadline = start + int(target.setup_timeout * 1e9)
    while eng.setting_up() and time.monotonic_ns() < deadline:
        if eng.poll(0.2):
            break  # the controller speaks (gave up): stop setting up
    pipe.send(
        (
            "ready",
            {
                "start_ns": start,
                "ready_ns": eng.ready_ns,
                "ready": eng.ready,
                "failed": eng.failed,
                "errors": dict(eng.errors),
                "tcp": eng.tcp_connected,
                "tcp_ns": eng.tcp_ns,
            },
        )
    )
    cpu0 = time.process_time()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    run_deadline = 0
    clients = 0
    tick = int(target.tick * 1e9)
    polled = 0
    while True:
        if eng.armed and tick:  # at most one poll per tick: more frames per wake-up and per recv
            wait = polled + tick - time.monotonic_ns()
            if wait > 0:
                time.sleep(wait / 1e9)
            polled = time.monotonic_ns()
        timeout = 1.0 if not eng.armed else max(0.0, min(1.0, (run_deadline - time.monotonic_ns()) / 1e9))
        if eng.poll(timeout):
            cmd, arg = pipe.recv()
            if cmd == "arm":
                eng.arm(arg["target"], arg["sample_every"])
                clients = eng.run_clients()
                run_deadline = time.monotonic_ns() + int(arg["timeout"] * 1e9)
                cpu0 = time.process_time()
                usage0 = resource.getrusage(resource.RUSAGE_SELF)
                pipe.send(("armed", clients))
            elif cmd == "stat":
                pipe.send(("stat", {"rx_bytes": eng.rx_bytes, "open": sum(c.state == READY for c in eng.clients.values())}))
            elif cmd == "stop":
                still_open = sum(c.state == READY for c in eng.clients.values())
                eng.close_all()
                pipe.send(("bye", {"open": still_open, "closes": dict(eng.closes), "cpu_total_s": time.process_time()}))
                pipe.close()
                return
        if eng.armed:
            now = time.monotonic_ns()
            finished = eng.completed + eng.lost >= clients
            if finished or now >= run_deadline:
                eng.armed = False
                pipe.send(
                    (
                        "result",
                        {
                            "finished": eng.completed >= clients,
                            "finish_ns": now if finished else None,
                            "last_ns": eng.last_ns,
                            "clients": clients,
                            "completed": eng.completed,
                            "lost": eng.lost,
                            "deliveries": eng.delivered,
                            "reads": eng.reads,
                            "cpu_s": time.process_time() - cpu0,
                            "cpu_user_s": (usage := resource.getrusage(resource.RUSAGE_SELF)).ru_utime - usage0.ru_utime,
                            "cpu_sys_s": usage.ru_stime - usage0.ru_stime,
                            "latencies": eng.lat.tobytes(),
                            "closes": dict(eng.closes),
                        },
                    )
                )


class Fleet:
    """The worker processes, their pipes, and the controller's own engine (publisher, slow client)."""

    def __init__(self, target: Target, clients: int, *, join: bool = True, first: int = 0) -> None:
        self.target = target
        method = target.start_method or ("fork" if threading.active_count() == 1 else "spawn")
        ctx: Any = multiprocessing.get_context(method)
        workers = max(1, min(target.workers, clients)) if clients else 0
        share = [clients // workers + (1 if i < clients % workers else 0) for i in range(workers)]
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self.by_fd: dict[int, int] = {}
        self.inbox: list[list[tuple[str, Any]]] = []
        at = first
        for n in share:
            mine, theirs = ctx.Pipe()
            tokens = [f"u{i}" for i in range(at, at + n)]
            at += n
            proc = ctx.Process(target=_worker_main, args=(target, tokens, join, theirs), daemon=True)
            proc.start()
            theirs.close()
            self.by_fd[mine.fileno()] = len(self.pipes)
            self.procs.append(proc)
            self.pipes.append(mine)
            self.inbox.append([])
        self.engine = target.engine(join=join)  # after the forks: the workers do not share its epoll
        for pipe in self.pipes:
            self.engine.watch(pipe.fileno())

    def poll(self, timeout: float) -> None:
        """Run the controller's engine for up to ``timeout`` s, collecting the workers' messages."""
        for fd in self.engine.poll(timeout):
            i = self.by_fd[fd]
            try:
                self.inbox[i].append(self.pipes[i].recv())
            except (EOFError, OSError):
                self.engine.ep.unregister(fd)
                self.engine.extra.discard(fd)
                self.inbox[i].append(("dead", None))

    def gather(self, kind: str, timeout: float) -> list[Any]:
        """Each worker's next ``kind`` message (``None`` for a worker that did not answer in time)."""
        deadline = time.monotonic() + timeout
        got: list[Any] = [None] * len(self.pipes)
        todo = set(range(len(self.pipes)))
        while todo and time.monotonic() < deadline:
            self.poll(0.05)
            for i in list(todo):
                for j, (k, v) in enumerate(self.inbox[i]):
                    if k in (kind, "dead"):
                        got[i] = v
                        del self.inbox[i][: j + 1]
                        todo.discard(i)
                        break
        return got

    def tell(self, cmd: str, arg: Any = None) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send((cmd, arg))

    def wait_ready(self) -> dict[str, Any]:
        """Wait for every worker's clients; the set-up report."""
        reports = [r for r in self.gather("ready", self.target.setup_timeout + 30) if r]
        if not reports:
            return {"ready": 0, "failed": 0, "seconds": None, "clients_per_s": None, "errors": {}}
        ready = sum(r["ready"] for r in reports)
        start = min(r["start_ns"] for r in reports)
        end = max(r["ready_ns"] for r in reports)
        seconds = (end - start) / 1e9 if ready else None
        errors: Counter[str] = Counter()
        for r in reports:
            errors.update(r["errors"])
        tcp = sum(r.get("tcp", 0) for r in reports)
        tcp_end = max(r.get("tcp_ns", 0) for r in reports)
        return {
            "ready": ready,
            "failed": sum(r["failed"] for r in reports),
            "seconds": seconds,
            "clients_per_s": ready / seconds if seconds else None,
            # TCP connections established (the server's kernel accepted them,
            # from its listen backlog), and by when: a storm's first hurdle.
            "tcp_connected": tcp,
            "tcp_seconds": (tcp_end - start) / 1e9 if tcp else None,
            "errors": dict(errors),
        }

    def settle(self, max_seconds: float = 120.0, quiet: float = 0.3) -> float:
        """Wait until the set-up traffic is over: no bytes to any client, and the server idle."""
        start = time.monotonic()
        pid = self.target.server_pid

        def snapshot() -> tuple[int, float]:
            self.tell("stat")
            stats = self.gather("stat", 30)
            rx = sum(s["rx_bytes"] for s in stats if s) + self.engine.rx_bytes
            return rx, cpu_seconds(pid) if pid else 0.0

        before = snapshot()
        while time.monotonic() - start < max_seconds:
            end = time.monotonic() + quiet
            while time.monotonic() < end:
                self.poll(0.05)
            after = snapshot()
            if after[0] == before[0] and after[1] - before[1] < 0.02 * quiet:
                break
            before = after
        return time.monotonic() - start

    def run(self, target: int, sample_every: int, publish: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Arm the workers for ``target`` deliveries per client, publish, and collect the results."""
        timeout = self.target.timeout
        self.tell("arm", {"target": target, "sample_every": sample_every, "timeout": timeout})
        clients = sum(n or 0 for n in self.gather("armed", 30))
        pid = self.target.server_pid
        server0 = cpu_seconds(pid) if pid else None
        print(f"loadgen: armed {clients} clients; publishing", file=sys.stderr, flush=True)  # for profilers: the run starts
        pub = publish()
        results = [r for r in self.gather("result", timeout + 30) if r]
        server1 = cpu_seconds(pid) if pid else None
        start_ns = pub["start_ns"]
        deliveries = sum(r["deliveries"] for r in results)
        finished = len(results) == len(self.procs) and all(r["finished"] for r in results)
        end_ns = max([r["finish_ns"] or r["last_ns"] for r in results] or [start_ns])
        wall = max(1e-9, (end_ns - start_ns) / 1e9)
        lat = array("q")
        for r in results:
            lat.frombytes(r["latencies"])
        closes: Counter[str] = Counter()
        for r in results:
            closes.update(r["closes"])
        gen_cpu = [r["cpu_s"] for r in results]
        out: dict[str, Any] = {
            "finished": finished,
            "timed_out": not finished,
            "clients": clients,
            "clients_complete": sum(r["completed"] for r in results),
            "clients_lost": sum(r["lost"] for r in results),
            "expected": clients * target,
            "deliveries": deliveries,
            "wall_s": wall,
            "deliveries_per_s": deliveries / wall,
            "latency": {**percentiles(lat), "sample_every": sample_every},
            "generator": {
                "cpu_s": gen_cpu,
                "cpu_user_s": [r["cpu_user_s"] for r in results],
                "cpu_sys_s": [r["cpu_sys_s"] for r in results],
                "deliveries": [r["deliveries"] for r in results],
                "deliveries_per_read": [r["deliveries"] / r["reads"] if r["reads"] else None for r in results],
                "us_per_delivery": [c / d * 1e6 if d else None for c, d in zip(gen_cpu, (r["deliveries"] for r in results), strict=True)],
                "us_per_delivery_total": sum(gen_cpu) / deliveries * 1e6 if deliveries else None,
            },
            "publisher": {k: v for k, v in pub.items() if k != "start_ns"},
            "close_codes": dict(closes),
            "close_codes_per_worker": [r["closes"] for r in results],
        }
        if server0 is not None and server1 is not None:
            cpu = server1 - server0
            out["server"] = {"pid": pid, "cpu_s": cpu, "us_per_delivery": cpu / deliveries * 1e6 if deliveries else None}
        return out

    def stop(self) -> dict[str, Any]:
        self.tell("stop")
        byes = [b for b in self.gather("bye", 30) if b]
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for pipe in self.pipes:
            pipe.close()
        self.engine.close_all()
        closes: Counter[str] = Counter()
        for b in byes:
            closes.update(b["closes"])
        return {
            "open_at_end": sum(b["open"] for b in byes),
            "close_codes": dict(closes),
            "worker_cpu_total_s": [b["cpu_total_s"] for b in byes],
        }

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


# -- publishing -------------------------------------------------------------------------------


def _publish_burst(fleet: Fleet, pub: Client, messages: int, size: int, chunk: int = 64, window: int = 0) -> dict[str, Any]:
    """Write ``messages`` as fast as the server takes them (in chunks, each stamped when built).

    With a ``window``, at most that many messages are out at once: the
    publisher (a member of the room) waits for its own copy of a message
    before it goes beyond ``window`` (a publisher that does not outrun the
    fan-out, as a flow-controlled client would).
    """
    eng, kind, room = fleet.engine, fleet.target.kind, fleet.target.room
    start = time.monotonic_ns()
    pub.count = 0
    seq = 0
    while seq < messages:
        room_left = window - (seq - pub.count) if window else chunk
        if pub.out or room_left <= 0:  # TCP backpressure (the server reads slower), or the window is full
            fleet.poll(0.01 if pub.out else 0.001)
            if pub.state == CLOSED:
                break
            continue
        now = time.monotonic_ns()
        last = min(messages, seq + min(chunk, room_left))
        frames = [client_frame(publish_text(kind, room, 10 + s, payload(now, s, size))) for s in range(seq, last)]
        seq += len(frames)
        eng._send(pub, b"".join(frames))
        fleet.poll(0)
    end = time.monotonic_ns()
    return {
        "start_ns": start,
        "sent": seq,
        "send_s": (end - start) / 1e9,
        "errors": eng.pub_errors,
        "first_error": eng.first_error,
        "fate": pub.fate or "open",
        "close_code": pub.close_code,
    }


def _publish_paced(fleet: Fleet, pub: Client, rate: float, duration: float, size: int) -> dict[str, Any]:
    """Send at ``rate``/s for ``duration`` s; each payload carries its scheduled time."""
    eng, kind, room = fleet.engine, fleet.target.kind, fleet.target.room
    total = max(1, int(rate * duration))
    interval = 1e9 / rate
    start = time.monotonic_ns() + 20_000_000
    seq = 0
    worst_lag = 0
    while seq < total and pub.state != CLOSED:
        now = time.monotonic_ns()
        due = min(total, int((now - start) / interval) + 1) if now >= start else 0
        if due > seq:
            frames = [client_frame(publish_text(kind, room, 10 + s, payload(start + int(s * interval), s, size))) for s in range(seq, due)]
            worst_lag = max(worst_lag, now - (start + int(seq * interval)))
            seq = due
            eng._send(pub, b"".join(frames))
        wait = (start + seq * interval - time.monotonic_ns()) / 1e9
        fleet.poll(max(0.0, min(wait, 0.05)))
    return {
        "start_ns": start,
        "sent": seq,
        "rate": rate,
        "send_s": (time.monotonic_ns() - start) / 1e9,
        "worst_schedule_lag_us": worst_lag / 1000,
        "unsent_bytes_at_end": len(pub.out),
        "errors": eng.pub_errors,
        "first_error": eng.first_error,
        "fate": pub.fate or "open",
        "close_code": pub.close_code,
    }


def _header_of(scenario: str, target: Target, **sizes: Any) -> dict[str, Any]:
    return {"scenario": scenario, "kind": target.kind, "url": target.url, "workers": target.workers, "payload_bytes": target.size, **sizes}


def _publisher(fleet: Fleet, result: dict[str, Any]) -> Client | None:
    """The publisher's connection, ready; ``None`` (and ``result["error"]``) if it fails."""
    if not result["setup"]["ready"]:
        result["error"] = "no client got ready"
        return None
    try:
        return fleet.engine.connect_one("pub", "pub", 30)
    except RuntimeError as e:
        result["error"] = str(e)
        return None


def _sample_every(expected: int, sample: int | None) -> int:
    """Latency of every delivery of small runs, else of 1 in 4 or more (about 100,000 samples)."""
    if sample is not None:
        return sample
    return 1 if expected < SAMPLE_ALL_BELOW else max(4, expected // SAMPLES_WANTED)


# -- scenarios ----------------------------------------------------------------------------------


def fanout(target: Target, clients: int = 1000, messages: int = 100, *, sample: int | None = None, window: int = 0) -> dict[str, Any]:
    """N clients, one publisher writing K messages pipelined (at most ``window``
    unreceived by itself, 0: no bound): throughput, latency, CPU."""
    if window and target.kind != "ensemble":
        raise ValueError("--window needs a publisher that receives its own messages (kind ensemble)")
    raise_nofile_limit()
    result = _header_of("fanout", target, clients=clients, messages=messages, window=window)
    with Fleet(target, clients) as fleet:
        result["setup"] = fleet.wait_ready()
        pub = _publisher(fleet, result)
        if pub is not None:
            result["settle_s"] = fleet.settle()
            every = _sample_every(clients * messages, sample)
            result.update(fleet.run(messages, every, lambda: _publish_burst(fleet, pub, messages, target.size, window=window)))
        result["end"] = fleet.stop()
    return result


def openloop(
    target: Target, clients: int = 1000, rate: float = 1000.0, duration: float = 10.0, *, sample: int | None = None
) -> dict[str, Any]:
    """N clients, a publisher at a fixed rate; latency from the scheduled send times."""
    raise_nofile_limit()
    total = max(1, int(rate * duration))
    result = _header_of("openloop", target, clients=clients, rate=rate, duration=duration, messages=total)
    target = attrs.evolve(target, timeout=target.timeout + duration)
    with Fleet(target, clients) as fleet:
        result["setup"] = fleet.wait_ready()
        pub = _publisher(fleet, result)
        if pub is not None:
            result["settle_s"] = fleet.settle()
            every = _sample_every(clients * total, sample)
            result.update(fleet.run(total, every, lambda: _publish_paced(fleet, pub, rate, duration, target.size)))
            result["offered_deliveries_per_s"] = result["clients"] * rate
        result["end"] = fleet.stop()
    return result


def idle(
    target: Target,
    clients: int = 1000,
    *,
    hold: float | None = 0.0,
    join: bool = False,
    on_connected: Callable[[int], None] | None = None,
    release: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """N idle clients: the set-up rate; held open for ``hold`` s, or until ``release()`` is true."""
    raise_nofile_limit()
    result = _header_of("idle", target, clients=clients, join=join)
    with Fleet(target, clients, join=join) as fleet:
        result["setup"] = fleet.wait_ready()
        if on_connected is not None:
            on_connected(result["setup"]["ready"])
        start = time.monotonic()
        while True:
            if hold is not None and time.monotonic() - start >= hold:
                break
            if release is not None and release():
                break
            fleet.poll(0.1)
        result["held_s"] = time.monotonic() - start
        result["end"] = fleet.stop()
    return result


def slow(
    target: Target, clients: int = 100, messages: int = 1000, *, rcvbuf: int = 4096, grace: float = 1.0, sample: int | None = None
) -> dict[str, Any]:
    """A baseline fanout of N - 1 clients, then the same with one more client that never reads."""
    raise_nofile_limit()
    result = _header_of("slow", target, clients=clients, messages=messages, rcvbuf=rcvbuf)
    fast = max(1, clients - 1)
    with Fleet(target, fast) as fleet:
        result["setup"] = fleet.wait_ready()
        pub = _publisher(fleet, result)
        if pub is not None:
            _slow_runs(fleet, pub, result, messages, rcvbuf, grace, _sample_every(fast * messages, sample))
        result["end"] = fleet.stop()
    return result


def _slow_runs(fleet: Fleet, pub: Client, result: dict[str, Any], messages: int, rcvbuf: int, grace: float, every: int) -> None:
    size = fleet.target.size
    result["settle_s"] = fleet.settle()
    result["baseline"] = fleet.run(messages, every, lambda: _publish_burst(fleet, pub, messages, size))
    eng = fleet.engine
    eng.rcvbuf = rcvbuf
    try:
        victim = eng.connect_one("slow", "slow", 30)
    except RuntimeError as e:
        result["error"] = str(e)
        return
    eng.pause(victim)  # it never reads again (until the end)
    fleet.settle()
    result["with_slow"] = fleet.run(messages, every, lambda: _publish_burst(fleet, pub, messages, size))
    base, loaded = result["baseline"]["latency"]["p99_us"], result["with_slow"]["latency"]["p99_us"]
    result["p99_ratio"] = loaded / base if base and loaded else None
    # The slow client's fate: drain what the server sent it and look for a close frame.
    time.sleep(grace)
    victim.count = 0
    eng.resume(victim)
    deadline = time.monotonic() + 30
    quiet_since = time.monotonic()
    rx = eng.rx_bytes
    while victim.state != CLOSED and time.monotonic() < deadline and time.monotonic() - quiet_since < 2.0:
        fleet.poll(0.05)
        if eng.rx_bytes != rx:
            rx, quiet_since = eng.rx_bytes, time.monotonic()
    result["slow_client"] = {
        "fate": victim.fate or "open",
        "close_code": victim.close_code,
        "close_reason": victim.close_reason,
        "deliveries_read_at_end": victim.count,
    }


def echo(target: Target, round_trips: int = 10_000, *, warmup: int | None = None) -> dict[str, Any]:
    """One connection, sequential round trips: p50/p99/max and round trips/s."""
    warmup = warmup if warmup is not None else min(1000, max(10, round_trips // 10))
    result = _header_of("echo", target, round_trips=round_trips, warmup=warmup)
    eng = target.engine(join=False)
    try:
        c = eng.connect_one("echo", "echo", 30)
        kind, room, size = target.kind, target.room, target.size
        rtts = array("q")
        start = time.monotonic_ns()
        cpu0 = time.process_time()
        for n in range(warmup + round_trips):
            if n == warmup:
                start = time.monotonic_ns()
                cpu0 = time.process_time()
            if kind == "ensemble":
                ref = 1000 + n
                c.wait = b'"ref":%d' % ref
                text = b'{"type":"ping","ref":%d}' % ref
            else:
                c.wait = b"S%09d" % n
                text = publish_text(kind, room, 10 + n, payload(time.monotonic_ns(), n, size))
            t0 = time.monotonic_ns()
            eng.send_text(c, text)
            deadline = t0 + int(target.timeout * 1e9)
            while c.wait is not None:
                eng.poll(0.5)
                if c.state == CLOSED or time.monotonic_ns() > deadline:
                    raise RuntimeError(f"echo: no answer to round trip {n} (fate {c.fate or 'open'}, code {c.close_code})")
            if n >= warmup:
                rtts.append(c.hit - t0)
        wall = (time.monotonic_ns() - start) / 1e9
        result.update(
            {
                "latency": percentiles(rtts),
                "round_trips_per_s": round_trips / wall if wall else None,
                "wall_s": wall,
                "generator_cpu_s": time.process_time() - cpu0,
            }
        )
    finally:
        eng.close_all()
    return result


# -- the command line -------------------------------------------------------------------------


def _stdin_closed() -> Callable[[], bool]:
    """A check that turns true once stdin reaches its end.

    Its reader thread starts at the first check, after the workers are forked.
    """
    done = threading.Event()
    started: list[threading.Thread] = []

    def read() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(sys.stdin.fileno(), 65536):
                pass
        done.set()

    def check() -> bool:
        if not started:
            started.append(threading.Thread(target=read, daemon=True))
            started[0].start()
        return done.is_set()

    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--kind", choices=KINDS, default="ensemble")
    parser.add_argument("--url", default="ws://127.0.0.1:8000", help="ws://HOST:PORT of the server")
    parser.add_argument("--path", help="the request target (default: /ws, or socket.io's)")
    parser.add_argument("--room", default="bench")
    parser.add_argument("--batch", action="store_true", help="ensemble: ask for batched frames")
    parser.add_argument("--clients", type=int, help="default 1000 (slow: 100)")
    parser.add_argument("--messages", type=int, help="fanout: 100, slow: 1000")
    parser.add_argument("--window", type=int, default=0, help="fanout: most messages the publisher has out (0: no bound; ensemble)")
    parser.add_argument("--rate", type=float, default=1000.0, help="openloop: messages/s")
    parser.add_argument("--duration", type=float, default=10.0, help="openloop: seconds")
    parser.add_argument("--hold", type=float, help="idle: hold the connections this many seconds (default: until stdin closes)")
    parser.add_argument("--round-trips", type=int, default=10_000, help="echo")
    parser.add_argument("--warmup", type=int, help="echo: round trips before timing")
    parser.add_argument("--rcvbuf", type=int, default=4096, help="slow: the slow client's SO_RCVBUF")
    parser.add_argument("--size", type=int, default=100, help="payload bytes (at least 33)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64, help="connections being set up at once, per worker")
    parser.add_argument("--sample", type=int, help="latency of 1 in S deliveries (default: 1 under 200k deliveries, else 4; 0: none)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run before a partial result")
    parser.add_argument("--tick", type=float, default=0.0, help="while counting, each worker polls at most once per TICK seconds")
    parser.add_argument("--setup-timeout", type=float, default=300.0)
    parser.add_argument("--server-pid", type=int, help="the server's pid: report its CPU")
    parser.add_argument("--start-method", choices=("fork", "spawn", "forkserver"))
    parser.add_argument("--no-machine", action="store_true", help="skip the machine description (it samples the load for 1 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the report here")
    args = parser.parse_args(argv)
    if args.size < len(payload(0, 0, 0)):
        parser.error(f"--size must be at least {len(payload(0, 0, 0))}")
    info = None if args.no_machine else machine_info()
    target = Target(
        kind=args.kind,
        url=args.url,
        path=args.path,
        room=args.room,
        batch=args.batch,
        size=args.size,
        workers=args.workers,
        concurrency=args.concurrency,
        timeout=args.timeout,
        setup_timeout=args.setup_timeout,
        server_pid=args.server_pid,
        tick=args.tick,
        start_method=args.start_method,
    )
    target.where()  # a bad URL fails before any process starts
    if args.scenario == "fanout":
        result = fanout(target, args.clients or 1000, args.messages or 100, sample=args.sample, window=args.window)
    elif args.scenario == "openloop":
        result = openloop(target, args.clients or 1000, args.rate, args.duration, sample=args.sample)
    elif args.scenario == "idle":

        def connected(n: int) -> None:
            print(f"connected {n}", flush=True)

        result = idle(
            target, args.clients or 1000, hold=args.hold, on_connected=connected, release=None if args.hold is not None else _stdin_closed()
        )
    elif args.scenario == "slow":
        result = slow(target, args.clients or 100, args.messages or 1000, rcvbuf=args.rcvbuf, sample=args.sample)
    else:
        result = echo(target, args.round_trips, warmup=args.warmup)
    report = {"machine": info, "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "result": result}
    print(json.dumps(report, indent=2), flush=True)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
