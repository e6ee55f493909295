"""Decode client frames into commands, and encode server frames: sans-IO.

Bytes (or text) in, a :class:`~ensemble.protocol._commands.Command` out, or
one :class:`ProtocolError`, whatever the input: no I/O, no Trio, no other
exception. Work is bounded before parsing: the size is checked first, then
the nesting depth by one regular-expression scan (no recursion), then the
standard library's JSON parser runs on at most ``max_size`` bytes nested at
most ``max_depth`` deep.

Encoders return compact UTF-8 JSON ``bytes``, serialised once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, NoReturn

from . import _commands as c

MAX_ID_LENGTH: Final = 200
"""Most characters in a room, user, message, notification or watch id (as the hub)."""
MAX_NAME_LENGTH: Final = 200
"""Most characters in a display name, role, message type or model name."""
MAX_REASON_LENGTH: Final = 1000
"""Most characters in a kick, ban or deny reason."""
MAX_TOKEN_LENGTH: Final = 16384
"""Most characters in a token."""
MAX_REF: Final = 2**53
"""Integer refs must be within ``±2**53`` (exact in JavaScript)."""
MAX_LIMIT: Final = 1000
"""Most items a ``history`` or ``notifications`` command may ask for."""
MAX_FILTERS: Final = 32
"""Most keys in a ``watch`` command's ``filters``."""

# Error codes of a frame the server could not use (decode's errors).
BAD_JSON: Final = "bad_json"
BAD_FRAME: Final = "bad_frame"
TOO_BIG: Final = "too_big"
TOO_DEEP: Final = "too_deep"
UNKNOWN_COMMAND: Final = "unknown_command"
INVALID: Final = "invalid"

DECODE_ERRORS: Final = frozenset({BAD_JSON, BAD_FRAME, TOO_BIG, TOO_DEEP, UNKNOWN_COMMAND, INVALID})
"""Every code :func:`decode` raises."""


class ProtocolError(Exception):
    """The client broke the protocol: a frame the server cannot use.

    Attributes:
        code: A stable, documented code (``bad_json``, ``bad_frame``,
            ``too_big``, ``too_deep``, ``unknown_command``, ``invalid``).
        detail: What was wrong, for the client's author.
        ref: The command's ``ref`` when it could be read, else ``None``.
    """

    def __init__(self, code: str, detail: str, ref: c.Ref = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.ref = ref

    def to_frame(self) -> bytes:
        """The ``error`` frame that tells the client."""
        return encode_error(self.code, self.detail, self.ref)


class _Invalid(Exception):
    """A field's value is wrong (becomes ``ProtocolError("invalid", ...)``)."""


# -- encoding ------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes (``ensure_ascii=False``; NaN refused).

    A string that cannot be UTF-8 (a lone surrogate) is escaped instead of
    breaking the frame.

    Raises:
        TypeError: Not JSON serialisable.
        ValueError: A non-finite float.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_default).encode("ascii")


def encode_reply(ref: c.Ref, data: Any = None) -> bytes:
    """``{"type":"reply","ref":ref,"ok":true,"data":data}``."""
    return dumps({"type": "reply", "ref": ref, "ok": True, "data": {} if data is None else data})


def encode_error(code: str, detail: str, ref: c.Ref = None, **extra: Any) -> bytes:
    """``{"type":"error","ref":ref,"code":code,"detail":detail,...extra}``.

    ``ref`` is left out when ``None`` (an error that answers no command: the
    seeds' ``{"type":"error","code":...,"detail":...}``).
    """
    frame: dict[str, Any] = {"type": "error"}
    if ref is not None:
        frame["ref"] = ref
    frame["code"] = code
    frame["detail"] = detail
    frame.update(extra)
    return dumps(frame)


def encode_pong(ref: c.Ref = None) -> bytes:
    """``{"type":"pong"}`` (with the ping's ``ref`` if it had one)."""
    return dumps({"type": "pong"} if ref is None else {"type": "pong", "ref": ref})


def encode_welcome(
    *,
    connection_id: str,
    user_id: str | None,
    guest: bool = False,
    notifications: Mapping[str, Any] | None = None,
    **extra: Any,
) -> bytes:
    """The ``welcome`` frame, the first a client receives.

    Args:
        connection_id: The connection's id.
        user_id: The authenticated user, or ``None`` until an ``auth``.
        guest: A development-mode guest identity.
        notifications: Where the connection's notification stream starts
            (``epoch``, ``last_seq``, ``recovered``, ``replayed``), or ``None``.
        **extra: More fields (``expires_at``, ``limits``, ...).
    """
    frame: dict[str, Any] = {
        "type": "welcome",
        "connection_id": connection_id,
        "user_id": user_id,
        "guest": guest,
        "notifications": None if notifications is None else dict(notifications),
    }
    frame.update(extra)
    return dumps(frame)


# -- decoding ------------------------------------------------------------------------

# A JSON string (skipped whole) or a bracket. Linear: no nested quantifiers.
_TOKENS: Final = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether brackets outside strings nest deeper than ``max_depth``."""
    if text.count("[") + text.count("{") <= max_depth:
        return False  # cannot nest deeper than there are brackets
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif token in "]}":
            depth -= 1
    return False


class _BadJSON(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _BadJSON("duplicate key in an object")
    return result


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Invalid(f"number {text[:40]} is out of range")
    return value


def _constant(text: str) -> NoReturn:
    raise _Invalid(f"{text} is not a JSON number")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _string(value: object, name: str, *, max_length: int, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be a string, got {_kind(value)}")
    if not empty and not value:
        raise _Invalid(f"{name} must not be empty")
    if len(value) > max_length:
        raise _Invalid(f"{name} has {len(value)} characters; at most {max_length} are allowed")
    if not _is_text(value):
        raise _Invalid(f"{name} is not valid Unicode (a lone surrogate)")
    return value


def _id(value: object, name: str) -> str:
    text = _string(value, name, max_length=MAX_ID_LENGTH)
    if "/" in text:
        raise _Invalid(f"{name} must not contain '/'")
    return text


def _name(value: object, name: str) -> str:
    return _string(value, name, max_length=MAX_NAME_LENGTH)


def _reason(value: object, name: str) -> str:
    return _string(value, name, max_length=MAX_REASON_LENGTH, empty=True)


def _token(value: object, name: str) -> str:
    return _string(value, name, max_length=MAX_TOKEN_LENGTH)


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"{name} must be true or false, got {_kind(value)}")
    return value


def _int(value: object, name: str, *, low: int, high: int) -> int:
    if type(value) is not int:
        raise _Invalid(f"{name} must be an integer, got {_kind(value)}")
    if not low <= value <= high:
        raise _Invalid(f"{name} must be between {low} and {high}, got {value}")
    return value


def _limit(value: object, name: str) -> int:
    return _int(value, name, low=1, high=MAX_LIMIT)


def _version(value: object, name: str) -> int:
    return _int(value, name, low=0, high=MAX_REF)


def _position(value: object, name: str) -> c.Position:
    if not isinstance(value, dict):
        raise _Invalid(f'{name} must be an object {{"epoch": "...", "seq": n}}, got {_kind(value)}')
    unknown = sorted(set(value) - {"epoch", "seq"})
    if unknown:
        raise _Invalid(f"{name} has unknown fields: {', '.join(unknown)}")
    if "epoch" not in value or "seq" not in value:
        raise _Invalid(f"{name} needs both epoch and seq")
    epoch = _string(value["epoch"], f"{name}.epoch", max_length=MAX_ID_LENGTH)
    seq = _int(value["seq"], f"{name}.seq", low=0, high=MAX_REF)
    return c.Position(epoch=epoch, seq=seq)


def _filters(value: object, name: str) -> dict[str, c.Scalar]:
    if not isinstance(value, dict):
        raise _Invalid(f"{name} must be an object of field values, got {_kind(value)}")
    if len(value) > MAX_FILTERS:
        raise _Invalid(f"{name} has {len(value)} keys; at most {MAX_FILTERS} are allowed")
    result: dict[str, c.Scalar] = {}
    for key, item in value.items():
        _string(key, f"{name} key", max_length=MAX_NAME_LENGTH)
        if isinstance(item, str):
            _string(item, f"{name}.{key}", max_length=MAX_ID_LENGTH * 5, empty=True)
        elif not (item is None or isinstance(item, (bool, int, float))):
            raise _Invalid(f"{name}.{key} must be a string, number, boolean or null, got {_kind(item)}")
        elif type(item) is int and abs(item) > MAX_REF:
            raise _Invalid(f"{name}.{key} is out of range")
        result[key] = item
    return result


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - JSON has no other kinds


_Parse = Callable[[object, str], object]
_REQUIRED: Final = object()


def _field(name: str, parse: _Parse, default: object = _REQUIRED, *, nullable: bool = False) -> tuple[str, _Parse, object, bool]:
    return (name, parse, default, nullable)


_CONTENT: Final = object()  # placeholder: content's limit is the frame size

_SPECS: Final[dict[str, tuple[type[Any], tuple[tuple[str, _Parse, object, bool], ...]]]] = {
    "auth": (c.Auth, (_field("token", _token), _field("since", _position, None, nullable=True))),
    "ping": (c.Ping, ()),
    "pong": (c.Pong, ()),
    "options": (c.Options, (_field("batch", _bool, None, nullable=True),)),
    "join": (
        c.Join,
        (_field("room", _id), _field("display_name", _name, None, nullable=True), _field("since", _position, None, nullable=True)),
    ),
    "leave": (c.Leave, (_field("room", _id), _field("membership", _bool, False))),
    "send": (c.Send, (_field("room", _id), _field("content", _CONTENT), _field("message_type", _name, "text"))),  # type: ignore[arg-type]
    "edit": (c.Edit, (_field("room", _id), _field("message_id", _id), _field("content", _CONTENT))),  # type: ignore[arg-type]
    "delete": (c.Delete, (_field("room", _id), _field("message_id", _id))),
    "typing": (c.Typing, (_field("room", _id), _field("typing", _bool, True))),
    "history": (c.History, (_field("room", _id), _field("limit", _limit, 50), _field("since", _position, None, nullable=True))),
    "members": (c.Members, (_field("room", _id),)),
    "kick": (c.Kick, (_field("room", _id), _field("user", _id), _field("reason", _reason, ""))),
    "ban": (c.Ban, (_field("room", _id), _field("user", _id), _field("reason", _reason, ""))),
    "unban": (c.Unban, (_field("room", _id), _field("user", _id))),
    "set_role": (c.SetRole, (_field("room", _id), _field("user", _id), _field("role", _name))),
    "request_join": (c.RequestJoin, (_field("room", _id), _field("display_name", _name, None, nullable=True))),
    "approve": (c.Approve, (_field("room", _id), _field("user", _id))),
    "deny": (c.Deny, (_field("room", _id), _field("user", _id), _field("reason", _reason, ""))),
    "join_requests": (c.JoinRequests, (_field("room", _id),)),
    "notifications": (c.Notifications, (_field("unread_only", _bool, False), _field("limit", _limit, 50))),
    "unread": (c.Unread, ()),
    "mark_read": (c.MarkRead, (_field("id", _id),)),
    "mark_all_read": (c.MarkAllRead, ()),
    "clear": (c.Clear, ()),
    "watch": (
        c.Watch,
        (
            _field("model", _name),
            _field("filters", _filters, None, nullable=True),
            _field("since", _version, None, nullable=True),
            _field("epoch", _id, None, nullable=True),
        ),
    ),
    "unwatch": (c.Unwatch, (_field("id", _id),)),
}

COMMAND_TYPES: Final = tuple(_SPECS)
"""The ``type`` of every client command, in documentation order."""


def _ref(obj: dict[str, Any]) -> c.Ref:
    ref = obj.get("ref")
    if ref is None:
        return None
    if type(ref) is int:
        if abs(ref) > MAX_REF:
            raise ProtocolError(INVALID, f"ref must be within ±2**53, got {ref}")
        return ref
    if isinstance(ref, str):
        if len(ref) > MAX_ID_LENGTH or not _is_text(ref):
            raise ProtocolError(INVALID, f"ref must be a string of at most {MAX_ID_LENGTH} characters")
        return ref
    raise ProtocolError(INVALID, f"ref must be a string or an integer, got {_kind(ref)}")


def decode(frame: str | bytes, *, max_size: int = 65536, max_depth: int = 32) -> c.Command:
    """Decode one client frame into a command.

    Unknown fields are ignored (so that newer clients work with older
    servers); a frame with a ``token`` and no ``type`` is an ``auth`` (the
    seeds' in-session token refresh).

    Args:
        frame: The frame as received: text, or UTF-8 bytes.
        max_size: Most bytes of UTF-8 a frame may have.
        max_depth: Most nesting of arrays and objects.

    Returns:
        The command.

    Raises:
        ProtocolError: The only exception, whatever the input: ``too_big``,
            ``bad_json`` (not JSON, not UTF-8, duplicate keys), ``too_deep``,
            ``bad_frame`` (not a JSON object), ``unknown_command``, or
            ``invalid`` (a missing field or one of the wrong type or length,
            an invalid id, a non-finite number). Its ``ref`` is the
            command's when it could be read.
    """
    if isinstance(frame, (bytes, bytearray, memoryview)):
        raw = bytes(frame)
        if len(raw) > max_size:
            raise ProtocolError(TOO_BIG, f"the frame has {len(raw)} bytes; at most {max_size} are allowed")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(BAD_JSON, "the frame is not valid UTF-8") from None
    elif isinstance(frame, str):
        text = frame
        if len(text) > max_size or (len(text) * 4 > max_size and len(text.encode("utf-8", "surrogatepass")) > max_size):
            raise ProtocolError(TOO_BIG, f"the frame has more than {max_size} bytes")
    else:
        raise ProtocolError(BAD_FRAME, f"a frame must be text or bytes, not {type(frame).__name__}")
    if _depth_exceeds(text, max_depth):
        raise ProtocolError(TOO_DEEP, f"the frame nests more than {max_depth} levels deep")
    try:
        obj = json.loads(text, object_pairs_hook=_pairs, parse_float=_float, parse_constant=_constant)
    except _Invalid as exc:
        raise ProtocolError(INVALID, str(exc)) from None
    except _BadJSON as exc:
        raise ProtocolError(BAD_JSON, f"the frame is not acceptable JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digits limit
        raise ProtocolError(BAD_JSON, f"the frame is not JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_FRAME, f"a frame must be a JSON object, got {_kind(obj)}")
    ref = _ref(obj)
    kind = obj.get("type")
    if kind is None:
        if "token" not in obj:
            raise ProtocolError(INVALID, 'the frame has no "type"', ref)
        kind = "auth"
    if not isinstance(kind, str):
        raise ProtocolError(INVALID, f"type must be a string, got {_kind(kind)}", ref)
    spec = _SPECS.get(kind)
    if spec is None:
        shown = kind[:MAX_NAME_LENGTH] if _is_text(kind) else "?"
        raise ProtocolError(UNKNOWN_COMMAND, f"unknown command type {shown!r}", ref)
    cls, fields = spec
    values: dict[str, object] = {"ref": ref}
    try:
        for name, parse, default, nullable in fields:
            value = obj.get(name)
            if value is None:
                if default is _REQUIRED or (name in obj and not nullable):
                    raise _Invalid(f"{kind} needs {name}" if name not in obj else f"{name} must not be null")
                if default is not None:
                    values[name] = default
                continue
            if parse is _CONTENT:
                values[name] = _string(value, name, max_length=max_size, empty=True)
            else:
                values[name] = parse(value, name)
    except _Invalid as exc:
        raise ProtocolError(INVALID, f"{kind}: {exc}", ref) from None
    command: c.Command = cls(**values)
    return command
