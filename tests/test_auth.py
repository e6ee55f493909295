"""Tests of the seed's WebSocket auth helpers (ws_authenticated and friends)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ensemble.realtime._auth import (
    CLOSE_UNAUTHENTICATED,
    authenticate_handshake,
    origin_allows_cookies,
    parse_cookies,
    set_default_authenticator,
    ws_auth_from_cookie,
    ws_auth_from_query,
    ws_authenticated,
)

TOKENS = {"t-alice": "alice", "s-bob": "bob"}


def scope(query: str = "", headers: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    return {
        "type": "websocket",
        "query_string": query.encode("latin-1"),
        "headers": [(name.lower().encode(), value.encode("latin-1")) for name, value in headers or []],
    }


class FakeWebSocket:
    """The shape of Starlette's WebSocket that the helpers use."""

    def __init__(self, query: str = "", headers: list[tuple[str, str]] | None = None) -> None:
        self.scope = scope(query, headers)
        self.closed: tuple[int, str] | None = None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)


def lookup(credential: str) -> str | None:
    return TOKENS.get(credential)


async def async_lookup(credential: str) -> str | None:
    return TOKENS.get(credential)


@pytest.fixture
def no_default() -> Iterator[None]:
    previous = set_default_authenticator(None)
    yield
    set_default_authenticator(previous)


def test_from_query() -> None:
    assert ws_auth_from_query(scope("token=abc")) == "abc"
    assert ws_auth_from_query(FakeWebSocket("room=1&token=a%20b%2Bc")) == "a b+c"
    assert ws_auth_from_query(scope("tok=abc")) is None
    assert ws_auth_from_query(scope("token=")) is None
    assert ws_auth_from_query(scope("token=a&token=b")) is None  # ambiguous
    assert ws_auth_from_query(scope("key=abc"), param="key") == "abc"
    assert ws_auth_from_query({"type": "websocket"}) is None
    with pytest.raises(TypeError, match="ASGI scope"):
        ws_auth_from_query(object())


def test_from_cookie() -> None:
    assert ws_auth_from_cookie(scope(headers=[("Cookie", "sessionid=s1; theme=dark")])) == "s1"
    assert ws_auth_from_cookie(scope(headers=[("cookie", 'theme=dark; sessionid="s2"')])) == "s2"
    assert ws_auth_from_cookie(scope(headers=[("cookie", "my_sess=s3")]), cookie_name="my_sess") == "s3"
    assert ws_auth_from_cookie(scope(headers=[("cookie", "my_sess=s3")])) is None
    # Split over two Cookie headers (HTTP/2 does this), and ambiguity.
    assert ws_auth_from_cookie(scope(headers=[("cookie", "a=1"), ("cookie", "sessionid=s4")])) == "s4"
    assert ws_auth_from_cookie(scope(headers=[("cookie", "sessionid=x; sessionid=y")])) is None
    assert ws_auth_from_cookie(scope()) is None
    assert parse_cookies(' a = 1 ;junk; b="2";=3') == [("a", "1"), ("b", "2")]


@pytest.mark.parametrize(
    ("headers", "allowed", "ok"),
    [
        ([], None, False),  # no Origin: a cookie cannot be trusted (a non-browser client uses a token)
        ([("origin", "https://chat.example.com"), ("host", "chat.example.com")], None, True),
        ([("origin", "https://evil.example"), ("host", "chat.example.com")], None, False),
        ([("origin", "https://chat.example.com.evil.example"), ("host", "chat.example.com")], None, False),
        ([("origin", "null"), ("host", "null")], None, False),
        ([("origin", "https://app.example.com")], ["https://app.example.com"], True),
        ([("origin", "https://app.example.com.evil")], ["https://app.example.com"], False),
        ([("origin", "https://evil.app.example.com")], ["https://app.example.com"], False),
        ([], ["https://app.example.com"], False),
        ([("origin", "https://a"), ("origin", "https://a")], ["https://a"], False),
    ],
)
def test_origin_allows_cookies(headers: list[tuple[str, str]], allowed: list[str] | None, ok: bool) -> None:
    assert origin_allows_cookies(scope(headers=headers), allowed) is ok


async def test_ws_authenticated_passes_the_resolved_user(no_default: None) -> None:
    calls: list[tuple[str, str]] = []

    @ws_authenticated(authenticate=lookup)
    async def chat(ws: FakeWebSocket, user_id: str, room_id: str) -> str:
        calls.append((user_id, room_id))
        return "done"

    ws = FakeWebSocket("token=t-alice")
    assert await chat(ws, "lobby") == "done"
    assert calls == [("alice", "lobby")]
    assert ws.closed is None
    assert chat.__name__ == "chat"


async def test_ws_authenticated_closes_4001_without_valid_auth(no_default: None) -> None:
    calls: list[str] = []

    @ws_authenticated(authenticate=async_lookup)
    async def chat(ws: FakeWebSocket, user_id: str) -> None:
        calls.append(user_id)

    for ws in (FakeWebSocket(), FakeWebSocket("token=forged"), FakeWebSocket("token=t-alice&token=t-alice")):
        assert await chat(ws) is None
        assert ws.closed == (CLOSE_UNAUTHENTICATED, "authentication required")
    assert calls == []


async def test_query_then_cookie_and_the_cookie_origin_rule(no_default: None) -> None:
    # An invalid token falls back to a valid cookie (the seed's order) ...
    same_site = [("cookie", "sessionid=s-bob"), ("origin", "https://chat.example.com"), ("host", "chat.example.com")]
    assert await authenticate_handshake(FakeWebSocket("token=nope", same_site), lookup) == "bob"
    assert await authenticate_handshake(FakeWebSocket("token=t-alice", same_site), lookup) == "alice"
    # ... but a cookie sent by a page of another site is not trusted (CSWSH).
    cross_site = [("cookie", "sessionid=s-bob"), ("origin", "https://evil.example"), ("host", "chat.example.com")]
    assert await authenticate_handshake(FakeWebSocket("", cross_site), lookup) is None
    # A token in the query is not ambient: any origin may present one.
    assert await authenticate_handshake(FakeWebSocket("token=t-alice", cross_site), lookup) == "alice"
    allowed = ["https://evil.example"]
    assert await authenticate_handshake(FakeWebSocket("", cross_site), lookup, allowed_origins=allowed) == "bob"


async def test_bare_decorator_uses_the_default_authenticator_and_fails_closed(no_default: None, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    @ws_authenticated
    async def chat(ws: FakeWebSocket, user_id: str) -> None:
        seen.append(user_id)

    ws = FakeWebSocket("token=t-alice")
    await chat(ws)  # no authenticator anywhere: refused, loudly
    assert ws.closed == (CLOSE_UNAUTHENTICATED, "authentication required")
    assert "no authenticator configured" in caplog.text
    assert "t-alice" not in caplog.text  # credentials never reach the log
    assert set_default_authenticator(lookup) is None
    ws = FakeWebSocket("token=t-alice")
    await chat(ws)
    assert seen == ["alice"]
    assert ws.closed is None


async def test_an_authenticator_returning_a_non_string_is_an_error(no_default: None) -> None:
    with pytest.raises(TypeError, match="user id"):
        await authenticate_handshake(scope("token=x"), lambda credential: 42)  # type: ignore[arg-type,return-value]
