"""The realtime actors: rooms, user mailboxes, connections, live queries.

Start them all with :func:`open_hub`; each room, user mailbox and connection
is its own supervised actor. See ``docs/embedding.md``.
"""

from ._auth import (
    CLOSE_UNAUTHENTICATED as CLOSE_UNAUTHENTICATED,
    authenticate_handshake as authenticate_handshake,
    origin_allows_cookies as origin_allows_cookies,
    set_default_authenticator as set_default_authenticator,
    ws_auth_from_cookie as ws_auth_from_cookie,
    ws_auth_from_query as ws_auth_from_query,
    ws_authenticated as ws_authenticated,
)
from ._connections import (
    CLOSE_GOING_AWAY as CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR as CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL as CLOSE_NORMAL,
    RATE_LIMITED as RATE_LIMITED,
    SLOW_CONSUMER as SLOW_CONSUMER,
    BatchTransport as BatchTransport,
    ConnectionManager as ConnectionManager,
    ConnectionManagerStatistics as ConnectionManagerStatistics,
    DirectTransport as DirectTransport,
    MemoryTransport as MemoryTransport,
    RoomStats as RoomStats,
    Transport as Transport,
    TransportClosed as TransportClosed,
)
from ._errors import (
    ApprovalRequired as ApprovalRequired,
    Banned as Banned,
    HistoryUnavailable as HistoryUnavailable,
    InvalidMessage as InvalidMessage,
    NotAllowed as NotAllowed,
    NotAMember as NotAMember,
    NotFound as NotFound,
    RateLimited as RateLimited,
    RealtimeError as RealtimeError,
    RoomFull as RoomFull,
    TooManyConnections as TooManyConnections,
)
from ._events import Audience as Audience, Event as Event, Subscriber as Subscriber
from ._hub import Hub as Hub, HubConfig as HubConfig, open_hub as open_hub
from ._live import (
    LIVE_RESET as LIVE_RESET,
    LiveConfig as LiveConfig,
    LiveQuery as LiveQuery,
    LiveStatistics as LiveStatistics,
    LiveStore as LiveStore,
    LiveWatch as LiveWatch,
    WatchOverflowed as WatchOverflowed,
)
from ._models import (
    Connected as Connected,
    ConnectionInfo as ConnectionInfo,
    ModelChange as ModelChange,
    Notification as Notification,
    Resumption as Resumption,
    RoomConfig as RoomConfig,
    RoomJoin as RoomJoin,
    RoomMember as RoomMember,
    RoomMessage as RoomMessage,
)
from ._notification_store import (
    InMemoryNotificationStore as InMemoryNotificationStore,
    NotificationStore as NotificationStore,
    UserRecord as UserRecord,
)
from ._notifications import NotificationManager as NotificationManager
from ._outbox import Outbox as Outbox, OutboxStatistics as OutboxStatistics
from ._ratelimit import (
    RateLimiterStatistics as RateLimiterStatistics,
    SlidingWindowLimit as SlidingWindowLimit,
    WebSocketRateLimiter as WebSocketRateLimiter,
    WSRateLimitConfig as WSRateLimitConfig,
)
from ._room import PERMISSIONS as PERMISSIONS, Room as Room, RoomStatistics as RoomStatistics
from ._room_store import (
    InMemoryRoomStore as InMemoryRoomStore,
    JoinRequest as JoinRequest,
    RoomRecord as RoomRecord,
    RoomStore as RoomStore,
)
