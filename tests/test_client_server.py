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


@pytest.mark.parametrize("times", [1, 4], ids=["room_reset", "room_closed"])
async def test_a_room_crash_is_answered_by_joining_again_from_the_position(transport: str, times: int) -> None:
    """After ``room_reset`` (a restart) or ``room_closed`` (given up on: the
    connection was dropped from the room), the client joins again with its
    position, so it keeps getting the room's messages."""
    from _doc_faults import crash_room

    async with (
        running_server(make_config(), transport=transport) as server,
        open_client(server.ws_url("token=alice"), backoff=FAST) as alice,
    ):
        await alice.join("general")
        await (await server.hub.room("general")).join("bob", "Bob")
        await crash_room(server.hub, "general", times=times)
        with trio.fail_after(10):
            async for event in alice.events():
                if event["type"] == ("room_reset" if times == 1 else "room_closed"):
                    break
        for _ in range(1000):  # the client's join reaches the room
            [connection] = server.hub.connections.get_user_connections("alice")
            if "general" in connection.rooms:
                break
            await trio.sleep(0.01)
        await (await server.hub.room("general")).send_message("bob", "after the crash")
        event = await next_message(alice.events(), "after the crash")
        assert event["seq"] > 0
