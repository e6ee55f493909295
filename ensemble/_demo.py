"""The embedded demo run by ``python -m ensemble``.

A small supervision tree of chat-room-like actors: messages flow, one room
crashes on purpose and is restarted without losing its queued messages, a
typing indicator expires by a timer, and the tree's statistics are printed.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from .actors import Actor, ChildSpec, MailboxConfig, Overflow, SupervisorSpec, open_supervisor


@attrs.frozen
class Say:
    user: str
    text: str


@attrs.frozen
class Typing:
    user: str

    @property
    def coalesce_key(self) -> str:
        return self.user


@attrs.frozen
class TypingExpired:
    user: str


@attrs.frozen
class Crash:
    """Makes the room raise, to show a supervised restart."""


@attrs.frozen
class History:
    pass


class DemoRoom(Actor):
    mailbox = MailboxConfig(size=100, per_type={Typing: Overflow.KEEP_LATEST})
    expected_exceptions = (PermissionError,)

    def __init__(self, log: list[str], typing_timeout: float) -> None:
        self.log = log
        self.typing_timeout = typing_timeout
        self.typing: set[str] = set()

    async def receive(self, message: Any) -> Any:
        if isinstance(message, Say):
            if message.user == "mallory":
                raise PermissionError("mallory is banned")
            self.log.append(f"{self.path}: <{message.user}> {message.text}")
            return len(self.log)
        if isinstance(message, Typing):
            self.typing.add(message.user)
            self.start_timer(("typing", message.user), self.typing_timeout, TypingExpired(message.user))
            return sorted(self.typing)
        if isinstance(message, TypingExpired):
            self.typing.discard(message.user)
            print(f"  {self.path}: {message.user} stopped typing (timer after {self.typing_timeout} s)")
            return None
        if isinstance(message, Crash):
            raise RuntimeError("a bug in the room")
        if isinstance(message, History):
            return [line for line in self.log if line.startswith(self.path)]
        raise TypeError(f"unknown message {message!r}")


async def run_demo(*, typing_timeout: float = 1.0) -> None:
    """Run the demo on the current Trio clock and print what happens.

    Args:
        typing_timeout: Seconds until a typing indicator expires.
    """
    log: list[str] = []
    async with open_supervisor(name="demo") as top:
        rooms = await top.start_child(SupervisorSpec(id="rooms", strategy="one_for_one"))
        general = await rooms.start_child(ChildSpec(id="general", factory=lambda: DemoRoom(log, typing_timeout)))
        await rooms.start_child(ChildSpec(id="random", factory=lambda: DemoRoom(log, typing_timeout)))
        print(f"started {general.path} and its siblings under {rooms.path}")
        print("alice says hello; messages in the log:", await general.ask(Say("alice", "hello")))
        try:
            await general.ask(Say("mallory", "spam"))
        except PermissionError as exc:
            print("mallory is refused (a rejection, not a crash):", exc)
        general.tell_nowait(Crash())
        general.tell_nowait(Say("carol", "queued behind the crash"))
        print("the room crashes on purpose and is restarted; the message queued behind the crash is kept:")
        print("  history:", await general.ask(History()))
        print("bob starts typing; typing now:", await general.ask(Typing("bob")))
        await trio.sleep(typing_timeout + 0.1)
        print("\nsupervision tree:")
        print(top.snapshot().format())
        stats = general.statistics()
        print(
            f"\n{general.path}: handled={stats.messages_handled} rejected={stats.messages_rejected} crashes={stats.crashes} restarts={stats.restarts}"
        )


def main() -> None:
    """Entry point of ``python -m ensemble``."""
    trio.run(run_demo)
