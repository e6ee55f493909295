"""Rate limits: the seed's ``WebSocketRateLimiter`` and a per-key sliding window.

Both are pure logic (no trio, no I/O) and read time from an injectable
``clock``, a zero-argument callable returning seconds (``time.monotonic`` by
default; a test passes a fake one, an actor may pass ``trio.current_time``).
They are not thread-safe and need not be: each has one owner (an actor).

Windows are exact sliding windows. A message accepted at time ``t`` counts
in a window of ``w`` seconds while ``now < t + w``, so with a limit of ``n``
no half-open interval ``[a, a + w)`` ever holds more than ``n`` accepted
messages (up to a nanosecond of slack that absorbs float rounding of clock
arithmetic; the token bucket likewise counts a billionth of a token short of
one as whole). Each key keeps at most ``n`` timestamps per window, so memory is
``O(n)`` per key however fast messages arrive; keys of departed connections
are dropped with ``reset``/``forget`` or by the periodic ``cleanup_*``.

``retry_after`` is ``0.0`` exactly when the check would succeed now, and
otherwise is computed from the same float expressions as the check (rounded
up by an ulp where needed), so advancing the clock by exactly
``retry_after(key)`` makes the next check succeed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import attrs

from ._errors import RateLimited

Clock = Callable[[], float]

_SECOND = 1.0
_MINUTE = 60.0
# Slack absorbing float rounding in clock arithmetic (``t + 0.1 + 0.1`` may
# read a hair before ``t + 0.2``): checks count a window as left, or a token
# as refilled, up to a nanosecond (a billionth of a token) early. The delays
# reported by ``retry_after`` are computed without it (so they are the exact
# values, 0.25 and not 0.24999999975) and are then never too short.
_TOLERANCE = 1e-9


def _positive_int(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _check_idle(max_idle: float) -> None:
    if not max_idle >= 0:  # also refuses NaN
        raise ValueError(f"max idle time must be >= 0, got {max_idle!r}")


def _prune(stamps: deque[float], now: float, window: float) -> None:
    """Drop the timestamps that have left the window ending at ``now``."""
    while stamps and now >= stamps[0] + window - _TOLERANCE:
        stamps.popleft()


def _window_ready_at(stamps: deque[float], limit: int, window: float, slack: float) -> float:
    """The earliest time at which a pruned window admits one more message.

    ``-inf`` if it admits one at any time. ``stamps`` holds at most ``limit``
    entries (its ``maxlen``), the most recent accepted ones. ``slack`` is
    ``_TOLERANCE`` for checks, ``0.0`` for reported delays.
    """
    if len(stamps) < limit:
        return -math.inf
    return stamps[0] + window - slack


def _delay_until(now: float, ready_at: float) -> float:
    """Seconds ``r >= 0`` to wait from ``now`` so that ``now + r >= ready_at``.

    Rounded up by an ulp where needed so that a clock advanced by exactly
    ``r`` (``now + r`` in floats) reaches ``ready_at``.
    """
    if now >= ready_at:
        return 0.0
    delay = ready_at - now
    step = math.ulp(delay)
    while now + delay < ready_at:  # doubling steps: few iterations at any scale
        delay += step
        step *= 2
    return delay


@attrs.frozen(kw_only=True)
class WSRateLimitConfig:
    """Limits of one :class:`WebSocketRateLimiter` (the seed's fields and defaults).

    Args:
        messages_per_second: Most messages accepted in any 1-second window.
        messages_per_minute: Most messages accepted in any 60-second window.
        burst_size: Capacity of the token bucket: most messages accepted at
            once after a quiet period. The bucket refills at
            ``messages_per_second`` tokens per second.

    Raises:
        TypeError: A field is not an ``int``.
        ValueError: A field is not positive.
    """

    messages_per_second: int = attrs.field(default=10, validator=_positive_int)
    messages_per_minute: int = attrs.field(default=120, validator=_positive_int)
    burst_size: int = attrs.field(default=20, validator=_positive_int)


@attrs.frozen(kw_only=True)
class RateLimiterStatistics:
    """A snapshot of a :class:`WebSocketRateLimiter`'s counters.

    Attributes:
        tracked: Connections with state kept now.
        allowed: Messages accepted since the limiter was created.
        refused: Messages refused since the limiter was created.
    """

    tracked: int
    allowed: int
    refused: int


@attrs.define(eq=False)
class _Bucket:
    """Per-connection state: token bucket plus both windows' timestamps."""

    tokens: float
    updated: float
    last_seen: float
    per_second: deque[float]
    per_minute: deque[float]


class WebSocketRateLimiter:
    """Per-connection rate limiting: a token bucket and two sliding windows.

    A message is accepted only if all three agree: the token bucket
    (capacity ``burst_size``, refilled at ``messages_per_second`` tokens per
    second) holds a whole token, fewer than ``messages_per_second`` messages
    were accepted in the last second, and fewer than ``messages_per_minute``
    in the last minute. An accepted message takes a token and is recorded in
    both windows; a refused one changes nothing, so a client that keeps
    sending while limited is not pushed further back.

    Args:
        config: The limits; the seed's defaults if ``None``.
        clock: Zero-argument callable returning the current time in seconds
            (monotonic).
    """

    def __init__(self, config: WSRateLimitConfig | None = None, *, clock: Clock = time.monotonic) -> None:
        self._config = config if config is not None else WSRateLimitConfig()
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._allowed = 0
        self._refused = 0

    @property
    def config(self) -> WSRateLimitConfig:
        """The limits this limiter applies."""
        return self._config

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        """The bucket's tokens at ``now`` (not stored)."""
        elapsed = now - bucket.updated
        if elapsed <= 0:  # a clock that went backwards refills nothing
            return bucket.tokens
        return min(float(self._config.burst_size), bucket.tokens + elapsed * self._config.messages_per_second)

    def _bucket_ready_at(self, bucket: _Bucket, now: float, slack: float) -> float:
        """The earliest time ``>= now`` at which the bucket holds ``1 - slack`` tokens."""
        one = 1.0 - slack
        if self._refilled(bucket, now) >= one:
            return now
        ready = max(now, bucket.updated + (one - bucket.tokens) / self._config.messages_per_second)
        # Float rounding may leave the refill a hair short at ``ready``; the
        # refill is monotonic in time, so step up (doubling the step, to stay
        # fast at any scale) until it is not.
        step = math.ulp(ready)
        while self._refilled(bucket, ready) < one:
            ready += step
            step *= 2
        return ready

    def _ready_at(self, bucket: _Bucket, now: float, slack: float = _TOLERANCE) -> float:
        """The earliest time ``>= now`` at which ``check`` would accept.

        With ``slack=0.0``, a time at which it would accept without the
        tolerance (hence certainly with it).
        """
        config = self._config
        _prune(bucket.per_second, now, _SECOND)
        _prune(bucket.per_minute, now, _MINUTE)
        return max(
            self._bucket_ready_at(bucket, now, slack),
            _window_ready_at(bucket.per_second, config.messages_per_second, _SECOND, slack),
            _window_ready_at(bucket.per_minute, config.messages_per_minute, _MINUTE, slack),
        )

    def check(self, connection_id: str) -> bool:
        """Accept or refuse one message from a connection.

        Args:
            connection_id: The connection sending the message.

        Returns:
            ``True`` if the message is allowed: it consumed one token and is
            recorded in both windows. ``False`` if it is refused: nothing is
            consumed or recorded.
        """
        now = self._clock()
        config = self._config
        bucket = self._buckets.get(connection_id)
        if bucket is None:
            bucket = _Bucket(
                tokens=float(config.burst_size),
                updated=now,
                last_seen=now,
                per_second=deque(maxlen=config.messages_per_second),
                per_minute=deque(maxlen=config.messages_per_minute),
            )
            self._buckets[connection_id] = bucket
        bucket.last_seen = now
        if now < self._ready_at(bucket, now):
            self._refused += 1
            return False
        # ``_ready_at`` guarantees a whole token, give or take the tolerance.
        bucket.tokens = max(self._refilled(bucket, now) - 1.0, 0.0)
        bucket.updated = max(bucket.updated, now)
        bucket.per_second.append(now)
        bucket.per_minute.append(now)
        self._allowed += 1
        return True

    def check_or_raise(self, connection_id: str) -> None:
        """Like :meth:`check`, raising instead of returning ``False``.

        Args:
            connection_id: The connection sending the message.

        Raises:
            RateLimited: The message is refused; its ``retry_after`` says
                how many seconds until one would be accepted.
        """
        if not self.check(connection_id):
            delay = self.retry_after(connection_id)
            raise RateLimited(f"connection {connection_id!r} is rate limited; retry after retry_after seconds", retry_after=delay)

    def retry_after(self, connection_id: str) -> float:
        """Seconds until :meth:`check` would accept a message from a connection.

        Advancing the clock by exactly this much makes the next ``check``
        succeed (if nothing else is sent meanwhile).

        Args:
            connection_id: The connection.

        Returns:
            The delay in seconds; ``0.0`` if a message would be accepted now.
        """
        bucket = self._buckets.get(connection_id)
        if bucket is None:
            return 0.0
        now = self._clock()
        if now >= self._ready_at(bucket, now):
            return 0.0
        return _delay_until(now, self._ready_at(bucket, now, 0.0))

    def reset(self, connection_id: str) -> None:
        """Forget a connection's state (on disconnect); unknown ids are ignored.

        Args:
            connection_id: The connection.
        """
        self._buckets.pop(connection_id, None)

    def cleanup_stale(self, max_idle_seconds: float = 300.0) -> int:
        """Forget connections that have not sent anything for a while.

        Call it periodically so that state of connections that went away
        without a ``reset`` does not accumulate. A connection is idle since
        its last ``check``, accepted or refused.

        Args:
            max_idle_seconds: Connections idle for longer than this are
                removed.

        Returns:
            How many connections were removed.

        Raises:
            ValueError: ``max_idle_seconds`` is negative.
        """
        _check_idle(max_idle_seconds)
        now = self._clock()
        stale = [key for key, bucket in self._buckets.items() if now - bucket.last_seen > max_idle_seconds]
        for key in stale:
            del self._buckets[key]
        return len(stale)

    def get_stats(self, connection_id: str) -> dict[str, int | float]:
        """The seed's stats of one connection (unknown ids report a fresh state).

        Args:
            connection_id: The connection.

        Returns:
            ``tokens_remaining`` (float), ``per_second_count`` and
            ``per_minute_count`` (messages in the current windows), and the
            configured ``burst_size``, ``messages_per_second`` and
            ``messages_per_minute``.
        """
        config = self._config
        bucket = self._buckets.get(connection_id)
        if bucket is None:
            tokens, per_second, per_minute = float(config.burst_size), 0, 0
        else:
            now = self._clock()
            _prune(bucket.per_second, now, _SECOND)
            _prune(bucket.per_minute, now, _MINUTE)
            tokens, per_second, per_minute = self._refilled(bucket, now), len(bucket.per_second), len(bucket.per_minute)
        return {
            "tokens_remaining": tokens,
            "per_second_count": per_second,
            "per_minute_count": per_minute,
            "burst_size": config.burst_size,
            "messages_per_second": config.messages_per_second,
            "messages_per_minute": config.messages_per_minute,
        }

    def statistics(self) -> RateLimiterStatistics:
        """A snapshot of the limiter's counters.

        Returns:
            Connections tracked now, and messages allowed and refused so far.
        """
        return RateLimiterStatistics(tracked=len(self._buckets), allowed=self._allowed, refused=self._refused)


@attrs.define(eq=False)
class _Window:
    stamps: deque[float]
    last_seen: float


class SlidingWindowLimit:
    """At most ``limit`` hits per key in any window of ``window`` seconds.

    Used by rooms for the per-user ``rate_limit`` (messages per minute). A
    refused hit is not recorded. Each key keeps at most ``limit`` timestamps.

    Args:
        limit: Most hits per key per window; ``0`` means unlimited (nothing
            is tracked).
        window: The window's length in seconds.
        clock: Zero-argument callable returning the current time in seconds
            (monotonic).

    Raises:
        TypeError: ``limit`` is not an ``int``.
        ValueError: ``limit`` is negative or ``window`` is not positive.
    """

    def __init__(self, limit: int, window: float, *, clock: Clock = time.monotonic) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, got {limit!r}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit!r}")
        if not (window > 0 and math.isfinite(window)):
            raise ValueError(f"window must be a positive finite number of seconds, got {window!r}")
        self._limit = limit
        self._window = float(window)
        self._clock = clock
        self._keys: dict[Hashable, _Window] = {}

    @property
    def limit(self) -> int:
        """Most hits per key per window (``0``: unlimited)."""
        return self._limit

    @property
    def window(self) -> float:
        """The window's length in seconds."""
        return self._window

    def __len__(self) -> int:
        """How many keys have state kept now."""
        return len(self._keys)

    def hit(self, key: Hashable) -> bool:
        """Record one hit for a key if the limit allows it.

        Args:
            key: Who is hitting (a user id, say).

        Returns:
            ``True`` if the hit is allowed (and recorded), ``False`` if the
            key already has ``limit`` hits in the current window.
        """
        if self._limit == 0:
            return True
        now = self._clock()
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Window(stamps=deque(maxlen=self._limit), last_seen=now)
        state.last_seen = now
        _prune(state.stamps, now, self._window)
        if now < _window_ready_at(state.stamps, self._limit, self._window, _TOLERANCE):
            return False
        state.stamps.append(now)
        return True

    def count(self, key: Hashable) -> int:
        """Hits of a key in the current window.

        Args:
            key: The key.

        Returns:
            The number of recorded hits still in the window (``0`` when
            unlimited).
        """
        state = self._keys.get(key)
        if state is None:
            return 0
        _prune(state.stamps, self._clock(), self._window)
        return len(state.stamps)

    def retry_after(self, key: Hashable) -> float:
        """Seconds until :meth:`hit` would allow a hit for a key.

        Args:
            key: The key.

        Returns:
            The delay in seconds; ``0.0`` if a hit would be allowed now.
        """
        state = self._keys.get(key)
        if state is None:
            return 0.0
        now = self._clock()
        _prune(state.stamps, now, self._window)
        if now >= _window_ready_at(state.stamps, self._limit, self._window, _TOLERANCE):
            return 0.0
        return _delay_until(now, _window_ready_at(state.stamps, self._limit, self._window, 0.0))

    def forget(self, key: Hashable) -> None:
        """Drop a key's state; unknown keys are ignored.

        Args:
            key: The key.
        """
        self._keys.pop(key, None)

    def cleanup(self, max_idle: float) -> int:
        """Drop keys with no hit (allowed or refused) for longer than ``max_idle``.

        Args:
            max_idle: Seconds of idleness after which a key is dropped.

        Returns:
            How many keys were dropped.

        Raises:
            ValueError: ``max_idle`` is negative.
        """
        _check_idle(max_idle)
        now = self._clock()
        stale = [key for key, state in self._keys.items() if now - state.last_seen > max_idle]
        for key in stale:
            del self._keys[key]
        return len(stale)
