"""Actors, refs, and the cell that runs an actor's loop.

An :class:`Actor` is user code: ``receive`` plus optional hooks. A *cell*
(:class:`_Cell`) is the runtime's side: it owns the mailbox, the statistics
and the one :class:`ActorRef`, and it outlives every incarnation of the actor,
which is why refs and queued messages survive restarts.

Timers live in the cell's loop: a heap of deadlines, and the loop waits for
its next message inside a cancel scope whose deadline is the earliest timer.
No task is spawned per timer.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

import attrs
import trio

from ._errors import ActorCrashed, ActorError, ActorStopped, AskTimeout
from ._mailbox import Mailbox, MailboxConfig, Waker, _CallbackReply, _Envelope, _Full, _Reply

if TYPE_CHECKING:
    from collections.abc import Awaitable

logger = logging.getLogger("ensemble.actors")

DEFAULT_ASK_TIMEOUT: Final = 5.0  # seconds
BATCH_LIMIT: Final = 128  # messages handled between two forced checkpoints


class Actor:
    """Base class of every actor.

    Subclasses implement :meth:`receive`; whatever it returns is the reply to
    an :meth:`ActorRef.ask`. An exception whose type is listed in
    :attr:`expected_exceptions` is a *rejection*: it is re-raised to the
    asker and the actor carries on with its state intact. Any other exception
    is a *crash*: the message is dropped, the asker gets
    :class:`ActorCrashed`, and the supervisor decides what happens next.

    Class attributes:
        mailbox: The default :class:`MailboxConfig` of this actor class (a
            child spec may override it).
        expected_exceptions: Exception types that are rejections, not crashes.
    """

    mailbox: ClassVar[MailboxConfig] = MailboxConfig()
    expected_exceptions: ClassVar[tuple[type[Exception], ...]] = ()

    _ensemble_cell: _Cell

    async def receive(self, message: Any) -> Any:
        """Handle one message; the return value is the reply to an ``ask``.

        Args:
            message: The message.

        Returns:
            The reply (ignored for ``tell``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement receive()")

    async def on_start(self) -> None:
        """Called before the first message of each incarnation.

        An exception here counts as a crash (and, on the very first start,
        makes ``start_child`` raise :class:`ActorStartFailed`).
        """

    async def on_stop(self) -> None:
        """Called when this incarnation stops: normally, on shutdown (within
        the child's grace period), or after a crash (best effort)."""

    # -- runtime services -----------------------------------------------------

    @property
    def ref(self) -> ActorRef:
        """This actor's ref (the same object across restarts)."""
        return self._cell().ref

    @property
    def path(self) -> str:
        """This actor's path, such as ``/rooms/general``."""
        return self._cell().path

    def start_timer(self, key: Hashable, seconds: float, message: Any, *, repeat: bool = False) -> None:
        """Deliver ``message`` to this actor after ``seconds``.

        Starting a timer with the key of a running one replaces it. Timers
        belong to this incarnation: a restart clears them.

        Args:
            key: Names the timer, for :meth:`cancel_timer` and replacement.
            seconds: Delay (and, with ``repeat``, the period); must be >= 0.
            message: What :meth:`receive` gets when the timer fires.
            repeat: Fire every ``seconds`` until cancelled (a fixed-rate
                schedule: deadlines do not drift with handling time).

        Raises:
            ValueError: ``seconds`` is negative or NaN, or zero with ``repeat``.
        """
        self._cell().start_timer(key, seconds, message, repeat)

    def cancel_timer(self, key: Hashable) -> bool:
        """Cancel the timer named ``key``.

        Returns:
            Whether a timer was running under that key.
        """
        return self._cell().cancel_timer(key)

    def stop(self) -> None:
        """Stop this actor normally after the current message.

        A ``transient`` or ``temporary`` child is then removed; a
        ``permanent`` one is restarted.
        """
        self._cell().request_stop()

    def _cell(self) -> _Cell:
        try:
            return self._ensemble_cell
        except AttributeError:
            raise RuntimeError(f"{type(self).__name__} is not running under a supervisor") from None


@attrs.frozen
class ActorStatistics:
    """A snapshot of one actor's counters (see :meth:`ActorRef.statistics`).

    Attributes:
        path: The actor's path.
        state: ``starting``, ``running``, ``hibernating`` (no task while
            idle; the next message starts one), ``restarting``, ``stopping``
            or ``stopped``.
        mailbox_capacity: The mailbox bound.
        mailbox_depth: Messages queued now.
        mailbox_peak: The most messages ever queued at once.
        messages_handled: Messages (and timer messages) handled, including
            rejections.
        messages_rejected: Messages refused with an expected exception.
        crashes: Unexpected exceptions, in ``on_start`` or ``receive``.
        restarts: Times the actor was restarted.
        dropped_newest: Messages dropped by ``drop_newest`` (and by
            ``keep_latest`` when full with a new key).
        dropped_oldest: Messages evicted by ``drop_oldest``.
        coalesced: Messages replaced in place by ``keep_latest``.
        refused: Messages refused with :class:`MailboxFull` at once.
        block_timeouts: ``block`` senders that gave up waiting.
        dropped_on_stop: Messages still queued when the actor stopped for good.
        blocked_senders: Senders waiting for room now.
        active_timers: Timers running now.
        timers_fired: Timer messages delivered.
        hibernations: Times the actor went idle without a task (see
            ``ChildSpec.hibernate_after``); each later message that found it
            so started a task again.
    """

    path: str
    state: str
    mailbox_capacity: int
    mailbox_depth: int
    mailbox_peak: int
    messages_handled: int
    messages_rejected: int
    crashes: int
    restarts: int
    dropped_newest: int
    dropped_oldest: int
    coalesced: int
    refused: int
    block_timeouts: int
    dropped_on_stop: int
    blocked_senders: int
    active_timers: int
    timers_fired: int
    hibernations: int = 0

    @property
    def dropped(self) -> int:
        """Every message lost to an overflow policy or a stop."""
        return self.dropped_newest + self.dropped_oldest + self.coalesced + self.refused + self.block_timeouts + self.dropped_on_stop


class ActorRef:
    """The handle to an actor: the only thing users hold.

    A ref stays valid across restarts of its actor; after the actor stops
    for good, sending raises :class:`ActorStopped`. Refs compare by identity
    (there is one per actor) and are hashable.
    """

    __slots__ = ("__weakref__", "_cell", "_mailbox")

    def __init__(self, cell: _Cell) -> None:
        self._cell = cell
        self._mailbox = cell.mailbox

    def __repr__(self) -> str:
        return f"<ActorRef {self._cell.path} ({self._cell.state})>"

    @property
    def path(self) -> str:
        """The actor's path, such as ``/rooms/general``."""
        return self._cell.path

    @property
    def alive(self) -> bool:
        """Whether the actor still takes messages (it may be restarting)."""
        return not self._mailbox.closed

    def tell_nowait(self, message: Any) -> None:
        """Queue ``message`` without waiting.

        Raises:
            MailboxFull: The mailbox is full and its policy is ``fail`` or
                ``block`` (which cannot wait here).
            ActorStopped: The actor has stopped for good.
        """
        mailbox = self._mailbox
        queue = mailbox._queue
        if mailbox._plain and len(queue) < mailbox.capacity:
            # Mailbox.put_nowait/_append inlined for the common case (an
            # open mailbox with one policy, not full): the fan-out hot path.
            queue.append(message)
            depth = len(queue)
            if depth > mailbox.peak:
                mailbox.peak = depth
            receiver = mailbox._receiver
            if receiver is not None:
                mailbox._receiver = None
                if isinstance(receiver, Waker):
                    receiver.resume()  # a hibernating actor
                else:
                    trio.lowlevel.reschedule(receiver)
            return
        mailbox.put_nowait_or_fail(message)

    async def tell(self, message: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the documented API)
        """Queue ``message``; under ``block``, wait for room.

        Args:
            message: The message.
            timeout: How long to wait for room under ``block``; defaults to
                the mailbox's ``block_timeout``.

        Raises:
            MailboxFull: The policy refused the message or the wait timed out.
            ActorStopped: The actor has stopped for good.
        """
        await self._mailbox.put(message, timeout=timeout)

    async def ask(self, message: Any, *, timeout: float | None = DEFAULT_ASK_TIMEOUT) -> Any:  # noqa: ASYNC109 (the documented API)
        """Send ``message`` and wait for the actor's reply.

        Args:
            message: The message.
            timeout: Seconds to wait for the reply (including any wait for
                mailbox room); ``None`` waits as long as the caller's own
                cancel scopes allow.

        Returns:
            What the actor's ``receive`` returned.

        Raises:
            AskTimeout: No reply within ``timeout``.
            ActorCrashed: The actor crashed on this message.
            MailboxFull: The mailbox refused the message.
            MessageDropped: The message was evicted before it was handled.
            ActorStopped: The actor stopped before handling it.
            Exception: Whatever expected exception the actor rejected the
                message with.
        """
        reply = _Reply()
        if timeout is None:
            await self._mailbox.put(message, reply)
            return await reply.wait()
        with trio.move_on_after(timeout):
            # No schedule point after queueing: reply.wait() is one.
            await self._mailbox.put(message, reply, schedule=False)
            return await reply.wait()
        reply.fail(AskTimeout(self.path, "abandoned"))
        raise AskTimeout(self.path, f"{self.path} did not reply within {timeout} s")

    async def ask_later(self, message: Any, on_reply: Callable[[Any, BaseException | None], None]) -> None:
        """Send ``message`` as an ask, without waiting for the reply.

        Returns once the message is queued (under ``block``, after waiting
        for room). The reply is given later to ``on_reply(value, None)``, or
        the error an :meth:`ask` would raise to ``on_reply(None, error)``
        (the actor's expected exception, :class:`ActorCrashed`,
        :class:`ActorStopped`, :class:`MessageDropped`). ``on_reply`` runs
        in whichever task gives the reply (usually the actor's): it must not
        block, and what it raises is logged. A sender that keeps several
        asks in flight to one actor gets their replies in order. There is a
        schedule point only when the call waits for room in the mailbox.

        Raises:
            MailboxFull: The mailbox refused the message.
            ActorStopped: The actor has stopped for good.
        """
        reply = _CallbackReply(on_reply)
        mailbox = self._mailbox
        try:
            mailbox.put_nowait(message, reply)  # no schedule point: a sender can queue a burst in one step
        except _Full:
            await mailbox.put(message, reply)

    def statistics(self) -> ActorStatistics:
        """A frozen snapshot of the actor's counters."""
        return self._cell.statistics()

    def is_current_task(self) -> bool:
        """Whether the calling task is the one running this actor now (in its
        ``receive``, ``on_start`` or ``on_stop``).

        Code that may run inside the actor uses this to call the actor's own
        methods directly rather than ``ask`` it (which would wait for itself).
        """
        task = self._cell.task
        return task is not None and task is trio.lowlevel.current_task()


class TaskStarted(Protocol):
    """What a child's run function calls once it is ready (like ``task_status``)."""

    def started(self, value: None = None) -> None: ...


class _Fault(Protocol):
    """A fault-injection hook (see :mod:`ensemble.testing`)."""

    def matches(self, message: Any) -> bool: ...

    def apply(self, cell: _Cell, message: Any) -> Awaitable[None]: ...


class _Timer:
    __slots__ = ("active", "deadline", "interval", "key", "message")

    def __init__(self, key: Hashable, deadline: float, message: Any, interval: float | None) -> None:
        self.key = key
        self.deadline = deadline
        self.message = message
        self.interval = interval
        self.active = True


class _Filler:
    """A mailbox filler put in by fault injection; the loop skips it."""

    __slots__ = ()


FILLER: Final = _Filler()


class _Cell:
    """The runtime side of one actor: mailbox, ref, timers, statistics."""

    # One per actor, and there may be one actor per connection: slots.
    __slots__ = (
        "__weakref__",
        "_heap",
        "_hibernate_asked",
        "_mailbox_settled",
        "_ref",
        "_seq",
        "_stop_requested",
        "_stopped_ref",
        "_timers",
        "activity_mark",
        "actor",
        "crashes",
        "factory",
        "faults",
        "handled",
        "hibernate_after",
        "hibernations",
        "idle_since",
        "last_crash",
        "mailbox",
        "path",
        "rejected",
        "restarts",
        "stalled",
        "start_hibernating",
        "state",
        "task",
        "timers_fired",
        "waker",
    )

    def __init__(self, path: str, factory: Callable[[], Actor], mailbox: MailboxConfig | None) -> None:
        self.path = path
        self.factory = factory
        # A spec's mailbox config wins; otherwise the actor class's, which is
        # known for sure only once the factory has made the first instance
        # (the factory may be a lambda), so ``run`` settles it then. A class
        # (or a partial of one) tells it now, which saves a second mailbox.
        self._mailbox_settled = mailbox is not None
        if mailbox is None:
            actor_class = _class_made_by(factory)
            mailbox = actor_class.mailbox if actor_class is not None else _DEFAULT_MAILBOX
        self.mailbox = Mailbox(mailbox, path)
        self._ref: ActorRef | None = ActorRef(self)
        self._stopped_ref: weakref.ref[ActorRef] | None = None  # see close()
        self.actor: Actor | None = None
        self.state = "starting"
        self.handled = 0
        self.rejected = 0
        self.crashes = 0
        self.restarts = 0
        self.timers_fired = 0
        self.hibernations = 0
        self.last_crash: BaseException | None = None
        # The task running this incarnation now (None while hibernating).
        self.task: trio.lowlevel.Task | None = None
        # Set by the supervisor for a child with hibernate_after: what a
        # message to the idle, task-less actor calls (see hibernate()).
        self.waker: Waker | None = None
        self.hibernate_after: float | None = None
        self.start_hibernating = False  # hibernate at the first idle moment of each incarnation
        self._hibernate_asked = False
        self.activity_mark = -1  # messages handled at the supervisor's last sweep
        self.idle_since = 0.0
        self._stop_requested = False
        self._timers: dict[Hashable, _Timer] = {}
        self._heap: list[tuple[float, int, _Timer]] = []
        self._seq = 0  # orders timers with equal deadlines
        # Fault injection (ensemble.testing); None on the fast path.
        self.faults: list[_Fault] | None = None
        self.stalled: trio.Event | None = None

    @property
    def ref(self) -> ActorRef:
        """The actor's one ref (the same object across restarts)."""
        ref = self._ref
        if ref is None:  # stopped for good (see close)
            assert self._stopped_ref is not None
            ref = self._stopped_ref()
            if ref is None:  # nobody kept it: a new one cannot be told apart
                ref = ActorRef(self)
                self._stopped_ref = weakref.ref(ref)
        return ref

    # -- control -------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested = True
        self.mailbox.wake()

    def close(self) -> None:
        """Stop for good: refuse messages, fail queued asks."""
        self.actor = None  # a ref held after the stop must not keep the actor's state
        self.state = "stopped"
        if self.waker is not None:
            # The waker refers to the supervisor's record of this child, which
            # refers to this cell: break the cycle (see below).
            self.waker = None
            if type(self.mailbox._receiver) is Waker:
                self.mailbox._receiver = None
        self.mailbox.close()
        self._clear_timers()
        ref = self._ref
        if ref is not None:
            # The ref points at this cell; from now on this cell points back
            # only weakly. Otherwise the two would form a cycle that only the
            # garbage collector frees, with the mailbox, the factory and all
            # they hold: after 100,000 idle rooms stopped, their cells would
            # wait for a full collection, and make it slower.
            self._stopped_ref = weakref.ref(ref)
            self._ref = None

    def statistics(self) -> ActorStatistics:
        mb = self.mailbox
        return ActorStatistics(
            path=self.path,
            state="running" if self.state == "waking" else self.state,
            mailbox_capacity=mb.capacity,
            mailbox_depth=len(mb),
            mailbox_peak=mb.peak,
            messages_handled=self.handled,
            messages_rejected=self.rejected,
            crashes=self.crashes,
            restarts=self.restarts,
            dropped_newest=mb.dropped_newest,
            dropped_oldest=mb.dropped_oldest,
            coalesced=mb.coalesced,
            refused=mb.refused,
            block_timeouts=mb.block_timeouts,
            dropped_on_stop=mb.dropped_on_stop,
            blocked_senders=mb.blocked_senders,
            active_timers=len(self._timers),
            timers_fired=self.timers_fired,
            hibernations=self.hibernations,
        )

    # -- timers --------------------------------------------------------------

    def start_timer(self, key: Hashable, seconds: float, message: Any, repeat: bool) -> None:
        if not seconds >= 0:
            raise ValueError(f"timer {key!r} of {self.path}: seconds must be >= 0, got {seconds}")
        if repeat and seconds == 0:
            raise ValueError(f"timer {key!r} of {self.path}: a repeating timer needs seconds > 0")
        old = self._timers.get(key)
        if old is not None:
            old.active = False
        timer = _Timer(key, trio.current_time() + seconds, message, seconds if repeat else None)
        self._timers[key] = timer
        self._seq += 1
        heapq.heappush(self._heap, (timer.deadline, self._seq, timer))
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._timers):
            self._compact_heap()
        self.mailbox.wake()

    def _clear_timers(self) -> None:
        self._timers.clear()
        self._heap.clear()

    def cancel_timer(self, key: Hashable) -> bool:
        timer = self._timers.pop(key, None)
        if timer is None:
            return False
        timer.active = False
        return True

    def _compact_heap(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2].active]
        heapq.heapify(self._heap)

    def _next_deadline(self) -> float:
        heap = self._heap
        while heap and not heap[0][2].active:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def _pop_due_timer(self, now: float) -> _Timer | None:
        if self._next_deadline() > now:
            return None
        _, _, timer = heapq.heappop(self._heap)
        if timer.interval is None:
            timer.active = False
            del self._timers[timer.key]
        else:
            timer.deadline += timer.interval
            self._seq += 1
            heapq.heappush(self._heap, (timer.deadline, self._seq, timer))
        return timer

    # -- running -------------------------------------------------------------

    async def run(self, task_status: TaskStarted) -> None:
        """Run one incarnation: create, ``on_start``, loop, ``on_stop``.

        Returns normally when the actor stops normally or is asked to stop;
        raises the exception of a crash.
        """
        self._stop_requested = False
        self._hibernate_asked = self.start_hibernating
        self._clear_timers()
        self.state = "starting"
        try:
            actor = self.factory()
            if not isinstance(actor, Actor):
                raise TypeError(f"the factory of {self.path} returned {actor!r}, not an Actor")
            self._settle_mailbox(type(actor))
            actor._ensemble_cell = self
            self.actor = actor
            await actor.on_start()
        except Exception as exc:
            self._record_crash(exc, "on_start")
            raise
        self.state = "running"
        task_status.started()
        await self._live(actor)

    async def resume(self) -> None:
        """Carry on with a hibernating incarnation, in a new task: as
        :meth:`run` after ``on_start`` (there is no second ``on_start``)."""
        actor = self.actor
        assert actor is not None, f"{self.path} has no incarnation to resume"
        assert self.state == "waking", f"{self.path} is not waking from hibernation"
        self.mailbox.restore_queue()
        self.state = "running"
        await self._live(actor)

    @property
    def hibernating(self) -> bool:
        return self.state == "hibernating"

    async def _live(self, actor: Actor) -> None:
        """The loop, then ``on_stop``; returns early, keeping the actor, when
        it hibernates."""
        self.task = trio.lowlevel.current_task()
        try:
            try:
                if await self._loop(actor):
                    return  # hibernating: the next message resumes it in a new task
            except Exception as exc:
                self._record_crash(exc, "receive")
                await self._stop_after_crash(actor)
                raise
            # Timers belong to the incarnation that is ending.
            self._clear_timers()
            self.state = "stopping"
            try:
                await actor.on_stop()
            except Exception as exc:
                self._record_crash(exc, "on_stop")
                raise
        finally:
            self.task = None
            if self.state != "hibernating":
                # The incarnation is over: do not keep its state alive.
                self.actor = None

    # -- hibernation -----------------------------------------------------------

    def hibernate(self) -> bool:
        """Ask an idle actor's task to end (the supervisor's sweep calls this).

        Only an actor waiting for a message with an empty mailbox, no timer
        and nothing else pending is asked; its loop checks again when it
        wakes (a message may have come meanwhile) and, if still idle, hands
        its mailbox a :class:`Waker` and returns. No task switch happens
        between that check and the end of the task, so a message is never
        left without someone to handle it.

        Returns:
            Whether the actor was asked.
        """
        mailbox = self.mailbox
        task = self.task
        if (
            self.waker is None
            or task is None
            or mailbox._receiver is not task
            or mailbox._queue
            or mailbox._blocked
            or self._timers
            or self._stop_requested
            or self.stalled is not None
            or self.state != "running"
        ):
            return False
        mailbox._receiver = None
        self._hibernate_asked = True
        trio.lowlevel.reschedule(task)
        return True

    def _enter_hibernation(self) -> None:
        """The loop ends its task now: the waker stands in for it."""
        self._hibernate_asked = False
        self.state = "hibernating"
        self.hibernations += 1
        self.mailbox.release_queue()
        self.mailbox._receiver = self.waker

    def _can_hibernate(self) -> bool:
        mailbox = self.mailbox
        return (
            self.waker is not None
            and not mailbox._queue
            and not mailbox._blocked
            and not mailbox.closed
            and not self._timers
            and not self._stop_requested
            and self.stalled is None
        )

    def _settle_mailbox(self, actor_class: type[Actor]) -> None:
        """Use the actor class's mailbox config, on the first start only."""
        if self._mailbox_settled:
            return
        self._mailbox_settled = True
        config = actor_class.mailbox
        if config is not self.mailbox.config and config != self.mailbox.config and not self.mailbox:
            self.mailbox = Mailbox(config, self.path)
            self.ref._mailbox = self.mailbox

    def _record_crash(self, exc: Exception, where: str) -> None:
        self.crashes += 1
        self.last_crash = exc
        self.state = "restarting"
        # Timers belong to the incarnation that crashed (no loop runs them
        # while a restart waits for its backoff).
        self._clear_timers()
        logger.error("actor %s crashed in %s: %r", self.path, where, exc, exc_info=exc)

    async def _stop_after_crash(self, actor: Actor) -> None:
        try:
            await actor.on_stop()
        except Exception as exc:
            logger.warning("on_stop of %s raised after a crash: %r", self.path, exc)

    async def _loop(self, actor: Actor) -> bool:
        """Handle messages and timers until asked to stop (returns False) or
        hibernating (returns True)."""
        mailbox = self.mailbox
        queue = mailbox._queue
        expected = type(actor).expected_exceptions
        path = self.path
        # Messages and timers handled since the loop last yielded. Kept across
        # batches: a batch cut short by a due timer must not reset it, or a
        # busy actor with frequent timers would never let other tasks run.
        budget = BATCH_LIMIT
        while not self._stop_requested:
            if self.stalled is not None:
                await self.stalled.wait()
                budget = BATCH_LIMIT
                continue
            if budget <= 0:
                await trio.lowlevel.checkpoint()
                budget = BATCH_LIMIT
                continue
            if self._heap:
                timer = self._pop_due_timer(trio.current_time())
                if timer is not None:
                    self.timers_fired += 1
                    budget -= 1
                    await self._handle_timer(actor.receive, expected, timer.message)
                    continue
            if not queue:
                # Mailbox.wait_nonempty inlined, with a bound method to abort:
                # fewer objects held by every idle actor than its closure and
                # coroutine (keep the two in step).
                deadline = self._next_deadline()
                if deadline == math.inf and self._hibernate_asked and self._can_hibernate():
                    # start_hibernating: idle for the first time in this
                    # incarnation (no checkpoint from here to the task's end).
                    self._enter_hibernation()
                    return True
                mailbox._receiver = trio.lowlevel.current_task()
                if deadline == math.inf:
                    await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
                    if self._hibernate_asked:
                        self._hibernate_asked = False
                        if self._can_hibernate():
                            # Nothing came since hibernate() looked: end the
                            # task (no checkpoint from here to its end).
                            self._enter_hibernation()
                            return True
                else:
                    with trio.CancelScope(deadline=deadline):
                        await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
                budget = BATCH_LIMIT
                continue
            # Bound for one batch only: an idle actor waits without them (one
            # object fewer each for the garbage collector to walk, per actor).
            popleft = queue.popleft
            receive = actor.receive
            while queue:
                # Mailbox.pop inlined (the hot path); keep the two in step.
                item = popleft()
                if mailbox._blocked:
                    mailbox.unpark_one()
                if type(item) is _Envelope:
                    if item.key is not None:
                        del mailbox._slots[item.key]
                    message = item.message
                    reply = item.reply
                else:
                    message = item
                    reply = None
                if message is FILLER:
                    continue
                try:
                    if self.faults is not None:
                        await self._apply_faults(message)
                    result = await receive(message)
                except expected as exc:
                    self.handled += 1
                    self.rejected += 1
                    if reply is not None:
                        reply.fail(exc)
                except Exception as exc:
                    if reply is not None:
                        reply.fail(_crashed(path, exc))
                    raise
                except BaseException:
                    if reply is not None:
                        reply.fail(ActorStopped(path, f"{path} was cancelled while handling the ask"))
                    raise
                else:
                    self.handled += 1
                    if reply is not None:
                        reply.set(result)
                budget -= 1
                if budget <= 0 or self._stop_requested or self.stalled is not None:
                    break
                if self._heap and self._heap[0][0] <= trio.current_time():
                    break
            del popleft, receive
        return False

    def _abort_wait(self, _: Any) -> trio.lowlevel.Abort:
        self.mailbox._receiver = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _handle_timer(
        self,
        receive: Callable[[Any], Awaitable[Any]],
        expected: tuple[type[Exception], ...],
        message: Any,
    ) -> None:
        """Handle a timer message (the mailbox path is inlined in ``_loop``)."""
        try:
            if self.faults is not None:
                await self._apply_faults(message)
            await receive(message)
        except expected:
            self.rejected += 1
        self.handled += 1

    async def _apply_faults(self, message: Any) -> None:
        for fault in list(self.faults or ()):
            if fault.matches(message):
                await fault.apply(self, message)


_DEFAULT_MAILBOX: Final = MailboxConfig()


def _class_made_by(factory: Callable[[], Actor]) -> type[Actor] | None:
    """The actor class that ``factory`` instantiates, when it is plain to see:
    ``factory`` is the class, or a ``functools.partial`` of it."""
    func: object = factory
    while isinstance(func, functools.partial):
        func = func.func
    return func if isinstance(func, type) and issubclass(func, Actor) else None


def _crashed(path: str, exc: Exception) -> ActorError:
    error = ActorCrashed(path, f"{path} crashed handling the message: {exc!r}")
    error.__cause__ = exc
    return error
