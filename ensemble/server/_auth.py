"""Authentication of connections: authenticators and the handshake check.

An *authenticator* turns a token into an :class:`Identity` (or ``None`` when
the token is not valid). Three are built in:

* :class:`JWTAuthenticator`: PyJWT verification with the algorithms pinned
  in :class:`AuthConfig` (a token's own ``alg`` header is never trusted).
* :class:`CallableAuthenticator`: your function (sync or async) returning a
  user id, an :class:`Identity`, or ``None``.
* :class:`GuestAuthenticator`: development mode, guest identities for
  anyone; never used when a key or an authenticator is configured.

:func:`authenticate_handshake` checks a WebSocket handshake (an ASGI scope)
before the upgrade: the ``Origin`` first, then a credential from, in order,
the query (``?token=``), the ``Sec-WebSocket-Protocol`` header, or the
cookie. Its :class:`HandshakeResult` says: accept with an identity, accept
and wait for an ``auth`` message (no credential presented), or refuse with
a close code and a reason safe to show (never the token).

The subprotocol convention: a client offers two subprotocols, the plain
``ensemble`` and ``ensemble.token.<token>`` (``new WebSocket(url,
["ensemble", "ensemble.token." + jwt])``); the server accepts the plain
``ensemble`` (:attr:`HandshakeResult.subprotocol`), so the token is never
echoed back in the response headers. A JWT only holds characters allowed in
a subprotocol; other tokens must be base64url-encoded by their issuer.

Tokens never appear in log records or in close reasons.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import secrets
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import parse_qsl

import attrs
import jwt

from ..protocol import CloseCode
from ..realtime._auth import _headers, _scope, origin_allows_cookies, parse_cookies, ws_auth_from_cookie, ws_auth_from_query
from ._config import ASYMMETRIC_ALGORITHMS, AuthConfig, ServerConfig
from ._identity import Identity

logger = logging.getLogger("ensemble.server.auth")

MAX_TOKEN_LENGTH: Final = 8192
"""Longest credential looked at; longer ones are refused unread."""

MAX_USER_ID_LENGTH: Final = 200
"""Longest user id (the hub's limit on ids)."""

SUBPROTOCOL_TOKEN_INFIX: Final = ".token."
"""A token subprotocol is ``<subprotocol>.token.<token>``."""

_GUEST_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


@runtime_checkable
class Authenticator(Protocol):
    """Resolves a token to an :class:`Identity`."""

    async def authenticate(self, token: str) -> Identity | None:
        """The identity of ``token``, or ``None`` when it is not valid."""
        ...


def _valid_user_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_USER_ID_LENGTH and "/" not in value


# -- JWT --------------------------------------------------------------------------------


class JWTAuthenticator:
    """Verifies JWTs with PyJWT, with the algorithms pinned in the config.

    Refused: a token signed with an algorithm not in ``jwt_algorithms``
    (``none``, or an ``HS256`` token against an RSA public key: algorithm
    confusion), a bad signature, ``exp`` in the past, ``nbf`` in the future
    (both with ``leeway``), a wrong or unexpected ``aud``, a wrong ``iss``,
    no ``exp`` when ``require_exp``, and a missing or invalid user claim
    (``sub`` by default: a non-empty string without ``/`` of at most 200
    characters). Why a token was refused is logged at DEBUG (the reason,
    never the token) and never told to the client.

    Args:
        config: The :class:`AuthConfig`; it must have a ``jwt_secret`` or a
            ``jwt_public_key``.

    Raises:
        ValueError: No key is configured.
    """

    def __init__(self, config: AuthConfig) -> None:
        if not config.jwt_enabled:
            raise ValueError("JWTAuthenticator needs auth.jwt_secret or auth.jwt_public_key")
        self.config = config
        self._algorithms = list(config.jwt_algorithms)
        self._key: Any
        if config.jwt_public_key is not None:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            assert set(self._algorithms) <= ASYMMETRIC_ALGORITHMS  # AuthConfig checks
            self._key = load_pem_public_key(config.jwt_public_key.encode())
        else:
            assert config.jwt_secret is not None
            self._key = config.jwt_secret
        required = ["exp"] if config.require_exp else []
        if config.jwt_audience is not None:
            required.append("aud")
        if config.jwt_issuer is not None:
            required.append("iss")
        self._options: dict[str, Any] = {"require": required, "verify_signature": True}

    def __repr__(self) -> str:
        return f"<JWTAuthenticator algorithms={self._algorithms}>"

    def verify(self, token: str) -> Identity | None:
        """Synchronous :meth:`authenticate` (verification does no I/O)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            logger.debug("JWT refused: empty or too long")
            return None
        config = self.config
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=config.jwt_audience,
                issuer=config.jwt_issuer,
                leeway=config.leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.PyJWTError as exc:
            # The exception's class names the reason (ExpiredSignatureError,
            # InvalidAlgorithmError, ...); its message never holds the token.
            logger.debug("JWT refused: %s", type(exc).__name__)
            return None
        user_id = claims.get(config.user_claim)
        if not isinstance(user_id, str) or not _valid_user_id(user_id):
            logger.debug("JWT refused: missing or invalid %r claim", config.user_claim)
            return None
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
        return Identity(user_id=user_id, expires_at=expires_at, claims=claims)

    async def authenticate(self, token: str) -> Identity | None:
        """The identity of a valid token, else ``None`` (see the class doc)."""
        return self.verify(token)


# -- callables ---------------------------------------------------------------------------

AuthCallable = Callable[[str], "Awaitable[str | Identity | None] | str | Identity | None"]
"""A user's authenticator function: token -> user id, Identity, or None."""


class CallableAuthenticator:
    """Wraps a function (sync or async) as an authenticator.

    The function gets the token and returns a user id (``str``), an
    :class:`Identity`, or ``None`` (not valid). A sync function runs in the
    event loop: keep it fast (no blocking I/O), or make it async.

    Args:
        fn: The function.

    Raises:
        TypeError: ``fn`` is not callable.
    """

    def __init__(self, fn: AuthCallable) -> None:
        if not callable(fn):
            raise TypeError(f"an authenticator must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __repr__(self) -> str:
        return f"<CallableAuthenticator {getattr(self.fn, '__qualname__', self.fn)!r}>"

    async def authenticate(self, token: str) -> Identity | None:
        """The identity the function gives ``token``, or ``None``.

        Raises:
            TypeError: The function returned something else than a user id,
                an Identity or None.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        result = self.fn(token)
        if inspect.isawaitable(result):
            result = await result
        if result is None or isinstance(result, Identity):
            return result
        if isinstance(result, str):
            if not result:
                return None
            if not _valid_user_id(result):
                raise TypeError("an authenticator returned an invalid user id (empty, with '/', or over 200 characters)")
            return Identity(user_id=result)
        raise TypeError(f"an authenticator must return a user id (str), an Identity or None, got {type(result).__name__}")


def load_authenticator(path: str) -> AuthCallable | Authenticator:
    """Import an authenticator from ``"package.module:name"``.

    Raises:
        ValueError: The path is malformed, or the name is not found.
        ImportError: The module cannot be imported.
    """
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"auth.authenticator must look like 'package.module:function', got {path!r}")
    module = importlib.import_module(module_name)
    target: Any = module
    for part in name.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"auth.authenticator: {module_name} has no {name}") from None
    if not callable(target) and not isinstance(target, Authenticator):
        raise ValueError(f"auth.authenticator: {path} is not callable")
    return target  # type: ignore[no-any-return]


# -- development mode ----------------------------------------------------------------------

DEV_MODE_WARNING: Final = (
    "DEVELOPMENT MODE: authentication is OFF, every connection gets a guest identity. "
    "Never expose this server; configure auth.jwt_secret, auth.jwt_public_key or auth.authenticator "
    "(ENSEMBLE_AUTH_JWT_SECRET, ...) to turn it off."
)


class GuestAuthenticator:
    """Development mode: everyone is a guest (``Identity.guest`` is true).

    A connection without a credential gets a new guest id
    (``guest-<8 hex digits>``), one per connection attempt. A credential
    that is a short name (1 to 32 letters, digits, ``_``, ``.``, ``-``) is
    taken as the guest's id, so a development client can pick a stable
    name (``?token=alice``) and keep it across reconnects; anything else
    (a JWT, say) is *not* verified or decoded and gets a new guest id. In
    development mode a "token" is a name, not a secret.

    Creating one logs a loud WARNING (once per authenticator).
    """

    def __init__(self) -> None:
        logger.warning(DEV_MODE_WARNING)

    def __repr__(self) -> str:
        return "<GuestAuthenticator (development mode)>"

    def new_guest(self) -> Identity:
        """A new guest identity (a connection without a credential)."""
        return Identity(user_id=f"guest-{secrets.token_hex(4)}", guest=True, source="guest")

    async def authenticate(self, token: str) -> Identity | None:
        """A guest identity for any token (see the class doc)."""
        if isinstance(token, str) and _GUEST_NAME.match(token):
            return Identity(user_id=token, guest=True, source="guest")
        return self.new_guest()


def build_authenticator(config: AuthConfig, authenticator: AuthCallable | Authenticator | None = None) -> Authenticator:
    """The authenticator a server uses for ``config``.

    In order: ``authenticator`` when given (a function is wrapped in a
    :class:`CallableAuthenticator`), the one at ``config.authenticator``,
    a :class:`JWTAuthenticator` when a key is configured, and a
    :class:`GuestAuthenticator` in development mode.

    Args:
        config: The auth config.
        authenticator: An authenticator or function passed in code.

    Raises:
        ValueError: Development mode is forced on while an authenticator
            is given, or nothing is configured and development mode is
            forced off (the server would refuse everyone).
    """
    if authenticator is not None:
        if config.jwt_enabled or config.authenticator is not None:
            raise ValueError("an authenticator was passed while the config also configures one (JWT or auth.authenticator)")
        if config.dev_mode is True:
            raise ValueError("dev_mode cannot be on while an authenticator is configured")
        return _as_authenticator(authenticator)
    if config.authenticator is not None:
        return _as_authenticator(load_authenticator(config.authenticator))
    if config.jwt_enabled:
        return JWTAuthenticator(config)
    if config.dev_mode_active:
        return GuestAuthenticator()
    raise ValueError("no authentication configured (auth.jwt_secret, auth.jwt_public_key or auth.authenticator) and dev_mode is off")


def _as_authenticator(authenticator: AuthCallable | Authenticator) -> Authenticator:
    if isinstance(authenticator, Authenticator) and inspect.iscoroutinefunction(authenticator.authenticate):
        return authenticator
    return CallableAuthenticator(authenticator)  # type: ignore[arg-type]


# -- the handshake -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class HandshakeResult:
    """What to do with a WebSocket handshake.

    Exactly one of: refused (``close_code`` set), authenticated
    (``identity`` set), or accepted pending an ``auth`` message
    (``needs_auth_message``: no credential was presented; the connection has
    ``auth.auth_timeout`` seconds to send one).

    Attributes:
        identity: The authenticated (or guest) identity.
        needs_auth_message: Accept, then wait for an ``auth`` message.
        subprotocol: The subprotocol to accept (the plain ``ensemble`` when
            the client offered it), or ``None``.
        close_code: Refuse with this code: ``POLICY_VIOLATION`` (1008) for
            an origin or a cookie without an acceptable origin,
            ``UNAUTHENTICATED`` (4001) for an invalid credential,
            ``INTERNAL_ERROR`` (1011) when the authenticator failed.
        reason: A short reason safe to send to the client (never a token).
    """

    identity: Identity | None = None
    needs_auth_message: bool = False
    subprotocol: str | None = None
    close_code: CloseCode | None = None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        """Whether the upgrade is accepted."""
        return self.close_code is None

    @classmethod
    def refuse(cls, code: CloseCode, reason: str) -> HandshakeResult:
        """A refusal with ``code`` and a safe ``reason``."""
        return cls(close_code=code, reason=reason)


def _origin_check(scope: Mapping[str, Any], allowed_origins: tuple[str, ...]) -> tuple[bool, bool]:
    """``(allowed, browser)``: whether the Origin is acceptable, and whether there was one."""
    origins = _headers(scope, b"origin")
    if not origins:
        return True, False  # not a browser: token authentication only
    if len(origins) > 1:
        return False, True
    # An empty allowlist: the server's own origin only (same host as Host).
    return origin_allows_cookies(scope, allowed_origins or None), True


def offered_subprotocols(scope: Mapping[str, Any]) -> list[str]:
    """The subprotocols a handshake offers, in order (ASGI's ``subprotocols``
    when present, else the ``Sec-WebSocket-Protocol`` headers)."""
    offered = scope.get("subprotocols")
    if offered is not None:
        return [str(item).strip() for item in offered if str(item).strip()]
    values: list[str] = []
    for header in _headers(scope, b"sec-websocket-protocol"):
        values.extend(part.strip() for part in header.split(",") if part.strip())
    return values


def subprotocol_token(offered: list[str], subprotocol: str) -> tuple[str | None, bool]:
    """``(token, ambiguous)``: the token of a ``<subprotocol>.token.<token>`` offer."""
    prefix = subprotocol + SUBPROTOCOL_TOKEN_INFIX
    found = [item[len(prefix) :] for item in offered if item.startswith(prefix)]
    if len(found) > 1:
        return None, True
    if not found or not found[0]:
        return None, False
    return found[0], False


async def authenticate_handshake(
    scope: Any,
    config: ServerConfig,
    authenticator: Authenticator,
) -> HandshakeResult:
    """Check a WebSocket handshake before the upgrade.

    1. The ``Origin``: a browser's must be exactly one of
       ``config.allowed_origins`` (or, when that is empty, the server's own
       origin, from the ``Host`` header); otherwise it is refused with
       ``POLICY_VIOLATION``. No ``Origin`` (a non-browser client) passes,
       but then a cookie is never used as a credential.
    2. The credential, the first present of: the query parameter
       (``?token=``), a token subprotocol (``ensemble.token.<token>``), the
       cookie (``sessionid``). A parameter, token subprotocol or cookie
       given twice is ambiguous and refused (4001); an empty one counts as
       absent.
    3. No credential: a guest in development mode, else accepted pending an
       ``auth`` message. A credential the authenticator refuses: 4001.

    Args:
        scope: An ASGI websocket scope (or an object with a ``scope``).
        config: The server config.
        authenticator: From :func:`build_authenticator`.

    Returns:
        The :class:`HandshakeResult`.
    """
    scope = _scope(scope)
    auth = config.auth
    allowed, browser = _origin_check(scope, config.allowed_origins)
    if not allowed:
        logger.info("handshake refused: origin not allowed")
        return HandshakeResult.refuse(CloseCode.POLICY_VIOLATION, "origin not allowed")
    offered = offered_subprotocols(scope)
    subprotocol = auth.subprotocol if auth.subprotocol in offered else None

    token: str | None = ws_auth_from_query(scope, param=auth.query_param)
    source = "query"
    if token is None and _query_ambiguous(scope, auth.query_param):
        return HandshakeResult.refuse(CloseCode.UNAUTHENTICATED, "ambiguous credentials")
    if token is None:
        token, ambiguous = subprotocol_token(offered, auth.subprotocol)
        source = "subprotocol"
        if ambiguous:
            return HandshakeResult.refuse(CloseCode.UNAUTHENTICATED, "ambiguous credentials")
    if token is None:
        cookie = ws_auth_from_cookie(scope, auth.cookie_name)
        if cookie is None and _cookie_ambiguous(scope, auth.cookie_name):
            return HandshakeResult.refuse(CloseCode.UNAUTHENTICATED, "ambiguous credentials")
        if cookie is not None:
            if not browser:
                logger.info("handshake refused: a cookie credential without an Origin header")
                return HandshakeResult.refuse(CloseCode.POLICY_VIOLATION, "cookie authentication requires an allowed origin")
            token, source = cookie, "cookie"

    if token is None:
        if isinstance(authenticator, GuestAuthenticator):
            return HandshakeResult(identity=authenticator.new_guest(), subprotocol=subprotocol)
        return HandshakeResult(needs_auth_message=True, subprotocol=subprotocol)
    if len(token) > MAX_TOKEN_LENGTH:
        return HandshakeResult.refuse(CloseCode.UNAUTHENTICATED, "invalid credentials")
    identity = await authenticate_token(authenticator, token, source=source)
    if isinstance(identity, CloseCode):
        return HandshakeResult.refuse(identity, "authentication failed")
    if identity is None:
        logger.info("handshake refused: invalid credentials (from the %s)", source)
        return HandshakeResult.refuse(CloseCode.UNAUTHENTICATED, "invalid credentials")
    return HandshakeResult(identity=identity, subprotocol=subprotocol)


async def authenticate_token(authenticator: Authenticator, token: str, *, source: str = "message") -> Identity | CloseCode | None:
    """Run an authenticator on a token, safely (for an ``auth`` message too).

    Returns:
        The identity (with ``source`` set, unless the authenticator set a
        source other than the default), ``None`` when the token is not
        valid, or ``CloseCode.INTERNAL_ERROR`` when the authenticator raised
        (logged with its exception type and location, never its message,
        which might quote the token).
    """
    try:
        identity = await authenticator.authenticate(token)
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        logger.error("authenticator %r raised %s%s", authenticator, type(exc).__name__, where)
        return CloseCode.INTERNAL_ERROR
    if identity is None:
        return None
    if identity.source == "message" and source != "message" and not identity.guest:
        identity = attrs.evolve(identity, source=source)
    return identity


def _query_ambiguous(scope: Mapping[str, Any], param: str) -> bool:
    """Whether the query gives ``param`` more than once."""
    raw = scope.get("query_string") or b""
    text = raw.decode("latin-1") if isinstance(raw, (bytes, bytearray)) else str(raw)
    return sum(1 for key, _ in parse_qsl(text, keep_blank_values=True) if key == param) > 1


def _cookie_ambiguous(scope: Mapping[str, Any], name: str) -> bool:
    """Whether the cookie ``name`` is sent more than once."""
    return sum(1 for header in _headers(scope, b"cookie") for key, _ in parse_cookies(header) if key == name) > 1
