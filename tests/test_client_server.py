"""The Python client against the real server (hypercorn on loopback, JWT auth)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from _sockets import SECRET, make_config, running_server, token

from ensemble.client import Backoff, Closed, ServerError, open_client
from ensemble.protocol import CloseCode
from ensemble.server import AuthConfig

FAST = Backoff(initial=0.01, maximum=0.05)


async def next_message(events: trio.MemoryReceiveChannel[dict[str, Any]], content: str) -> dict[str, Any]:
    """The next ``message`` event with this content (other events are skipped)."""
    with trio.fail_after(10):
        async for event in events:
            data = event.get("data")
            if event.get("type") == "message" and isinstance(data, dict) and data.get("content") == content:
                return event
    raise AssertionError(f"the events ended before the message {content!r}")


async def test_chat_and_a_dropped_client_resumes_without_loss(transport: str) -> None:
    config = make_config(auth=AuthConfig(jwt_secret=SECRET))
    async with running_server(config, transport=transport) as server:
        url = server.ws_url()
        async with (
            open_client(url, token=lambda: token("alice"), backoff=FAST) as alice,
            open_client(url, token=lambda: token("bob"), backoff=FAST) as bob,
        ):
            assert alice.welcome is not None
            await alice.join("general", display_name="Alice")
            await bob.join("general", display_name="Bob")
            sent = await alice.send("general", "hello bob")
            assert sent["content"] == "hello bob"
            received = await next_message(bob.events(), "hello bob")
            assert received["seq"] == sent["seq"]
            with pytest.raises(ServerError) as error:
                await bob.send("elsewhere", "not joined")
            assert error.value.code == "not_joined"

            # The server drops bob (as for a slow consumer: reconnect and
            # resume); alice talks meanwhile; bob gets every message once.
            [bob_connection] = server.app.hub.connections.get_user_connections("bob")
            await server.app.hub.connections.disconnect(bob_connection.connection_id, code=int(CloseCode.SLOW_CONSUMER), reason="test")
            for n in range(3):
                await alice.send("general", f"missed {n}")
            for n in range(3):
                await next_message(bob.events(), f"missed {n}")
            assert bob.reconnects >= 1
            await alice.send("general", "live again")
            await next_message(bob.events(), "live again")


async def test_a_bad_token_is_terminal(transport: str) -> None:
    config = make_config(auth=AuthConfig(jwt_secret=SECRET))
    async with running_server(config, transport=transport) as server:
        with trio.fail_after(10), pytest.raises(Closed) as closed:
            async with open_client(server.ws_url(), token="not-a-jwt", backoff=FAST):
                pass  # pragma: no cover
        assert closed.value.code == int(CloseCode.UNAUTHENTICATED)


async def test_a_batching_client_gets_every_event(transport: str) -> None:
    config = make_config(auth=AuthConfig(jwt_secret=SECRET))
    async with running_server(config, transport=transport) as server:
        url = server.ws_url()
        async with (
            open_client(url, token=token("alice"), backoff=FAST) as alice,
            open_client(url, token=token("bob"), backoff=FAST, batch=True) as bob,
        ):
            await alice.join("general")
            await bob.join("general")
            for n in range(5):  # within the default inbound rate limit (10 a second)
                await alice.send("general", f"burst {n}")
            for n in range(5):
                await next_message(bob.events(), f"burst {n}")
