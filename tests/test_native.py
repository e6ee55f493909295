"""The native transport's frames and HTTP, checked by independent implementations.

The fast path builds server frames itself (:mod:`ensemble.transport._frames`),
so a strict client library that shares no code with it, ``websockets``
(run in a thread: its synchronous client), reads them: text frames, close
frames with codes and reasons, ping/pong, fragmented client messages. Frames
a well-behaved client refuses to send (invalid UTF-8, unmasked, oversized)
are crafted by hand. The rest of the protocol runs on both transports in
the socket suite (``transport`` fixture).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from _sockets import closed_with, http_get, make_config, open_websocket_url, receive_json, request, running_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from ensemble.protocol import CloseCode
from ensemble.transport._frames import OP_CLOSE, OP_PING, OP_TEXT, FrameCache, accept_key, close_frame, frame, valid_key

DEADLINE = 10.0


# -- the frame builders (sans-IO) ---------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frames_of_every_length_encoding_parse_back(size: int) -> None:
    payload = b"x" * size
    framed = frame(payload)
    client = Connection(ConnectionType.CLIENT)  # a client's wsproto connection, after the handshake
    client.receive_data(framed)
    events = list(client.events())
    assert len(events) == 1
    assert isinstance(events[0], TextMessage)
    assert events[0].data == "x" * size
    assert events[0].message_finished


def test_control_frames() -> None:
    assert frame(b"hi", OP_PING) == bytes([0x80 | OP_PING, 2]) + b"hi"
    with pytest.raises(ValueError, match="125"):
        frame(b"x" * 126, OP_PING)
    assert close_frame(4008, "slow") == bytes([0x80 | OP_CLOSE, 6]) + struct.pack("!H", 4008) + b"slow"
    long = close_frame(1000, "é" * 100)  # cut to whole characters within 123 bytes
    assert len(long) - 2 <= 125
    assert long[4:].decode("utf-8") == "é" * 61
    for reserved in (1005, 1006, 999, 5000):
        with pytest.raises(ValueError, match="close code"):
            close_frame(reserved)
    assert frame(b"", OP_TEXT) == b"\x81\x00"


def test_the_handshake_keys() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455, section 1.3
    assert valid_key("dGhlIHNhbXBsZSBub25jZQ==")
    assert not valid_key("short")
    assert not valid_key("dGhlIHNhbXBsZSBub25jZQ")  # bad padding
    assert not valid_key("é")


def test_the_frame_cache_frames_each_payload_once() -> None:
    cache = FrameCache(size=8)
    payload = b'{"type":"message"}'
    first = cache.frame(payload)
    assert cache.frame(payload) is first  # the same bytes object for every connection
    assert cache.frames([payload, payload]) == first * 2
    assert (cache.hits, cache.misses) == (3, 1)
    equal_but_other = bytes(bytearray(payload))
    assert cache.frame(equal_but_other) == first  # keyed by object: framed again, same bytes
    assert cache.misses == 2
    kept = [os.urandom(8) for _ in range(50)]
    for item in kept:
        cache.frame(item)
    assert len(cache) <= 8
    with pytest.raises(ValueError, match="size"):
        FrameCache(size=0)


# -- a strict independent client ---------------------------------------------------------


def _client_session(url: str, **options: Any) -> dict[str, Any]:
    """Runs in a thread: the websockets sync client against the server."""
    out: dict[str, Any] = {}
    with connect(url, open_timeout=DEADLINE, close_timeout=DEADLINE, **options) as ws:
        out["welcome"] = ws.recv(timeout=DEADLINE)
        out["subprotocol"] = ws.subprotocol
        # A ping frame is answered with a pong frame.
        pong = ws.ping(b"are you there")
        out["pong"] = pong.wait(DEADLINE)
        # A fragmented client message is reassembled.
        ws.send(['{"type":"ping",', '"ref":7}'])
        out["fragmented"] = ws.recv(timeout=DEADLINE)
        ws.send('{"type":"join","ref":8,"room":"lobby"}')
        frames = []
        while True:
            text = ws.recv(timeout=DEADLINE)
            frames.append(text)
            if '"ref":8' in text:
                break
        out["join"] = frames
        ws.send('{"type":"send","ref":9,"room":"lobby","content":"' + "é" * 30000 + '"}')  # a 16-bit length, multi-byte UTF-8
        while True:
            text = ws.recv(timeout=DEADLINE)
            if '"ref":9' in text:
                out["big"] = text
                break
    out["close"] = (ws.close_code, ws.close_reason)
    return out


async def test_websockets_reads_every_frame_of_the_native_transport() -> None:
    async with running_server(make_config(), transport="native") as server:
        out = await trio.to_thread.run_sync(_client_session, server.ws_url("token=alice"))
    assert '"type":"welcome"' in out["welcome"]
    assert out["pong"] is True
    assert out["fragmented"] == '{"type":"pong","ref":7}'
    assert any('"type":"member_joined"' in text for text in out["join"])
    assert '"ok":true' in out["big"]
    assert "é" * 30000 in out["big"]
    assert out["close"][0] == 1000  # the client closed; the server answered


def _closed_by_server(url: str) -> tuple[int | None, str | None]:
    with connect(url, open_timeout=DEADLINE, close_timeout=DEADLINE) as ws:
        ws.recv(timeout=DEADLINE)
        try:
            while True:
                ws.recv(timeout=DEADLINE)
        except ConnectionClosed:
            pass
    return ws.close_code, ws.close_reason


async def test_websockets_reads_a_close_frame_with_code_and_reason() -> None:
    async with running_server(make_config(), transport="native") as server, trio.open_nursery() as nursery:
        result: list[tuple[int | None, str | None]] = []

        async def client() -> None:
            result.append(await trio.to_thread.run_sync(_closed_by_server, server.ws_url("token=alice")))

        nursery.start_soon(client)
        with trio.fail_after(DEADLINE):
            while not server.hub.connections.get_user_connections("alice"):  # noqa: ASYNC110 (another thread connects)
                await trio.sleep(0.01)
        [connection] = server.hub.connections.get_user_connections("alice")
        await server.hub.connections.disconnect(connection.connection_id, code=int(CloseCode.DISCONNECTED), reason="kicked off the server")
    assert result == [(4003, "kicked off the server")]


# -- frames a good client never sends -----------------------------------------------------


async def _handshake(port: int, resource: str = "/ws?token=alice") -> tuple[trio.SocketStream, WSConnection]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"127.0.0.1:{port}", target=resource)))
    with trio.fail_after(DEADLINE):
        while True:
            ws.receive_data(await stream.receive_some(65536))
            if any(isinstance(event, AcceptConnection) for event in ws.events()):
                return stream, ws


async def _close_code(stream: trio.SocketStream, ws: WSConnection) -> int | None:
    with trio.fail_after(DEADLINE):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return None
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    return int(event.code)


def _masked(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None) -> bytes:
    """A client frame (masked); ``length`` may announce more payload than follows."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = bytes([first, 0x80 | size])
    elif size < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(
    ("name", "frames", "code"),
    [
        ("invalid UTF-8", [_masked(OP_TEXT, b'{"type":"ping","x":"\xff\xfe"}')], CloseCode.INVALID_PAYLOAD),
        (
            "invalid UTF-8 across fragments",
            [_masked(OP_TEXT, b'{"a":"\xe2', fin=False), _masked(0x0, b'\x28"}')],
            CloseCode.INVALID_PAYLOAD,
        ),
        ("unmasked", [bytes([0x81, 2]) + b"{}"], CloseCode.PROTOCOL_ERROR),
        ("a binary frame", [_masked(0x2, b"\x00\x01")], CloseCode.UNSUPPORTED_DATA),
        ("a fragmented control frame", [_masked(OP_PING, b"x", fin=False)], CloseCode.PROTOCOL_ERROR),
    ],
)
async def test_a_bad_frame_gets_its_close_code_and_others_go_on(name: str, frames: list[bytes], code: CloseCode) -> None:
    async with running_server(make_config(), transport="native") as server, open_websocket_url(server.ws_url("token=bob")) as bob:
        await receive_json(bob)
        stream, ws = await _handshake(server.port)
        try:
            for data in frames:
                await stream.send_all(data)
            assert await _close_code(stream, ws) == code, name
        finally:
            await stream.aclose()
        assert (await request(bob, 1, type="ping"))["type"] == "pong"


async def test_an_oversized_frame_is_refused_before_it_is_buffered_whole() -> None:
    """A frame announcing 64 MiB: the server closes with 1009 after the first
    bytes past the limit, without waiting for (or buffering) the rest."""
    config = make_config(limits__max_message_size=1024)
    async with running_server(config, transport="native") as server:
        stream, ws = await _handshake(server.port)
        try:
            await stream.send_all(_masked(OP_TEXT, b"x" * 2048, length=64 << 20))
            assert await _close_code(stream, ws) == CloseCode.MESSAGE_TOO_BIG
        finally:
            await stream.aclose()


async def test_an_oversized_fragmented_message_is_refused() -> None:
    config = make_config(limits__max_message_size=1024)
    async with running_server(config, transport="native") as server:
        stream, ws = await _handshake(server.port)
        try:
            for _ in range(3):
                await stream.send_all(_masked(OP_TEXT if _ == 0 else 0x0, b"x" * 500, fin=False))
            assert await _close_code(stream, ws) == CloseCode.MESSAGE_TOO_BIG
        finally:
            await stream.aclose()


# -- handshake and HTTP -------------------------------------------------------------------


async def test_bad_handshakes_get_http_errors() -> None:
    async with running_server(make_config(), transport="native") as server:
        for headers, status in [
            ({"Sec-WebSocket-Version": "8"}, 426),
            ({"Sec-WebSocket-Key": "short"}, 400),
        ]:
            raw = {
                "Host": "127.0.0.1",
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
                **headers,
            }
            head = "GET /ws?token=alice HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in raw.items()) + "\r\n"
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(head.encode())
                with trio.fail_after(DEADLINE):
                    answer = await stream.receive_some(4096)
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            with trio.fail_after(DEADLINE):
                answer = await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert (await http_get(server.port, "/healthz"))[0] == 200  # still serving


async def test_a_silent_connection_is_dropped_after_the_handshake_timeout() -> None:
    config = make_config(limits__handshake_timeout=0.2)
    async with running_server(config, transport="native") as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET /ws HTTP/1.1\r\n")  # never finished
            with trio.fail_after(DEADLINE):
                assert await stream.receive_some(4096) == b""


async def test_the_native_transport_serves_the_http_app() -> None:
    config = make_config(api_keys=("k" * 32,))
    async with running_server(config, transport="native") as server:
        status, body = await http_get(server.port, "/healthz")
        assert status == 200
        status, body = await http_get(server.port, "/metrics")
        assert status == 200
        assert b"ensemble_connections" in body
        status, body = await http_get(server.port, "/")
        assert status == 200
        assert b"<html" in body.lower()
        status, _ = await http_get(server.port, "/nowhere")
        assert status == 404


# -- TLS ------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    client = ssl.create_default_context(cadata=certificate.public_bytes(serialization.Encoding.PEM).decode())
    return cert_path, key_path, client


def _tls_session(url: str, context: ssl.SSLContext) -> tuple[str, int | None]:
    with connect(url, ssl=context, open_timeout=DEADLINE, close_timeout=DEADLINE) as ws:
        welcome = ws.recv(timeout=DEADLINE)
        ws.send('{"type":"ping","ref":1}')
        assert ws.recv(timeout=DEADLINE) == '{"type":"pong","ref":1}'
    assert isinstance(welcome, str)
    return welcome, ws.close_code


async def test_tls_on_both_transports(transport: str, tmp_path: Path) -> None:
    cert, key, client = _self_signed(tmp_path)
    config = make_config(tls_certfile=str(cert), tls_keyfile=str(key))
    async with running_server(config, transport=transport) as server:
        url = f"wss://127.0.0.1:{server.port}/ws?token=alice"
        welcome, code = await trio.to_thread.run_sync(_tls_session, url, client)
    assert '"user_id":"alice"' in welcome
    assert code == 1000


async def test_a_server_close_is_answered_and_ends_the_connection_task() -> None:
    async with running_server(make_config(), transport="native") as server, open_websocket_url(server.ws_url("token=alice")) as ws:
        welcome = await receive_json(ws)
        app = server.app
        assert app.handler is not None
        await app.handler.close(welcome["connection_id"], code=CloseCode.DISCONNECTED, reason="bye")
        assert await closed_with(ws) == 4003
        with trio.fail_after(DEADLINE):
            while server.hub.connections.connection_count:  # noqa: ASYNC110 (the connection task ends soon after)
                await trio.sleep(0.01)


async def test_the_message_size_limit_counts_utf8_bytes(transport: str) -> None:
    """700 characters of 2 bytes each are over a 1024-byte limit on both transports."""
    config = make_config(limits__max_message_size=1024)
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as ws:
        await receive_json(ws)
        await ws.send_message('{"type":"ping","pad":"' + "é" * 700 + '"}')
        assert await closed_with(ws) == CloseCode.MESSAGE_TOO_BIG
