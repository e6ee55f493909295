"""The Ensemble wire protocol: sans-IO (bytes in, commands out; no trio).

:func:`decode` turns one client frame into a command (or raises
:class:`ProtocolError`, and nothing else); the ``encode_*`` functions make
the server's frames. See ``docs/protocol.md``.
"""

from ._close import CloseCode as CloseCode
from ._codec import (
    COMMAND_TYPES as COMMAND_TYPES,
    DECODE_ERRORS as DECODE_ERRORS,
    ProtocolError as ProtocolError,
    decode as decode,
    dumps as dumps,
    encode_error as encode_error,
    encode_pong as encode_pong,
    encode_reply as encode_reply,
    encode_welcome as encode_welcome,
)
from ._commands import (
    Approve as Approve,
    Auth as Auth,
    Ban as Ban,
    Clear as Clear,
    Command as Command,
    Delete as Delete,
    Deny as Deny,
    Edit as Edit,
    History as History,
    Join as Join,
    JoinRequests as JoinRequests,
    Kick as Kick,
    Leave as Leave,
    MarkAllRead as MarkAllRead,
    MarkRead as MarkRead,
    Members as Members,
    Notifications as Notifications,
    Options as Options,
    Ping as Ping,
    Pong as Pong,
    Position as Position,
    Ref as Ref,
    RequestJoin as RequestJoin,
    Send as Send,
    SetRole as SetRole,
    Typing as Typing,
    Unban as Unban,
    Unread as Unread,
    Unwatch as Unwatch,
    Watch as Watch,
)
