"""The server's configuration: one frozen object, with named constructors.

A :class:`ServerConfig` is built from defaults, then a TOML file
(:meth:`ServerConfig.from_toml`), then environment variables
(:meth:`ServerConfig.from_env`), then command-line options
(:meth:`ServerConfig.evolve`); each later source overrides the earlier ones.
docs/configuration.md lists every option with its default, TOML key and
environment variable.

Secrets (``auth.jwt_secret``, ``auth.jwt_public_key``, ``api_keys``) are
never shown in a ``repr``; they can be read from a file (``*_file`` keys,
``*_FILE`` environment variables) so that they stay out of config files
and process listings.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from ..realtime import HubConfig

HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
"""JWT algorithms verified with a shared secret (``auth.jwt_secret``)."""

RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS: Final = frozenset({"ES256", "ES384", "ES512"})
OKP_ALGORITHMS: Final = frozenset({"EdDSA"})
ASYMMETRIC_ALGORITHMS: Final = RSA_ALGORITHMS | EC_ALGORITHMS | OKP_ALGORITHMS
"""JWT algorithms verified with a public key (``auth.jwt_public_key``)."""

_HMAC_MIN_KEY_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 3.2: at least the hash size

TRANSPORTS: Final = ("hypercorn", "native")
LOG_FORMATS: Final = ("json", "text")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_SECTIONS: Final = ("auth", "limits", "heartbeat", "hub")
_HUB_LIMITS: Final = ("max_connections", "max_connections_per_user")  # set in [limits], not [hub]
_TOKEN_CHARS: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 7230 token


# -- validators --------------------------------------------------------------------


def _finite_positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attribute.name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a finite number of seconds > 0, got {value!r}")


def _finite_non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attribute.name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number of seconds >= 0, got {value!r}")


def _int_at_least(minimum: int) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name} must be an int, got {value!r}")
        if value < minimum:
            raise ValueError(f"{attribute.name} must be at least {minimum}, got {value}")

    return check


def _optional_int_at_least(minimum: int) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    check = _int_at_least(minimum)

    def optional(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            check(instance, attribute, value)

    return optional


def _one_of(choices: Iterable[str]) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    allowed = tuple(choices)

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"{attribute.name} must be one of {', '.join(allowed)}; got {value!r}")

    return check


def _non_empty_str(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _optional_non_empty_str(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _non_empty_str(instance, attribute, value)


def _rfc7230_token(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not _TOKEN_CHARS.match(value):
        raise ValueError(f"{attribute.name} must be a non-empty name of letters, digits and -._~ (an HTTP token), got {value!r}")


def _str_tuple(value: Any) -> tuple[str, ...]:
    """Converter: a string (comma-separated) or an iterable of strings."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)


def _check_origin(origin: object) -> None:
    if not isinstance(origin, str):
        raise TypeError(f"allowed_origins must hold strings, got {origin!r}")
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        raise ValueError(f"allowed origin {origin!r} must be an exact origin such as 'https://chat.example.com'")
    if any(char in rest for char in "/*?#@ \t") or origin != origin.lower():
        raise ValueError(
            f"allowed origin {origin!r} must be an exact, lowercase origin (scheme://host[:port]): "
            "no path, trailing slash, wildcard or user info; it is compared exactly with the Origin header"
        )


def _valid_origins(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for origin in value:
        _check_origin(origin)


def _valid_api_keys(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for key in value:
        if not isinstance(key, str) or not key or any(char.isspace() for char in key):
            # Never include the key itself in the message.
            raise ValueError("api_keys must be non-empty strings without whitespace")


def _valid_host(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value or any(char.isspace() for char in value):
        raise ValueError(f"host must be a host name or IP address, got {value!r}")


def _valid_port(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"port must be an int, got {value!r}")
    if not 0 <= value <= 65535:
        raise ValueError(f"port must be between 0 and 65535 (0: any free port), got {value}")


def _log_level(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


# -- sections ----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class AuthConfig:
    """How connections authenticate (``[auth]``).

    JWT verification is on when ``jwt_secret`` (HMAC algorithms) or
    ``jwt_public_key`` (RSA, EC or EdDSA algorithms) is set; the two are
    never mixed, and the accepted algorithms are pinned by
    ``jwt_algorithms`` (``none`` is refused here, at configuration time).

    Args:
        jwt_secret: The HMAC secret of ``HS*`` tokens (at least as many bytes
            as the hash: 32 for HS256). Never shown in a repr.
        jwt_public_key: The PEM public key of ``RS*``/``PS*``/``ES*``/
            ``EdDSA`` tokens. Never shown in a repr.
        jwt_algorithms: The algorithms accepted, all of one family matching
            the key (a token's own ``alg`` header is never trusted).
        jwt_audience: The required ``aud`` claim; ``None``: a token with an
            ``aud`` claim is refused.
        jwt_issuer: The required ``iss`` claim, or ``None``.
        leeway: Seconds of clock skew allowed on ``exp`` and ``nbf``.
        require_exp: Refuse tokens without an ``exp`` claim.
        user_claim: The claim holding the user id.
        authenticator: An import path (``"package.module:function"``) of a
            callable resolving a token to a user id or an
            :class:`~ensemble.server.Identity` (sync or async). Exclusive with
            JWT verification.
        cookie_name: The cookie read as a credential (browsers, same origin).
        query_param: The query parameter read as a credential (``?token=``).
        subprotocol: The WebSocket subprotocol of the protocol; a client may
            offer ``<subprotocol>.token.<token>`` beside it to send a token
            in ``Sec-WebSocket-Protocol`` (the server accepts the plain one).
        auth_timeout: Seconds a connection without a credential has to send
            an ``auth`` message before it is closed (4001).
        dev_mode: Development mode (guest identities, no credentials
            needed). ``None``: on only when no JWT key and no authenticator
            is configured. ``True`` with either configured is an error.

    Raises:
        ValueError: An invalid value or combination (see above).
        TypeError: A value of the wrong type.
    """

    jwt_secret: str | None = attrs.field(default=None, repr=False, validator=_optional_non_empty_str)
    jwt_public_key: str | None = attrs.field(default=None, repr=False, validator=_optional_non_empty_str)
    jwt_algorithms: tuple[str, ...] = attrs.field(default=("HS256",), converter=_str_tuple)
    jwt_audience: str | None = attrs.field(default=None, validator=_optional_non_empty_str)
    jwt_issuer: str | None = attrs.field(default=None, validator=_optional_non_empty_str)
    leeway: float = attrs.field(default=0.0, validator=_finite_non_negative)
    require_exp: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    user_claim: str = attrs.field(default="sub", validator=_non_empty_str)
    authenticator: str | None = attrs.field(default=None, validator=_optional_non_empty_str)
    cookie_name: str = attrs.field(default="sessionid", validator=_rfc7230_token)
    query_param: str = attrs.field(default="token", validator=_non_empty_str)
    subprotocol: str = attrs.field(default="ensemble", validator=_rfc7230_token)
    auth_timeout: float = attrs.field(default=10.0, validator=_finite_positive)
    dev_mode: bool | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.instance_of(bool)))

    def __attrs_post_init__(self) -> None:
        algorithms = self.jwt_algorithms
        if not algorithms:
            raise ValueError("jwt_algorithms must name at least one algorithm")
        for algorithm in algorithms:
            if not isinstance(algorithm, str):
                raise TypeError(f"jwt_algorithms must hold strings, got {algorithm!r}")
            if algorithm.lower() == "none":
                raise ValueError("jwt_algorithms must not include 'none' (unsigned tokens are never accepted)")
            if algorithm not in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
                known = ", ".join(sorted(HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS))
                raise ValueError(f"unsupported JWT algorithm {algorithm!r} (supported: {known})")
        hmac = set(algorithms) & HMAC_ALGORITHMS
        if hmac and len(hmac) != len(set(algorithms)):
            raise ValueError("jwt_algorithms must not mix HMAC (HS*) with public-key algorithms (algorithm confusion)")
        if self.jwt_secret is not None and self.jwt_public_key is not None:
            raise ValueError("configure jwt_secret (HMAC) or jwt_public_key (RSA/EC/EdDSA), not both")
        if self.jwt_secret is not None:
            if not hmac:
                raise ValueError("jwt_secret needs HMAC jwt_algorithms (HS256, HS384 or HS512)")
            if self.jwt_secret.lstrip().startswith("-----BEGIN"):
                raise ValueError("jwt_secret looks like a PEM key: set jwt_public_key and an RS*/ES* algorithm instead")
            needed = max(_HMAC_MIN_KEY_BYTES[algorithm] for algorithm in hmac)
            if len(self.jwt_secret.encode()) < needed:
                raise ValueError(f"jwt_secret must be at least {needed} bytes for {', '.join(sorted(hmac))} (RFC 7518)")
        if self.jwt_public_key is not None:
            if hmac:
                raise ValueError("jwt_public_key needs public-key jwt_algorithms (such as RS256 or ES256), not HS*")
            _check_public_key(self.jwt_public_key, algorithms)
        if self.authenticator is not None and self.jwt_enabled:
            raise ValueError("configure either an authenticator or JWT verification (jwt_secret/jwt_public_key), not both")
        if self.dev_mode is True and self.configured:
            raise ValueError("dev_mode cannot be on while a JWT key or an authenticator is configured")

    @property
    def jwt_enabled(self) -> bool:
        """Whether JWT verification is configured (a secret or a public key)."""
        return self.jwt_secret is not None or self.jwt_public_key is not None

    @property
    def configured(self) -> bool:
        """Whether any real authentication is configured."""
        return self.jwt_enabled or self.authenticator is not None

    @property
    def dev_mode_active(self) -> bool:
        """Whether development mode is on (``dev_mode``, or auto)."""
        if self.dev_mode is not None:
            return self.dev_mode
        return not self.configured


def _check_public_key(pem: str, algorithms: tuple[str, ...]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        raise ValueError("jwt_public_key is not a PEM public key") from None
    for algorithm in algorithms:
        if algorithm in RSA_ALGORITHMS:
            fits = isinstance(key, rsa.RSAPublicKey)
        elif algorithm in EC_ALGORITHMS:
            fits = isinstance(key, ec.EllipticCurvePublicKey)
        else:
            fits = isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
        if not fits:
            raise ValueError(f"jwt_public_key is a {type(key).__name__.lstrip('_')}, which cannot verify {algorithm}")


@attrs.frozen(kw_only=True)
class LimitsConfig:
    """Limits enforced before any actor is allocated (``[limits]``).

    Args:
        max_message_size: Largest client frame, in bytes (larger: 1009).
        max_rooms_per_connection: Most rooms one connection may join.
        max_connections: Most connections at once (more: 1013).
        max_connections_per_user: Most connections of one user (more:
            1013), or ``None`` for no limit.
        handshake_timeout: Seconds to complete the WebSocket handshake.
        max_handshake_bytes: Largest handshake request (request line and
            headers), in bytes.
        max_headers: Most headers in the handshake request.
        write_timeout: Seconds the data written to a client may stay
            unacknowledged (``TCP_USER_TIMEOUT`` on the listening socket,
            inherited by each connection; Linux only) before the kernel
            aborts the connection: a client that stops reading (a zero
            receive window) cannot pin a connection task forever.

    Raises:
        ValueError: A value out of range.
        TypeError: A value of the wrong type.
    """

    max_message_size: int = attrs.field(default=65536, validator=_int_at_least(1))
    max_rooms_per_connection: int = attrs.field(default=100, validator=_int_at_least(1))
    max_connections: int = attrs.field(default=10_000, validator=_int_at_least(1))
    max_connections_per_user: int | None = attrs.field(default=100, validator=_optional_int_at_least(1))
    handshake_timeout: float = attrs.field(default=10.0, validator=_finite_positive)
    max_handshake_bytes: int = attrs.field(default=16384, validator=_int_at_least(256))
    max_headers: int = attrs.field(default=100, validator=_int_at_least(1))
    write_timeout: float = attrs.field(default=30.0, validator=_finite_positive)


@attrs.frozen(kw_only=True)
class HeartbeatConfig:
    """Server pings (``[heartbeat]``).

    Args:
        interval: Seconds between pings to each connection.
        timeout: Seconds a peer has to answer a ping before it is closed
            (4009) and its presence ends.

    Raises:
        ValueError: A value that is not a positive number of seconds.
    """

    interval: float = attrs.field(default=20.0, validator=_finite_positive)
    timeout: float = attrs.field(default=20.0, validator=_finite_positive)


# -- the whole config --------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Configuration of an Ensemble server.

    Args:
        host: The address to listen on.
        port: The TCP port (0: any free port).
        transport: ``"hypercorn"`` (the ASGI server) or ``"native"``.
        allowed_origins: Exact origins (``"https://chat.example.com"``) whose
            browser pages may connect; empty: only pages of the server's own
            origin (the ``Host`` header). Connections without an ``Origin``
            (non-browser clients) may connect with a token, never a cookie.
        api_keys: Keys accepted by the HTTP API (``Authorization: Bearer``).
            Never shown in a repr or logged.
        watchable_models: The live-query models clients may ``watch``
            (``"*"``: any); empty (the default): none.
        auth: :class:`AuthConfig`.
        limits: :class:`LimitsConfig`.
        heartbeat: :class:`HeartbeatConfig`.
        hub: The realtime hub's :class:`~ensemble.realtime.HubConfig` (its
            connection limits come from ``limits``: see :meth:`hub_config`).
        shutdown_timeout: Seconds a graceful shutdown may take before the
            remaining work is cancelled.
        tls_certfile: A PEM certificate chain: serve TLS (``wss://``,
            ``https://``) with it, on either transport.
        tls_keyfile: The certificate's PEM private key (``None``: it is in
            ``tls_certfile``).
        log_level: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL``.
        log_format: ``"text"`` or ``"json"`` (one line per event either way).
        gc_threshold: The garbage collector's first threshold set by ``ensemble
            serve`` (allocations between young collections; Python's default
            is 700), which also freezes the objects of its start-up; ``0``
            leaves the collector alone. Thousands of long-lived connection
            objects make Python's default collect (and scan) very often.

    Raises:
        ValueError: An invalid value.
        TypeError: A value of the wrong type.
    """

    host: str = attrs.field(default="127.0.0.1", validator=_valid_host)
    port: int = attrs.field(default=8000, validator=_valid_port)
    transport: str = attrs.field(default="hypercorn", validator=_one_of(TRANSPORTS))
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple, validator=_valid_origins)
    api_keys: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple, validator=_valid_api_keys, repr=False)
    watchable_models: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    auth: AuthConfig = attrs.field(factory=AuthConfig, validator=attrs.validators.instance_of(AuthConfig))
    limits: LimitsConfig = attrs.field(factory=LimitsConfig, validator=attrs.validators.instance_of(LimitsConfig))
    heartbeat: HeartbeatConfig = attrs.field(factory=HeartbeatConfig, validator=attrs.validators.instance_of(HeartbeatConfig))
    hub: HubConfig = attrs.field(factory=HubConfig, validator=attrs.validators.instance_of(HubConfig))
    shutdown_timeout: float = attrs.field(default=10.0, validator=_finite_positive)
    tls_certfile: str | None = attrs.field(default=None, validator=_optional_non_empty_str)
    tls_keyfile: str | None = attrs.field(default=None, validator=_optional_non_empty_str)
    log_level: str = attrs.field(default="INFO", converter=_log_level, validator=_one_of(LOG_LEVELS))
    log_format: str = attrs.field(default="text", validator=_one_of(LOG_FORMATS))
    gc_threshold: int = attrs.field(default=50_000, validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)])

    def hub_config(self) -> HubConfig:
        """The hub's config with the server's connection limits applied.

        The server opens its hub with this (``limits.max_connections`` and
        ``limits.max_connections_per_user`` are the single source of those
        limits).
        """
        return attrs.evolve(
            self.hub,
            max_connections=self.limits.max_connections,
            max_connections_per_user=self.limits.max_connections_per_user,
        )

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` is a loopback address (or ``localhost``)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def evolve(self, **changes: Any) -> ServerConfig:
        """A copy with some options changed (how CLI options are applied).

        Top-level options are keyword arguments (``host="0.0.0.0"``);
        options of a section are ``section__option`` (``auth__dev_mode=True``,
        ``limits__max_message_size=1024``). ``None`` values are ignored, so
        unset command-line options can be passed as they are.

        Raises:
            ValueError: An unknown option or an invalid value.
        """
        known = {field.name for field in attrs.fields(ServerConfig)}
        applied: dict[str, Any] = {}
        for key, value in changes.items():
            if value is None:
                continue
            section, sep, option = key.partition("__")
            if sep:
                if section not in _SECTIONS:
                    raise ValueError(f"unknown config section {section!r} (known: {', '.join(_SECTIONS)})")
                fields = {field.name for field in attrs.fields(type(getattr(self, section)))}
                if option not in fields:
                    raise ValueError(f"unknown key in [{section}]: {option} (known: {', '.join(sorted(fields))})")
            elif key not in known:
                raise ValueError(f"unknown server config option {key!r} (known: {', '.join(sorted(known))})")
            applied[key] = value
        return _apply(self, applied)

    # -- named constructors --------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: str | Path | None = None) -> ServerConfig:
        """Build a config from plain data: the server's options, with the
        sections ``auth``, ``limits``, ``heartbeat`` and ``hub`` as mappings.

        Secrets may be given as files: ``api_keys_file`` (one key per line),
        ``auth.jwt_secret_file`` and ``auth.jwt_public_key_file``.

        Args:
            data: The options.
            base_dir: The directory relative file paths are read from (the
                current directory by default).

        Raises:
            ValueError: An unknown key, an invalid value, or an unreadable file.
            TypeError: A value of the wrong type.
        """
        base = Path(base_dir) if base_dir is not None else Path()
        known = {field.name for field in attrs.fields(cls)} | {"api_keys_file"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown server config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = dict(data)
        if "api_keys_file" in values:
            if "api_keys" in values:
                raise ValueError("give api_keys or api_keys_file, not both")
            values["api_keys"] = tuple(_read_secret_file(base, values.pop("api_keys_file"), "api_keys_file").split())
        for section in _SECTIONS:
            if section not in values:
                continue
            options = values[section]
            if isinstance(options, (HubConfig, *_SECTION_CLASSES.values())):
                continue  # already built
            if not isinstance(options, Mapping):
                raise ValueError(f"[{section}] must be a table of options, got {options!r}")
            if section == "hub":
                clash = sorted(set(options) & set(_HUB_LIMITS))
                if clash:
                    raise ValueError(f"set {', '.join(clash)} in [limits], not [hub]")
                values[section] = HubConfig.from_mapping(options)
                continue
            options = dict(options)
            if section == "auth":
                for name in ("jwt_secret", "jwt_public_key"):
                    if f"{name}_file" in options:
                        if name in options:
                            raise ValueError(f"give auth.{name} or auth.{name}_file, not both")
                        options[name] = _read_secret_file(base, options.pop(f"{name}_file"), f"auth.{name}_file")
            section_cls = _SECTION_CLASSES[section]
            fields = {field.name for field in attrs.fields(section_cls)}
            if section == "auth":
                fields |= {"jwt_secret_file", "jwt_public_key_file"}
            bad = sorted(set(options) - fields)
            if bad:
                raise ValueError(f"unknown keys in [{section}]: {', '.join(bad)} (known: {', '.join(sorted(fields))})")
            values[section] = section_cls(**options)
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> ServerConfig:
        """Read a config from a TOML file.

        The file has a ``[server]`` table (the top-level options) and the
        tables ``[auth]``, ``[limits]``, ``[heartbeat]`` and ``[hub]`` (with
        ``[hub.room]``, ``[hub.rate_limit]``, ``[hub.live]``); all optional.
        Relative ``*_file`` paths are relative to the file's directory.

        Raises:
            ValueError: An unknown table or key, or an invalid value.
            OSError: The file cannot be read.
            tomllib.TOMLDecodeError: The file is not valid TOML.
        """
        path = Path(path)
        with path.open("rb") as file:
            document = tomllib.load(file)
        tables = ("server", *_SECTIONS)
        unknown = sorted(set(document) - set(tables))
        if unknown:
            raise ValueError(f"{path}: unknown tables or keys: {', '.join(unknown)} (known tables: {', '.join(tables)})")
        data: dict[str, Any] = {}
        server = document.get("server", {})
        if not isinstance(server, Mapping):
            raise ValueError(f"{path}: [server] must be a table")
        data.update(server)
        for section in _SECTIONS:
            if section in document:
                if section in data:
                    raise ValueError(f"{path}: [{section}] is given twice (also as [server.{section}])")
                data[section] = document[section]
        try:
            return cls.from_mapping(data, base_dir=path.parent)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{path}: {exc}") from None

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        prefix: str = "ENSEMBLE_",
        base: ServerConfig | None = None,
    ) -> ServerConfig:
        """Overlay environment variables onto a config.

        ``<PREFIX><OPTION>`` sets a top-level option (``ENSEMBLE_PORT``),
        ``<PREFIX><SECTION>_<OPTION>`` an option of a section
        (``ENSEMBLE_AUTH_JWT_SECRET``, ``ENSEMBLE_LIMITS_MAX_MESSAGE_SIZE``,
        ``ENSEMBLE_HUB_NAME``; the hub's nested tables only come from TOML).
        Lists are comma-separated; booleans are ``true``/``false``
        (``1``/``0``, ``yes``/``no``, ``on``/``off``); ``none`` (or an empty
        value) clears an optional option. ``<NAME>_FILE`` reads a secret
        from a file: ``ENSEMBLE_API_KEYS_FILE``,
        ``ENSEMBLE_AUTH_JWT_SECRET_FILE``, ``ENSEMBLE_AUTH_JWT_PUBLIC_KEY_FILE``.
        ``<PREFIX>CONFIG`` (the TOML file of the command line) is ignored
        here; any other unknown ``<PREFIX>*`` variable is an error, so a
        misspelt secret does not silently leave the server in dev mode.

        Args:
            environ: The variables (default: ``os.environ``).
            prefix: The prefix of the variables.
            base: The config to overlay (default: the defaults).

        Raises:
            ValueError: An unknown variable or an invalid value.
        """
        environ = os.environ if environ is None else environ
        config = base if base is not None else cls()
        table = _env_table(prefix)
        changes: dict[str, Any] = {}
        for name, raw in environ.items():
            if not name.startswith(prefix) or name == f"{prefix}CONFIG":
                continue
            entry = table.get(name)
            if entry is None:
                close = difflib.get_close_matches(name, table, n=3)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise ValueError(f"unknown environment variable {name} ({hint}every variable is listed in docs/configuration.md)")
            key, kind = entry
            try:
                changes[key] = _parse_env(raw, kind)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        for key in ("api_keys", "auth__jwt_secret", "auth__jwt_public_key"):
            file_key = f"{key}_file"
            if file_key in changes:
                if key in changes:
                    raise ValueError(f"set {_env_name(prefix, key)} or {_env_name(prefix, file_key)}, not both")
                content = _read_secret_file(Path(), changes.pop(file_key), _env_name(prefix, file_key))
                changes[key] = tuple(content.split()) if key == "api_keys" else content
        return _apply(config, {key: None if value is _CLEAR else value for key, value in changes.items()})


_SECTION_CLASSES: Final[dict[str, type]] = {"auth": AuthConfig, "limits": LimitsConfig, "heartbeat": HeartbeatConfig}

_CLEAR: Final = object()
"""An optional option set to ``none`` in the environment (cleared to ``None``)."""


def _apply(config: ServerConfig, changes: Mapping[str, Any]) -> ServerConfig:
    """``attrs.evolve`` with ``section__option`` keys (already checked)."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        section, sep, option = key.partition("__")
        if sep:
            nested.setdefault(section, {})[option] = value
        else:
            top[key] = value
    for section, options in nested.items():
        top[section] = attrs.evolve(getattr(config, section), **options)
    return attrs.evolve(config, **top)


def _read_secret_file(base: Path, name: object, what: str) -> str:
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path, got {name!r}")
    path = base / Path(name)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {str(path)!r}: {exc.strerror or exc}") from None


def _env_name(prefix: str, key: str) -> str:
    return prefix + key.replace("__", "_").upper()


def _env_table(prefix: str) -> dict[str, tuple[str, str]]:
    """Environment variable name -> (evolve key, type of the field)."""
    table: dict[str, tuple[str, str]] = {}

    def add(key: str, kind: str) -> None:
        table[_env_name(prefix, key)] = (key, kind)

    for field in attrs.fields(ServerConfig):
        if field.name not in _SECTIONS:
            add(field.name, str(field.type))
    add("api_keys_file", "str")
    for section, section_cls in (*_SECTION_CLASSES.items(), ("hub", HubConfig)):
        for field in attrs.fields(section_cls):
            kind = str(field.type)
            if kind not in _ENV_KINDS or (section == "hub" and field.name in _HUB_LIMITS):
                continue  # nested tables, and the hub's limits (set in [limits])
            add(f"{section}__{field.name}", kind)
    add("auth__jwt_secret_file", "str")
    add("auth__jwt_public_key_file", "str")
    return table


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _parse_scalar(raw: str, kind: str) -> Any:
    if kind == "str":
        return raw
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if kind == "bool":
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    raise AssertionError(kind)  # pragma: no cover


def _parse_env(raw: str, kind: str) -> Any:
    raw = raw.strip()
    if kind == "tuple[str, ...]":
        return _str_tuple(raw)
    base, optional = kind, False
    if kind.endswith(" | None"):
        base, optional = kind.removesuffix(" | None"), True
    if optional and raw.lower() in ("", "none"):
        return _CLEAR
    return _parse_scalar(raw, base)


_ENV_KINDS: Final = frozenset({"str", "int", "float", "bool", "str | None", "int | None", "float | None", "bool | None", "tuple[str, ...]"})
