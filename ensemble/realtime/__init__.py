"""The realtime actors: rooms, user mailboxes, connections, live queries.

Start them all with :func:`open_hub`; each room, user mailbox and connection
is its own supervised actor. See ``docs/embedding.md``.
"""

from ._connections import (
    CLOSE_GOING_AWAY as CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR as CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL as CLOSE_NORMAL,
    SLOW_CONSUMER as SLOW_CONSUMER,
    ConnectionManager as ConnectionManager,
    ConnectionManagerStatistics as ConnectionManagerStatistics,
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
    SlowConsumer as SlowConsumer,
    TooManyConnections as TooManyConnections,
)
from ._events import Audience as Audience, Event as Event, Subscriber as Subscriber
from ._hub import Hub as Hub, HubConfig as HubConfig, open_hub as open_hub
from ._live import (
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
