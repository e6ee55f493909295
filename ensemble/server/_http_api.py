"""The HTTP API for backends: framework-free ASGI, JSON in and out.

A backend pushes events with an API key (``Authorization: Bearer <key>``
or ``X-API-Key: <key>``, compared in constant time with
:func:`hmac.compare_digest`, never logged). docs/http-api.md lists every
endpoint with a curl example (a test runs them):

================================  =========  ======================================
Path (under the app's root)       Method     Does
================================  =========  ======================================
``/healthz``                      GET        the process is up (no key)
``/readyz``                       GET        the hub runs and accepts (no key)
``/metrics``                      GET        Prometheus text (no key)
``/api/rooms/{room}/publish``     POST       a ``system`` event to a room
``/api/rooms/{room}/presence``    GET        members, and who is online
``/api/rooms/{room}/history``     GET        recent messages (``limit``, ``since``)
``/api/rooms/{room}/kick``        POST       remove a member
``/api/rooms/{room}/ban``         POST       ban a user
``/api/rooms/{room}/unban``       POST       lift a ban
``/api/users/{user}/notify``      POST       a notification to a user
``/api/users/{user}/online``      GET        whether the user is connected
``/api/users/{user}/disconnect``  POST       close the user's connections (4003)
``/api/broadcast``                POST       a ``data`` event to every connection
``/api/live/{model}/{action}``    POST       live-query change: create/update/delete
================================  =========  ======================================

Every error is ``{"error": "<code>", "detail": "..."}`` with a status code:
400 bad input, 401 no or wrong key, 403 the API is disabled (no key
configured), 404 unknown path or thing, 405 wrong method, 409 a refusal of
the room, 410 history no longer kept, 413 body too large, 415 not JSON,
503 not ready. An unexpected error is 500 with no detail (it is logged).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl

import trio

from ..actors import ActorError
from ..protocol import CloseCode
from ..realtime import HistoryUnavailable, Hub, RealtimeError
from ._metrics import CONTENT_TYPE_LATEST

logger = logging.getLogger("ensemble.server.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY: Final = 1 << 20
"""Largest request body accepted by default (1 MiB)."""

_JSON: Final = [(b"content-type", b"application/json")]
_NO_STORE: Final = (b"cache-control", b"no-store")


class ApiError(Exception):
    """An answer other than success: a status, a code and a detail.

    Args:
        status: The HTTP status.
        code: A short machine-readable code (``"bad_request"``).
        detail: What went wrong, for a human.
        headers: Extra response headers.
        extra: Extra fields of the JSON body.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = list(headers)
        self.extra = dict(extra or {})


def _bad(detail: str) -> ApiError:
    return ApiError(400, "bad_request", detail)


Handler = Callable[["_Request"], Awaitable[Any]]


class _Request:
    """One API request: its path parameters, query and JSON body."""

    def __init__(self, params: Sequence[str], query: Mapping[str, str], body: Any) -> None:
        self.params = params
        self.query = query
        self.body = body

    def field(self, name: str, kind: type | tuple[type, ...], *, default: Any = ..., what: str = "") -> Any:
        body = self.body if isinstance(self.body, Mapping) else {}
        if name not in body:
            if default is ...:
                raise _bad(f"the body needs {name!r}{what}")
            return default
        value = body[name]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise _bad(f"{name!r} must be {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise _bad(f"{name!r} must be {_kind_name(kind)}, got {type(value).__name__}")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "an object", str: "a string", int: "an integer", list: "an array", float: "a number", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


class HttpApi:
    """Serves the HTTP API, health, readiness and metrics for one app.

    Args:
        hub: Returns the running hub, or ``None`` before start-up.
        api_keys: The accepted keys (empty: the ``/api`` endpoints answer
            403; health, readiness and metrics stay open).
        ready: Whether the server accepts connections now (``/readyz``).
        metrics: Renders the Prometheus text (``/metrics``).
        max_body_size: Largest request body, in bytes (larger: 413).
    """

    def __init__(
        self,
        hub: Callable[[], Hub | None],
        *,
        api_keys: Sequence[str] = (),
        ready: Callable[[], bool],
        metrics: Callable[[], bytes],
        max_body_size: int = DEFAULT_MAX_BODY,
    ) -> None:
        self._hub = hub
        self._keys = [key.encode() for key in api_keys]
        self._ready = ready
        self._metrics = metrics
        self.max_body_size = max_body_size
        # (method, path pattern) -> handler; "{}" matches one path segment.
        self._routes: dict[tuple[str, ...], dict[str, Handler]] = {
            ("rooms", "{}", "publish"): {"POST": self._publish},
            ("rooms", "{}", "presence"): {"GET": self._presence},
            ("rooms", "{}", "history"): {"GET": self._history},
            ("rooms", "{}", "kick"): {"POST": self._kick},
            ("rooms", "{}", "ban"): {"POST": self._ban},
            ("rooms", "{}", "unban"): {"POST": self._unban},
            ("users", "{}", "notify"): {"POST": self._notify},
            ("users", "{}", "online"): {"GET": self._online},
            ("users", "{}", "disconnect"): {"POST": self._disconnect},
            ("broadcast",): {"POST": self._broadcast},
            ("live", "{}", "{}"): {"POST": self._live},
        }

    def handles(self, path: str) -> bool:
        """Whether ``path`` (relative to the app's root) is the API's."""
        return path in ("/healthz", "/readyz", "/metrics") or path == "/api" or path.startswith("/api/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """Answer one HTTP request whose app-relative path is ``path``."""
        method = scope.get("method", "GET")
        try:
            if path in ("/healthz", "/readyz", "/metrics"):
                if method not in ("GET", "HEAD"):
                    raise ApiError(405, "method_not_allowed", f"{path} answers GET", headers=[(b"allow", b"GET, HEAD")])
                await self._probe(path, send, head=method == "HEAD")
                return
            status, result = await self._api(scope, receive, method, path)
        except ApiError as error:
            await _send_json(send, error.status, {"error": error.code, "detail": error.detail, **error.extra}, error.headers)
            return
        await _send_json(send, status, result)

    async def _probe(self, path: str, send: Send, *, head: bool) -> None:
        if path == "/healthz":
            await _send_json(send, 200, {"status": "ok"}, head=head)
        elif path == "/readyz":
            hub = self._hub()
            if hub is None or not self._ready():
                await _send_json(send, 503, {"status": "not ready"}, head=head)
            else:
                await _send_json(send, 200, {"status": "ready", "connections": hub.connections.connection_count}, head=head)
        else:
            body = self._metrics()
            await _send(send, 200, b"" if head else body, [(b"content-type", CONTENT_TYPE_LATEST.encode()), _NO_STORE])

    async def _api(self, scope: Scope, receive: Receive, method: str, path: str) -> tuple[int, Any]:
        self._authorize(scope)
        segments = path.removeprefix("/api").strip("/").split("/")
        handlers, params = self._match(segments)
        handler = handlers.get(method)
        if handler is None:
            allow = ", ".join(sorted(handlers))
            raise ApiError(405, "method_not_allowed", f"{path} answers {allow}", headers=[(b"allow", allow.encode())])
        body = await self._read_body(scope, receive) if method == "POST" else None
        query = _query(scope)
        hub = self._hub()
        if hub is None or not self._ready():
            raise ApiError(503, "not_ready", "the server is starting or shutting down", headers=[(b"retry-after", b"1")])
        try:
            return 200, await handler(_Request(params, query, body))
        except ApiError:
            raise
        except HistoryUnavailable as exc:
            raise ApiError(
                410,
                "history_unavailable",
                str(exc),
                extra={"epoch": exc.epoch, "first_seq": exc.first_seq, "last_seq": exc.last_seq},
            ) from None
        except LookupError as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except RealtimeError as exc:  # refusals: NotAllowed, Banned, RoomFull, ... (PermissionError)
            raise ApiError(409, type(exc).__name__, str(exc)) from None
        except (ValueError, TypeError) as exc:
            raise _bad(str(exc)) from None
        except ActorError as exc:
            logger.warning("API %s %s: %r", method, path, exc)
            raise ApiError(503, "unavailable", "the actor handling this is unavailable; retry", headers=[(b"retry-after", b"1")]) from None
        except Exception:
            logger.exception("API %s %s failed", method, path)
            raise ApiError(500, "internal_error", "internal error") from None

    def _authorize(self, scope: Scope) -> None:
        if not self._keys:
            raise ApiError(403, "api_disabled", "the HTTP API is disabled: configure api_keys (ENSEMBLE_API_KEYS)")
        presented: bytes | None = None
        for name, value in scope.get("headers", ()):
            lowered = name.lower()
            if lowered == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = credential.strip()
            elif lowered == b"x-api-key":
                presented = value.strip()
        if presented is None:
            raise ApiError(401, "unauthorized", "an API key is required", headers=[(b"www-authenticate", b"Bearer")])
        # Compare with every key (no early exit) so timing says nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise ApiError(
                401, "unauthorized", "the API key is not valid", headers=[(b"www-authenticate", b'Bearer error="invalid_token"')]
            )

    def _match(self, segments: list[str]) -> tuple[dict[str, Handler], list[str]]:
        for pattern, handlers in self._routes.items():
            if len(pattern) != len(segments):
                continue
            params: list[str] = []
            for part, segment in zip(pattern, segments, strict=True):
                if part == "{}":
                    if not segment:
                        break
                    params.append(segment)
                elif part != segment:
                    break
            else:
                return handlers, params
        raise ApiError(404, "not_found", "no such API endpoint")

    async def _read_body(self, scope: Scope, receive: Receive) -> Any:
        for name, value in scope.get("headers", ()):
            lowered = name.lower()
            if lowered == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _bad("Content-Length is not a number") from None
                if length > self.max_body_size:
                    raise ApiError(413, "body_too_large", f"the body is over {self.max_body_size} bytes")
            elif lowered == b"content-type":
                media = value.split(b";", 1)[0].strip().lower()
                if media != b"application/json":
                    raise ApiError(415, "unsupported_media_type", "send JSON (Content-Type: application/json)")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "bad_request", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                raise ApiError(413, "body_too_large", f"the body is over {self.max_body_size} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise _bad("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    # -- endpoints --------------------------------------------------------------------

    def _hub_now(self) -> Hub:
        hub = self._hub()
        if hub is None:  # checked before the handler runs; keeps mypy honest
            raise ApiError(503, "not_ready", "the server is starting or shutting down")
        return hub

    async def _publish(self, request: _Request) -> Any:
        data = request.field("data", dict)
        room = await self._hub_now().room(request.params[0])
        await room.broadcast(data)
        return {"ok": True}

    async def _presence(self, request: _Request) -> Any:
        hub = self._hub_now()
        room_id = request.params[0]
        room = await hub.room(room_id)
        members = await room.get_members()
        subscribed = sorted({c.user_id for c in hub.connections.get_room_connections(room_id) if c.user_id is not None})
        return {
            "room_id": room_id,
            "members": [{**member.to_dict(), "online": hub.is_online(member.user_id)} for member in members],
            "online": subscribed,
        }

    async def _history(self, request: _Request) -> Any:
        limit: int | None = 50
        raw_limit = request.query.get("limit")
        if raw_limit is not None:
            if raw_limit == "all":
                limit = None
            else:
                try:
                    limit = int(raw_limit)
                except ValueError:
                    raise _bad("limit must be an integer or 'all'") from None
                if limit < 0:
                    raise _bad("limit must be >= 0")
        since: tuple[str, int] | int | None = None
        raw_since = request.query.get("since")
        if raw_since is not None:
            epoch, sep, seq = raw_since.rpartition(":")
            try:
                since = (epoch, int(seq)) if sep else int(seq)
            except ValueError:
                raise _bad("since must be a seq or epoch:seq") from None
        room = await self._hub_now().room(request.params[0])
        messages = await room.get_history(limit=limit, since=since)
        return {"room_id": request.params[0], "messages": [message.to_dict() for message in messages]}

    async def _kick(self, request: _Request) -> Any:
        user_id = request.field("user_id", str)
        reason = request.field("reason", str, default="")
        room = await self._hub_now().room(request.params[0])
        return {"ok": True, "kicked": await room.kick(user_id, reason)}

    async def _ban(self, request: _Request) -> Any:
        user_id = request.field("user_id", str)
        reason = request.field("reason", str, default="")
        room = await self._hub_now().room(request.params[0])
        return {"ok": True, "banned": await room.ban(user_id, reason)}

    async def _unban(self, request: _Request) -> Any:
        user_id = request.field("user_id", str)
        room = await self._hub_now().room(request.params[0])
        return {"ok": True, "unbanned": await room.unban(user_id)}

    async def _notify(self, request: _Request) -> Any:
        title = request.field("title", str)
        body = request.field("body", str, default="")
        kind = request.field("type", str, default="info")
        data = request.field("data", dict, default=None)
        notification = await self._hub_now().notifications.send(request.params[0], title, body, kind, data=data)
        return {"ok": True, "notification": notification.to_dict()}

    async def _online(self, request: _Request) -> Any:
        hub = self._hub_now()
        user_id = request.params[0]
        return {"user_id": user_id, "online": hub.is_online(user_id), "connections": len(hub.connections.get_user_connections(user_id))}

    async def _disconnect(self, request: _Request) -> Any:
        hub = self._hub_now()
        reason = request.field("reason", str, default="disconnected by the server")
        if len(reason.encode()) > 120:
            raise _bad("reason must be at most 120 bytes (it is a WebSocket close reason)")
        connections = hub.connections.get_user_connections(request.params[0])
        closed = 0
        async with trio.open_nursery() as nursery:

            async def close(connection_id: str) -> None:
                nonlocal closed
                if await hub.connections.disconnect(connection_id, code=int(CloseCode.DISCONNECTED), reason=reason):
                    closed += 1

            for info in connections:
                nursery.start_soon(close, info.connection_id)
        return {"ok": True, "disconnected": closed}

    async def _broadcast(self, request: _Request) -> Any:
        data = request.field("data", dict)
        delivered = await self._hub_now().connections.broadcast(data)
        return {"ok": True, "delivered": delivered}

    async def _live(self, request: _Request) -> Any:
        model, action = request.params
        pk = request.field("pk", (str, int))
        live = self._hub_now().live
        if action == "create":
            await live.notify_create(model, pk, request.field("data", dict))
        elif action == "update":
            changed = request.field("changed_fields", list, default=None)
            if changed is not None and not all(isinstance(name, str) for name in changed):
                raise _bad("'changed_fields' must be an array of strings")
            await live.notify_update(model, pk, request.field("data", dict), changed)
        elif action == "delete":
            await live.notify_delete(model, pk, request.field("data", dict, default=None))
        else:
            raise ApiError(404, "not_found", f"unknown live action {action!r} (create, update or delete)")
        return {"ok": True}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"")
    try:
        return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
    except ValueError:
        raise _bad("the query string is malformed") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


async def _send_json(
    send: Send,
    status: int,
    body: Any,
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    head: bool = False,
) -> None:
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=_json_default, allow_nan=False).encode()
    await _send(send, status, b"" if head else payload, [*_JSON, _NO_STORE, *headers], length=len(payload))


async def _send(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]], *, length: int | None = None) -> None:
    size = len(body) if length is None else length
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", str(size).encode())]})
    await send({"type": "http.response.body", "body": body})


async def not_found(send: Send) -> None:
    """Answer 404 in the API's JSON error shape (for paths nobody serves)."""
    await _send_json(send, 404, {"error": "not_found", "detail": "nothing here"})
