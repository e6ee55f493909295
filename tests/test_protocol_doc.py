"""Every example session in docs/protocol.md runs against a real hub.

A session is a fenced block whose info string is ``session``. Its lines:

- ``NAME> {json}``: client ``NAME`` sends the frame; it connects before
  its first frame, authenticated at the handshake as user ``NAME``
  (``alice.phone`` is another device of ``alice``; ``anonymous`` presents
  no credential);
- ``NAME< {json}``: a frame ``NAME`` receives, in order: after each ``>``
  or ``!`` line the hub settles, and the frames each client received must
  be exactly the ``<`` lines that follow (the ``welcome`` of a client is
  skipped unless the session shows it);
- ``! python``: server code, awaited with ``hub`` in scope (the backend);
- ``#`` comments and blank lines are ignored.

Ids, epochs and times differ per run, so they are normalised: the values of
the keys in ``IDS`` are placeholders mapped one-to-one to the real values
when first seen (and replaced in later client lines), and the values of the
keys in ``TIMES`` match any number.

Run ``python tests/test_protocol_doc.py`` to print each session as it runs
now (to write a new example).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio
import trio.testing

from ensemble import Hub, HubConfig, MemoryTransport, open_hub
from ensemble.realtime import RoomConfig
from ensemble.server import Identity, ProtocolHandler

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
IDS = {"id", "ids", "epoch", "connection_id", "message_id"}
TIMES = {"timestamp", "joined_at", "created_at", "requested_at", "retry_after"}
LINE = re.compile(r"^(?:(?P<name>[a-z_][a-z_.0-9]*)(?P<dir>[<>]) (?P<json>.*)|! (?P<code>.*))$")


def sessions() -> list[tuple[int, list[str]]]:
    found: list[tuple[int, list[str]]] = []
    lines = DOC.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```session":
            start = index + 1
            end = lines.index("```", start)
            found.append((start + 1, lines[start:end]))
            index = end
        index += 1
    return found


class Tokens:
    """The doc's authenticator: ``token-<user>`` is that user's token."""

    async def authenticate(self, token: str) -> Identity | None:
        await trio.lowlevel.checkpoint()
        return Identity(user_id=token.removeprefix("token-"), expires_at=1900000000.0) if token.startswith("token-") else None


class Normaliser:
    def __init__(self) -> None:
        self.real: dict[str, str] = {}  # placeholder -> real
        self.shown: dict[str, str] = {}  # real -> placeholder
        self.counts: dict[str, int] = {}

    def substitute(self, text: str) -> str:
        for placeholder, real in self.real.items():
            text = text.replace(f'"{placeholder}"', json.dumps(real))
            text = text.replace(f'"live:{placeholder}"', json.dumps(f"live:{real}"))
        return text

    def match(self, expected: Any, actual: Any, key: str = "") -> bool:
        if key in TIMES and isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
            return True
        if key in IDS and isinstance(expected, str) and isinstance(actual, str):
            return self._same(expected, actual)
        if key == "topic" and isinstance(expected, str) and isinstance(actual, str) and expected.startswith("live:"):
            return actual.startswith("live:") and self._same(expected[5:], actual[5:])
        if isinstance(expected, dict) and isinstance(actual, dict):
            return expected.keys() == actual.keys() and all(self.match(expected[k], actual[k], k) for k in expected)
        if isinstance(expected, list) and isinstance(actual, list):
            return len(expected) == len(actual) and all(self.match(e, a, key) for e, a in zip(expected, actual, strict=True))
        if isinstance(actual, (list, dict)) and key == "positions":
            return False
        return bool(expected == actual and type(expected) is type(actual))

    def _same(self, placeholder: str, real: str) -> bool:
        known = self.real.get(placeholder)
        if known is None:
            if real in self.shown:
                return False  # one-to-one
            self.real[placeholder] = real
            self.shown[real] = placeholder
            return True
        return known == real

    def show(self, value: Any, key: str = "") -> Any:
        """The value with real ids replaced by new placeholders (for writing examples)."""
        if key in TIMES and isinstance(value, (int, float)):
            return 1700000000.0 if key != "retry_after" else 0.5
        if key in IDS and isinstance(value, str):
            return self._placeholder(key, value)
        if key == "topic" and isinstance(value, str) and value.startswith("live:"):
            return "live:" + self._placeholder("id", value[5:])
        if isinstance(value, dict):
            return {k: self.show(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.show(v, key) for v in value]
        return value

    def _placeholder(self, key: str, real: str) -> str:
        if real not in self.shown:
            prefix = {"epoch": "E", "connection_id": "C"}.get(key, "I")
            self.counts[prefix] = self.counts.get(prefix, 0) + 1
            placeholder = f"{prefix}{self.counts[prefix]}"
            self.shown[real] = placeholder
            self.real[placeholder] = real
        return self.shown[real]


def split(frame: bytes) -> Iterator[Any]:
    for line in frame.split(b"\n"):
        yield json.loads(line)


class Clients(Protocol):
    """How a session's clients reach a server: in memory here, over sockets in
    tests/test_protocol_sockets.py."""

    @property
    def hub(self) -> Hub:
        """The server's hub (``!`` lines run against it)."""
        ...

    async def open(self, name: str, token: str | None) -> None:
        """Connect client ``name`` presenting ``token`` (None: no credential)."""

    async def send(self, name: str, frame: str) -> None:
        """Send one text frame from client ``name``."""

    def received(self, name: str) -> list[Any]:
        """Every frame client ``name`` received so far (batches split)."""
        ...

    async def settle(self, ready: Callable[[], bool]) -> None:
        """Wait until the server has done everything the last frame caused
        (``ready()`` says when every expected frame is there)."""


class MemoryClients:
    """Clients on :class:`MemoryTransport`: the handler opens them directly
    with the identity their token stands for; time is virtual."""

    def __init__(self, hub: Hub, handler: ProtocolHandler) -> None:
        self.hub = hub
        self.handler = handler
        self.transports: dict[str, MemoryTransport] = {}
        self.ids: dict[str, str] = {}

    async def open(self, name: str, token: str | None) -> None:
        identity = await Tokens().authenticate(token) if token is not None else None
        transport = self.transports[name] = MemoryTransport()
        self.ids[name] = (await self.handler.open(transport, identity)).connection_id

    async def send(self, name: str, frame: str) -> None:
        await self.handler.frame(self.ids[name], frame)

    def received(self, name: str) -> list[Any]:
        return [f for frame in self.transports[name].sent for f in split(frame)]

    async def settle(self, ready: Callable[[], bool]) -> None:
        await trio.sleep(0.5)


HUB_CONFIG = HubConfig(room=RoomConfig(history_size=3))
"""The hub the sessions run against (3 messages of history)."""
MAX_ROOMS = 2
WATCHABLE = ("Order",)


@asynccontextmanager
async def memory_clients() -> AsyncIterator[MemoryClients]:
    async with open_hub(HUB_CONFIG) as hub:
        handler = ProtocolHandler(hub, authenticator=Tokens(), max_rooms_per_connection=MAX_ROOMS, watchable_models=WATCHABLE).install()
        yield MemoryClients(hub, handler)


def token_of(name: str) -> str | None:
    """The token client ``name`` presents (``alice.phone`` is another device of ``alice``)."""
    user = name.split(".")[0]
    return None if user == "anonymous" else f"token-{user}"


async def run_session(lines: list[str], *, first_line: int, clients: Clients, record: bool = False) -> list[str]:
    normaliser = Normaliser()
    out: list[str] = []
    read: dict[str, int] = {}
    shows_welcome = {m["name"] for line in lines if (m := LINE.match(line)) and m["dir"] == "<" and '"type":"welcome"' in line}
    expected: dict[str, list[tuple[int, Any]]] = {}

    def new_frames(name: str) -> list[Any]:
        got = clients.received(name)[read[name] :]
        return got if name in shows_welcome else [f for f in got if f.get("type") != "welcome"]

    def ready() -> bool:
        return all(len(new_frames(name)) >= len(expected.get(name, ())) for name in read)

    async def settle_and_check() -> None:
        await clients.settle(ready)
        for name in read:
            got = new_frames(name)
            read[name] = len(clients.received(name))
            want = expected.pop(name, [])
            if record:
                out.extend(f"{name}< {json.dumps(normaliser.show(f), separators=(',', ':'), ensure_ascii=False)}" for f in got)
                continue
            if len(got) != len(want) or not all(normaliser.match(w, g) for (_, w), g in zip(want, got, strict=False)):
                shown = "\n".join(json.dumps(g, ensure_ascii=False) for g in got)
                where = ", ".join(str(number) for number, _ in want) or "none"
                raise AssertionError(f"{DOC.name}: {name} received (expected lines {where}):\n{shown}")
        if expected and not record:
            raise AssertionError(f"{DOC.name}: frames expected for clients that never connected: {sorted(expected)}")

    pending = False
    for offset, line in enumerate(lines):
        number = first_line + offset
        if not line.strip() or line.startswith("#"):
            continue
        match = LINE.match(line)
        assert match, f"{DOC.name}:{number}: not a session line: {line!r}"
        if match["dir"] == "<":
            if not record:
                expected.setdefault(match["name"], []).append((number, json.loads(line.split("< ", 1)[1])))
            continue
        if pending:
            await settle_and_check()
        if record:
            out.append(line)
        if match["code"] is not None:
            await eval(
                compile(match["code"], f"{DOC.name}:{number}", "eval", flags=0x2000),
                {"hub": clients.hub, "trio": trio, "RoomConfig": RoomConfig, "faults": __import__("_doc_faults")},
            )
        else:
            name = match["name"]
            if name not in read:
                await clients.open(name, token_of(name))
                read[name] = 0
            await clients.send(name, normaliser.substitute(match["json"]))
        pending = True
    await settle_and_check()
    return out


@pytest.mark.parametrize(("first_line", "lines"), sessions(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
async def test_session(first_line: int, lines: list[str], autojump_clock: trio.abc.Clock) -> None:
    async with memory_clients() as clients:
        await run_session(lines, first_line=first_line, clients=clients)


def test_the_doc_has_sessions_for_every_command() -> None:
    from ensemble.protocol import COMMAND_TYPES

    text = "\n".join(line for _, lines in sessions() for line in lines)
    missing = [kind for kind in COMMAND_TYPES if f'"type":"{kind}"' not in text]
    assert not missing, f"no example session sends {missing}"


def test_the_doc_has_sessions_for_every_event() -> None:
    """Every event type of the ``## Events`` table (``welcome`` included: the
    first session shows it) is received in some session."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Events\n", 1)[1].split("\n## ", 1)[0]
    rows = section.split("\n| --- |", 1)[1]  # below the header row
    events = re.findall(r"^\| `([a-z_]+)` \|", rows, flags=re.MULTILINE)
    assert len(events) > 10, f"could not read the events table: {events}"
    received = {
        json.loads(match["json"])["type"]
        for _, lines in sessions()
        for line in lines
        if (match := LINE.match(line)) and match["dir"] == "<"
    }
    missing = [kind for kind in events if kind not in received]
    assert not missing, f"no example session receives {missing}"


def _record(first: int, lines: list[str]) -> None:
    print(f"--- line {first}")
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def record() -> list[str]:
        async with memory_clients() as clients:
            return await run_session(lines, first_line=first, clients=clients, record=True)

    print("\n".join(trio.run(record, clock=clock)))


if __name__ == "__main__":  # print the sessions as they run now
    only = int(sys.argv[1]) if len(sys.argv) > 1 else None
    for first, lines in sessions():
        if only is None or first == only:
            _record(first, lines)
