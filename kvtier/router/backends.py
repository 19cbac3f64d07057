"""What the router knows of each instance: its KV-event index, its health, its load (all in this process)."""

from __future__ import annotations

import logging
import threading
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
    in_flight: int = 0
    queued_prefill_tokens: int = 0
    requests: int = 0  # forwarded to it (answered with a response)
    retried_away: int = 0  # requests that failed to start here and went elsewhere
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
            "queued_prefill_tokens": self.queued_prefill_tokens,
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
