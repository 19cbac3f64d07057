"""A circuit breaker for a remote tier: after a failure, stop calling for a while, then probe once.

Closed, every call may go ahead. A failure opens it: for ``retry_interval_s``
:meth:`CircuitBreaker.allow` answers False (the caller answers a miss
without touching the network). Once the interval has passed, the next
``allow`` lets exactly one call through, the probe, and the interval starts
again for everyone else while it runs; its success closes the breaker, its
failure keeps it open. So a dead or black-holed server costs at most one
timeout per interval.

Failures are logged at WARNING, at most once per ``retry_interval_s`` (and
at most once per ``min_log_interval_s``); recovery is logged at INFO. The
breaker keeps no counters: its caller counts what it reports. Thread-safe;
``clock`` (monotonic seconds) is injectable for tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Breaker state of one remote target; ``what`` names it in log messages (credentials redacted by the caller)."""

    def __init__(
        self,
        what: str,
        retry_interval_s: float,
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_log_interval_s: float = 1.0,
    ) -> None:
        self.what = what
        self.retry_interval_s = retry_interval_s
        self._log = logger or logging.getLogger(__name__)
        self._clock = clock
        self._log_interval = max(retry_interval_s, min_log_interval_s)
        self._lock = threading.Lock()
        self._retry_at = float("-inf")  # before this time every call is refused
        self._tripped = False  # the last call failed (a probe is due once _retry_at passes)
        self._last_log = float("-inf")

    @property
    def is_open(self) -> bool:
        """Whether the last call failed (calls are refused, or the next one is the probe)."""
        with self._lock:
            return self._tripped

    def allow(self) -> bool:
        """Whether a call may go ahead now: closed, or this call is the probe after the interval."""
        with self._lock:
            now = self._clock()
            if now < self._retry_at:
                return False
            if self._tripped:
                self._retry_at = now + self.retry_interval_s  # others are refused while this probe runs
            return True

    def failure(self, op: str, exc: BaseException) -> None:
        """Record a failed call: open (again) for ``retry_interval_s``; logged, rate-limited."""
        with self._lock:
            now = self._clock()
            self._tripped = True
            self._retry_at = now + self.retry_interval_s
            loud = now - self._last_log >= self._log_interval
            if loud:
                self._last_log = now
        if loud:
            self._log.warning(
                "%s: %s failed (%s: %s); answering misses for %.1fs",
                self.what,
                op,
                type(exc).__name__,
                exc,
                self.retry_interval_s,
            )

    def success(self) -> None:
        """Record a successful call: closed."""
        with self._lock:
            recovered, self._tripped = self._tripped, False
            self._retry_at = float("-inf")
        if recovered:
            self._log.info("%s: reachable again", self.what)
