"""Pure helpers of bench/serving.py: log lines -> loads, token timestamps -> gaps, arrivals, load-run summaries.

Nothing here starts a process or talks to a server, so all of it is tested
(tests/test_bench_serving.py) on exact inputs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from statistics import mean, median
from typing import Any

from harness import percentile

# kvtier's worker (kvtier/adapters/vllm/worker.py): "request R: loaded N tokens [a, b) from kvtier (TIERS) in X ms"
KVTIER_LOAD = re.compile(r"loaded (\d+) tokens \[\d+, \d+\) from kvtier \(([^)]*)\) in ([0-9.]+) ms")
# LMCache's MP server (engine_driven_transfer.py): "Retrieved N tokens in S seconds"
LMCACHE_RETRIEVE = re.compile(r"Retrieved (\d+) tokens in ([0-9.]+) seconds")
# LMCache's MP server (storage_manager.py), its lookup's prefetch into memory, before the retrieve:
# "Prefetch request completed (L1+L2): 2/2 retained keys (0 L1, 2 L2) in 17.5 ms"
LMCACHE_PREFETCH = re.compile(
    r"Prefetch request completed \(L1\+L2\): \d+/\d+ retained keys \((\d+) L1, (\d+) L2\) in ([0-9.]+) ms"
)


@dataclass(frozen=True)
class Load:
    """One load of cached KV into vLLM's blocks as the system's own log reports it."""

    tokens: int
    seconds: float
    source: str  # kvtier: the tiers it names ("l1", "l2", "l1+l2"...); LMCache: "lmcache"


def kvtier_loads(text: str) -> list[Load]:
    """kvtier's load lines in ``text`` that loaded something (lines of 0 tokens are misses)."""
    out = []
    for m in KVTIER_LOAD.finditer(text):
        if int(m.group(1)) > 0:
            out.append(Load(int(m.group(1)), float(m.group(3)) / 1e3, m.group(2)))
    return out


def lmcache_loads(text: str) -> list[Load]:
    """LMCache's "Retrieved" lines in ``text`` that retrieved something."""
    return [
        Load(int(m.group(1)), float(m.group(2)), "lmcache")
        for m in LMCACHE_RETRIEVE.finditer(text)
        if int(m.group(1)) > 0
    ]


@dataclass(frozen=True)
class Prefetch:
    """One LMCache prefetch: chunks already in its memory (L1), chunks read from its disk tier (L2), time."""

    l1_chunks: int
    l2_chunks: int
    seconds: float


def lmcache_prefetches(text: str) -> list[Prefetch]:
    """LMCache's prefetch lines in ``text``."""
    return [
        Prefetch(int(m.group(1)), int(m.group(2)), float(m.group(3)) / 1e3) for m in LMCACHE_PREFETCH.finditer(text)
    ]


def load_summary(loads: Sequence[Load], bytes_per_token: int) -> dict[str, Any]:
    """Tokens, seconds and GB/s (10^9 bytes of the model's KV, its dtype as served) over ``loads``."""
    tokens = sum(x.tokens for x in loads)
    seconds = sum(x.seconds for x in loads)
    return {
        "load_tokens": tokens,
        "load_s": seconds if loads else None,
        "load_bytes": tokens * bytes_per_token,
        "load_gbps": tokens * bytes_per_token / seconds / 1e9 if seconds > 0 else None,
        "load_sources": sorted({x.source for x in loads}),
    }


# -- inter-token gaps ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gaps:
    """A streaming decode's inter-token gaps around another request.

    ``baseline`` are the gaps that ended before the other request was sent (the steady decode, the first
    ``skip`` gaps left out); ``window`` those that ended in ``[start, end]`` (the other request's life,
    plus the tail the caller chose)."""

    baseline: list[float]
    window: list[float]

    @property
    def p50_s(self) -> float | None:
        return median(self.baseline) if self.baseline else None

    @property
    def max_s(self) -> float | None:
        return max(self.window) if self.window else None


def gaps_around(token_times: Sequence[float], start: float, end: float, *, skip: int = 2) -> Gaps:
    """Split the gaps between consecutive ``token_times`` (seconds, one clock) by when each gap ended:
    before ``start`` -> baseline (after the first ``skip``), within ``[start, end]`` -> window."""
    baseline, window = [], []
    for i in range(1, len(token_times)):
        gap, ended = token_times[i] - token_times[i - 1], token_times[i]
        if ended < start:
            if i > skip:
                baseline.append(gap)
        elif ended <= end:
            window.append(gap)
        # a gap that ended after ``end`` spans nothing the other request did
    return Gaps(baseline, window)


def gaps(token_times: Sequence[float]) -> list[float]:
    """The gaps between consecutive timestamps."""
    return [b - a for a, b in pairwise(token_times)]


# -- the load scenario -----------------------------------------------------------------------------------------


def arrival_offsets(n: int, qps: float) -> list[float]:
    """Send offsets (s) of ``n`` requests at a fixed rate of ``qps``: 0, 1/qps, 2/qps, ..."""
    if qps <= 0:
        raise ValueError(f"qps must be positive, got {qps}")
    return [i / qps for i in range(n)]


def round_robin(users: int, rounds: int) -> list[tuple[int, int]]:
    """(user, round) in send order: every user's round 0, then every user's round 1, ..."""
    return [(u, r) for r in range(rounds) for u in range(users)]


@dataclass(frozen=True)
class Request:
    """What the load scenario keeps of one request (times in seconds on one clock)."""

    user: int
    round: int
    sent: float
    ttft_s: float | None
    done: float | None
    completion_tokens: int
    token_times: tuple[float, ...]
    error: str | None = None


def summarize_level(requests: Iterable[Request]) -> dict[str, Any]:
    """One QPS level: TTFT mean/p50/p90 of returning rounds (round >= 1) and of round 0, inter-token
    gap p50/p99 over every request's stream, output tokens/s over the level's span (first send to
    last completion), request counts."""
    reqs = list(requests)
    ok = [r for r in reqs if r.error is None and r.ttft_s is not None and r.done is not None]
    back = [r.ttft_s for r in ok if r.round > 0]
    first = [r.ttft_s for r in ok if r.round == 0]
    itl = [g for r in ok for g in gaps(r.token_times)]
    span = max((r.done for r in ok), default=0.0) - min((r.sent for r in reqs), default=0.0)
    out_tokens = sum(r.completion_tokens for r in ok)
    return {
        "ttft_mean_s": mean(back) if back else None,
        "ttft_p50_s": median(back) if back else None,
        "ttft_p90_s": percentile(back, 90),
        "ttft_round0_mean_s": mean(first) if first else None,
        "itl_p50_s": median(itl) if itl else None,
        "itl_p99_s": percentile(itl, 99),
        "itl_max_s": max(itl) if itl else None,
        "output_tokens": out_tokens,
        "output_tokens_per_sec": out_tokens / span if span > 0 else None,
        "span_s": span if ok else None,
        "requests": len(reqs),
        "requests_returning": len(back),
        "errors": sum(r.error is not None for r in reqs),
    }
