"""Supervisors: start children, watch them, restart them by a strategy.

A supervisor is itself actor-shaped: one *control loop* task owns all of its
state and handles commands one at a time from an inbox (a child exited,
start a child, terminate a child, a delayed restart is due, stop). Callers of
:meth:`Supervisor.start_child` and :meth:`Supervisor.terminate_child` send a
command and wait for the reply, so nothing needs a lock. Each time it wakes
up, the control loop handles every command queued by then, without a
scheduler round trip per command.

Starting a child is the one exception, and only when the supervisor is idle
(no command queued or being handled, no other start in progress): then
``start_child`` registers the child and spawns its task itself, which is
exactly what the control loop would do next, and waits for its ``on_start``,
without a round trip through the control loop. It counts as busy meanwhile,
so the control loop waits for such a start to end before handling its next
command, and other callers queue their commands as usual: commands and
starts still happen one at a time, in order.

Every child runs in a task of the supervisor's nursery, inside a shielded
cancel scope of its own (the "kill" after the grace period): only the
supervisor stops it, even when an outer scope is cancelled. Its task reports
how ``on_start`` went to whoever started it (a :class:`_Starting`), and never
lets an ``Exception`` escape: it reports the exit to the control loop instead.
``BaseException`` (``Cancelled``, ``KeyboardInterrupt``, ``SystemExit``)
always propagates.

The rules are Erlang/OTP's:

* ``one_for_one`` restarts the child that exited; ``one_for_all`` stops the
  others (reverse start order) and restarts them all; ``rest_for_one`` does
  that for the children started after the one that exited.
* ``permanent`` children are always restarted, ``transient`` ones only after
  a crash, ``temporary`` ones never (and they are removed, not restarted, when
  a sibling's exit restarts the group).
* More than ``max_restarts`` restarts within ``max_seconds`` makes the
  supervisor stop all children in reverse start order and give up with
  :class:`SupervisorGaveUp`, which its parent treats as a crash of that child.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, Final, overload

import attrs
import trio

from ._actor import BATCH_LIMIT, Actor, ActorRef, ActorStatistics, TaskStarted, _Cell
from ._errors import ActorStartFailed, ActorStopped, SupervisorGaveUp
from ._mailbox import MailboxConfig, Waker, _Reply

logger = logging.getLogger("ensemble.actors")

DEFAULT_SHUTDOWN: Final = 5.0  # seconds of grace for a worker


class Strategy(enum.Enum):
    """Which children a supervisor restarts when one exits."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class Restart(enum.Enum):
    """When a child is restarted after it exits."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


def _to_strategy(value: Strategy | str) -> Strategy:
    return value if isinstance(value, Strategy) else Strategy(value)


def _to_restart(value: Restart | str) -> Restart:
    return value if isinstance(value, Restart) else Restart(value)


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0 or value == math.inf:
        raise ValueError(f"{attribute.name} must be a positive number of seconds, got {value!r}")


def _valid_id(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or "/" in value:
        raise ValueError(f"a child id must be non-empty and contain no '/', got {value!r}")


@attrs.frozen(kw_only=True)
class Backoff:
    """Exponential restart backoff with jitter.

    The n-th restart within the supervisor's intensity window waits
    ``min(maximum, initial * factor ** (n - 1))`` seconds, multiplied by a
    random factor in ``[1 - jitter, 1 + jitter]``.

    Args:
        initial: Delay before the first restart, in seconds.
        factor: Growth per further restart.
        maximum: Upper bound, in seconds.
        jitter: Relative random spread, from 0 to 1.
    """

    initial: float = attrs.field(default=0.1, validator=_non_negative)
    factor: float = attrs.field(default=2.0, validator=_non_negative)
    maximum: float = attrs.field(default=10.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.1, validator=[_non_negative, attrs.validators.le(1.0)])

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The delay before restart number ``attempt`` (counting from 1)."""
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        if self.jitter:
            base *= rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return base


@attrs.frozen(kw_only=True)
class ChildSpec:
    """How to start (and restart) one actor.

    Args:
        id: Unique among the supervisor's children; the last part of the
            actor's path.
        factory: Makes a fresh actor instance for each (re)start; usually the
            actor class, or a ``functools.partial`` of it.
        restart: ``permanent``, ``transient`` or ``temporary``.
        mailbox: Overrides the actor class's ``mailbox`` configuration.
        shutdown: Grace period in seconds for ``on_stop`` when the child is
            stopped; after it the child is cancelled.
        max_restarts: A restart limit of the child's own (Akka's one-for-one
            semantics): more than this many restarts within ``max_seconds``
            and the child is removed instead of restarted, while its
            siblings and its supervisor carry on. Its exits then do not count
            toward the supervisor's intensity. ``None`` (the default): the
            supervisor's intensity applies, as in OTP. Meant for many
            independent children, such as one actor per chat room.
        max_seconds: The window of ``max_restarts``.
        on_given_up: Called with the child's id (in the supervisor's control
            loop, so it must not block or await) right after the child was
            removed for exceeding ``max_restarts``: the owner's chance to
            tell the child's clients. An exception from it is logged.
        hibernate_after: Seconds without a message after which the actor's
            task ends while the actor (its state, mailbox and ref) stays;
            the next message, stop or timer for it starts a task again and
            it carries on where it was (no second ``on_start``). Meant for
            many mostly idle actors, such as one per connection: an idle
            task costs memory, a hibernating actor does not. An actor with
            a running timer does not hibernate. The supervisor checks every
            ``hibernate_after`` seconds, so an actor hibernates after
            between one and two such periods without messages. ``None``
            (the default): never.
        start_hibernating: With ``hibernate_after``: the first time the
            actor is idle after ``on_start`` (each incarnation), it
            hibernates at once instead of after a period. For actors that
            are mostly idle from the start (one per connection): a burst of
            starts then never holds a task per actor, and the memory their
            tasks used is reused by the next ones.
    """

    id: str = attrs.field(validator=_valid_id)
    factory: Callable[[], Actor]
    restart: Restart = attrs.field(default=Restart.PERMANENT, converter=_to_restart)
    mailbox: MailboxConfig | None = None
    shutdown: float = attrs.field(default=DEFAULT_SHUTDOWN, validator=_non_negative)
    max_restarts: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))
    max_seconds: float = attrs.field(default=5.0, validator=_non_negative)
    on_given_up: Callable[[str], None] | None = attrs.field(default=None, eq=False)
    hibernate_after: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    start_hibernating: bool = False


@attrs.frozen(kw_only=True)
class SupervisorSpec:
    """How to start a nested supervisor as a child of another.

    Args:
        id: Unique among the parent's children.
        strategy: The nested supervisor's strategy.
        max_restarts: Its restart intensity: restarts allowed ...
        max_seconds: ... within this many seconds.
        backoff: Its restart backoff, or ``None`` for immediate restarts.
        children: Specs started in order each time the nested supervisor
            starts (children added later with ``start_child`` are restarted
            with it too, except ``temporary`` ones).
        restart: How the parent treats the nested supervisor's exit.
        shutdown: Grace period for the whole subtree (default: unlimited, as
            its children have their own).
    """

    id: str = attrs.field(validator=_valid_id)
    strategy: Strategy = attrs.field(default=Strategy.ONE_FOR_ONE, converter=_to_strategy)
    max_restarts: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    max_seconds: float = attrs.field(default=5.0, validator=_non_negative)
    backoff: Backoff | None = None
    children: tuple[ChildSpec | SupervisorSpec, ...] = attrs.field(default=(), converter=tuple)
    restart: Restart = attrs.field(default=Restart.PERMANENT, converter=_to_restart)
    shutdown: float = attrs.field(default=math.inf, validator=_non_negative)


AnySpec = ChildSpec | SupervisorSpec


@attrs.frozen
class ChildInfo:
    """One row of :meth:`Supervisor.which_children`.

    Attributes:
        id: The child's id.
        kind: ``"worker"`` (an actor) or ``"supervisor"``.
        restart: Its restart type.
        running: Whether it is running now (not restarting or stopped).
        handle: Its :class:`ActorRef`, or the nested :class:`Supervisor`.
    """

    id: str
    kind: str
    restart: Restart
    running: bool
    handle: ActorRef | Supervisor


@attrs.frozen
class ChildCounts:
    """What :meth:`Supervisor.count_children` returns (OTP's four counts)."""

    specs: int
    active: int
    supervisors: int
    workers: int


@attrs.frozen
class SupervisorStatistics:
    """A snapshot of one supervisor's counters.

    Attributes:
        path: The supervisor's path.
        strategy: Its strategy.
        state: ``running``, ``stopping`` or ``stopped``.
        children: How many children it has.
        active: How many of them are running.
        restarts: Child restarts it performed in total.
        recent_restarts: Restarts within the current intensity window.
        max_restarts: The intensity limit.
        max_seconds: The intensity window.
        gave_up: Times it gave up (a nested supervisor can be restarted).
        children_given_up: Children removed for exceeding their own
            ``ChildSpec.max_restarts``.
        hibernating: How many children hibernate now (no task; see
            ``ChildSpec.hibernate_after``); they count as ``active``.
        hibernations: Times a child went to hibernate, in total.
        wakeups: Times a hibernating child was given a task again.
    """

    path: str
    strategy: Strategy
    state: str
    children: int
    active: int
    restarts: int
    recent_restarts: int
    max_restarts: int
    max_seconds: float
    gave_up: int
    children_given_up: int = 0
    hibernating: int = 0
    hibernations: int = 0
    wakeups: int = 0


@attrs.frozen
class TreeNode:
    """One node of :meth:`Supervisor.snapshot`: a supervisor or an actor."""

    path: str
    kind: str
    restart: Restart | None
    statistics: ActorStatistics | SupervisorStatistics
    children: tuple[TreeNode, ...] = ()

    def walk(self) -> list[TreeNode]:
        """This node and every node below it, depth first."""
        nodes = [self]
        for child in self.children:
            nodes.extend(child.walk())
        return nodes

    def format(self, indent: str = "") -> str:
        """The tree as indented text, one line per node."""
        stats = self.statistics
        if isinstance(stats, ActorStatistics):
            line = f"{indent}{self.path} [{stats.state}] handled={stats.messages_handled} depth={stats.mailbox_depth} restarts={stats.restarts}"
        else:
            line = f"{indent}{self.path} <{stats.strategy.value}> children={stats.children} restarts={stats.restarts}"
        return "\n".join([line, *(child.format(indent + "  ") for child in self.children)])


# -- commands to the control loop -------------------------------------------------


@attrs.define(eq=False)
class _Exited:
    child: _Child
    generation: int
    error: Exception | None  # None: a normal exit


@attrs.define(eq=False)
class _Start:
    spec: AnySpec
    reply: _Reply


@attrs.define(eq=False)
class _Terminate:
    id: str
    reply: _Reply


@attrs.define(eq=False)
class _Due:
    """A delayed (backed-off) restart is due."""

    children: list[_Child]
    token: int


@attrs.define(eq=False)
class _StopAll:
    reply: _Reply


@attrs.define(eq=False)
class _Child:
    # Kept lean: an on-demand supervisor holds one per room, so every object
    # made per child is one more for the garbage collector to walk.
    spec: AnySpec
    cell: _Cell | None
    sup: Supervisor | None
    generation: int = 0
    running: bool = False
    terminating: bool = False
    scope: trio.CancelScope | None = None
    done: trio.Event | None = None  # made by _terminate when it waits; set when the incarnation's task ends
    pending_restart: int = 0  # token of a scheduled restart, 0 if none
    restart_times: deque[float] | None = None  # for a ChildSpec.max_restarts, made at the first restart

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def handle(self) -> ActorRef | Supervisor:
        if self.cell is not None:
            return self.cell.ref
        assert self.sup is not None
        return self.sup

    def request_stop(self) -> None:
        if self.cell is not None:
            self.cell.request_stop()
        elif self.sup is not None:
            self.sup._request_stop()

    def close(self) -> None:
        if self.cell is not None:
            self.cell.close()
        elif self.sup is not None:
            self.sup._close_all()


def _join(parent: str, child: str) -> str:
    return f"{parent.rstrip('/')}/{child}"


class Supervisor:
    """A running supervisor (from :func:`open_supervisor` or a
    :class:`SupervisorSpec`). Use it to start, stop and inspect children.
    """

    def __init__(
        self,
        *,
        path: str,
        strategy: Strategy,
        max_restarts: int,
        max_seconds: float,
        backoff: Backoff | None,
        children: Sequence[AnySpec],
        rng: random.Random,
    ) -> None:
        self.path = path
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self.backoff = backoff
        self._initial_specs = tuple(children)
        self._rng = rng
        self._children: dict[str, _Child] = {}  # in start order
        self._restart_times: deque[float] = deque()
        self._restarts = 0
        self._gave_up_count = 0
        self._children_given_up = 0
        self._state = "stopped"
        self._closed = False
        self._nursery: trio.Nursery | None = None
        self._inbox_send: trio.MemorySendChannel[Any] | None = None
        self._gave_up: SupervisorGaveUp | None = None
        self._self_cancelled = False
        self._body_running = False
        self._started_once = False
        self._tokens = 0
        # Commands sent to the control loop and not yet handled (plus one
        # while it starts the initial children): start_child takes the fast
        # path only at zero, with no start in progress.
        self._pending = 0
        self._starting: _Starting | None = None  # the start in progress (at most one)
        self._context = contextvars.copy_context()  # what child tasks inherit (see _spawn)
        self._control_scope = trio.CancelScope(shield=True)
        # The hibernation sweep (see ChildSpec.hibernate_after): its period,
        # and whether its task runs in the current nursery.
        self._sweep_period = math.inf
        self._sweeping = False
        self._hibernations = 0
        self._wakeups = 0

    def __repr__(self) -> str:
        return f"<Supervisor {self.path} {self.strategy.value} ({self._state})>"

    # -- public API -------------------------------------------------------------

    @overload
    async def start_child(self, spec: ChildSpec) -> ActorRef: ...

    @overload
    async def start_child(self, spec: SupervisorSpec) -> Supervisor: ...

    async def start_child(self, spec: AnySpec) -> ActorRef | Supervisor:
        """Start a child and return its handle once ``on_start`` has run.

        Starts happen one at a time, in order with the supervisor's other
        work: while one child's ``on_start`` runs, other calls wait. If the
        caller is cancelled while it waits, the child still starts (and is
        then a child like any other). The child's task inherits the context
        variables of the task that opened the supervisor, not the caller's.

        Args:
            spec: A :class:`ChildSpec` (returns an :class:`ActorRef`) or a
                :class:`SupervisorSpec` (returns the nested supervisor).

        Raises:
            ValueError: A child with that id exists already.
            ActorStartFailed: The child's ``on_start`` raised; it was not
                added.
            ActorStopped: This supervisor is not running.
            RuntimeError: Called from the ``on_start`` of a child of this
                supervisor (that would deadlock).
        """
        self._check_caller()
        if self._pending == 0 and self._starting is None:
            # The fast path: the control loop is idle, and starting the child
            # is what it would do next; do it here, without a round trip.
            try:
                return await self._add(spec)
            except ValueError:
                await trio.lowlevel.checkpoint()
                raise
        result: ActorRef | Supervisor = await self._command(_Start(spec, _Reply()))
        return result

    async def terminate_child(self, id: str) -> None:
        """Stop a child (``on_stop`` within its grace period) and remove it.

        Raises:
            KeyError: No child has that id.
            ActorStopped: This supervisor is not running.
        """
        await self._command(_Terminate(id, _Reply()))

    def which_children(self) -> list[ChildInfo]:
        """The children in start order."""
        return [
            ChildInfo(
                id=child.id,
                kind="worker" if child.cell is not None else "supervisor",
                restart=child.spec.restart,
                running=child.running,
                handle=child.handle,
            )
            for child in self._children.values()
        ]

    def count_children(self) -> ChildCounts:
        """How many children there are, of which kind, and how many run."""
        children = list(self._children.values())
        return ChildCounts(
            specs=len(children),
            active=sum(1 for child in children if child.running),
            supervisors=sum(1 for child in children if child.sup is not None),
            workers=sum(1 for child in children if child.cell is not None),
        )

    def child(self, id: str) -> ActorRef | Supervisor | None:
        """The handle of the child with this id, or ``None``."""
        child = self._children.get(id)
        return None if child is None else child.handle

    def statistics(self) -> SupervisorStatistics:
        """A frozen snapshot of this supervisor's counters."""
        self._prune_restart_times(trio.current_time() if self._state == "running" else math.inf)
        return SupervisorStatistics(
            path=self.path,
            strategy=self.strategy,
            state=self._state,
            children=len(self._children),
            active=sum(1 for child in self._children.values() if child.running),
            restarts=self._restarts,
            recent_restarts=len(self._restart_times),
            max_restarts=self.max_restarts,
            max_seconds=self.max_seconds,
            gave_up=self._gave_up_count,
            children_given_up=self._children_given_up,
            hibernating=sum(1 for child in self._children.values() if child.cell is not None and child.cell.hibernating),
            hibernations=self._hibernations,
            wakeups=self._wakeups,
        )

    def snapshot(self) -> TreeNode:
        """The whole tree below this supervisor, with every node's statistics."""
        nodes: list[TreeNode] = []
        for child in self._children.values():
            if child.cell is not None:
                nodes.append(TreeNode(child.cell.path, "worker", child.spec.restart, child.cell.statistics()))
            else:
                assert child.sup is not None
                sub = child.sup.snapshot()
                nodes.append(attrs.evolve(sub, restart=child.spec.restart))
        return TreeNode(self.path, "supervisor", None, self.statistics(), tuple(nodes))

    # -- running ------------------------------------------------------------------

    def _check_caller(self) -> None:
        starting = self._starting
        if starting is not None and starting.task is trio.lowlevel.current_task():
            raise RuntimeError(
                f"a child of {self.path} called start_child or terminate_child on {self.path} from its on_start; "
                "the supervisor waits for on_start to finish, so this would deadlock (do it after on_start, e.g. in receive)"
            )
        if self._state != "running" or self._inbox_send is None:
            raise ActorStopped(self.path, f"supervisor {self.path} is not running")

    async def _command(self, command: _Start | _Terminate | _StopAll) -> Any:
        self._check_caller()
        self._send(command)
        return await command.reply.wait()

    def _send(self, command: Any) -> bool:
        """Queue a command for the control loop, if it runs."""
        send = self._inbox_send
        if send is None:
            return False
        self._pending += 1
        send.send_nowait(command)
        return True

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        """Run the control loop and the initial children around the body.

        When the body ends for any reason the control loop stops the
        children (reverse start order, each within its grace period, shielded
        from outer cancellation). Raises :class:`SupervisorGaveUp` if the
        supervisor gave up.
        """
        self._gave_up = None
        self._self_cancelled = False
        self._body_running = False
        self._restart_times.clear()
        self._control_scope = trio.CancelScope(shield=True)
        self._pending = 1  # the initial children: commands wait for them
        self._starting = None
        self._context = contextvars.copy_context()
        body_error: BaseException | None = None
        inbox_send, inbox_receive = trio.open_memory_channel[Any](math.inf)
        ready = _Reply()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._inbox_send = inbox_send
            self._state = "running"
            nursery.start_soon(self._control_loop, inbox_receive, ready)
            try:
                await ready.wait()
                self._body_running = True
                yield
            except BaseException as exc:
                body_error = exc
            finally:
                self._body_running = False
                self._state = "stopping"
                with trio.CancelScope(shield=True):
                    await self._shutdown()
                # Normally a no-op: the control loop has ended and stopped
                # every child. If it died, do not wait on shielded tasks.
                self._control_scope.cancel()
                for child in self._children.values():
                    if child.scope is not None:
                        child.scope.cancel()
                nursery.cancel_scope.cancel()
        self._state = "stopped"
        self._nursery = None
        if body_error is not None and not (self._self_cancelled and isinstance(body_error, trio.Cancelled)):
            raise body_error
        if self._gave_up is not None:
            raise self._gave_up

    async def _shutdown(self) -> None:
        """Have the control loop stop every child, and wait for it."""
        command = _StopAll(_Reply())
        if not self._send(command):
            return  # the control loop has ended (gave up or stopped)
        # The control loop may end first, having stopped the children itself
        # (it gave up, or an initial child failed to start); it then refuses
        # this command, which is no error here.
        with suppress(ActorStopped):
            await command.reply.wait()

    async def _start_initial(self) -> None:
        """(Re)start the children this supervisor starts with, in order."""
        if self._started_once:
            # A nested supervisor restarted by its parent restarts the
            # children it had (refs stay valid), dropping temporary ones.
            for child in list(self._children.values()):
                if child.spec.restart is Restart.TEMPORARY:
                    self._remove(child)
            for child in list(self._children.values()):
                await self._start(child, first=False)
            return
        self._started_once = True
        for spec in self._initial_specs:
            await self._add(spec)

    async def _run_nested(self, task_status: TaskStarted) -> None:
        async with self._running():
            task_status.started()
            await trio.sleep_forever()

    def _request_stop(self) -> None:
        self._send(_StopAll(_Reply()))

    def _close_all(self) -> None:
        for child in list(self._children.values()):
            self._remove(child)
        self._closed = True

    async def _control_loop(self, inbox: trio.MemoryReceiveChannel[Any], ready: _Reply) -> None:
        # Shielded from outer cancellation, so that it can stop the children
        # gracefully when the body ends; it ends itself (stop, give up), and
        # ``_running`` cancels ``_control_scope`` as a last resort.
        with self._control_scope:
            await self._control_loop_body(inbox, ready)

    async def _control_loop_body(self, inbox: trio.MemoryReceiveChannel[Any], ready: _Reply) -> None:
        current: Any = None
        try:
            try:
                await self._start_initial()
            except (ActorStartFailed, ValueError) as exc:
                ready.fail(exc)
                await self._stop_children()
                self._inbox_send = None
                return
            ready.set(None)
            self._pending -= 1
            while True:
                try:
                    command = await inbox.receive()
                except trio.EndOfChannel:
                    return
                # Handle every command queued by now without going back to
                # the scheduler for each (a burst of idle stops queues one
                # exit per child), yielding only every BATCH_LIMIT commands.
                budget = BATCH_LIMIT
                while True:
                    current = command
                    starting = self._starting
                    if starting is not None:
                        await starting.wait()  # a start_child on the fast path
                    if await self._dispatch(command):
                        return
                    self._pending -= 1
                    # Hold no command while waiting for the next one: an exit
                    # record would keep the stopped child's actor (and all of
                    # its state) alive until then.
                    current = command = None
                    budget -= 1
                    if budget <= 0:
                        await trio.lowlevel.checkpoint()
                        budget = BATCH_LIMIT
                    try:
                        command = inbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
        finally:
            self._inbox_send = None
            self._fail_pending(current, inbox)

    async def _dispatch(self, command: Any) -> bool:
        """Handle one command; return whether the control loop ends."""
        if isinstance(command, _Exited):
            await self._on_exit(command)
        elif isinstance(command, _Start):
            await self._on_start_command(command)
        elif isinstance(command, _Terminate):
            child = self._children.get(command.id)
            if child is None:
                command.reply.fail(KeyError(f"{self.path} has no child {command.id!r}"))
            else:
                await self._terminate(child)
                self._remove(child)
                command.reply.set(None)
        elif isinstance(command, _Due):
            await self._on_due(command)
        elif isinstance(command, _StopAll):
            await self._stop_children()
            self._inbox_send = None
            command.reply.set(None)
            self._cancel_own_scope()
            return True
        return self._gave_up is not None

    def _fail_pending(self, current: Any, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        pending = [current] if current is not None else []
        while True:
            try:
                pending.append(inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        for command in pending:
            reply = getattr(command, "reply", None)
            if reply is not None:
                reply.fail(ActorStopped(self.path, f"supervisor {self.path} stopped"))

    def _cancel_own_scope(self) -> None:
        self._self_cancelled = self._body_running
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _on_start_command(self, command: _Start) -> None:
        try:
            handle = await self._add(command.spec)
        except (ValueError, ActorStartFailed) as exc:
            command.reply.fail(exc)
        else:
            command.reply.set(handle)

    async def _add(self, spec: AnySpec) -> ActorRef | Supervisor:
        """Register a child and start it (in the control loop, or in the
        caller's task on the fast path of ``start_child``)."""
        if spec.id in self._children:
            raise ValueError(f"{self.path} already has a child {spec.id!r}")
        path = _join(self.path, spec.id)
        if isinstance(spec, ChildSpec):
            cell = _Cell(path, spec.factory, spec.mailbox)
            child = _Child(spec, cell, None)
            if spec.hibernate_after is not None:
                cell.hibernate_after = spec.hibernate_after
                cell.start_hibernating = spec.start_hibernating
                cell.waker = _ChildWaker(self, child)
        else:
            nested = Supervisor(
                path=path,
                strategy=spec.strategy,
                max_restarts=spec.max_restarts,
                max_seconds=spec.max_seconds,
                backoff=spec.backoff,
                children=spec.children,
                rng=self._rng,
            )
            child = _Child(spec, None, nested)
        self._children[spec.id] = child
        handle = child.handle  # held here: the child may be gone by the time its start is reported
        await self._start(child, first=True)
        return handle

    async def _start(self, child: _Child, *, first: bool) -> None:
        """Start one incarnation of ``child`` and wait for its ``on_start``.

        On the first start an ``on_start`` failure removes the child and
        raises :class:`ActorStartFailed`; on a restart it is reported to the
        control loop as a crash (it counts toward the restart intensity).
        Either is done by the child's task, so a starter that is cancelled
        while it waits leaves nothing half done.
        """
        starting = self._spawn(child, first=first)
        await starting.wait()
        if starting.error is not None:
            raise starting.error

    def _spawn(self, child: _Child, *, first: bool) -> _Starting:
        assert self._nursery is not None
        child.generation += 1
        child.done = None
        child.pending_restart = 0
        # Only the supervisor stops a child (gracefully, then by cancelling
        # this scope), even when an outer scope is cancelled. That holds
        # during on_start too, as it did when the control loop started
        # children in a nursery of its own, under its shielded scope.
        child.scope = trio.CancelScope(shield=True)
        if not first:
            self._restarts += 1
            if child.cell is not None:
                child.cell.restarts += 1
        starting = _Starting(self, child, first=first)
        # Children inherit the supervisor's context (contextvars), not that
        # of whichever task called start_child.
        self._context.run(self._nursery.start_soon, self._child_task, child, child.generation, starting)
        self._starting = starting
        cell = child.cell
        if cell is not None and cell.hibernate_after is not None:
            self._ensure_sweep(cell.hibernate_after)
        return starting

    async def _child_task(self, child: _Child, generation: int, starting: _Starting) -> None:
        # The starter waits for this child's on_start; a command sent to this
        # supervisor from that on_start could never be handled.
        starting.task = trio.lowlevel.current_task()
        scope = child.scope
        assert scope is not None
        started = True
        hibernating = False
        error: Exception | None = None
        try:
            with scope:
                if child.cell is not None:
                    await child.cell.run(starting)
                else:
                    assert child.sup is not None
                    await child.sup._run_nested(starting)
        except Exception as exc:
            error = exc
        finally:
            hibernating = error is None and child.cell is not None and child.cell.hibernating
            if hibernating:
                self._hibernations += 1
                child.scope = None  # a new one when it wakes
            else:
                self._task_ended(child)
            if not starting.over:
                # on_start did not finish (even on a BaseException, which
                # propagates): the starter must not wait forever.
                started = False
                self._start_failed(child, generation, starting, error)
        if not started or hibernating or scope.cancelled_caught or child.terminating:
            return
        self._post(_Exited(child, generation, error))

    @staticmethod
    def _task_ended(child: _Child) -> None:
        child.running = False
        if child.done is not None:
            child.done.set()

    # -- hibernation (ChildSpec.hibernate_after) ---------------------------------

    def _resume(self, child: _Child) -> None:
        """A message (or a stop) came for a hibernating child: give it a task
        again. Called by its mailbox's :class:`Waker`, in the sender's task."""
        cell = child.cell
        nursery = self._nursery
        if cell is None or not cell.hibernating or cell.mailbox.closed or nursery is None or self._children.get(child.id) is not child:
            return
        scope = trio.CancelScope(shield=True)
        try:
            self._context.run(nursery.start_soon, self._resume_task, child, child.generation, scope)
        except RuntimeError:
            return  # the nursery is closing: the supervisor is stopping
        cell.state = "waking"  # no second task; hibernate() leaves it alone until it runs
        child.scope = scope
        self._wakeups += 1

    async def _resume_task(self, child: _Child, generation: int, scope: trio.CancelScope) -> None:
        cell = child.cell
        assert cell is not None
        hibernating = False
        error: Exception | None = None
        try:
            with scope:
                await cell.resume()
        except Exception as exc:
            error = exc
        finally:
            hibernating = error is None and cell.hibernating
            if hibernating:
                self._hibernations += 1
                child.scope = None  # a new one when it wakes
            else:
                self._task_ended(child)
        if hibernating or scope.cancelled_caught or child.terminating:
            return
        self._post(_Exited(child, generation, error))

    def _ensure_sweep(self, period: float) -> None:
        self._sweep_period = min(self._sweep_period, period)
        if not self._sweeping and self._nursery is not None:
            self._sweeping = True
            self._context.run(self._nursery.start_soon, self._sweep)

    async def _sweep(self) -> None:
        """Every ``hibernate_after`` seconds, ask the children that handled
        nothing since the last look, and have been idle that long, to
        hibernate."""
        try:
            while True:
                await trio.sleep(self._sweep_period)
                now = trio.current_time()
                children = list(self._children.values())
                for n, child in enumerate(children, 1):
                    cell = child.cell
                    if cell is not None and cell.hibernate_after is not None and cell.state == "running":
                        mark = cell.handled + cell.timers_fired
                        if mark != cell.activity_mark:
                            cell.activity_mark = mark
                            cell.idle_since = now
                        elif now - cell.idle_since >= cell.hibernate_after:
                            cell.hibernate()
                    if n % 1024 == 0:
                        await trio.lowlevel.checkpoint()
        finally:
            self._sweeping = False

    def _start_failed(self, child: _Child, generation: int, starting: _Starting, error: Exception | None) -> None:
        path = _join(self.path, child.id)
        cause = error if error is not None else RuntimeError(f"{path} exited before it started")
        if starting.first:
            self._remove(child)
            failure = ActorStartFailed(path, f"{path} failed to start: {cause!r}")
            failure.__cause__ = cause
            starting.error = failure
        else:
            self._post(_Exited(child, generation, cause))
        starting.finish()

    def _post(self, command: Any) -> None:
        self._send(command)

    async def _on_exit(self, event: _Exited) -> None:
        child = event.child
        if self._children.get(child.id) is not child or event.generation != child.generation:
            return  # stale: the child was restarted or removed meanwhile
        crashed = event.error is not None
        restart = child.spec.restart
        if restart is Restart.TEMPORARY or (restart is Restart.TRANSIENT and not crashed):
            logger.debug("%s exited (%s); not restarted (%s)", _join(self.path, child.id), "crash" if crashed else "normal", restart.value)
            self._remove(child)
            return
        now = trio.current_time()
        own_limit = child.spec.max_restarts if isinstance(child.spec, ChildSpec) else None
        if own_limit is not None:
            window = child.restart_times
            if window is None:
                window = child.restart_times = deque()
            window.append(now)
            while window and window[0] < now - child.spec.max_seconds:
                window.popleft()
            if len(window) > own_limit:
                logger.error(
                    "%s: removing %s: more than %d restarts of its own within %s s (last: %r)",
                    self.path,
                    child.id,
                    own_limit,
                    child.spec.max_seconds,
                    event.error,
                )
                self._children_given_up += 1
                self._remove(child)
                hook = child.spec.on_given_up if isinstance(child.spec, ChildSpec) else None
                if hook is not None:
                    try:
                        hook(child.id)
                    except Exception:
                        logger.exception("%s: the on_given_up hook of %s raised", self.path, child.id)
                return
        else:
            window = self._restart_times
            window.append(now)
            self._prune_restart_times(now)
            if len(window) > self.max_restarts:
                await self._give_up(child, event.error)
                return
        group = self._restart_group(child)
        for other in reversed(group):
            if other is not child:
                await self._terminate(other)
        survivors = []
        for member in group:
            if member is not child and member.spec.restart is Restart.TEMPORARY:
                self._remove(member)
            else:
                survivors.append(member)
        delay = self.backoff.delay(len(window), self._rng) if self.backoff is not None else 0.0
        logger.warning(
            "%s: restarting %s after %s of %s%s",
            self.path,
            ", ".join(member.id for member in survivors),
            "a crash" if crashed else "an exit",
            child.id,
            f" in {delay:.3f} s" if delay else "",
        )
        if delay > 0:
            self._tokens += 1
            for member in survivors:
                member.pending_restart = self._tokens
                if member.cell is not None:
                    member.cell.state = "restarting"
            assert self._nursery is not None
            self._nursery.start_soon(self._wake_after, delay, _Due(survivors, self._tokens))
            return
        for member in survivors:
            await self._start(member, first=False)

    async def _wake_after(self, delay: float, command: _Due) -> None:
        await trio.sleep(delay)
        self._post(command)

    async def _on_due(self, command: _Due) -> None:
        for member in command.children:
            if self._children.get(member.id) is member and member.pending_restart == command.token and not member.running:
                await self._start(member, first=False)

    def _restart_group(self, child: _Child) -> list[_Child]:
        ordered = list(self._children.values())
        if self.strategy is Strategy.ONE_FOR_ONE:
            return [child]
        if self.strategy is Strategy.ONE_FOR_ALL:
            return ordered
        return ordered[ordered.index(child) :]

    def _prune_restart_times(self, now: float) -> None:
        window_start = now - self.max_seconds
        times = self._restart_times
        while times and times[0] < window_start:
            times.popleft()

    async def _give_up(self, child: _Child, error: Exception | None) -> None:
        self._gave_up_count += 1
        detail = (
            f"supervisor {self.path} gave up: more than {self.max_restarts} restarts within "
            f"{self.max_seconds} s (last: {child.id} {'crashed: ' + repr(error) if error else 'exited'})"
        )
        logger.error("%s", detail)
        await self._stop_children()
        gave_up = SupervisorGaveUp(self.path, detail)
        gave_up.__cause__ = error
        self._gave_up = gave_up
        self._inbox_send = None
        self._cancel_own_scope()

    async def _stop_children(self) -> None:
        for child in reversed(list(self._children.values())):
            await self._terminate(child)
            child.pending_restart = 0

    async def _terminate(self, child: _Child) -> None:
        """Ask ``child`` to stop; cancel it after its grace period."""
        child.pending_restart = 0
        if not child.running:
            return
        child.terminating = True
        try:
            # The incarnation's task sets this event when it ends (and clears
            # ``running``); made only now, as most children never need it.
            done = child.done
            if done is None:
                done = child.done = trio.Event()
            child.request_stop()  # wakes a hibernating child
            if child.cell is not None and child.cell.hibernating:
                # It could not be given a task (the supervisor is closing):
                # there is nothing to run its on_stop in.
                logger.warning("%s could not be woken to stop; dropped without on_stop", _join(self.path, child.id))
                self._task_ended(child)
                return
            with trio.move_on_after(child.spec.shutdown):
                await done.wait()
            if not done.is_set():
                logger.warning("%s did not stop within %s s; cancelling it", _join(self.path, child.id), child.spec.shutdown)
                assert child.scope is not None
                child.scope.cancel()
                await done.wait()
        finally:
            child.terminating = False

    def _remove(self, child: _Child) -> None:
        if self._children.get(child.id) is child:
            del self._children[child.id]
        child.pending_restart = 0
        child.close()


class _ChildWaker(Waker):
    """Resumes one hibernating child of one supervisor."""

    __slots__ = ("child", "supervisor")

    def __init__(self, supervisor: Supervisor, child: _Child) -> None:
        self.supervisor = supervisor
        self.child = child

    def resume(self) -> None:
        self.supervisor._resume(self.child)


class _Starting:
    """One incarnation's start, from spawning its task to the end of its
    ``on_start``.

    It is the ``task_status`` of the child's run function: ``started()``
    means ``on_start`` returned. The starter waits with :meth:`wait`. Once
    the start is over it lets go of everything, since the child's frames
    keep it for the incarnation's whole life.
    """

    __slots__ = ("_event", "child", "error", "first", "over", "supervisor", "task")

    def __init__(self, supervisor: Supervisor, child: _Child, *, first: bool) -> None:
        self.supervisor: Supervisor | None = supervisor
        self.child: _Child | None = child
        self.first = first
        self.task: trio.lowlevel.Task | None = None  # the child's task, once it runs
        self.over = False
        self.error: ActorStartFailed | None = None  # a first start failed
        self._event: trio.Event | None = None

    def started(self, value: None = None) -> None:
        """``on_start`` returned: the child runs."""
        assert self.child is not None, "started() after the start was over"
        self.child.running = True
        self.finish()

    def finish(self) -> None:
        supervisor = self.supervisor
        if supervisor is not None and supervisor._starting is self:
            supervisor._starting = None
        self.over = True
        self.supervisor = self.child = self.task = None
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    async def wait(self) -> None:
        """Wait until the start is over (see :attr:`error`)."""
        if self.over:
            await trio.lowlevel.checkpoint()
            return
        event = self._event
        if event is None:
            event = self._event = trio.Event()
        await event.wait()


@asynccontextmanager
async def open_supervisor(
    *,
    strategy: Strategy | str = Strategy.ONE_FOR_ONE,
    max_restarts: int = 3,
    max_seconds: float = 5.0,
    name: str = "",
    backoff: Backoff | None = None,
    children: Sequence[AnySpec] = (),
    seed: int | None = None,
) -> AsyncIterator[Supervisor]:
    """Open a supervisor that runs for the duration of the ``async with``.

    On exit its children are stopped in reverse start order, each within its
    grace period (shielded from outer cancellation for that long). If the
    supervisor gives up, the body is cancelled and :class:`SupervisorGaveUp`
    is raised out of the ``async with``.

    Args:
        strategy: ``one_for_one``, ``one_for_all`` or ``rest_for_one``.
        max_restarts: Restart intensity: more than this many restarts ...
        max_seconds: ... within this many seconds makes the supervisor give up.
        name: The supervisor's path is ``/name`` (``/`` if empty); children
            are ``/name/child``.
        backoff: Delays between restarts, or ``None`` to restart at once.
        children: Specs started in order before the body runs.
        seed: Seeds the backoff jitter, for reproducible tests.

    Yields:
        The running :class:`Supervisor`.

    Raises:
        SupervisorGaveUp: The restart intensity was exceeded.
        ActorStartFailed: One of ``children`` failed to start.
    """
    if max_restarts < 0 or not max_seconds >= 0:
        raise ValueError("max_restarts and max_seconds must be >= 0")
    if "/" in name:
        raise ValueError(f"a supervisor name contains no '/', got {name!r}")
    supervisor = Supervisor(
        path=f"/{name}",
        strategy=_to_strategy(strategy),
        max_restarts=max_restarts,
        max_seconds=max_seconds,
        backoff=backoff,
        children=children,
        rng=random.Random(seed),
    )
    try:
        async with supervisor._running():
            yield supervisor
    finally:
        supervisor._close_all()


@asynccontextmanager
async def open_actor(
    factory: Callable[[], Actor],
    *,
    name: str = "actor",
    restart: Restart | str = Restart.PERMANENT,
    mailbox: MailboxConfig | None = None,
    max_restarts: int = 3,
    max_seconds: float = 5.0,
    backoff: Backoff | None = None,
    hibernate_after: float | None = None,
) -> AsyncIterator[ActorRef]:
    """Run one supervised actor for the duration of the ``async with``.

    A shorthand for a ``one_for_one`` supervisor with a single child: the
    actor is restarted after crashes within the given intensity.

    Args:
        factory: Makes a fresh actor instance for each (re)start.
        name: The actor's path is ``/name``.
        restart: Its restart type.
        mailbox: Overrides the actor class's mailbox configuration.
        max_restarts: Restart intensity (see :func:`open_supervisor`).
        max_seconds: Restart intensity window.
        backoff: Delays between restarts.
        hibernate_after: End the actor's task after this many idle seconds
            (see :class:`ChildSpec`).

    Yields:
        The actor's :class:`ActorRef`.
    """
    async with open_supervisor(max_restarts=max_restarts, max_seconds=max_seconds, backoff=backoff) as supervisor:
        yield await supervisor.start_child(
            ChildSpec(id=name, factory=factory, restart=restart, mailbox=mailbox, hibernate_after=hibernate_after)
        )
