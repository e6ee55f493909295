"""The HTTP API for backends, health, readiness and metrics, over real sockets.

``test_the_documented_curl_examples_work`` runs every ``curl`` line of
docs/http-api.md, in order, against a live server (parsed and performed with
a small HTTP client, so it needs no ``curl`` binary) and checks the ``# ``
lines under it: a JSON object is matched field by field (``"..."`` matches
anything, objects may list a subset of the fields), other text must appear
in the response.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from _sockets import closed_with, http_request, make_config, open_websocket_url, receive_json, request, running_server

from ensemble.protocol import CloseCode

KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
DOC = Path(__file__).resolve().parent.parent / "docs" / "http-api.md"


async def call(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    raw = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    status, response_headers, payload = await http_request(port, method, path, body=raw, headers=JSON if headers is None else headers)
    if response_headers.get("content-type", "").startswith("application/json"):
        return status, json.loads(payload)
    return status, payload.decode()


# -- keys ------------------------------------------------------------------------------------


async def test_a_wrong_or_missing_key_is_401_and_a_right_one_works() -> None:
    async with running_server(make_config(api_keys=(KEY, "another-key-0123456789"))) as server:
        status, body = await call(server.port, "GET", "/api/users/alice/online", headers={"Authorization": "Bearer nope"})
        assert (status, body["error"]) == (401, "unauthorized")
        assert "nope" not in json.dumps(body)
        status, body = await call(server.port, "GET", "/api/users/alice/online", headers={})
        assert (status, body["error"]) == (401, "unauthorized")
        status, body = await call(server.port, "GET", "/api/users/alice/online", headers={"X-API-Key": KEY})
        assert (status, body) == (200, {"user_id": "alice", "online": False, "connections": 0})
        status, _ = await call(server.port, "GET", "/api/users/alice/online", headers={"Authorization": "Bearer another-key-0123456789"})
        assert status == 200


async def test_without_keys_the_api_is_disabled_but_probes_answer() -> None:
    async with running_server() as server:
        status, body = await call(server.port, "GET", "/api/users/alice/online", headers={"Authorization": "Bearer anything"})
        assert (status, body["error"]) == (403, "api_disabled")
        assert (await call(server.port, "GET", "/healthz", headers={})) == (200, {"status": "ok"})
        status, body = await call(server.port, "GET", "/readyz", headers={})
        assert (status, body["status"]) == (200, "ready")


# -- bad input ---------------------------------------------------------------------------------


async def test_bad_input_gets_clear_errors() -> None:
    config = make_config(api_keys=(KEY,))
    async with running_server(config) as server:
        port = server.port
        cases: list[tuple[str, str, Any, dict[str, str] | None, int, str]] = [
            ("POST", "/api/rooms/general/publish", b"{not json", None, 400, "bad_request"),
            ("POST", "/api/rooms/general/publish", b"[1, 2]", None, 400, "bad_request"),
            ("POST", "/api/rooms/general/publish", {"data": "not an object"}, None, 400, "bad_request"),
            (
                "POST",
                "/api/rooms/general/publish",
                {"data": {"x": 1}},
                {**AUTH, "Content-Type": "text/plain"},
                415,
                "unsupported_media_type",
            ),
            ("POST", "/api/rooms/general/kick", {}, None, 400, "bad_request"),
            ("POST", "/api/rooms/general/kick", {"user_id": True}, None, 400, "bad_request"),
            ("POST", "/api/users/alice/notify", {"title": "x", "type": "shouting"}, None, 400, "bad_request"),
            ("POST", "/api/live/task/explode", {"pk": 1}, None, 404, "not_found"),
            ("POST", "/api/live/task/create", {"pk": 1.5, "data": {}}, None, 400, "bad_request"),
            ("GET", "/api/rooms/general/history?limit=many", None, None, 400, "bad_request"),
            ("GET", "/api/rooms/general/history?since=nope:x", None, None, 400, "bad_request"),
            ("GET", "/api/rooms/general/publish", None, None, 405, "method_not_allowed"),
            ("GET", "/api/nothing/here", None, None, 404, "not_found"),
            ("POST", "/healthz", b"", None, 405, "method_not_allowed"),
            ("POST", "/api/rooms/general/publish", b"x" * (1 << 20 + 1), None, 413, "body_too_large"),
        ]
        for method, path, body, headers, status, code in cases:
            got_status, got = await call(port, method, path, body, headers)
            assert (got_status, got["error"]) == (status, code), (method, path, got)
            assert isinstance(got["detail"], str)
        # A room id that the hub refuses is a 400 too.
        status, body = await call(port, "GET", "/api/rooms/" + "r" * 300 + "/presence")
        assert (status, body["error"]) == (400, "bad_request")


async def test_history_since_a_position_no_longer_kept_is_410() -> None:
    async with running_server(make_config(api_keys=(KEY,))) as server:
        assert server.app.hub is not None
        room = await server.app.hub.room("general")
        await room.join("alice", "Alice")
        first = await room.send_message("alice", "one")
        status, body = await call(server.port, "GET", f"/api/rooms/general/history?since={first.epoch}:{first.seq - 1}")
        assert status == 200
        assert [m["content"] for m in body["messages"]] == ["one"]
        status, body = await call(server.port, "GET", "/api/rooms/general/history?since=another-epoch:1")
        assert (status, body["error"]) == (410, "history_unavailable")
        assert body["epoch"] == first.epoch


async def test_publish_and_notify_reach_a_connected_client() -> None:
    async with running_server(make_config(api_keys=(KEY,))) as server, open_websocket_url(server.ws_url("token=alice")) as ws:
        await receive_json(ws)
        await request(ws, 1, type="join", room="general")
        status, _ = await call(server.port, "POST", "/api/rooms/general/publish", {"data": {"text": "deployed"}})
        assert status == 200
        frame = await receive_json(ws)
        while frame["type"] != "system":
            frame = await receive_json(ws)
        assert frame["data"]["text"] == "deployed"
        status, _ = await call(server.port, "POST", "/api/users/alice/notify", {"title": "Hi", "body": "there"})
        assert status == 200
        frame = await receive_json(ws)
        while frame["type"] != "notification":
            frame = await receive_json(ws)
        assert frame["data"]["title"] == "Hi"


async def test_readyz_is_503_while_shutting_down() -> None:
    async with running_server(make_config(api_keys=(KEY,))) as server:
        await server.app.drain()
        status, body = await call(server.port, "GET", "/readyz", headers={})
        assert (status, body["status"]) == (503, "not ready")
        status, body = await call(server.port, "GET", "/api/users/alice/online")
        assert (status, body["error"]) == (503, "not_ready")


async def test_metrics_text_has_the_expected_names() -> None:
    async with running_server() as server, open_websocket_url(server.ws_url("token=alice")) as ws:
        await receive_json(ws)
        await request(ws, 1, type="join", room="general")
        status, headers, body = await http_request(server.port, "GET", "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain")
        text = body.decode()
        for name in (
            "ensemble_connections 1.0",
            "ensemble_users_online 1.0",
            "ensemble_rooms_running 1.0",
            "ensemble_messages_in_total",
            "ensemble_messages_out_total",
            "ensemble_bytes_in_total",
            "ensemble_connections_opened_total 1.0",
            "ensemble_slow_consumers_total",
            "ensemble_rate_limited_total",
            'ensemble_mailbox_depth{group="connections"}',
            'ensemble_mailbox_depth_max{group="rooms"}',
            'ensemble_mailbox_drops_total{group="rooms"}',
            'ensemble_restarts_total{group="rooms"}',
            'ensemble_actors{group="connections"} 2.0',  # the connection and the direct writer
            "ensemble_heartbeat_pings_total",
        ):
            assert name in text, name
        # Two apps in one process have their own registries: no clash.
        async with running_server() as other:
            status, _, body = await http_request(other.port, "GET", "/metrics")
            assert status == 200
            assert "ensemble_connections 0.0" in body.decode()


# -- the documentation --------------------------------------------------------------------------


@attrs.frozen
class CurlExample:
    line: int
    argv: list[str]
    expected: list[str]


def curl_examples(text: str) -> list[CurlExample]:
    """The ``curl`` commands of the ```sh blocks, with the ``# `` lines under each."""
    examples: list[CurlExample] = []
    for block in re.finditer(r"```sh\n(.*?)```", text, re.DOTALL):
        first_line = text[: block.start()].count("\n") + 2
        lines = block.group(1).splitlines()
        index = 0
        while index < len(lines):
            line = lines[index]
            start = index
            if not line.startswith("curl "):
                index += 1
                continue
            command = line
            while command.endswith("\\"):
                index += 1
                command = command[:-1] + lines[index]
            index += 1
            expected = []
            while index < len(lines) and lines[index].startswith("# "):
                expected.append(lines[index][2:])
                index += 1
            examples.append(CurlExample(first_line + start, shlex.split(command), expected))
    return examples


def perform(argv: list[str], variables: dict[str, str]) -> tuple[str, str, dict[str, str], bytes | None]:
    """Method, URL, headers and body of a curl command line."""
    assert argv[0] == "curl"
    method, url, body = "GET", "", None
    headers: dict[str, str] = {}
    args = iter(argv[1:])
    for arg in args:
        arg = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], arg)
        if arg == "-s":
            continue
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], next(args)).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            body = next(args).encode()
            if method == "GET":
                method = "POST"
        elif arg.startswith("-"):
            raise AssertionError(f"unsupported curl option {arg}")
        else:
            url = arg
    return method, url, headers, body


def matches(expected: Any, actual: Any) -> bool:
    if expected == "...":
        return True
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(key in actual and matches(value, actual[key]) for key, value in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(map(matches, expected, actual))
    return bool(expected == actual and type(expected) is type(actual))


def test_the_documentation_has_curl_examples_for_every_endpoint() -> None:
    examples = curl_examples(DOC.read_text(encoding="utf-8"))
    urls = " ".join(arg for example in examples for arg in example.argv if "ENSEMBLE_URL" in arg)
    for path in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/publish",
        "/presence",
        "/history",
        "/ban",
        "/unban",
        "/kick",
        "/notify",
        "/online",
        "/disconnect",
        "/api/broadcast",
        "/api/live/task/create",
        "/api/live/task/update",
        "/api/live/task/delete",
    ):
        assert path in urls, path
    assert all(example.expected for example in examples)


async def test_the_documented_curl_examples_work() -> None:
    examples = curl_examples(DOC.read_text(encoding="utf-8"))
    assert len(examples) >= 18
    async with running_server(make_config(api_keys=(KEY,))) as server, open_websocket_url(server.ws_url("token=alice")) as alice:
        await receive_json(alice)
        await request(alice, 1, type="join", room="general")
        await request(alice, 2, type="send", room="general", content="hello from alice")
        variables = {"ENSEMBLE_URL": f"http://127.0.0.1:{server.port}", "API_KEY": KEY}
        for example in examples:
            method, url, headers, body = perform(example.argv, variables)
            path = url.removeprefix(variables["ENSEMBLE_URL"])
            assert path.startswith("/"), f"docs/http-api.md:{example.line}: {url}"
            _, response_headers, payload = await http_request(server.port, method, path, body=body, headers=headers)
            where = f"docs/http-api.md:{example.line}"
            if response_headers.get("content-type", "").startswith("application/json"):
                assert len(example.expected) == 1, where
                expected = json.loads(example.expected[0])
                actual = json.loads(payload)
                assert matches(expected, actual), f"{where}: expected {expected}, got {actual}"
            else:
                text = payload.decode()
                for line in example.expected:
                    assert line in text, f"{where}: {line!r} not in the response"
        # The last examples disconnected alice with 4003.
        assert await closed_with(alice) == CloseCode.DISCONNECTED == 4003


@pytest.mark.parametrize("expected", ['{"a": 1}', '{"a": "..."}'])
def test_the_matcher(expected: str) -> None:
    assert matches(json.loads(expected), {"a": 1, "b": 2})
    assert not matches({"a": 2}, {"a": 1})
    assert not matches([1], [1, 2])
    assert not matches({"a": True}, {"a": 1})


async def test_disconnect_closes_every_connection_of_the_user() -> None:
    async with (
        running_server(make_config(api_keys=(KEY,))) as server,
        open_websocket_url(server.ws_url("token=alice")) as phone,
        open_websocket_url(server.ws_url("token=alice")) as laptop,
    ):
        await receive_json(phone)
        await receive_json(laptop)
        status, body = await call(server.port, "POST", "/api/users/alice/disconnect", {"reason": "suspended"})
        assert (status, body) == (200, {"ok": True, "disconnected": 2})
        with trio.fail_after(10):
            assert await closed_with(phone) == 4003
            assert await closed_with(laptop) == 4003
