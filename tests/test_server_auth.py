"""Server authentication: JWT verification, authenticators, dev mode, and the handshake."""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import attrs
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ensemble.protocol import CloseCode
from ensemble.server import Identity
from ensemble.server._auth import (
    DEV_MODE_WARNING,
    CallableAuthenticator,
    GuestAuthenticator,
    HandshakeResult,
    JWTAuthenticator,
    authenticate_handshake,
    authenticate_token,
    build_authenticator,
)
from ensemble.server._config import AuthConfig, ServerConfig
from ensemble.server._logging import RedactingFilter, configure_logging, redact

SECRET = "a-test-secret-of-at-least-32-bytes!"
AUDIENCE = "chat"
ISSUER = "https://auth.example.com"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_public_pem(rsa_key: rsa.RSAPrivateKey) -> str:
    return rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(autouse=True)
def _auth_logger_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever other tests did to logging (dictConfig disables existing loggers), these see the records."""
    for name in ("ensemble", "ensemble.server", "ensemble.server.auth"):
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)


@pytest.fixture
def auth_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="ensemble")
    return caplog


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "exp": now + 3600, "iat": now}
    claims.update(extra)
    return {key: value for key, value in claims.items() if value is not None}


def _hs(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(claims: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def _hmac() -> JWTAuthenticator:
    return JWTAuthenticator(AuthConfig(jwt_secret=SECRET))


# -- JWT ------------------------------------------------------------------------------------


async def test_a_valid_token_gives_an_identity_with_its_expiry() -> None:
    claims = _claims(role="admin")
    identity = await _hmac().authenticate(_hs(claims))
    assert identity is not None
    assert identity.user_id == "alice"
    assert identity.guest is False
    assert identity.expires_at == float(claims["exp"])
    assert identity.claims["role"] == "admin"


async def test_audience_and_issuer_are_checked() -> None:
    authenticator = JWTAuthenticator(AuthConfig(jwt_secret=SECRET, jwt_audience=AUDIENCE, jwt_issuer=ISSUER))
    assert await authenticator.authenticate(_hs(_claims(aud=AUDIENCE, iss=ISSUER))) is not None
    assert await authenticator.authenticate(_hs(_claims(aud="billing", iss=ISSUER))) is None
    assert await authenticator.authenticate(_hs(_claims(aud=AUDIENCE, iss="https://evil.example.com"))) is None
    assert await authenticator.authenticate(_hs(_claims(iss=ISSUER))) is None  # no aud
    assert await authenticator.authenticate(_hs(_claims(aud=AUDIENCE))) is None  # no iss


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("alg none", lambda: _unsigned(_claims())),
        ("bad signature", lambda: _hs(_claims(), key="another-secret-of-at-least-32-bytes")),
        ("tampered payload", lambda: _tamper(_hs(_claims()))),
        ("wrong HMAC algorithm", lambda: _hs(_claims(), key=SECRET * 2, algorithm="HS512")),
        ("expired", lambda: _hs(_claims(exp=int(time.time()) - 60))),
        ("not yet valid", lambda: _hs(_claims(nbf=int(time.time()) + 600))),
        ("unexpected audience", lambda: _hs(_claims(aud="someone-else"))),
        ("missing exp", lambda: _hs(_claims(exp=None))),
        ("missing sub", lambda: _hs(_claims(sub=None))),
        ("empty sub", lambda: _hs(_claims(sub=""))),
        ("numeric sub", lambda: _hs(_claims(sub=42))),
        ("sub with a slash", lambda: _hs(_claims(sub="a/b"))),
        ("overlong sub", lambda: _hs(_claims(sub="x" * 201))),
        ("garbage", lambda: "not-a-jwt"),
        ("empty", lambda: ""),
        ("huge", lambda: "eyJ" + "A" * 10_000),
    ],
)
async def test_jwt_rejections(name: str, token: Any, auth_logs: pytest.LogCaptureFixture) -> None:
    value = token()
    assert await _hmac().authenticate(value) is None, name
    if value:
        assert value not in auth_logs.text


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "mallory"
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


async def test_exp_may_be_optional_and_leeway_applies() -> None:
    lenient = JWTAuthenticator(AuthConfig(jwt_secret=SECRET, require_exp=False, leeway=120))
    identity = await lenient.authenticate(_hs(_claims(exp=None)))
    assert identity is not None
    assert identity.expires_at is None
    assert await lenient.authenticate(_hs(_claims(exp=int(time.time()) - 60))) is not None  # within the leeway
    assert await lenient.authenticate(_hs(_claims(exp=int(time.time()) - 600))) is None


async def test_a_custom_user_claim() -> None:
    authenticator = JWTAuthenticator(AuthConfig(jwt_secret=SECRET, user_claim="uid"))
    identity = await authenticator.authenticate(_hs(_claims(uid="bob")))
    assert identity is not None
    assert identity.user_id == "bob"
    assert await authenticator.authenticate(_hs(_claims())) is None  # has sub, not uid


async def test_rs256_with_a_public_key(rsa_key: rsa.RSAPrivateKey, rsa_public_pem: str) -> None:
    authenticator = JWTAuthenticator(AuthConfig(jwt_public_key=rsa_public_pem, jwt_algorithms=["RS256"]))
    identity = await authenticator.authenticate(jwt.encode(_claims(), rsa_key, algorithm="RS256"))
    assert identity is not None
    assert identity.user_id == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await authenticator.authenticate(jwt.encode(_claims(), other, algorithm="RS256")) is None
    assert await authenticator.authenticate(jwt.encode(_claims(), rsa_key, algorithm="PS256")) is None  # not pinned
    assert await authenticator.authenticate(_unsigned(_claims())) is None


async def test_algorithm_confusion_is_refused(rsa_public_pem: str) -> None:
    """An HS256 token whose HMAC key is the server's *public* key."""
    authenticator = JWTAuthenticator(AuthConfig(jwt_public_key=rsa_public_pem, jwt_algorithms=["RS256"]))
    forged = _forge_hs256(_claims(sub="mallory"), rsa_public_pem.encode())
    assert await authenticator.authenticate(forged) is None


def _forge_hs256(claims: dict[str, Any], key: bytes) -> str:
    import hashlib
    import hmac

    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


async def test_es256(rsa_public_pem: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    authenticator = JWTAuthenticator(AuthConfig(jwt_public_key=pem, jwt_algorithms=["ES256"]))
    assert await authenticator.authenticate(jwt.encode(_claims(), key, algorithm="ES256")) is not None


def test_a_jwt_authenticator_needs_a_key() -> None:
    with pytest.raises(ValueError, match=r"needs auth\.jwt_secret"):
        JWTAuthenticator(AuthConfig())


# -- callables ------------------------------------------------------------------------------


async def test_callable_authenticators_sync_and_async() -> None:
    def sync(token: str) -> str | None:
        return "carol" if token == "good" else None

    async def asynchronous(token: str) -> Identity | None:
        return Identity(user_id="dave", expires_at=123.0) if token == "good" else None

    identity = await CallableAuthenticator(sync).authenticate("good")
    assert identity == Identity(user_id="carol")
    assert await CallableAuthenticator(sync).authenticate("bad") is None
    identity = await CallableAuthenticator(asynchronous).authenticate("good")
    assert identity is not None
    assert (identity.user_id, identity.expires_at) == ("dave", 123.0)
    assert await CallableAuthenticator(lambda token: "").authenticate("x") is None


async def test_a_callable_returning_garbage_is_an_error() -> None:
    with pytest.raises(TypeError, match="must return a user id"):
        await CallableAuthenticator(lambda token: 42).authenticate("x")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="invalid user id"):
        await CallableAuthenticator(lambda token: "a/b").authenticate("x")
    with pytest.raises(TypeError, match="must be callable"):
        CallableAuthenticator("nope")  # type: ignore[arg-type]


async def test_authenticate_token_survives_a_raising_authenticator_without_logging_the_token(
    auth_logs: pytest.LogCaptureFixture,
) -> None:
    def broken(token: str) -> str:
        raise RuntimeError(f"database down while checking {token}")

    result = await authenticate_token(CallableAuthenticator(broken), "tok-SECRET-123", source="query")
    assert result is CloseCode.INTERNAL_ERROR
    assert "RuntimeError" in auth_logs.text
    assert "tok-SECRET-123" not in auth_logs.text


# -- building the authenticator and dev mode --------------------------------------------------


def test_build_authenticator_chooses_by_config(caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(build_authenticator(AuthConfig(jwt_secret=SECRET)), JWTAuthenticator)
    assert isinstance(build_authenticator(AuthConfig(), lambda token: "x"), CallableAuthenticator)
    assert isinstance(build_authenticator(AuthConfig(authenticator="tests.test_server_auth:_module_authenticator")), CallableAuthenticator)
    with caplog.at_level(logging.WARNING, logger="ensemble"):
        guest = build_authenticator(AuthConfig())
    assert isinstance(guest, GuestAuthenticator)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING and "DEVELOPMENT MODE" in record.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == DEV_MODE_WARNING


def _module_authenticator(token: str) -> str | None:
    return "eve" if token == "ok" else None


def test_guest_mode_is_never_on_when_something_is_configured(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ensemble"):
        assert not isinstance(build_authenticator(AuthConfig(jwt_secret=SECRET)), GuestAuthenticator)
        assert not isinstance(build_authenticator(AuthConfig(), lambda token: None), GuestAuthenticator)
        assert not isinstance(
            build_authenticator(AuthConfig(authenticator="tests.test_server_auth:_module_authenticator")), GuestAuthenticator
        )
    assert "DEVELOPMENT MODE" not in caplog.text
    with pytest.raises(ValueError, match="dev_mode cannot be on"):
        build_authenticator(AuthConfig(dev_mode=True), lambda token: None)
    with pytest.raises(ValueError, match="also configures one"):
        build_authenticator(AuthConfig(jwt_secret=SECRET), lambda token: None)
    with pytest.raises(ValueError, match="no authentication configured"):
        build_authenticator(AuthConfig(dev_mode=False))


def test_a_bad_authenticator_path() -> None:
    with pytest.raises(ValueError, match="must look like"):
        build_authenticator(AuthConfig(authenticator="no_colon"))
    with pytest.raises(ValueError, match="has no missing"):
        build_authenticator(AuthConfig(authenticator="tests.test_server_auth:missing"))


async def test_guests() -> None:
    guests = GuestAuthenticator()
    first, second = guests.new_guest(), guests.new_guest()
    assert first.guest
    assert second.guest
    assert first.user_id.startswith("guest-")
    assert first.user_id != second.user_id
    named = await guests.authenticate("alice")
    assert named is not None
    assert (named.user_id, named.guest) == ("alice", True)
    token = _hs(_claims())
    unnamed = await guests.authenticate(token)  # never decoded, never used as an id
    assert unnamed is not None
    assert unnamed.guest
    assert unnamed.user_id.startswith("guest-")


# -- the handshake ----------------------------------------------------------------------------


def _scope(
    *,
    query: str = "",
    origin: str | list[str] | None = None,
    host: str = "chat.example.com",
    cookie: str | None = None,
    subprotocols: list[str] | None = None,
) -> dict[str, Any]:
    headers: list[tuple[bytes, bytes]] = [(b"host", host.encode())]
    origins = [origin] if isinstance(origin, str) else origin or []
    headers.extend((b"origin", value.encode()) for value in origins)
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    scope: dict[str, Any] = {"type": "websocket", "path": "/ws", "query_string": query.encode(), "headers": headers}
    if subprotocols is not None:
        scope["subprotocols"] = subprotocols
    return scope


def _config(**auth: Any) -> ServerConfig:
    return ServerConfig(allowed_origins=["https://chat.example.com"], auth=AuthConfig(jwt_secret=SECRET, **auth))


async def _handshake(scope: dict[str, Any], config: ServerConfig | None = None) -> HandshakeResult:
    config = config or _config()
    return await authenticate_handshake(scope, config, build_authenticator(config.auth))


async def test_a_token_in_the_query() -> None:
    result = await _handshake(_scope(query=f"token={_hs(_claims())}"))
    assert result.accepted
    assert result.identity is not None
    assert (result.identity.user_id, result.identity.source) == ("alice", "query")
    assert result.subprotocol is None


async def test_an_invalid_token_is_refused_with_4001_and_a_safe_reason(auth_logs: pytest.LogCaptureFixture) -> None:
    token = _hs(_claims(exp=int(time.time()) - 60))
    result = await _handshake(_scope(query=f"token={token}"))
    assert not result.accepted
    assert result.close_code is CloseCode.UNAUTHENTICATED
    assert result.reason == "invalid credentials"
    assert token not in auth_logs.text


async def test_origin_must_match_exactly() -> None:
    token = _hs(_claims())
    ok = await _handshake(_scope(query=f"token={token}", origin="https://chat.example.com"))
    assert ok.accepted
    for origin in (
        "https://chat.example.com.evil.com",
        "https://evilchat.example.com",
        "https://chat.example.co",
        "http://chat.example.com",  # another scheme
        "https://chat.example.com:8443",  # another port
        "https://chat.example.com/",
        "null",
        "",
    ):
        result = await _handshake(_scope(query=f"token={token}", origin=origin))
        assert result.close_code is CloseCode.POLICY_VIOLATION, origin
        assert result.reason == "origin not allowed"
    twice = await _handshake(_scope(query=f"token={token}", origin=["https://chat.example.com", "https://evil.com"]))
    assert twice.close_code is CloseCode.POLICY_VIOLATION


async def test_without_an_allowlist_only_the_servers_own_origin() -> None:
    config = ServerConfig(auth=AuthConfig(jwt_secret=SECRET))
    token = _hs(_claims())
    same = await _handshake(_scope(query=f"token={token}", origin="https://chat.example.com"), config)
    assert same.accepted
    other = await _handshake(_scope(query=f"token={token}", origin="https://evil.com"), config)
    assert other.close_code is CloseCode.POLICY_VIOLATION
    lookalike = await _handshake(_scope(query=f"token={token}", origin="https://chat.example.com.evil.com"), config)
    assert lookalike.close_code is CloseCode.POLICY_VIOLATION
    no_origin = await _handshake(_scope(query=f"token={token}"), config)  # not a browser
    assert no_origin.accepted


async def test_a_cookie_with_an_allowed_origin() -> None:
    result = await _handshake(_scope(cookie=f"theme=dark; sessionid={_hs(_claims())}", origin="https://chat.example.com"))
    assert result.identity is not None
    assert result.identity.source == "cookie"


async def test_a_cookie_without_an_origin_is_refused() -> None:
    result = await _handshake(_scope(cookie=f"sessionid={_hs(_claims())}"))
    assert result.close_code is CloseCode.POLICY_VIOLATION
    assert "origin" in result.reason


async def test_a_cookie_from_a_foreign_origin_is_refused() -> None:
    result = await _handshake(_scope(cookie=f"sessionid={_hs(_claims())}", origin="https://evil.com"))
    assert result.close_code is CloseCode.POLICY_VIOLATION


async def test_a_custom_cookie_name() -> None:
    config = _config(cookie_name="auth")
    result = await _handshake(_scope(cookie=f"auth={_hs(_claims())}", origin="https://chat.example.com"), config)
    assert result.identity is not None


async def test_a_token_in_the_subprotocol_header() -> None:
    token = _hs(_claims())
    result = await _handshake(_scope(subprotocols=["ensemble", f"ensemble.token.{token}"]))
    assert result.identity is not None
    assert result.identity.source == "subprotocol"
    assert result.subprotocol == "ensemble"  # the token is never echoed back
    # Without an ASGI "subprotocols" list, the raw header is read.
    scope = _scope()
    scope["headers"].append((b"sec-websocket-protocol", f"ensemble, ensemble.token.{token}".encode()))
    raw = await _handshake(scope)
    assert raw.identity is not None
    assert raw.subprotocol == "ensemble"
    bad = await _handshake(_scope(subprotocols=["ensemble", "ensemble.token.garbage"]))
    assert bad.close_code is CloseCode.UNAUTHENTICATED


async def test_ambiguous_credentials_are_refused() -> None:
    token = _hs(_claims())
    twice = await _handshake(_scope(query=f"token={token}&token={token}"))
    assert twice.close_code is CloseCode.UNAUTHENTICATED
    two_protocols = await _handshake(_scope(subprotocols=["ensemble", f"ensemble.token.{token}", "ensemble.token.x"]))
    assert two_protocols.close_code is CloseCode.UNAUTHENTICATED
    two_cookies = await _handshake(_scope(cookie=f"sessionid={token}; sessionid=other", origin="https://chat.example.com"))
    assert two_cookies.close_code is CloseCode.UNAUTHENTICATED


async def test_the_query_comes_first() -> None:
    good, bad = _hs(_claims(sub="query-user")), "garbage"
    result = await _handshake(_scope(query=f"token={good}", subprotocols=["ensemble", f"ensemble.token.{bad}"]))
    assert result.identity is not None
    assert result.identity.user_id == "query-user"
    assert result.subprotocol == "ensemble"


async def test_no_credential_waits_for_an_auth_message() -> None:
    result = await _handshake(_scope(subprotocols=["ensemble"]))
    assert result.accepted
    assert result.identity is None
    assert result.needs_auth_message
    assert result.subprotocol == "ensemble"
    empty = await _handshake(_scope(query="token="))
    assert empty.needs_auth_message


async def test_dev_mode_gives_guests_and_still_checks_origins() -> None:
    config = ServerConfig()  # nothing configured
    guest = await _handshake(_scope(), config)
    assert guest.identity is not None
    assert guest.identity.guest
    assert guest.identity.source == "guest"
    named = await _handshake(_scope(query="token=alice"), config)
    assert named.identity is not None
    assert (named.identity.user_id, named.identity.guest) == ("alice", True)
    foreign = await _handshake(_scope(origin="https://evil.com"), config)
    assert foreign.close_code is CloseCode.POLICY_VIOLATION


async def test_a_raising_authenticator_closes_with_1011() -> None:
    def broken(token: str) -> str:
        raise RuntimeError("boom")

    config = ServerConfig()
    result = await authenticate_handshake(_scope(query="token=x"), config, build_authenticator(config.auth, broken))
    assert result.close_code is CloseCode.INTERNAL_ERROR
    assert result.reason == "authentication failed"


async def test_an_identity_keeps_a_source_set_by_the_authenticator() -> None:
    async def custom(token: str) -> Identity:
        return Identity(user_id="x", source="sso")

    config = ServerConfig()
    result = await authenticate_handshake(_scope(query="token=t"), config, build_authenticator(config.auth, custom))
    assert result.identity is not None
    assert result.identity.source == "sso"


async def test_tokens_never_appear_in_logs_or_reasons(auth_logs: pytest.LogCaptureFixture) -> None:
    valid, expired = _hs(_claims()), _hs(_claims(exp=int(time.time()) - 60))
    results = [
        await _handshake(_scope(query=f"token={valid}")),
        await _handshake(_scope(query=f"token={expired}")),
        await _handshake(_scope(query=f"token={expired}", origin="https://evil.com")),
        await _handshake(_scope(cookie=f"sessionid={valid}")),
        await _handshake(_scope(subprotocols=["ensemble", f"ensemble.token.{expired}"])),
        await _handshake(_scope(query=f"token={valid}&token={expired}")),
    ]
    assert auth_logs.records  # refusals are logged ...
    for token in (valid, expired):
        assert token not in auth_logs.text  # ... without the tokens
        for result in results:
            assert token not in result.reason
            assert token not in repr(attrs.evolve(result, identity=None))


# -- redaction --------------------------------------------------------------------------------


def test_redact() -> None:
    token = _hs(_claims())
    assert token not in redact(f"connect /ws?token={token}")
    assert redact("GET /ws?token=abc123&room=x") == "GET /ws?token=[REDACTED]&room=x"
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer [REDACTED]"
    assert redact("cookie sessionid=xyz; theme=dark") == "cookie sessionid=[REDACTED]; theme=dark"
    assert redact("api_key=k123 done") == "api_key=[REDACTED] done"
    assert redact("offered ensemble.token.abc") == "offered ensemble.token.[REDACTED]"
    assert redact(f"bare {token} here") == "bare [REDACTED] here"
    assert redact("the key is hunter2-key", ["hunter2-key"]) == "the key is [REDACTED]"
    assert redact("the token was not accepted in room general") == "the token was not accepted in room general"


def test_the_redacting_filter_covers_args_and_tracebacks() -> None:
    token = _hs(_claims())
    record = logging.LogRecord("ensemble.test", logging.ERROR, __file__, 1, "client sent %s", (f"token={token}",), None)
    try:
        raise ValueError(f"bad {token}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactingFilter(["my-api-key"]).filter(record)
    assert token not in record.getMessage()
    assert record.exc_text is not None
    assert token not in record.exc_text
    assert "ValueError" in record.exc_text


def test_configure_logging_writes_one_redacted_line_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("INFO", "json", secrets=["sekrit-api-key"], stream=stream)
    try:
        logger = logging.getLogger("ensemble.test")
        logger.info("line one\nline two with sekrit-api-key", extra={"user": "alice"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
        logger.debug("not shown")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 2
        first, second = (json.loads(line) for line in lines)
        assert first["message"] == "line one\nline two with [REDACTED]"
        assert (first["level"], first["logger"], first["user"]) == ("INFO", "ensemble.test", "alice")
        assert "RuntimeError: boom" in second["exc"]
        # Text, and reconfiguring replaces the handler.
        text_stream = io.StringIO()
        text_handler = configure_logging("DEBUG", "text", stream=text_stream)
        assert handler not in root.handlers
        handler = text_handler
        logger.warning("a\nb", extra={"room": "general"})
        (line,) = text_stream.getvalue().splitlines()
        assert line.endswith("WARNING ensemble.test: a\\nb room='general'")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml")
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD", "text")
