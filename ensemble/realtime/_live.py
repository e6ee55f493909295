"""Live queries: watch the rows of a model change, with filters and replay.

The seed's ``LiveQuery`` (``watch``, ``unwatch``, ``on_change``,
``notify_create``/``update``/``delete``) as one supervised actor behind a
facade. The application tells it about changes (from its save and delete
paths); it tells every watcher whose filter admits the row.

Semantics:

* **Filters** are an equality mapping (``{"post_id": 42}``: every key present
  in the row and equal) or a predicate ``(row) -> bool``; ``None`` admits
  every row. A predicate that raises counts as "no match" (logged, counted in
  ``predicate_errors``).
* **Row cache.** Per ``(model, pk)`` the actor keeps the last row data it was
  told about, in an LRU bounded by :attr:`LiveConfig.max_rows`. An update's
  ``data`` may be partial: it is merged over the cached row, and the merged
  row is what filters see and what watchers receive.
* **Transitions.** On an update, a watcher whose filter admitted the old row
  and admits the new one gets ``update``; one that admits only the new row
  gets ``enter`` (with the full row); one that admitted only the old row gets
  ``leave`` (with the new row); one that admits neither gets nothing. A
  create reaches the watchers that admit its row; a delete reaches exactly
  the watchers that admitted the last known row (``data`` is ``None``).
* **Unknown rows** (never seen, or evicted from the cache). For an update the
  filter is evaluated on the update's data alone; a field missing from it
  means "no match", so rows never leak to watchers that might not see them.
  Whether the row *was* admitted is then inferred from ``changed_fields``: if
  none of the filter's fields changed, it was admitted exactly when it is now
  (``update`` or nothing); if one did (or the filter is a predicate, whose
  fields are unknown), a match is an ``enter`` and a non-match a ``leave``
  with ``data=None`` (the watcher may never have had the row, so it learns
  only the pk). A delete of an unknown row reaches every watcher of the model
  (pk only), unless ``notify_delete`` is given the row's last ``data``, which
  then stands in for the cache. Include the filtered fields in updates (or
  keep ``max_rows`` above the working set) to stay on the exact path.
* **Ordering.** Every change goes through the actor's mailbox, so a watcher
  receives the changes of a model in notify order, each tagged with the
  model's version.
* **Versions and replay** (the lost-events race). Every change increments
  its model's version; the last :attr:`LiveConfig.log_size` changes per model
  are kept. A page renders at ``await live.version(model)`` (with
  :attr:`LiveQuery.epoch`); its socket later watches with ``since=`` that
  version and first receives every change after it, then live changes, with
  nothing lost or repeated in between. A version older than the log, in the
  future, or from another epoch raises :class:`HistoryUnavailable`: the client
  must reload, never silently miss changes.
* **Handlers** registered with :meth:`LiveQuery.on_change` run in the actor
  for every change of their model (with the merged row), after the watchers
  got it, one at a time, each within :attr:`LiveConfig.handler_timeout`. A
  handler that raises or times out is logged and counted; the actor, the
  other handlers and the watchers carry on. A slow handler delays the next
  change, so handlers should hand long work off.
* **Restarts.** Watchers, handlers, the row cache, versions and the log live
  in a :class:`LiveStore` passed to the actor's factory, so they survive a
  crash and restart of the actor. ``notify_*`` returns once the change is
  published (watchers have it queued, handlers ran); if the actor crashed on
  it, ``notify_*`` raises :class:`~ensemble.actors.ActorCrashed` (the change
  may not have reached every watcher, so the caller knows), and the restarted
  actor ends every watch of that model (whatever its filters) before it
  handles anything else, telling each to re-sync: a connection gets a
  ``live_reset`` event on the watch's topic (``data``: the model, its
  ``version`` and ``epoch``) and no further change on that topic, and
  resumes with a new watch ``since`` the last version it has; a
  subscriber-less watch is ended with :class:`WatchOverflowed` (watch again
  ``since`` its ``version``). Either way the new watch gets exactly the
  changes after that version once, with nothing lost or repeated. A crash on
  any other message loses only that message. (``notify_*`` called from
  inside a handler is queued, not awaited.)

Delivery: a watch with a ``subscriber`` (a connection) receives
``Event(type="change", topic=..., data=change.to_dict(), seq=version,
epoch=epoch)``; the topic defaults to ``live:<subscription id>``. Per change,
each variant (action, with or without data) is converted to a dict once, and
watchers that share a ``topic`` (say, every connection showing the comments
of one post) share one :class:`Event` object, hence its encoded bytes. A watch
without a subscriber is consumed with :class:`LiveWatch` (``receive()`` or
``async for``), best through :meth:`LiveQuery.open_watch`; its buffer is
bounded, and a consumer that falls behind gets :class:`WatchOverflowed` (and
may watch again ``since`` its last version).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import attrs
import trio

from ..actors import Actor, ActorRef, ActorStopped, ChildSpec, MailboxConfig, MailboxFull, Supervisor
from ._errors import HistoryUnavailable, NotFound, RealtimeError
from ._events import CHANGE, Event, Subscriber
from ._models import ModelChange

logger = logging.getLogger("ensemble.realtime.live")

Row: TypeAlias = Mapping[str, object]
"""A row's fields, as given to ``notify_*``."""
Predicate: TypeAlias = Callable[[Row], bool]
"""A filter as a function of the row."""
Filters: TypeAlias = Mapping[str, object] | Predicate | None
"""An equality mapping, a predicate, or ``None`` (every row)."""
Handler: TypeAlias = Callable[[ModelChange], Awaitable[None]]
"""An ``on_change`` handler."""

DEFAULT_MAX_ROWS: Final = 100_000
DEFAULT_LOG_SIZE: Final = 1000
DEFAULT_HANDLER_TIMEOUT: Final = 1.0
DEFAULT_WATCH_BUFFER: Final = 100

_MISSING: Final = object()


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _timeout(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 or None, got {value!r}")


@attrs.frozen(kw_only=True)
class LiveConfig:
    """Configuration of the live-query actor.

    Args:
        max_rows: Most rows kept in the last-known-row cache (LRU), over all
            models; 0 disables it (every update takes the unknown-row path).
        log_size: Changes kept per model for ``watch(since=...)``.
        handler_timeout: Seconds each ``on_change`` handler may take per
            change before it is cancelled; ``None`` for no limit (then a
            handler that hangs hangs the actor).
        watch_buffer: Default buffer (changes) of a watch without a
            subscriber; a consumer that falls further behind is cut off.
    """

    max_rows: int = attrs.field(default=DEFAULT_MAX_ROWS, validator=_non_negative)
    log_size: int = attrs.field(default=DEFAULT_LOG_SIZE, validator=_non_negative)
    handler_timeout: float | None = attrs.field(default=DEFAULT_HANDLER_TIMEOUT, validator=_timeout)
    watch_buffer: int = attrs.field(default=DEFAULT_WATCH_BUFFER, validator=_positive)


@attrs.frozen(kw_only=True)
class LiveStatistics:
    """A snapshot of the live-query counters (see :meth:`LiveQuery.statistics`).

    Attributes:
        watchers: Watches registered now.
        models: Models with at least one watcher, handler or change.
        rows_cached: Rows in the last-known-row cache.
        rows_evicted: Rows evicted from the cache because it was full.
        changes: Changes notified (create, update, delete).
        delivered: Changes delivered to watchers (events and queue items).
        refused: Events a subscriber refused (closed or slow).
        overflowed: Subscriber-less watches cut off because they fell behind.
        handler_calls: ``on_change`` handler invocations.
        handler_errors: Handler invocations that raised.
        handler_timeouts: Handler invocations cancelled by the timeout.
        predicate_errors: Filter predicate calls that raised.
    """

    watchers: int
    models: int
    rows_cached: int
    rows_evicted: int
    changes: int
    delivered: int
    refused: int
    overflowed: int
    handler_calls: int
    handler_errors: int
    handler_timeouts: int
    predicate_errors: int


class WatchOverflowed(RealtimeError):
    """A subscriber-less watch fell more than its buffer behind and was ended.

    Watch again with ``since=version`` to resume without a gap (or reload if
    that raises :class:`HistoryUnavailable`).

    Attributes:
        subscription_id: The ended watch.
        version: The version of the last change the consumer received.
    """

    def __init__(self, message: str, *, subscription_id: str, version: int) -> None:
        super().__init__(message)
        self.subscription_id = subscription_id
        self.version = version


LIVE_RESET: Final = "live_reset"
"""The event type telling a watcher to re-sync after a crash mid-publish."""

# -- state that survives restarts ---------------------------------------------


@attrs.define(eq=False)
class _WatchState:
    """Shared by a subscriber-less watcher and its handle."""

    overflowed: bool = False
    reason: str = "fell behind"


@attrs.define(eq=False)
class _Watcher:
    id: str
    model: str
    filters: Mapping[str, object] | Predicate | None
    fields: frozenset[str] | None  # the equality filter's keys; None for a predicate
    topic: str
    subscriber: Subscriber | None
    channel: trio.MemorySendChannel[tuple[int, ModelChange]] | None
    state: _WatchState | None


@attrs.frozen
class _Entry:
    """One change in a model's log: the canonical change and the row before."""

    version: int
    change: ModelChange
    before: Row | None  # None: unknown (or not applicable, for a create)


class LiveStore:
    """The live-query state, owned outside the actor so it survives restarts.

    Only the live-query actor changes it; pass it to :meth:`LiveQuery.spec`
    or :func:`start_live_query`.

    Args:
        config: Limits and timeouts.

    Attributes:
        config: The configuration.
        epoch: Identifies this store's version sequences; a version from
            another epoch (another process, a lost store) cannot be resumed.
    """

    def __init__(self, config: LiveConfig | None = None) -> None:
        self.config = config or LiveConfig()
        self.epoch = secrets.token_hex(4)
        self.watchers: dict[str, _Watcher] = {}
        self.by_model: dict[str, dict[str, _Watcher]] = {}
        self.handlers: dict[str, list[Handler]] = {}
        self.rows: OrderedDict[tuple[str, int | str], Row] = OrderedDict()
        self.versions: dict[str, int] = {}
        self.logs: dict[str, deque[_Entry]] = {}
        self.rows_evicted = 0
        self.changes = 0
        self.delivered = 0
        self.refused = 0
        self.overflowed = 0
        self.handler_calls = 0
        self.handler_errors = 0
        self.handler_timeouts = 0
        self.predicate_errors = 0
        self.publishing: str | None = None  # the model of the change being published
        self.task: trio.lowlevel.Task | None = None  # the actor's task

    def statistics(self) -> LiveStatistics:
        """A frozen snapshot of the counters."""
        models = set(self.by_model) | set(self.handlers) | set(self.versions)
        return LiveStatistics(
            watchers=len(self.watchers),
            models=len(models),
            rows_cached=len(self.rows),
            rows_evicted=self.rows_evicted,
            changes=self.changes,
            delivered=self.delivered,
            refused=self.refused,
            overflowed=self.overflowed,
            handler_calls=self.handler_calls,
            handler_errors=self.handler_errors,
            handler_timeouts=self.handler_timeouts,
            predicate_errors=self.predicate_errors,
        )


# -- messages -----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _Watch:
    model: str
    filters: Mapping[str, object] | Predicate | None
    subscriber: Subscriber | None = None
    topic: str | None = None
    channel: trio.MemorySendChannel[tuple[int, ModelChange]] | None = None
    state: _WatchState | None = None
    since: int | None = None
    epoch: str | None = None


@attrs.frozen
class _Unwatch:
    subscription_id: str


@attrs.frozen
class _Active:
    subscription_ids: frozenset[str]


@attrs.frozen
class _UnwatchConnection:
    connection_id: str


@attrs.frozen(kw_only=True)
class _Notify:
    model: str
    action: str
    pk: int | str
    data: Row | None
    changed_fields: tuple[str, ...] | None
    timestamp: float


@attrs.frozen
class _AddHandler:
    model: str
    handler: Handler


@attrs.frozen
class _Version:
    model: str


# -- the actor ----------------------------------------------------------------


class _LiveActor(Actor):
    """Owns a :class:`LiveStore`: matches changes to watchers, runs handlers."""

    expected_exceptions = (HistoryUnavailable,)

    def __init__(self, store: LiveStore) -> None:
        self._store = store

    async def on_start(self) -> None:
        store = self._store
        store.task = trio.lowlevel.current_task()
        model = store.publishing
        if model is not None:
            # The last incarnation crashed publishing a change of ``model``:
            # some of its watchers may have missed it. Tell them to re-sync.
            store.publishing = None
            self._reset_watchers(model)

    def _reset_watchers(self, model: str) -> None:
        """End every watch of ``model``, telling each to re-sync.

        Called from ``on_start``, before any message is handled: no later
        change reaches an ended watch, and a new watch made after the reset
        (with ``since``) is the only one that gets the missed changes.
        """
        store = self._store
        version = store.versions.get(model, 0)
        data = {"model": model, "version": version, "epoch": store.epoch}
        events: dict[str, Event] = {}  # per topic, shared as change events are
        for watcher in list(store.by_model.get(model, {}).values()):
            if watcher.subscriber is not None:
                event = events.get(watcher.topic)
                if event is None:
                    event = events[watcher.topic] = Event(type=LIVE_RESET, topic=watcher.topic, data=data)
                watcher.subscriber.deliver_nowait(event)
            elif watcher.state is not None:
                watcher.state.overflowed = True
                watcher.state.reason = "was ended: the live-query actor restarted"
            self._remove(watcher.id)
        logger.warning("live query restarted while publishing a change of %s; its watches were ended and told to re-sync", model)

    async def receive(self, message: Any) -> Any:
        if isinstance(message, _Notify):
            self._store.publishing = message.model
            entry = self._record(message)
            watchers = self._store.by_model.get(message.model)
            if watchers:
                self._deliver(entry, list(watchers.values()))
            self._store.publishing = None
            await self._run_handlers(entry.change)
            return None
        if isinstance(message, _Watch):
            return self._watch(message)
        if isinstance(message, _Unwatch):
            return self._remove(message.subscription_id)
        if isinstance(message, _Active):
            return message.subscription_ids & self._store.watchers.keys()
        if isinstance(message, _UnwatchConnection):
            ids = [
                w.id
                for w in self._store.watchers.values()
                if w.subscriber is not None and w.subscriber.connection_id == message.connection_id
            ]
            for id in ids:
                self._remove(id)
            return len(ids)
        if isinstance(message, _AddHandler):
            self._store.handlers.setdefault(message.model, []).append(message.handler)
            return None
        if isinstance(message, _Version):
            return self._store.versions.get(message.model, 0)
        raise TypeError(f"unexpected message {message!r}")

    # -- watchers ---------------------------------------------------------------

    def _watch(self, message: _Watch) -> tuple[str, int]:
        store = self._store
        model = message.model
        current = store.versions.get(model, 0)
        log = store.logs.get(model)
        replay: list[_Entry] = []
        if message.since is not None:
            first = log[0].version if log else current + 1
            since = message.since
            if message.epoch is not None and message.epoch != store.epoch:
                reason = f"epoch {message.epoch!r} is not the current epoch {store.epoch!r}"
            elif since > current:
                reason = f"version {since} is in the future (the latest is {current})"
            elif since < first - 1:
                reason = f"changes after version {since} are no longer kept (the oldest kept is {first})"
            else:
                reason = None
            if reason is not None:
                raise HistoryUnavailable(
                    f"cannot watch {model} since {since}: {reason}",
                    epoch=store.epoch,
                    first_seq=first if log else None,
                    last_seq=current,
                )
            replay = [entry for entry in log or () if entry.version > since]
        id = f"lq-{secrets.token_urlsafe(12)}"
        filters = message.filters
        fields: frozenset[str] | None
        if filters is None or callable(filters):
            fields = frozenset() if filters is None else None
        else:
            filters = MappingProxyType(dict(filters))
            fields = frozenset(filters)
        watcher = _Watcher(
            id=id,
            model=model,
            filters=filters,
            fields=fields,
            topic=message.topic or f"live:{id}",
            subscriber=message.subscriber,
            channel=message.channel,
            state=message.state,
        )
        store.watchers[id] = watcher
        store.by_model.setdefault(model, {})[id] = watcher
        for entry in replay:
            self._deliver(entry, [watcher])
        return id, current

    def _remove(self, id: str) -> bool:
        store = self._store
        watcher = store.watchers.pop(id, None)
        if watcher is None:
            return False
        of_model = store.by_model[watcher.model]
        del of_model[id]
        if not of_model:
            del store.by_model[watcher.model]
        if watcher.channel is not None:
            watcher.channel.close()
        return True

    # -- changes ------------------------------------------------------------------

    def _record(self, message: _Notify) -> _Entry:
        """Update the row cache, version and log; return the logged change."""
        store = self._store
        key = (message.model, message.pk)
        before = store.rows.get(key)
        data: Row | None
        changed = message.changed_fields
        if message.action == "create":
            data = MappingProxyType(dict(message.data or {}))
            self._remember(key, data)
        elif message.action == "update":
            given = message.data or {}
            data = MappingProxyType({**before, **given} if before is not None else dict(given))
            if changed is None:
                changed = tuple(given)
            self._remember(key, data)
        else:
            if before is None and message.data is not None:
                before = MappingProxyType(dict(message.data))
            data = None
            store.rows.pop(key, None)
        version = store.versions.get(message.model, 0) + 1
        store.versions[message.model] = version
        store.changes += 1
        change = ModelChange(
            model_name=message.model,
            action=message.action,
            pk=message.pk,
            data=data,
            changed_fields=changed if message.action == "update" else None,
            timestamp=message.timestamp,
        )
        entry = _Entry(version, change, before)
        if store.config.log_size:
            log = store.logs.get(message.model)
            if log is None:
                log = store.logs[message.model] = deque(maxlen=store.config.log_size)
            log.append(entry)
        return entry

    def _remember(self, key: tuple[str, int | str], row: Row) -> None:
        store = self._store
        if not store.config.max_rows:
            return
        store.rows[key] = row
        store.rows.move_to_end(key)
        while len(store.rows) > store.config.max_rows:
            store.rows.popitem(last=False)
            store.rows_evicted += 1

    def _matches(self, watcher: _Watcher, row: Row) -> bool:
        filters = watcher.filters
        if filters is None:
            return True
        if isinstance(filters, Mapping):
            return all(row.get(field, _MISSING) == value for field, value in filters.items())
        try:
            return bool(filters(row))
        except Exception as exc:
            self._store.predicate_errors += 1
            logger.warning("the filter of live watch %s raised: %r", watcher.id, exc, exc_info=exc)
            return False

    def _decide(self, watcher: _Watcher, entry: _Entry) -> tuple[str, bool] | None:
        """What ``watcher`` gets for ``entry``: ``(action, with_data)`` or nothing."""
        change = entry.change
        before = entry.before
        if change.action == "create":
            assert change.data is not None
            return ("create", True) if self._matches(watcher, change.data) else None
        if change.action == "delete":
            if before is None or self._matches(watcher, before):
                return ("delete", False)
            return None
        assert change.data is not None
        now = self._matches(watcher, change.data)
        if before is not None:
            was = self._matches(watcher, before)
            if was:
                return ("update" if now else "leave", True)
            return ("enter", True) if now else None
        # Unknown row: the data is all we have; infer the past from changed_fields.
        touched = watcher.fields is None or not watcher.fields.isdisjoint(change.changed_fields or ())
        if now:
            return ("enter" if touched else "update", True)
        return ("leave", False) if touched else None

    def _deliver(self, entry: _Entry, watchers: Iterable[_Watcher]) -> None:
        store = self._store
        variants: dict[tuple[str, bool], tuple[ModelChange, dict[str, object]]] = {}
        events: dict[tuple[str, str, bool], Event] = {}
        for watcher in watchers:
            decision = self._decide(watcher, entry)
            if decision is None:
                continue
            variant = variants.get(decision)
            if variant is None:
                action, with_data = decision
                change = entry.change
                if action != change.action or (change.data is not None and not with_data):
                    change = attrs.evolve(change, action=action, data=change.data if with_data else None)
                variant = variants[decision] = (change, change.to_dict())
            if watcher.subscriber is not None:
                key = (watcher.topic, *decision)
                event = events.get(key)
                if event is None:
                    event = events[key] = Event(type=CHANGE, topic=watcher.topic, data=variant[1], seq=entry.version, epoch=store.epoch)
                if watcher.subscriber.deliver_nowait(event):
                    store.delivered += 1
                else:
                    store.refused += 1
            elif watcher.channel is not None:
                try:
                    watcher.channel.send_nowait((entry.version, variant[0]))
                except trio.WouldBlock:
                    store.overflowed += 1
                    if watcher.state is not None:
                        watcher.state.overflowed = True
                    logger.warning("live watch %s fell behind and was ended", watcher.id)
                    self._remove(watcher.id)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._remove(watcher.id)
                else:
                    store.delivered += 1

    async def _run_handlers(self, change: ModelChange) -> None:
        store = self._store
        handlers = store.handlers.get(change.model_name)
        if not handlers:
            return
        timeout = store.config.handler_timeout
        for handler in list(handlers):
            store.handler_calls += 1
            try:
                with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                    await handler(change)
            except Exception as exc:
                store.handler_errors += 1
                logger.error("on_change handler %r for %s raised: %r", handler, change.model_name, exc, exc_info=exc)
            else:
                if scope.cancelled_caught:
                    store.handler_timeouts += 1
                    logger.warning("on_change handler %r for %s timed out after %s s", handler, change.model_name, timeout)


# -- the facade -----------------------------------------------------------------


class LiveWatch:
    """A subscriber-less watch, consumed with ``receive()`` or ``async for``.

    Attributes:
        id: The subscription id.
        model_name: The watched model.
        version: The version of the last change received (initially the
            model's version when the watch started, or ``since``).
    """

    def __init__(
        self,
        id: str,
        model_name: str,
        channel: trio.MemoryReceiveChannel[tuple[int, ModelChange]],
        state: _WatchState,
        version: int,
    ) -> None:
        self.id = id
        self.model_name = model_name
        self.version = version
        self._channel = channel
        self._state = state

    async def receive(self) -> ModelChange:
        """The next change.

        Raises:
            WatchOverflowed: The watch fell behind and was ended (after the
                buffered changes were received).
            trio.EndOfChannel: The watch was ended (unwatched).
        """
        try:
            version, change = await self._channel.receive()
        except trio.EndOfChannel:
            self._check_overflow()
            raise
        self.version = version
        return change

    def receive_nowait(self) -> ModelChange:
        """The next change, if one is buffered.

        Raises:
            trio.WouldBlock: None is buffered.
            WatchOverflowed: As :meth:`receive`.
            trio.EndOfChannel: As :meth:`receive`.
        """
        try:
            version, change = self._channel.receive_nowait()
        except trio.EndOfChannel:
            self._check_overflow()
            raise
        self.version = version
        return change

    def _check_overflow(self) -> None:
        if self._state.overflowed:
            raise WatchOverflowed(
                f"live watch {self.id} {self._state.reason} after version {self.version}",
                subscription_id=self.id,
                version=self.version,
            ) from None

    def __aiter__(self) -> LiveWatch:
        return self

    async def __anext__(self) -> ModelChange:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving (the actor drops the watch at its next change)."""
        self._channel.close()


def _check_filters(filters: Filters) -> None:
    if filters is not None and not isinstance(filters, Mapping) and not callable(filters):
        raise TypeError(f"filters must be a mapping, a callable or None, not {type(filters).__name__}")


class LiveQuery:
    """The seed's ``LiveQuery`` API, over the live-query actor (``hub.live``).

    Make one with :func:`start_live_query`, or start :meth:`spec` yourself and
    wrap the ref: ``LiveQuery(ref, store)``.

    Args:
        ref: The running live-query actor.
        store: The store it was started with.
    """

    def __init__(self, ref: ActorRef, store: LiveStore) -> None:
        self.ref = ref
        self.store = store
        self._watches: dict[str, LiveWatch] = {}
        self._watching: set[str] = set()  # connections that watched (or tried to), until they close

    @staticmethod
    def spec(store: LiveStore, *, id: str = "live", mailbox: MailboxConfig | None = None) -> ChildSpec:
        """The child spec of a live-query actor over ``store``.

        Args:
            store: Its state (kept across restarts).
            id: The child id.
            mailbox: Overrides the default mailbox (1000 messages, block).

        Returns:
            The spec, for ``supervisor.start_child``.
        """
        return ChildSpec(id=id, factory=functools.partial(_LiveActor, store), mailbox=mailbox)

    @property
    def epoch(self) -> str:
        """The epoch of the versions (pass it back with ``since``)."""
        return self.store.epoch

    # -- watching -------------------------------------------------------------------

    async def watch(
        self,
        model_name: str,
        filters: Filters = None,
        *,
        subscriber: Subscriber | None = None,
        topic: str | None = None,
        since: int | None = None,
        epoch: str | None = None,
    ) -> str:
        """Watch the changes of a model's rows that ``filters`` admits.

        With a ``subscriber``, changes are delivered to it as ``change``
        events; without one, they are buffered for :meth:`subscription`
        (prefer :meth:`open_watch`, which also unwatches).

        Args:
            model_name: The model.
            filters: An equality mapping, a predicate on the row, or ``None``.
            subscriber: The connection to deliver events to.
            topic: The events' topic (default ``live:<subscription id>``);
                watches sharing a topic share their events' bytes.
            since: A version of the model (from :meth:`version`): first
                deliver every change after it.
            epoch: The epoch ``since`` belongs to (checked when given).

        Returns:
            The subscription id.

        Raises:
            HistoryUnavailable: ``since`` is too old, in the future, or from
                another epoch.
        """
        _check_filters(filters)
        if subscriber is not None:
            # Noted before the ask: a connection that may have a watch is
            # asked about when it closes (the others are not: a mass
            # disconnect must not queue an ask per connection here).
            self._watching.add(subscriber.connection_id)
            id, _ = await self.ref.ask(
                _Watch(model=model_name, filters=filters, subscriber=subscriber, topic=topic, since=since, epoch=epoch)
            )
            return str(id)
        handle = await self._watch_queue(model_name, filters, since=since, epoch=epoch, buffer=None)
        self._watches[handle.id] = handle
        return handle.id

    def subscription(self, subscription_id: str) -> LiveWatch:
        """The handle of a subscriber-less watch made with :meth:`watch`.

        Raises:
            NotFound: No such watch (or it was unwatched).
        """
        try:
            return self._watches[subscription_id]
        except KeyError:
            raise NotFound(f"no live watch {subscription_id!r}") from None

    async def _watch_queue(
        self, model_name: str, filters: Filters, *, since: int | None, epoch: str | None, buffer: int | None
    ) -> LiveWatch:
        send, receive = trio.open_memory_channel[tuple[int, ModelChange]](buffer or self.store.config.watch_buffer)
        state = _WatchState()
        try:
            id, version = await self.ref.ask(_Watch(model=model_name, filters=filters, channel=send, state=state, since=since, epoch=epoch))
        except BaseException:
            send.close()
            receive.close()
            raise
        return LiveWatch(id, model_name, receive, state, since if since is not None else version)

    @asynccontextmanager
    async def open_watch(
        self,
        model_name: str,
        filters: Filters = None,
        *,
        since: int | None = None,
        epoch: str | None = None,
        buffer: int | None = None,
    ) -> AsyncIterator[LiveWatch]:
        """Watch a model for the duration of a block::

            async with live.open_watch("Comment", {"post_id": 42}) as changes:
                async for change in changes:
                    ...

        Args:
            model_name: The model.
            filters: An equality mapping, a predicate on the row, or ``None``.
            since: First deliver every change after this version.
            epoch: The epoch ``since`` belongs to.
            buffer: Changes buffered before the watch overflows (default
                :attr:`LiveConfig.watch_buffer`).

        Yields:
            The :class:`LiveWatch`.

        Raises:
            HistoryUnavailable: ``since`` cannot be resumed.
        """
        _check_filters(filters)
        handle = await self._watch_queue(model_name, filters, since=since, epoch=epoch, buffer=buffer)
        try:
            yield handle
        finally:
            handle.close()
            self._unwatch_nowait(handle.id)

    def _unwatch_nowait(self, subscription_id: str) -> None:
        # Best effort: if this fails, the closed channel ends the watch at
        # the next change anyway.
        with suppress(MailboxFull, ActorStopped):
            self.ref.tell_nowait(_Unwatch(subscription_id))

    async def unwatch(self, subscription_id: str) -> bool:
        """End a watch.

        Returns:
            Whether it existed: ``False`` also for a watch the actor ended
            (a ``live_reset``, an overflow).
        """
        self._watches.pop(subscription_id, None)
        return bool(await self.ref.ask(_Unwatch(subscription_id)))

    async def active(self, subscription_ids: Iterable[str]) -> frozenset[str]:
        """Which of these watches are still active.

        A watch stops being active when it is unwatched, or when the actor
        ends it (a ``live_reset`` after a crash mid-publish, an overflow).
        Whoever keeps a set of watch ids (the protocol handler, per
        connection) can drop the others.

        Returns:
            The ids among ``subscription_ids`` that are active now.
        """
        return frozenset(await self.ref.ask(_Active(frozenset(subscription_ids))))

    async def unwatch_connection(self, connection_id: str) -> int:
        """End every watch whose subscriber has this ``connection_id``.

        Returns:
            How many were ended.
        """
        if connection_id not in self._watching:
            await trio.lowlevel.checkpoint()
            return 0  # it never watched: nothing to ask the actor
        self._watching.discard(connection_id)
        return int(await self.ref.ask(_UnwatchConnection(connection_id)))

    def on_change(self, model_name: str) -> Callable[[Handler], Handler]:
        """Register the decorated ``async def handler(change)`` for a model.

        It runs for every change of the model after the changes queued
        before it (see the module docs for timeouts and errors).

        Raises:
            MailboxFull: The actor's mailbox is full.
            ActorStopped: The actor has stopped.
        """

        def register(handler: Handler) -> Handler:
            self.ref.tell_nowait(_AddHandler(model_name, handler))
            return handler

        return register

    # -- notifying ------------------------------------------------------------------

    async def notify_create(self, model_name: str, pk: int | str, data: Row) -> None:
        """A row was created.

        Each ``notify_*`` returns once the change is published (see the
        module's notes on restarts).

        Raises:
            ActorCrashed: The live-query actor crashed on this change; its
                watchers are told to re-sync.

        Args:
            model_name: The model.
            pk: The row's primary key.
            data: The row's fields.
        """
        await self._notify(model_name, "create", pk, data, None)

    async def notify_update(self, model_name: str, pk: int | str, data: Row, changed_fields: Iterable[str] | None = None) -> None:
        """A row was updated.

        Args:
            model_name: The model.
            pk: The row's primary key.
            data: The changed fields (or the whole row); merged over the last
                known row.
            changed_fields: The fields that changed (default: ``data``'s keys).
        """
        await self._notify(model_name, "update", pk, data, None if changed_fields is None else tuple(changed_fields))

    async def notify_delete(self, model_name: str, pk: int | str, data: Row | None = None) -> None:
        """A row was deleted.

        Args:
            model_name: The model.
            pk: The row's primary key.
            data: Its last fields, if at hand: used to find its watchers when
                the row is not in the cache.
        """
        await self._notify(model_name, "delete", pk, data, None)

    async def _notify(self, model_name: str, action: str, pk: int | str, data: Row | None, changed: tuple[str, ...] | None) -> None:
        if data is not None and not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping, not {type(data).__name__}")
        message = _Notify(
            model=model_name,
            action=action,
            pk=pk,
            data=None if data is None else dict(data),
            changed_fields=changed,
            timestamp=time.time(),
        )
        if trio.lowlevel.current_task() is self.store.task:
            self.ref.tell_nowait(message)  # from a handler: after the change being handled
        else:
            await self.ref.ask(message, timeout=None)

    async def version(self, model_name: str) -> int:
        """The model's current version (0 before its first change).

        Changes notified before this call are counted, so it also waits for
        them to be handled.
        """
        return int(await self.ref.ask(_Version(model_name)))

    def statistics(self) -> LiveStatistics:
        """A frozen snapshot of the counters."""
        return self.store.statistics()


async def start_live_query(
    supervisor: Supervisor,
    *,
    id: str = "live",
    config: LiveConfig | None = None,
    store: LiveStore | None = None,
    mailbox: MailboxConfig | None = None,
) -> LiveQuery:
    """Start a live-query actor under ``supervisor`` and return its facade.

    Args:
        supervisor: The parent.
        id: The child id.
        config: The configuration of a new store (ignored with ``store``).
        store: The state to run over (a new one by default).
        mailbox: Overrides the default mailbox.

    Returns:
        The :class:`LiveQuery`.
    """
    if store is None:
        store = LiveStore(config)
    ref = await supervisor.start_child(LiveQuery.spec(store, id=id, mailbox=mailbox))
    return LiveQuery(ref, store)
