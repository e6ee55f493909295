"""WebSocket close codes of the Ensemble protocol, and whether to reconnect.

The table is the contract with clients (docs/protocol.md): a client
reconnects (with backoff and jitter, then resumes with its positions) after
a code whose :attr:`CloseCode.reconnect` is true, and does not after the
others until something changes (a new token, a fixed client, a user action).
"""

from __future__ import annotations

import enum
from typing import Final


class CloseCode(enum.IntEnum):
    """Every close code Ensemble sends (RFC 6455 range and 4000-4999)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutdown or restart
    PROTOCOL_ERROR = 1002  # a WebSocket-level violation
    UNSUPPORTED_DATA = 1003  # a binary frame where text is expected
    INVALID_PAYLOAD = 1007  # invalid UTF-8 in a text frame
    POLICY_VIOLATION = 1008  # Origin not allowed (or another policy refusal)
    MESSAGE_TOO_BIG = 1009  # a frame over max_message_size
    INTERNAL_ERROR = 1011  # a server bug (a crash of the connection actor)
    TRY_AGAIN_LATER = 1013  # overload: too many connections (global or per user)
    UNAUTHENTICATED = 4001  # no valid authentication presented (the first seed's code)
    TOKEN_EXPIRED = 4002  # the token expired and was not refreshed in time
    DISCONNECTED = 4003  # disconnected by the server: kicked off the server, banned
    PROTOCOL_VIOLATION = 4004  # repeated application-protocol errors (garbage frames)
    SLOW_CONSUMER = 4008  # the outbound queue overflowed; the reason holds resume positions
    HEARTBEAT_TIMEOUT = 4009  # the peer did not answer pings
    RATE_LIMITED = 4029  # kept sending over the inbound rate limit after error replies

    @property
    def reconnect(self) -> bool:
        """Whether a client should reconnect (with backoff) after this code."""
        return self in _RECONNECT


_RECONNECT: Final = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.INTERNAL_ERROR,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.SLOW_CONSUMER,
        CloseCode.HEARTBEAT_TIMEOUT,
        CloseCode.RATE_LIMITED,
        CloseCode.TOKEN_EXPIRED,  # after refreshing the token
    }
)
