"""A :class:`MemoryTransport` that can be written without waiting, like the native transport."""

from __future__ import annotations

from ensemble.realtime import MemoryTransport


class DirectMemoryTransport(MemoryTransport):
    """A :class:`MemoryTransport` with ``send_nowait``, like the native transport.

    ``room`` is how many frames the "kernel" takes per direct write (``None``:
    all; none while :meth:`block` ed); the rest is kept and written first by the next ``send_many`` or
    before the close, as the native transport does with its bytes.
    """

    direct_writes = True

    def __init__(self, room: int | None = None, *, stop_reading_when_full: bool = False) -> None:
        super().__init__()
        self.room = room
        self.stop_reading_when_full = stop_reading_when_full  # a remainder blocks the transport
        self.pending: list[bytes] = []
        self.direct: list[int] = []  # frames per send_nowait call
        self.waited: list[int] = []  # frames per send_many call (the actor's writes)
        self.writing = False  # an actor's send_many in progress (the native transport's lock)

    def can_send_nowait(self) -> bool:
        return not self.closed and not self.pending and not self.writing

    def send_nowait(self, frames: list[bytes]) -> bool:
        assert self.can_send_nowait()
        if self._error is not None:
            raise self._error
        self.direct.append(len(frames))
        if self._gate is not None:
            taken: list[bytes] = []  # a client that stopped reading: the kernel takes nothing
        else:
            taken = frames if self.room is None else frames[: self.room]
        self.sent.extend(taken)
        self.pending = list(frames[len(taken) :])
        if self.pending and self.stop_reading_when_full:
            self.block()
        return not self.pending

    async def send_many(self, frames: list[bytes]) -> None:
        self.waited.append(len(frames))
        self.writing = True
        try:
            await self._writable()
        finally:
            self.writing = False
        self.sent.extend(self.pending)
        self.pending = []
        self.sent.extend(frames)

    async def send(self, data: bytes) -> None:
        await self.send_many([data])

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.sent.extend(self.pending)  # the interrupted write is finished first
            self.pending = []
        await super().close(code, reason)
