"""Ensemble: a realtime server for Python, built on Trio in the actor model.

The realtime actors (rooms, notifications, connections, live queries) start
with :func:`open_hub`; their names are exported here. The supervised actor
runtime is :mod:`ensemble.actors`; fault injection for tests is
:mod:`ensemble.testing`; everything else of the realtime layer is in
:mod:`ensemble.realtime`.
"""

from .realtime import (
    ApprovalRequired as ApprovalRequired,
    Banned as Banned,
    ConnectionInfo as ConnectionInfo,
    HistoryUnavailable as HistoryUnavailable,
    Hub as Hub,
    HubConfig as HubConfig,
    InvalidMessage as InvalidMessage,
    MemoryTransport as MemoryTransport,
    ModelChange as ModelChange,
    NotAllowed as NotAllowed,
    NotAMember as NotAMember,
    NotFound as NotFound,
    Notification as Notification,
    RateLimited as RateLimited,
    RealtimeError as RealtimeError,
    Room as Room,
    RoomConfig as RoomConfig,
    RoomFull as RoomFull,
    RoomMember as RoomMember,
    RoomMessage as RoomMessage,
    TooManyConnections as TooManyConnections,
    WebSocketRateLimiter as WebSocketRateLimiter,
    WSRateLimitConfig as WSRateLimitConfig,
    open_hub as open_hub,
)

__version__ = "0.1.0"
