"""The load generator (benchmarks/loadgen.py): its frame parser and masking, and
tiny runs of its scenarios against a real server on each transport. No timings
are checked; every delivery must be counted."""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import trio
from _sockets import make_config, running_server
from conftest import BENCHMARKS

from ensemble.realtime import HubConfig, RoomConfig, WSRateLimitConfig


@pytest.fixture(scope="module")
def lg(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("loadgen")


class FakeSocket:
    """What the engine writes to (pongs, close echoes)."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return -1

    def send(self, data: bytes) -> int:
        self.sent += data
        return len(data)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def engines(lg: ModuleType) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(kind: str, **options: Any) -> Any:
        engine = lg.Engine(kind, **options)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close_all()


def sent_frames(lg: ModuleType, sock: FakeSocket) -> list[tuple[int, bytes]]:
    """The client frames written to ``sock``, unmasked."""
    out = []
    data = bytes(sock.sent)
    while data:
        assert data[1] & 0x80, "client frames are masked"
        n = data[1] & 0x7F
        head = 2 + {126: 2, 127: 8}.get(n, 0)
        if n >= 126:
            n = int.from_bytes(data[2:head], "big")
        size = head + 4 + n
        out.append(lg.unmask(data[:size]))
        data = data[size:]
    return out


def feed_in_pieces(engine: Any, client: Any, data: bytes, rng: random.Random, now: int) -> None:
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 2, 3, 7, 100, 5000, 70000))
        engine.feed(client, data[pos : pos + step], now)
        pos += step


# -- frames ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 125, 126, 65535, 65536])
def test_client_frames_are_masked(lg: ModuleType, n: int) -> None:
    data = os.urandom(n)
    frame = lg.client_frame(data, key=b"\x01\x02\x03\x04")
    assert frame[0] == 0x81
    assert frame[1] & 0x80
    assert lg.unmask(frame) == (lg.OP_TEXT, data)
    if n:
        assert data not in frame
    assert lg.unmask(lg.client_frame(data, lg.OP_PONG)) == (lg.OP_PONG, data)  # a random key


def test_frames_split_across_reads_are_all_counted(lg: ModuleType, engines: Callable[..., Any]) -> None:
    engine = engines("plain")
    client = engine.attach(FakeSocket())
    now = 10**18
    times = [now - 1000 * (i + 1) for i in range(40)]
    frames = [lg.server_frame(lg.payload(t, i).encode()) for i, t in enumerate(times[:30])]  # 7-bit lengths
    frames.append(lg.server_frame(lg.payload(times[30], 30, 300).encode()))  # 16-bit length
    frames.append(lg.server_frame(b"no marker here " * 20))
    big = lg.payload(times[31], 31, 40000) + lg.payload(times[32], 32, 40000)  # 64-bit length, two deliveries
    frames.append(lg.server_frame(big.encode()))
    frames += [lg.server_frame(lg.payload(t, 33 + i, 140).encode()) for i, t in enumerate(times[33:])]
    stream = b"".join(frames)
    feed_in_pieces(engine, client, stream[:500], random.Random(1), now)  # a byte at a time, mostly
    feed_in_pieces(engine, client, stream[500:], random.Random(2), now)
    assert client.count == engine.delivered == 40
    assert sorted(engine.lat) == sorted(now - t for t in times)
    assert client.left == b""
    assert client.state == lg.READY


def test_latency_sampled_one_in_four(lg: ModuleType, engines: Callable[..., Any]) -> None:
    engine = engines("plain")
    engine.sample_every = 4
    client = engine.attach(FakeSocket())
    stream = b"".join(lg.server_frame(lg.payload(i, i).encode()) for i in range(100))
    engine.feed(client, stream[:1234], 10**6)
    engine.feed(client, stream[1234:], 10**6)
    assert client.count == 100
    assert len(engine.lat) == 25
    assert len(set(engine.lat)) == 25


def test_ping_is_answered_with_pong(lg: ModuleType, engines: Callable[..., Any]) -> None:
    engine = engines("plain")
    sock = FakeSocket()
    client = engine.attach(sock)
    ping = lg.server_frame(b"hello", lg.OP_PING)
    engine.feed(client, ping[:3])
    assert not sock.sent
    engine.feed(client, ping[3:] + lg.server_frame(lg.payload(1, 1).encode()))
    assert sent_frames(lg, sock) == [(lg.OP_PONG, b"hello")]
    assert client.count == 1


def test_the_publisher_counts_its_copies_of_the_fan_out_not_the_replies(lg: ModuleType, engines: Callable[..., Any]) -> None:
    # The window of a flow-controlled publisher is its own copies of the
    # room's messages; the reply to a send echoes the content too, but says
    # only that the server took the message.
    engine = engines("ensemble")
    publisher = engine.attach(FakeSocket(), role="pub")
    body = lg.payload(1, 1)
    reply = f'{{"type":"reply","ref":10,"ok":true,"data":{{"content":"{body}"}}}}'.encode()
    event = f'{{"type":"message","topic":"room:r","data":{{"content":"{body}"}}}}'.encode()
    engine.feed(publisher, lg.server_frame(reply))
    assert publisher.count == 0
    engine.feed(publisher, lg.server_frame(event))
    assert publisher.count == 1
    batched = b"[" + event + b"," + reply + b"," + event + b"]"  # batched frames mix both
    engine.feed(publisher, lg.server_frame(batched))
    assert publisher.count == 3


def test_close_frame_records_code_and_reason(lg: ModuleType, engines: Callable[..., Any]) -> None:
    engine = engines("plain")
    sock = FakeSocket()
    client = engine.attach(sock)
    client.need = 5
    engine.feed(client, lg.server_frame(lg.payload(1, 1).encode()) + lg.server_frame(lg.close_payload(4008, "slow consumer"), lg.OP_CLOSE))
    assert (client.close_code, client.close_reason, client.fate) == (4008, "slow consumer", "close")
    assert client.state == lg.CLOSED
    assert sock.closed
    assert sent_frames(lg, sock) == [(lg.OP_CLOSE, lg.close_payload(4008))]
    assert dict(engine.closes) == {"4008": 1}
    assert (client.count, engine.lost) == (1, 1)


def test_fragmented_message_is_reassembled(lg: ModuleType, engines: Callable[..., Any]) -> None:
    engine = engines("plain")
    sock = FakeSocket()
    client = engine.attach(sock)
    text = lg.payload(7, 1).encode()
    stream = (
        lg.server_frame(text[:2], lg.OP_TEXT, fin=False)  # the marker split across fragments
        + lg.server_frame(b"ping!", lg.OP_PING)  # a control frame between fragments
        + lg.server_frame(text[2:30], lg.OP_CONT, fin=False)
        + lg.server_frame(text[30:], lg.OP_CONT)
        + lg.server_frame(lg.payload(8, 2).encode())
    )
    feed_in_pieces(engine, client, stream, random.Random(3), 100)
    assert client.count == 2
    assert sorted(engine.lat) == [92, 93]
    assert sent_frames(lg, sock) == [(lg.OP_PONG, b"ping!")]


def test_masked_or_stray_server_frames_are_errors(lg: ModuleType, engines: Callable[..., Any]) -> None:
    engine = engines("plain")
    client = engine.attach(FakeSocket())
    engine.feed(client, lg.client_frame(b"masked"))
    assert client.fate == "error: masked server frame"
    other = engine.attach(FakeSocket())
    engine.feed(other, lg.server_frame(b"orphan", lg.OP_CONT))
    assert other.fate == "error: continuation without a message"


def test_adapter_heartbeats(lg: ModuleType, engines: Callable[..., Any]) -> None:
    message = b'{"type":"message","data":{"content":"' + lg.payload(1, 1).encode() + b'"}}'
    for batch in (False, True):
        ensemble = engines("ensemble", batch=batch)
        sock = FakeSocket()
        client = ensemble.attach(sock)
        ensemble.feed(client, lg.server_frame(message) + lg.server_frame(b'{"type":"ping"}') + lg.server_frame(message))
        if batch:  # several events joined in one frame
            ensemble.feed(client, lg.server_frame(message + b'\n{"type":"ping"}\n' + message))
        assert sent_frames(lg, sock) == [(lg.OP_TEXT, b'{"type":"pong"}')] * (2 if batch else 1)
        assert client.count == (4 if batch else 2)
    socketio = engines("socketio")
    sock = FakeSocket()
    client = socketio.attach(sock)
    socketio.feed(client, lg.server_frame(b"2") + lg.server_frame(b'42["msg","' + lg.payload(1, 1).encode() + b'"]'))
    assert sent_frames(lg, sock) == [(lg.OP_TEXT, b"3")]
    assert client.count == 1


# -- against a real server -----------------------------------------------------------------------


def lifted_config() -> Any:
    """The per-user room limit and the inbound rate limit lifted (as a benchmark must)."""
    lifted = WSRateLimitConfig(messages_per_second=100_000, messages_per_minute=1_000_000, burst_size=100_000)
    return make_config(hub=HubConfig(room=RoomConfig(rate_limit=0), rate_limit=lifted))


async def loadgen(port: int, *args: str, stdin: bytes | None = None) -> tuple[dict[str, Any], str]:
    """Run the CLI against the server on ``port``: its JSON result and its stdout."""
    command = [sys.executable, str(BENCHMARKS / "loadgen.py"), *args, "--kind", "ensemble", "--url", f"ws://127.0.0.1:{port}"]
    command += ["--no-machine", "--workers", "1", "--timeout", "30", "--setup-timeout", "30"]
    with trio.fail_after(90):
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, stdin=stdin, check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(out[out.index("{") :])
    result: dict[str, Any] = report["result"]
    return result, out


async def test_fanout_and_echo_count_everything(transport: str) -> None:
    async with running_server(lifted_config(), transport=transport) as server:
        result, _ = await loadgen(server.port, "fanout", "--clients", "5", "--messages", "3")
        assert result["setup"]["ready"] == 5
        assert result["finished"]
        assert (result["deliveries"], result["expected"], result["clients_complete"]) == (15, 15, 5)
        assert result["latency"]["samples"] == 15
        assert result["publisher"]["errors"] == 0
        assert result["close_codes"] == {}

        assert result["setup"]["tcp_connected"] == 5
        assert result["setup"]["tcp_seconds"] <= result["setup"]["seconds"]

        # A publisher with at most 2 messages out (its own copies are its acks).
        result, _ = await loadgen(server.port, "fanout", "--clients", "5", "--messages", "10", "--window", "2")
        assert result["window"] == 2
        assert (result["deliveries"], result["expected"]) == (50, 50)
        assert result["publisher"]["sent"] == 10

        result, _ = await loadgen(server.port, "echo", "--round-trips", "20")
        assert result["latency"]["samples"] == 20
        assert result["round_trips_per_s"] > 0


async def test_openloop_idle_and_slow(transport: str) -> None:
    async with running_server(lifted_config(), transport=transport) as server:
        result, _ = await loadgen(server.port, "openloop", "--clients", "3", "--rate", "200", "--duration", "0.2")
        assert result["finished"]
        assert result["deliveries"] == 3 * 40
        assert result["publisher"]["sent"] == 40

        result, out = await loadgen(server.port, "idle", "--clients", "4", "--hold", "0.1")
        assert out.startswith("connected 4\n")
        assert result["end"]["open_at_end"] == 4
        result, out = await loadgen(server.port, "idle", "--clients", "2", stdin=b"")  # held until stdin closes
        assert out.startswith("connected 2\n")

        result, _ = await loadgen(server.port, "slow", "--clients", "4", "--messages", "30")
        for run in (result["baseline"], result["with_slow"]):
            assert run["finished"]
            assert run["deliveries"] == 3 * 30
        # Too few messages to fill its outbox: the slow client is still open, or closed as a slow consumer.
        assert result["slow_client"]["fate"] in ("open", "close")
        if result["slow_client"]["fate"] == "close":
            assert result["slow_client"]["close_code"] == 4008
