"""The circuit breaker on a fake clock: closed, open for an interval after a failure, one probe, rate-limited logs."""

from __future__ import annotations

import logging
import threading

import pytest

from kvtier.storage.breaker import CircuitBreaker

LOGGER = "kvtier.test.breaker"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _breaker(clock: Clock, interval: float = 2.0, **kwargs: float) -> CircuitBreaker:
    return CircuitBreaker("tier x", interval, logger=logging.getLogger(LOGGER), clock=clock, **kwargs)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_closed_until_a_failure_then_open_for_the_interval_then_one_probe(clock: Clock) -> None:
    b = _breaker(clock)
    assert [b.allow() for _ in range(3)] == [True] * 3 and not b.is_open
    b.failure("get", OSError("refused"))
    assert b.is_open and not b.allow()
    clock.now += 1.99
    assert not b.allow()
    clock.now += 0.01
    assert b.allow()  # the probe
    assert [b.allow() for _ in range(3)] == [False] * 3  # everyone else waits while it runs
    b.success()
    assert not b.is_open and b.allow() and b.allow()


def test_a_failed_probe_opens_it_for_another_interval(clock: Clock) -> None:
    b = _breaker(clock)
    b.failure("get", OSError())
    clock.now += 2.0
    assert b.allow()
    b.failure("get", TimeoutError())
    assert not b.allow()
    clock.now += 1.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow() and not b.allow()


def test_a_zero_interval_never_refuses(clock: Clock) -> None:
    b = _breaker(clock, 0.0)
    b.failure("put", OSError())
    assert b.allow() and b.allow() and b.is_open
    b.success()
    assert not b.is_open


def test_failures_are_logged_at_most_once_per_interval_and_recovery_once(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    b = _breaker(clock, 0.5, min_log_interval_s=1.0)  # logs at most once a second although it retries sooner
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b.failure("get", OSError("refused"))
        clock.now += 0.5
        b.failure("put", OSError("refused"))
        clock.now += 0.5
        b.failure("contains", TimeoutError("timed out"))
        b.success()
        b.success()
    assert _warnings(caplog) == [
        "tier x: get failed (OSError: refused); answering misses for 0.5s",
        "tier x: contains failed (TimeoutError: timed out); answering misses for 0.5s",
    ]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == ["tier x: reachable again"]


def test_one_probe_among_racing_threads(clock: Clock) -> None:
    b = _breaker(clock)
    b.failure("get", OSError())
    clock.now += 2.0
    start = threading.Barrier(8)
    allowed: list[bool] = []

    def race() -> None:
        start.wait()
        allowed.append(b.allow())

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(allowed) == [False] * 7 + [True]
