"""Server-to-client WebSocket frames, built once (sans-IO: no trio, no sockets).

A server's frames are never masked (RFC 6455, section 5.1), so the bytes of
a text frame depend only on its payload: every recipient of an event can be
sent the *same* bytes object. :class:`FrameCache` frames each payload once,
the first time any connection writes it, and hands the same frame to every
other connection that writes the same payload object (a fan-out hands the
one ``Event.encoded`` bytes object to each recipient's outbox).

Compression (permessage-deflate) is never negotiated on this path: it would
make each connection's bytes different.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Final

OP_TEXT: Final = 0x1
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_FIN: Final = 0x80
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SHORT: Final = [bytes((_FIN | OP_TEXT, n)) for n in range(126)]
_MEDIUM: Final = struct.Struct("!BBH")
_LONG: Final = struct.Struct("!BBQ")


def frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One unmasked, final frame of ``opcode`` holding ``payload``.

    Args:
        payload: The payload (UTF-8 for a text frame; at most 125 bytes for a
            control frame).
        opcode: ``OP_TEXT`` (default), ``OP_CLOSE``, ``OP_PING`` or ``OP_PONG``.

    Raises:
        ValueError: A control frame's payload is over 125 bytes.
    """
    size = len(payload)
    if opcode == OP_TEXT and size < 126:
        return _SHORT[size] + payload
    if opcode >= OP_CLOSE and size > 125:
        raise ValueError(f"a control frame holds at most 125 bytes, not {size}")
    if size < 126:
        return bytes((_FIN | opcode, size)) + payload
    if size < 65536:
        return _MEDIUM.pack(_FIN | opcode, 126, size) + payload
    return _LONG.pack(_FIN | opcode, 127, size) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and ``reason`` (cut to fit 123 bytes of UTF-8).

    Raises:
        ValueError: ``code`` is not a close code a server may send.
    """
    if not (1000 <= code <= 4999) or code in (1004, 1005, 1006, 1015):
        raise ValueError(f"{code} is not a close code that may be sent")
    encoded = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return frame(struct.pack("!H", code) + encoded, OP_CLOSE)


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` answer to a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def valid_key(key: str) -> bool:
    """Whether ``key`` is a ``Sec-WebSocket-Key``: base64 of 16 bytes."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


class FrameCache:
    """Text frames by payload *object*: each payload is framed once.

    A small table keyed by ``id(payload)`` that keeps the payload alive with
    its frame (so an id is never reused while its entry exists), evicting
    the oldest entries past ``size``. A fan-out writes the same payload to
    many connections within a short time, so the table stays small.

    Args:
        size: The most payloads remembered.
    """

    __slots__ = ("_entries", "_size", "hits", "misses")

    def __init__(self, size: int = 4096) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        self._entries: dict[int, tuple[bytes, bytes]] = {}
        self._size = size
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def frame(self, payload: bytes) -> bytes:
        """The text frame of ``payload``: built the first time, shared after."""
        entry = self._entries.get(id(payload))
        if entry is not None and entry[0] is payload:
            self.hits += 1
            return entry[1]
        self.misses += 1
        framed = frame(payload)
        entries = self._entries
        if len(entries) >= self._size:
            for key in list(entries)[: max(1, self._size // 4)]:  # the oldest quarter
                del entries[key]
        entries[id(payload)] = (payload, framed)
        return framed

    def frames(self, payloads: list[bytes]) -> bytes:
        """The frames of ``payloads``, in order, as one buffer (one socket write)."""
        get = self._entries.get
        out: list[bytes] = []
        append = out.append
        hits = 0
        for payload in payloads:
            entry = get(id(payload))
            if entry is not None and entry[0] is payload:
                append(entry[1])
                hits += 1
            else:
                append(self.frame(payload))
        self.hits += hits
        return out[0] if len(out) == 1 else b"".join(out)
