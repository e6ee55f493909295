"""``WebSocketRateLimiter``, ``WSRateLimitConfig`` and ``SlidingWindowLimit``.

All deterministic: a fake clock is advanced by hand, nothing sleeps. Times
in the property tests are multiples of 1/64 s, so that float arithmetic on
them (and on integer rates) is exact and the limiter can be compared with
an exact model.
"""

from __future__ import annotations

import ast
import math
from fractions import Fraction
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from ensemble.realtime._errors import RateLimited, RealtimeError
from ensemble.realtime._ratelimit import (
    RateLimiterStatistics,
    SlidingWindowLimit,
    WebSocketRateLimiter,
    WSRateLimitConfig,
)

SEED_STATS_KEYS = {"tokens_remaining", "per_second_count", "per_minute_count", "burst_size", "messages_per_second", "messages_per_minute"}


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(mps: int = 10, mpm: int = 120, burst: int = 20, *, now: float = 0.0) -> tuple[WebSocketRateLimiter, FakeClock]:
    clock = FakeClock(now)
    config = WSRateLimitConfig(messages_per_second=mps, messages_per_minute=mpm, burst_size=burst)
    return WebSocketRateLimiter(config, clock=clock), clock


def accept_all(limiter: WebSocketRateLimiter, key: str, n: int) -> None:
    for i in range(n):
        assert limiter.check(key), f"message {i + 1} of {n} refused"


# -- configuration ------------------------------------------------------------


def test_config_defaults_are_the_seeds() -> None:
    config = WSRateLimitConfig()
    assert (config.messages_per_second, config.messages_per_minute, config.burst_size) == (10, 120, 20)
    assert WebSocketRateLimiter().config == config


def test_config_is_frozen_and_keyword_only() -> None:
    config = WSRateLimitConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.burst_size = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        WSRateLimitConfig(5, 60, 10)  # type: ignore[call-arg]


@pytest.mark.parametrize("field", ["messages_per_second", "messages_per_minute", "burst_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_config_refuses_non_positive(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        WSRateLimitConfig(**{field: value})


@pytest.mark.parametrize("field", ["messages_per_second", "messages_per_minute", "burst_size"])
@pytest.mark.parametrize("value", [1.5, "10", True, None])
def test_config_refuses_non_int(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=field):
        WSRateLimitConfig(**{field: value})  # type: ignore[arg-type]


def test_default_clock_is_monotonic_time() -> None:
    limiter = WebSocketRateLimiter()
    assert limiter.check("c")
    assert limiter.get_stats("c")["per_second_count"] == 1


def test_module_is_pure_logic() -> None:
    source = Path(__file__).resolve().parent.parent / "ensemble" / "realtime" / "_ratelimit.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.partition(".")[0])
    assert "trio" not in imported
    assert imported <= {"__future__", "math", "time", "collections", "typing", "attrs"}


# -- the token bucket ---------------------------------------------------------


def test_burst_allows_exactly_burst_size_at_once() -> None:
    limiter, _ = make(mps=100, mpm=1000, burst=5)
    accept_all(limiter, "c", 5)
    assert not limiter.check("c")


def test_seed_defaults_allow_ten_at_once_then_refill() -> None:
    # Default config: the per-second window (10) binds before the burst (20).
    limiter, clock = make()
    accept_all(limiter, "c", 10)
    assert not limiter.check("c")
    clock.advance(1.0)
    accept_all(limiter, "c", 10)  # 10 tokens left, window empty again
    assert not limiter.check("c")
    clock.advance(1.0)
    accept_all(limiter, "c", 10)  # refilled 10 in a second
    assert not limiter.check("c")


def test_refill_rate() -> None:
    limiter, clock = make(mps=4, mpm=1000, burst=2)
    accept_all(limiter, "c", 2)
    assert not limiter.check("c")
    clock.advance(0.25)  # one token at 4/s
    assert limiter.check("c")
    assert not limiter.check("c")
    clock.advance(0.125)  # half a token
    assert not limiter.check("c")
    assert limiter.get_stats("c")["tokens_remaining"] == 0.5
    clock.advance(0.125)
    assert limiter.check("c")
    assert not limiter.check("c")


def test_refill_caps_at_burst_size() -> None:
    limiter, clock = make(mps=4, mpm=1000, burst=3)
    accept_all(limiter, "c", 3)
    clock.advance(100.0)
    assert limiter.get_stats("c")["tokens_remaining"] == 3.0
    accept_all(limiter, "c", 3)
    assert not limiter.check("c")


def test_refill_with_a_rate_that_is_not_a_binary_fraction() -> None:
    limiter, clock = make(mps=10, mpm=1000, burst=1, now=1234.5678)
    for _ in range(50):
        assert limiter.check("c")
        assert not limiter.check("c")
        clock.advance(0.1)


# -- the sliding windows ------------------------------------------------------


def test_per_second_window() -> None:
    limiter, clock = make(mps=3, mpm=1000, burst=10)
    accept_all(limiter, "c", 3)
    assert not limiter.check("c")  # the bucket still has 7 tokens
    assert limiter.get_stats("c")["tokens_remaining"] == 7.0
    clock.advance(0.5)
    assert not limiter.check("c")
    assert limiter.retry_after("c") == 0.5
    clock.advance(0.5)  # all three leave the window exactly now
    accept_all(limiter, "c", 3)
    assert not limiter.check("c")


def test_per_second_window_slides() -> None:
    limiter, clock = make(mps=3, mpm=1000, burst=10)
    for t in (0.0, 0.25, 0.5):
        clock.now = t
        assert limiter.check("c")
    clock.now = 0.75
    assert not limiter.check("c")
    clock.now = 1.0  # the message at 0.0 left; 0.25 and 0.5 are still in
    assert limiter.check("c")
    assert not limiter.check("c")
    assert limiter.retry_after("c") == 0.25
    clock.now = 1.25
    assert limiter.check("c")
    assert not limiter.check("c")


def test_per_minute_window() -> None:
    limiter, clock = make(mps=1000, mpm=120, burst=1000)
    assert limiter.check("c")  # the oldest, at t=0
    clock.now = 1.0
    accept_all(limiter, "c", 119)
    clock.now = 2.0
    assert not limiter.check("c")  # the 121st within 60 s
    assert limiter.retry_after("c") == 58.0
    clock.now = 59.984375
    assert not limiter.check("c")
    clock.now = 60.0  # the oldest leaves the window: exactly one more
    assert limiter.check("c")
    assert not limiter.check("c")
    assert limiter.retry_after("c") == 1.0
    clock.now = 61.0  # the 119 of t=1 leave
    accept_all(limiter, "c", 119)
    assert not limiter.check("c")


def test_per_minute_window_with_the_seed_defaults() -> None:
    # 10/s for 12 s reaches 120/min; then nothing until the first second's
    # messages leave the window, at t=60.
    limiter, clock = make()
    for second in range(12):
        clock.now = float(second)
        accept_all(limiter, "c", 10)
    assert limiter.get_stats("c")["per_minute_count"] == 120
    clock.now = 12.0
    assert not limiter.check("c")
    assert limiter.retry_after("c") == 48.0
    clock.now = 60.0
    accept_all(limiter, "c", 10)
    assert not limiter.check("c")


# -- refusals, reset, cleanup -------------------------------------------------


def test_refusals_consume_and_record_nothing() -> None:
    limiter, clock = make(mps=1, mpm=1000, burst=1)
    assert limiter.check("c")
    for _ in range(100):
        clock.advance(0.0078125)
        assert not limiter.check("c")
    before = limiter.get_stats("c")
    assert before["per_second_count"] == 1
    assert before["per_minute_count"] == 1
    clock.now = 1.0  # one token refilled, the window emptied: as if no refusals
    assert limiter.check("c")
    assert limiter.statistics() == RateLimiterStatistics(tracked=1, allowed=2, refused=100)


def test_reset_forgets_a_connection() -> None:
    limiter, _ = make(mps=2, mpm=1000, burst=2)
    accept_all(limiter, "c", 2)
    assert not limiter.check("c")
    limiter.reset("c")
    assert limiter.statistics().tracked == 0
    assert limiter.retry_after("c") == 0.0
    accept_all(limiter, "c", 2)
    limiter.reset("unknown")  # no error


def test_cleanup_stale() -> None:
    limiter, clock = make()
    assert limiter.check("a")
    clock.now = 100.0
    assert limiter.check("b")
    clock.now = 250.0
    assert limiter.check("c")
    clock.now = 400.0
    assert limiter.cleanup_stale() == 1  # a: idle 400 s > 300 (b: exactly 300, kept)
    assert limiter.statistics().tracked == 2
    assert limiter.cleanup_stale(max_idle_seconds=150.0) == 1  # b
    assert limiter.cleanup_stale(max_idle_seconds=150.0) == 0
    assert limiter.get_stats("c")["tokens_remaining"] == 20.0
    assert limiter.cleanup_stale(max_idle_seconds=0.0) == 1
    assert limiter.statistics().tracked == 0


def test_cleanup_stale_counts_refused_messages_as_activity() -> None:
    limiter, clock = make(mps=1, mpm=1, burst=1)
    assert limiter.check("c")
    clock.now = 50.0
    assert not limiter.check("c")  # still limited by the minute window
    clock.now = 59.0
    assert limiter.cleanup_stale(max_idle_seconds=10.0) == 0
    assert not limiter.check("c")


def test_cleanup_stale_refuses_negative_idle_time() -> None:
    limiter, _ = make()
    with pytest.raises(ValueError, match="idle"):
        limiter.cleanup_stale(-1.0)
    with pytest.raises(ValueError, match="idle"):
        limiter.cleanup_stale(math.nan)


# -- stats --------------------------------------------------------------------


def test_get_stats_has_the_seeds_keys_and_values() -> None:
    limiter, clock = make(mps=5, mpm=60, burst=10)
    accept_all(limiter, "c", 3)
    clock.advance(0.5)
    stats = limiter.get_stats("c")
    assert set(stats) == SEED_STATS_KEYS
    assert stats == {
        "tokens_remaining": 9.5,  # 7 + 0.5 s * 5/s
        "per_second_count": 3,
        "per_minute_count": 3,
        "burst_size": 10,
        "messages_per_second": 5,
        "messages_per_minute": 60,
    }
    assert isinstance(stats["tokens_remaining"], float)
    clock.advance(0.5)  # the three leave the 1-second window
    stats = limiter.get_stats("c")
    assert (stats["per_second_count"], stats["per_minute_count"], stats["tokens_remaining"]) == (0, 3, 10.0)
    clock.advance(59.0)
    assert limiter.get_stats("c")["per_minute_count"] == 0


def test_get_stats_of_an_unknown_connection_keeps_no_state() -> None:
    limiter, _ = make(mps=5, mpm=60, burst=10)
    stats = limiter.get_stats("nobody")
    assert stats["tokens_remaining"] == 10.0
    assert stats["per_second_count"] == stats["per_minute_count"] == 0
    assert limiter.retry_after("nobody") == 0.0
    assert limiter.statistics() == RateLimiterStatistics(tracked=0, allowed=0, refused=0)


def test_statistics_is_a_frozen_snapshot() -> None:
    limiter, _ = make(mps=1, mpm=10, burst=1)
    assert limiter.check("a")
    assert not limiter.check("a")
    assert limiter.check("b")
    stats = limiter.statistics()
    assert stats == RateLimiterStatistics(tracked=2, allowed=2, refused=1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.allowed = 0  # type: ignore[misc]
    assert not limiter.check("b")
    assert stats.refused == 1


# -- retry_after and check_or_raise ---------------------------------------------


def test_retry_after_of_the_bucket() -> None:
    limiter, clock = make(mps=4, mpm=1000, burst=1)
    assert limiter.retry_after("c") == 0.0
    assert limiter.check("c")
    assert limiter.retry_after("c") == 0.25
    clock.advance(0.125)
    assert limiter.retry_after("c") == 0.125
    clock.advance(0.125)
    assert limiter.retry_after("c") == 0.0
    assert limiter.check("c")


@pytest.mark.parametrize("mps", [3, 7, 10, 13])
@pytest.mark.parametrize("start", [0.0, 0.1, 1e6 + 0.3, 123456789.123])
def test_advancing_by_retry_after_always_succeeds(mps: int, start: float) -> None:
    limiter, clock = make(mps=mps, mpm=10_000, burst=2, now=start)
    for _ in range(60):
        delay = limiter.retry_after("c")
        if delay > 0:
            assert not limiter.check("c")
            clock.advance(delay)
            assert limiter.retry_after("c") == 0.0
        assert limiter.check("c")
        assert delay <= 1.0


def test_retry_after_is_the_latest_of_the_three_limits() -> None:
    limiter, clock = make(mps=2, mpm=3, burst=4)
    accept_all(limiter, "c", 2)
    assert limiter.retry_after("c") == 1.0  # per-second window, not the bucket (2 tokens left)
    clock.now = 1.0
    assert limiter.check("c")
    assert limiter.retry_after("c") == 59.0  # per-minute window
    clock.now = 59.0
    assert not limiter.check("c")
    clock.now = 60.0
    accept_all(limiter, "c", 2)


def test_check_or_raise() -> None:
    limiter, clock = make(mps=4, mpm=1000, burst=1)
    limiter.check_or_raise("conn-7")
    with pytest.raises(RateLimited, match="conn-7") as info:
        limiter.check_or_raise("conn-7")
    assert info.value.retry_after == 0.25
    assert isinstance(info.value, PermissionError)
    assert isinstance(info.value, RealtimeError)
    assert limiter.statistics().refused == 1
    clock.advance(info.value.retry_after)
    limiter.check_or_raise("conn-7")


def test_connections_are_independent() -> None:
    limiter, clock = make(mps=2, mpm=1000, burst=2)
    accept_all(limiter, "a", 2)
    assert not limiter.check("a")
    accept_all(limiter, "b", 2)
    assert not limiter.check("b")
    limiter.reset("a")
    assert limiter.check("a")
    assert not limiter.check("b")
    assert limiter.get_stats("b")["per_second_count"] == 2
    clock.advance(1.0)
    assert limiter.check("b")


def test_memory_per_connection_is_bounded_by_the_limits() -> None:
    limiter, clock = make(mps=5, mpm=50, burst=5)
    for _ in range(10_000):
        limiter.check("c")
        clock.advance(0.015625)
    bucket = limiter._buckets["c"]
    assert len(bucket.per_second) <= 5
    assert len(bucket.per_minute) <= 50


# -- properties ---------------------------------------------------------------


class Model:
    """The limiter's specification, in exact arithmetic and without memory bounds."""

    def __init__(self, mps: int, mpm: int, burst: int) -> None:
        self.mps, self.mpm, self.burst = mps, mpm, burst
        self.tokens = Fraction(burst)
        self.updated: Fraction | None = None
        self.accepted: list[Fraction] = []

    def _tokens(self, now: Fraction) -> Fraction:
        if self.updated is None:
            return Fraction(self.burst)
        return min(Fraction(self.burst), self.tokens + (now - self.updated) * self.mps)

    def _in_window(self, now: Fraction, window: int) -> list[Fraction]:
        return [t for t in self.accepted if now < t + window]

    def retry_after(self, now: Fraction) -> Fraction:
        waits = [Fraction(0)]
        tokens = self._tokens(now)
        if tokens < 1:
            waits.append((1 - tokens) / self.mps)
        for limit, window in ((self.mps, 1), (self.mpm, 60)):
            inside = self._in_window(now, window)
            if len(inside) >= limit:
                waits.append(inside[-limit] + window - now)
        return max(waits)

    def check(self, now: Fraction) -> bool:
        if self.retry_after(now) > 0:
            return False
        self.tokens = self._tokens(now) - 1
        self.updated = now
        self.accepted.append(now)
        return True


configs = st.tuples(st.integers(1, 6), st.integers(1, 30), st.integers(1, 10))
# Steps in 1/64 s: mostly small, sometimes across whole windows.
steps = st.one_of(st.integers(0, 32), st.integers(0, 64 * 70))


def assert_limits_hold(times: list[Fraction], mps: int, mpm: int, burst: int, slack: Fraction) -> None:
    """No half-open window [a, a + 1) holds more than mps accepted messages,
    none of [a, a + 60) more than mpm, and no span more than burst + rate * span."""
    for i in range(len(times) - mps):
        assert times[i + mps] - times[i] >= 1 - slack
    for i in range(len(times) - mpm):
        assert times[i + mpm] - times[i] >= 60 - slack
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + mps * (times[j] - times[i] + slack)


@settings(max_examples=300, deadline=None)
@given(config=configs, ops=st.lists(st.tuples(steps, st.integers(1, 4)), max_size=150))
def test_limiter_matches_an_exact_model(config: tuple[int, int, int], ops: list[tuple[int, int]]) -> None:
    mps, mpm, burst = config
    limiter, clock = make(mps=mps, mpm=mpm, burst=burst)
    model = Model(mps, mpm, burst)
    accepted: list[float] = []
    for step, repeat in ops:
        clock.advance(step / 64)
        for _ in range(repeat):
            now = Fraction(clock.now)
            expected_wait = model.retry_after(now)
            assert limiter.retry_after("c") == pytest.approx(float(expected_wait), abs=1e-9)
            allowed = limiter.check("c")
            assert allowed == model.check(now)
            assert allowed == (expected_wait == 0)
            if allowed:
                accepted.append(clock.now)
        stats = limiter.get_stats("c")
        now = Fraction(clock.now)
        if model.updated is not None:
            assert stats["tokens_remaining"] == model._tokens(now)
            assert stats["per_second_count"] == len(model._in_window(now, 1))
            assert stats["per_minute_count"] == len(model._in_window(now, 60))

    assert_limits_hold([Fraction(t) for t in accepted], mps, mpm, burst, slack=Fraction(0))
    assert limiter.statistics().allowed == len(accepted)


# Arbitrary float steps (not exact in binary), or ``None``: advance by exactly
# ``retry_after``, which must then succeed.
float_steps = st.one_of(st.floats(0, 0.5), st.floats(0, 70), st.none())


@settings(max_examples=300, deadline=None)
@given(
    config=configs,
    start=st.sampled_from([0.0, 0.1, 1234.5678, 1e6 + 0.3]),
    ops=st.lists(st.tuples(float_steps, st.integers(1, 4)), max_size=150),
)
def test_limits_hold_with_any_float_clock(config: tuple[int, int, int], start: float, ops: list[tuple[float | None, int]]) -> None:
    mps, mpm, burst = config
    limiter, clock = make(mps=mps, mpm=mpm, burst=burst, now=start)
    accepted: list[float] = []
    for step, repeat in ops:
        if step is None:
            clock.advance(limiter.retry_after("c"))
            assert limiter.retry_after("c") == 0.0
        else:
            clock.advance(step)
        for _ in range(repeat):
            wait = limiter.retry_after("c")
            allowed = limiter.check("c")
            assert allowed == (wait == 0.0)
            if allowed:
                accepted.append(clock.now)
    assert_limits_hold([Fraction(t) for t in accepted], mps, mpm, burst, slack=Fraction(1, 10**8))


# -- SlidingWindowLimit -------------------------------------------------------


def make_window(limit: int = 3, window: float = 60.0, *, now: float = 0.0) -> tuple[SlidingWindowLimit, FakeClock]:
    clock = FakeClock(now)
    return SlidingWindowLimit(limit, window, clock=clock), clock


def test_window_limit_allows_limit_hits_per_window() -> None:
    limit, clock = make_window(3, 60.0)
    assert [limit.hit("u") for _ in range(4)] == [True, True, True, False]
    assert limit.count("u") == 3
    assert limit.retry_after("u") == 60.0
    clock.now = 59.5
    assert not limit.hit("u")
    assert limit.retry_after("u") == 0.5
    clock.now = 60.0
    assert limit.retry_after("u") == 0.0
    assert [limit.hit("u") for _ in range(4)] == [True, True, True, False]


def test_window_limit_slides_one_hit_at_a_time() -> None:
    limit, clock = make_window(2, 10.0)
    assert limit.hit("u")
    clock.now = 4.0
    assert limit.hit("u")
    clock.now = 9.0
    assert not limit.hit("u")  # refused: not recorded
    assert limit.count("u") == 2
    clock.now = 10.0
    assert limit.hit("u")  # the hit of t=0 left
    assert not limit.hit("u")
    assert limit.retry_after("u") == 4.0  # until the hit of t=4 leaves
    clock.now = 14.0
    assert limit.hit("u")


def test_window_limit_keys_are_independent() -> None:
    limit, _ = make_window(1, 60.0)
    assert limit.hit("alice")
    assert not limit.hit("alice")
    assert limit.hit("bob")
    assert limit.hit(("room", 1))
    assert len(limit) == 3


def test_window_limit_zero_is_unlimited() -> None:
    limit, _ = make_window(0, 60.0)
    assert all(limit.hit("u") for _ in range(1000))
    assert limit.retry_after("u") == 0.0
    assert limit.count("u") == 0
    assert len(limit) == 0


def test_window_limit_forget_and_cleanup() -> None:
    limit, clock = make_window(1, 60.0)
    assert limit.hit("a")
    clock.now = 10.0
    assert limit.hit("b")
    assert not limit.hit("b")
    limit.forget("b")
    limit.forget("nobody")
    assert limit.hit("b")
    clock.now = 30.0
    assert limit.hit("c")
    clock.now = 40.0
    assert limit.cleanup(30.0) == 1  # a (idle 40); b idle exactly 30 stays
    assert len(limit) == 2
    assert limit.cleanup(5.0) == 2
    assert len(limit) == 0
    with pytest.raises(ValueError, match="idle"):
        limit.cleanup(-1.0)


def test_window_limit_memory_is_bounded() -> None:
    limit, clock = make_window(5, 60.0)
    for _ in range(10_000):
        limit.hit("u")
        clock.advance(0.125)
    assert len(limit._keys["u"].stamps) <= 5


def test_window_limit_validation() -> None:
    with pytest.raises(ValueError, match="limit"):
        SlidingWindowLimit(-1, 60.0)
    with pytest.raises(TypeError, match="limit"):
        SlidingWindowLimit(1.5, 60.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="limit"):
        SlidingWindowLimit(True, 60.0)
    for window in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="window"):
            SlidingWindowLimit(1, window)
    limit = SlidingWindowLimit(30, 60)
    assert (limit.limit, limit.window) == (30, 60.0)
    assert limit.hit("u")  # real monotonic clock by default


@settings(max_examples=200, deadline=None)
@given(
    limit_and_window=st.tuples(st.integers(1, 8), st.integers(1, 20)),
    ops=st.lists(st.tuples(st.one_of(st.integers(0, 64 * 25), st.none()), st.integers(1, 3)), max_size=150),
)
def test_window_limit_holds_over_any_sequence(limit_and_window: tuple[int, int], ops: list[tuple[int | None, int]]) -> None:
    n, window = limit_and_window
    limit, clock = make_window(n, float(window))
    accepted: list[float] = []
    for step, repeat in ops:
        clock.advance(limit.retry_after("u") if step is None else step / 64)
        for _ in range(repeat):
            inside = [t for t in accepted if clock.now < t + window]
            expected = len(inside) < n
            assert (limit.retry_after("u") == 0.0) == expected
            assert limit.hit("u") == expected
            if expected:
                accepted.append(clock.now)
            assert limit.count("u") == len([t for t in accepted if clock.now < t + window])
    for i in range(len(accepted) - n):
        assert accepted[i + n] - accepted[i] >= window
