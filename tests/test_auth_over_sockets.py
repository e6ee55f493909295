"""Every authentication failure of the server, over real sockets, on each transport.

tests/test_server_auth.py checks the authenticators and the handshake
function one by one; here each failure goes through a real handshake (a
token in the query, the ``Sec-WebSocket-Protocol`` header, a cookie with an
allowed ``Origin``, or an in-band ``auth`` message) and must end the same
way: close code 4001, no actor left behind, the token never in the log,
and other clients unaffected.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from _sockets import SECRET, closed_with, make_config, open_websocket_url, receive_json, request, running_server

from ensemble.protocol import CloseCode
from ensemble.server._config import AuthConfig

AUDIENCE = "ensemble"
ISSUER = "https://auth.example.com"
ORIGIN = "https://chat.example.com"


def _claims(**changes: Any) -> dict[str, Any]:
    claims = {"sub": "alice", "exp": int(time.time()) + 600, "aud": AUDIENCE, "iss": ISSUER, **changes}
    return {name: value for name, value in claims.items() if value is not None}


def _hs(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}."


FAILURES: dict[str, Callable[[], str]] = {
    "alg none": lambda: _unsigned(_claims()),
    "wrong algorithm": lambda: _hs(_claims(), key=SECRET * 2, algorithm="HS512"),
    "bad signature": lambda: _hs(_claims(), key="another-secret-of-at-least-32-bytes"),
    "expired": lambda: _hs(_claims(exp=int(time.time()) - 60)),
    "not yet valid": lambda: _hs(_claims(nbf=int(time.time()) + 600)),
    "wrong audience": lambda: _hs(_claims(aud="billing")),
    "wrong issuer": lambda: _hs(_claims(iss="https://evil.example.com")),
    "missing exp": lambda: _hs(_claims(exp=None)),
    "garbage": lambda: "not-a-jwt",
}

SOURCES = ("query", "subprotocol", "cookie", "auth message")


def _config() -> Any:
    return make_config(
        allowed_origins=(ORIGIN,),
        auth=AuthConfig(jwt_secret=SECRET, jwt_audience=AUDIENCE, jwt_issuer=ISSUER, auth_timeout=5.0),
    )


async def _presented_by(source: str, token: str, url: str) -> int:
    """Connect presenting ``token`` from ``source``: the close code the server ends with."""
    query, subprotocols, headers = "", None, None
    if source == "query":
        query = f"?token={token}"
    elif source == "subprotocol":
        subprotocols = ["ensemble", f"ensemble.token.{token}"]
    elif source == "cookie":
        headers = [(b"origin", ORIGIN.encode()), (b"cookie", f"sessionid={token}".encode())]
    async with open_websocket_url(url + query, subprotocols=subprotocols, extra_headers=headers) as ws:
        if source == "auth message":
            welcome = await receive_json(ws)
            assert welcome["user_id"] is None
            answer = await request(ws, 1, type="auth", token=token)
            assert answer["type"] == "error"
            assert answer["code"] == "unauthenticated"
        return await closed_with(ws)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_bad_token_is_closed_with_4001(
    transport: str, failure: str, source: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ensemble", "ensemble.server", "ensemble.server.auth"):  # whatever other tests did to logging
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="ensemble")
    bad = FAILURES[failure]()
    async with (
        running_server(_config(), transport=transport) as server,
        open_websocket_url(server.ws_url(f"token={_hs(_claims(sub='bob'))}")) as bob,
    ):
        assert (await receive_json(bob))["user_id"] == "bob"
        assert await _presented_by(source, bad, server.ws_url()) == CloseCode.UNAUTHENTICATED
        assert (await request(bob, 1, type="ping"))["type"] == "pong"  # bob never noticed
        assert server.hub.connections.connection_count == 1  # nothing of the refused client is left
    assert "refused" in caplog.text or "unauthenticated" in caplog.text.lower()  # the log saw it...
    assert bad not in caplog.text  # ...without the token


@pytest.mark.parametrize("source", SOURCES)
async def test_a_good_token_from_each_source_is_accepted(transport: str, source: str) -> None:
    good = _hs(_claims())
    async with running_server(_config(), transport=transport) as server:
        query, subprotocols, headers = "", None, None
        if source == "query":
            query = f"?token={good}"
        elif source == "subprotocol":
            subprotocols = ["ensemble", f"ensemble.token.{good}"]
        elif source == "cookie":
            headers = [(b"origin", ORIGIN.encode()), (b"cookie", f"sessionid={good}".encode())]
        async with open_websocket_url(server.ws_url() + query, subprotocols=subprotocols, extra_headers=headers) as ws:
            welcome = await receive_json(ws)
            if source == "auth message":
                assert welcome["user_id"] is None
                welcome = (await request(ws, 1, type="auth", token=good))["data"]
            assert welcome["user_id"] == "alice"
            assert server.hub.is_online("alice")


async def test_a_raising_authenticator_is_closed_with_1011_and_others_go_on(transport: str) -> None:
    def authenticator(token: str) -> str | None:
        if token == "boom":
            raise RuntimeError("the identity service is down")
        return token

    async with (
        running_server(make_config(), transport=transport, authenticator=authenticator) as server,
        open_websocket_url(server.ws_url("token=bob")) as bob,
    ):
        await receive_json(bob)
        async with open_websocket_url(server.ws_url("token=boom")) as broken:
            assert await closed_with(broken) == CloseCode.INTERNAL_ERROR
        assert (await request(bob, 1, type="ping"))["type"] == "pong"


async def test_no_credential_and_no_auth_message_is_closed_with_4001(transport: str) -> None:
    config = make_config(auth=AuthConfig(jwt_secret=SECRET, auth_timeout=0.3))
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url()) as ws:
        assert (await receive_json(ws))["user_id"] is None
        assert await closed_with(ws) == 4001
