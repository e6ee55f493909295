"""The seed's WebSocket auth helpers: credentials from the query or a cookie.

``ws_auth_from_query(ws)`` and ``ws_auth_from_cookie(ws)`` read a credential
from a WebSocket handshake; ``@ws_authenticated`` wraps a handler
``async def handler(ws, user_id, ...)``, resolves the credential to a user id
with an *authenticator*, and closes the WebSocket with
:data:`CLOSE_UNAUTHENTICATED` (4001, the seed's code) when there is none.

``ws`` is whatever the framework hands a WebSocket handler: an ASGI scope
(a mapping with ``query_string`` and ``headers``), or an object with a
``scope`` attribute holding one (Starlette's ``WebSocket``, Ensemble's own
adapters). Nothing here does I/O except the decorator's ``ws.close``.

Security rules (the fourth seed's warnings):

* A credential is only a claim: ``@ws_authenticated`` never passes it on as
  the user id. It calls the authenticator given to it, or the default one
  (:func:`set_default_authenticator`); with neither, every connection is
  refused with 4001 and an error is logged (it fails closed).
* A query parameter or cookie given more than once is ambiguous and counts
  as absent (no parameter-pollution games).
* A cookie is sent by the browser whatever page opened the socket
  (cross-site WebSocket hijacking), so a cookie credential is used only when
  the handshake's ``Origin`` is acceptable: exactly one of
  ``allowed_origins`` when given, else the same origin as the ``Host``
  header. A handshake without ``Origin`` cannot use a cookie (a non-browser
  client presents a token instead). Exact comparisons only, no suffix
  matching.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

logger = logging.getLogger("ensemble.realtime")

CLOSE_UNAUTHENTICATED: Final = 4001
"""Close code when no valid authentication is presented (the seed's code)."""

DEFAULT_COOKIE_NAME: Final = "sessionid"
"""The cookie read by default (the seed's)."""

DEFAULT_QUERY_PARAM: Final = "token"
"""The query parameter read by default (the seed's ``?token=``)."""

Authenticator = Callable[[str], "Awaitable[str | None] | str | None"]
"""Resolves a credential (token or session id) to a user id, or ``None``."""

_default_authenticator: Authenticator | None = None


def set_default_authenticator(authenticator: Authenticator | None) -> Authenticator | None:
    """Set the authenticator of ``@ws_authenticated`` used without one.

    Args:
        authenticator: Resolves a credential to a user id (or ``None`` when
            it is not valid); sync or async. ``None`` removes it (every
            connection is then refused).

    Returns:
        The previous default authenticator.
    """
    global _default_authenticator
    previous = _default_authenticator
    _default_authenticator = authenticator
    return previous


def _scope(ws: Any) -> Mapping[str, Any]:
    if isinstance(ws, Mapping):
        return ws
    scope = getattr(ws, "scope", None)
    if isinstance(scope, Mapping):
        return scope
    raise TypeError(f"expected an ASGI scope or an object with a .scope mapping, got {type(ws).__name__}")


def _headers(scope: Mapping[str, Any], name: bytes) -> list[str]:
    values = []
    for key, value in scope.get("headers") or ():
        if bytes(key).lower() == name:
            values.append(bytes(value).decode("latin-1"))
    return values


def _single(pairs: Iterable[tuple[str, str]], name: str) -> str | None:
    found = [value for key, value in pairs if key == name]
    if len(found) != 1 or not found[0]:
        return None  # absent, empty, or ambiguous
    return found[0]


def ws_auth_from_query(ws: Any, *, param: str = DEFAULT_QUERY_PARAM) -> str | None:
    """The credential in the handshake's query string (``?token=...``).

    Args:
        ws: An ASGI scope, or an object with a ``scope`` attribute.
        param: The query parameter.

    Returns:
        The (percent-decoded) value, or ``None`` when the parameter is
        absent, empty, or given more than once.

    Raises:
        TypeError: ``ws`` is neither a scope nor has one.
    """
    raw = _scope(ws).get("query_string") or b""
    text = raw.decode("latin-1") if isinstance(raw, (bytes, bytearray)) else str(raw)
    return _single(parse_qsl(text, keep_blank_values=True), param)


def parse_cookies(header: str) -> list[tuple[str, str]]:
    """Split a ``Cookie`` header into (name, value) pairs, in order.

    Quoted values are unquoted; pairs without ``=`` are skipped.
    """
    pairs = []
    for part in header.split(";"):
        name, sep, value = part.partition("=")
        if not sep:
            continue
        name, value = name.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name:
            pairs.append((name, value))
    return pairs


def ws_auth_from_cookie(ws: Any, cookie_name: str = DEFAULT_COOKIE_NAME) -> str | None:
    """The credential in a handshake cookie (``sessionid`` by default).

    This only reads the cookie; :func:`origin_allows_cookies` says whether a
    cookie may be trusted for this handshake (``@ws_authenticated`` checks).

    Args:
        ws: An ASGI scope, or an object with a ``scope`` attribute.
        cookie_name: The cookie's name.

    Returns:
        The cookie's value, or ``None`` when it is absent, empty, or sent
        more than once.

    Raises:
        TypeError: ``ws`` is neither a scope nor has one.
    """
    pairs: list[tuple[str, str]] = []
    for header in _headers(_scope(ws), b"cookie"):
        pairs.extend(parse_cookies(header))
    return _single(pairs, cookie_name)


def origin_allows_cookies(ws: Any, allowed_origins: Collection[str] | None = None) -> bool:
    """Whether a cookie credential may be used for this handshake.

    Args:
        ws: An ASGI scope, or an object with a ``scope`` attribute.
        allowed_origins: Exact origins (``"https://chat.example.com"``)
            allowed to open cookie-authenticated sockets. ``None``: only an
            ``Origin`` with the same host as the ``Host`` header.

    Returns:
        ``True`` when the ``Origin`` is acceptable; ``False`` without one.
    """
    scope = _scope(ws)
    origins = _headers(scope, b"origin")
    if len(origins) > 1:
        return False
    origin = origins[0].strip() if origins else None
    if origin is None:
        return False
    if allowed_origins is not None:
        return origin in allowed_origins
    hosts = _headers(scope, b"host")
    if len(hosts) != 1 or origin == "null":
        return False
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and rest.lower() == hosts[0].strip().lower()


async def _resolve(authenticator: Authenticator, credential: str) -> str | None:
    result = authenticator(credential)
    if inspect.isawaitable(result):
        result = await result
    if result is not None and not isinstance(result, str):
        raise TypeError(f"an authenticator must return a user id (str) or None, got {type(result).__name__}")
    return result or None


async def authenticate_handshake(
    ws: Any,
    authenticate: Authenticator | None = None,
    *,
    cookie_name: str = DEFAULT_COOKIE_NAME,
    query_param: str = DEFAULT_QUERY_PARAM,
    allowed_origins: Collection[str] | None = None,
) -> str | None:
    """The user id of a handshake: query first, then cookie (the seed's order).

    Args:
        ws: An ASGI scope, or an object with a ``scope`` attribute.
        authenticate: Resolves a credential to a user id; defaults to the one
            set with :func:`set_default_authenticator`.
        cookie_name: The cookie to read.
        query_param: The query parameter to read.
        allowed_origins: See :func:`origin_allows_cookies`.

    Returns:
        The user id, or ``None`` when no valid credential was presented (or
        no authenticator is configured).
    """
    authenticator = authenticate if authenticate is not None else _default_authenticator
    if authenticator is None:
        logger.error("ws_authenticated: no authenticator configured (pass authenticate= or call set_default_authenticator); refusing")
        return None
    token = ws_auth_from_query(ws, param=query_param)
    if token is not None:
        user_id = await _resolve(authenticator, token)
        if user_id is not None:
            return user_id
    session = ws_auth_from_cookie(ws, cookie_name)
    if session is not None and origin_allows_cookies(ws, allowed_origins):
        return await _resolve(authenticator, session)
    return None


def ws_authenticated(
    handler: Callable[..., Awaitable[Any]] | None = None,
    *,
    authenticate: Authenticator | None = None,
    cookie_name: str = DEFAULT_COOKIE_NAME,
    query_param: str = DEFAULT_QUERY_PARAM,
    allowed_origins: Collection[str] | None = None,
) -> Any:
    """Decorate ``async def handler(ws, user_id, ...)`` to require auth.

    Usable bare (``@ws_authenticated``, with the default authenticator) or
    with options (``@ws_authenticated(authenticate=verify)``). Tries the
    query string (``?token=``), then the cookie (when the ``Origin`` allows
    it); with no valid credential, awaits ``ws.close(code=4001, reason=...)``
    and returns ``None`` without calling the handler.

    Args:
        handler: The handler (when used bare).
        authenticate: See :func:`authenticate_handshake`.
        cookie_name: The cookie to read.
        query_param: The query parameter to read.
        allowed_origins: See :func:`origin_allows_cookies`.

    Returns:
        The wrapped handler, or a decorator.
    """

    def decorate(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(func)
        async def wrapper(ws: Any, *args: Any, **kwargs: Any) -> Any:
            user_id = await authenticate_handshake(
                ws, authenticate, cookie_name=cookie_name, query_param=query_param, allowed_origins=allowed_origins
            )
            if user_id is None:
                await ws.close(code=CLOSE_UNAUTHENTICATED, reason="authentication required")
                return None
            return await func(ws, user_id, *args, **kwargs)

        return wrapper

    return decorate if handler is None else decorate(handler)
