"""On-demand children: actors created on first use and reaped when idle.

Rooms and user mailboxes are ``transient`` children of a supervisor that are
started the first time someone needs them and stop themselves (normally)
when idle. Two races need care, and both are handled here once:

* two tasks ask for the same missing child at the same time: the second
  ``start_child`` raises ``ValueError`` (duplicate id), and gets the child the
  first one started;
* a child stops itself just as a caller sends to it: the send fails with
  ``ActorStopped`` and :meth:`OnDemand.ask` resolves the id again (starting a
  fresh incarnation, which resumes from its store) and retries once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..actors import ActorRef, ActorStopped, ChildSpec, Supervisor


class OnDemand:
    """Resolves ids to the refs of on-demand children of one supervisor.

    Args:
        supervisor: The supervisor the children run under.
        make_spec: Makes the child spec for an id (its ``id`` must be the
            same id; use ``restart="transient"`` so idle children are
            removed when they stop).
    """

    def __init__(self, supervisor: Supervisor, make_spec: Callable[[str], ChildSpec]) -> None:
        self._supervisor = supervisor
        self._make_spec = make_spec

    def get_nowait(self, id: str) -> ActorRef | None:
        """The running child's ref, or ``None`` if it is not running now."""
        handle = self._supervisor.child(id)
        return handle if isinstance(handle, ActorRef) and handle.alive else None

    async def get(self, id: str) -> ActorRef:
        """The child's ref, starting the child if needed.

        Raises:
            ActorStartFailed: The child failed to start.
        """
        ref = self.get_nowait(id)
        if ref is not None:
            return ref
        spec = self._make_spec(id)
        if spec.id != id:
            raise ValueError(f"make_spec({id!r}) returned a spec for {spec.id!r}")
        try:
            return await self._supervisor.start_child(spec)
        except ValueError:
            # Started meanwhile by another task (or still being removed after
            # an idle stop: then the next lookup starts it afresh).
            ref = self.get_nowait(id)
            if ref is None:
                return await self._supervisor.start_child(spec)
            return ref

    async def ask(self, id: str, message: Any, *, timeout: float | None = 5.0) -> Any:  # noqa: ASYNC109 (mirrors ActorRef.ask)
        """``ask`` the child, starting it if needed; retry once if it had just
        stopped itself (its ``ActorStopped`` is not the caller's problem).
        """
        ref = await self.get(id)
        try:
            return await ref.ask(message, timeout=timeout)
        except ActorStopped:
            ref = await self.get(id)
            return await ref.ask(message, timeout=timeout)

    async def tell(self, id: str, message: Any) -> None:
        """``tell`` the child, starting it if needed (retrying once as :meth:`ask`)."""
        ref = await self.get(id)
        try:
            await ref.tell(message)
        except ActorStopped:
            ref = await self.get(id)
            await ref.tell(message)

    def running(self) -> list[str]:
        """The ids of the children running now."""
        return [info.id for info in self._supervisor.which_children() if info.running]
