"""What the router knows of each instance: its KV-event index, its health, its load (all in this process).

The load is the work ahead of a new request's first token there, in prefill tokens: the uncached
prompt tokens of the requests this router sent it that have no first token yet, less what the instance
has presumably done of them since its last first token (its prefill rate, learned online from the
streamed first tokens it sent back, times the time since), plus its decoding requests. vLLM schedules
prefills first come, first served, so a request's wait is about the prefill queued ahead of it.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.config import RouterInstance
from kvtier.storage.events import EventSubscriber

log = logging.getLogger("kvtier.router")


def _pack(tokens: tuple[int, ...]) -> bytes:
    """Token ids as little-endian 4-byte words (ids >= 2**32 are folded: a hint, never a correctness input)."""
    return struct.pack(f"<{len(tokens)}I", *(t & 0xFFFFFFFF for t in tokens))


def _common_tokens(a: bytes, b: bytes) -> int:
    """Leading tokens two packed sequences share: a binary search over slice equality (memcmp)."""
    lo, hi = 0, min(len(a), len(b)) // 4
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[: 4 * mid] == b[: 4 * mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
    # prompts it was sent, still in flight or finished within the hint's life: (salt, tokens, expiry or None)
    # (tokens packed 4 bytes each: compact, and compared by memcmp)
    sent: dict[int, tuple[str | None, bytes, float | None]] = field(default_factory=dict)
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

    def dispatched(
        self, prefill_tokens: int, tokens: tuple[int, ...] = (), salt: str | None = None, max_sent: int = 0
    ) -> int:
        """A request sent here with ``prefill_tokens`` uncached prompt tokens; returns its handle. Its prompt
        ``tokens`` (of tenant ``salt``) are kept as a hint of what the instance holds (at most ``max_sent``)."""
        self._serial += 1
        if not self.pending:
            self.busy_since = self.clock()
        self.pending[self._serial] = max(0, prefill_tokens)
        if tokens and max_sent > 0:
            self.sent[self._serial] = (salt, _pack(tokens), None)
            while len(self.sent) > max_sent:
                del self.sent[next(iter(self.sent))]
        return self._serial

    def sent_match(self, tokens: tuple[int, ...], salt: str | None, block: int = 1) -> int:
        """Leading tokens of ``tokens`` shared with a prompt sent here (in flight, or finished and unexpired),
        in whole ``block``s (the index's granularity: a few shared template tokens are no hit).

        Bridges the time from a request's prefill to its chunks' store events (stores run when a request
        finishes): the instance's engine holds the prefix in between, the KV-event index does not know yet."""
        now = self.clock()
        for h in [h for h, (_, _, exp) in self.sent.items() if exp is not None and exp <= now]:
            del self.sent[h]
        if not tokens:
            return 0
        key = _pack(tokens)
        best = 0
        for s, toks, _ in self.sent.values():
            if s == salt and toks[:4] == key[:4]:
                best = max(best, _common_tokens(toks, key))
        return best // max(1, block) * max(1, block)

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

    def finished(self, handle: int, started: bool, sent_life_s: float = 0.0) -> None:
        """The request is over (``started``: it had had its first token); its prompt stays a hint for
        ``sent_life_s`` more seconds (the time its store takes to reach the index), if it had started."""
        if started:
            self.decoding -= 1
        elif self.pending.pop(handle, None) is not None and not self.pending:
            self.busy_since = None
        hint = self.sent.get(handle)
        if hint is not None:
            if started and sent_life_s > 0:
                self.sent[handle] = (hint[0], hint[1], self.clock() + sent_life_s)
            else:
                del self.sent[handle]

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
