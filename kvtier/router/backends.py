"""What the router knows of each instance: its KV-event index, its health, its load (all in this process).

The load is the work ahead of a new request's first token there, in prefill tokens: the uncached
prompt tokens of the requests this router sent it that have no first token yet, less what the instance
has presumably done of them since its last first token (its prefill rate, learned online from the
streamed first tokens it sent back, times the time since), plus its decoding requests. vLLM schedules
prefills first come, first served, so a request's wait is about the prefill queued ahead of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.config import RouterInstance
from kvtier.storage.events import EventSubscriber

log = logging.getLogger("kvtier.router")


@dataclass
class Backend:
    """One instance. Counters are changed on the router's event loop only (plus ``healthy`` by the checker)."""

    config: RouterInstance
    subscriber: EventSubscriber | None = None
    healthy: bool = True
    failures: int = 0
    requests: int = 0  # forwarded to it (answered with a response)
    retried_away: int = 0  # requests that failed to start here and went elsewhere
    rate_decay: float = 0.9  # weight of the older samples in the prefill rate, per sample
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    pending: dict[int, int] = field(default_factory=dict)  # request -> its uncached prompt tokens, till its first token
    decoding: int = 0  # requests past their first token, still streaming
    busy_since: float | None = None  # since when pending prefill has been worked on (last first token or arrival)
    # the prefill rate, as decayed sums of tokens done and the busy seconds they took (streamed requests only)
    rate_tokens: float = 0.0
    rate_seconds: float = 0.0
    _serial: int = 0

    @property
    def in_flight(self) -> int:
        return len(self.pending) + self.decoding

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """The learned prefill rate, None before the first sample."""
        return self.rate_tokens / self.rate_seconds if self.rate_seconds > 0 else None

    @property
    def queued_prefill_tokens(self) -> int:
        """Uncached prompt tokens still to prefill for the pending requests: their sum, less the learned rate
        times the time since the instance last finished one (never below 0; the whole sum while no rate is
        known yet)."""
        total = sum(self.pending.values())
        rate = self.prefill_tokens_per_s
        if not total or rate is None or self.busy_since is None:
            return total
        return max(0, round(total - rate * (self.clock() - self.busy_since)))

    def dispatched(self, prefill_tokens: int) -> int:
        """A request sent here with ``prefill_tokens`` uncached prompt tokens; returns its handle."""
        self._serial += 1
        if not self.pending:
            self.busy_since = self.clock()
        self.pending[self._serial] = max(0, prefill_tokens)
        return self._serial

    def first_token(self, handle: int, learn: bool) -> None:
        """The request's first response bytes came back: its prefill is done. ``learn``: its timing is a rate
        sample (a streamed response; a non-streamed one answers only when its decode is done too)."""
        tokens = self.pending.pop(handle, None)
        if tokens is None:
            return
        now = self.clock()
        if learn and self.busy_since is not None:
            # busy time since the last first token (or since work arrived) went into this request's prefill
            # (first come, first served); at least one token's worth, so a cached prompt still counts a step
            self.rate_tokens = self.rate_decay * self.rate_tokens + max(1, tokens)
            self.rate_seconds = self.rate_decay * self.rate_seconds + max(0.0, now - self.busy_since)
        self.busy_since = now if self.pending else None
        self.decoding += 1

    def finished(self, handle: int, started: bool) -> None:
        """The request is over (``started``: it had had its first token)."""
        if started:
            self.decoding -= 1
        elif self.pending.pop(handle, None) is not None and not self.pending:
            self.busy_since = None

    @property
    def url(self) -> str:
        return self.config.url.rstrip("/")

    @property
    def index_usable(self) -> bool:
        """A subscriber whose index has no unrepaired gap."""
        return self.subscriber is not None and not self.subscriber.stale

    def mark_dead(self, why: str, after: int) -> None:
        if self.healthy:
            log.warning("router: instance %s dropped: %s", self.url, why)
        self.healthy = False
        self.failures = max(self.failures, after)

    def health_result(self, ok: bool, after: int) -> None:
        if ok:
            if not self.healthy:
                log.info("router: instance %s is back", self.url)
            self.healthy, self.failures = True, 0
        else:
            self.failures += 1
            if self.failures >= after:
                self.mark_dead(f"{self.failures} failed health checks", after)

    def snapshot(self) -> dict[str, object]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "decoding": self.decoding,
            "queued_prefill_tokens": self.queued_prefill_tokens,
            "prefill_tokens_per_s": None if (r := self.prefill_tokens_per_s) is None else round(r, 1),
            "requests": self.requests,
            "retried_away": self.retried_away,
            "index": None
            if self.subscriber is None
            else {
                "stale": self.subscriber.stale,
                "next_seq": self.subscriber.index.next_seq,
                "chunks": {m: len(h) for m, h in self.subscriber.index.snapshot().items()},
            },
        }
