"""Prometheus metrics: per-tier hits, misses, bytes, errors and latency; engine-level token counts.

Each :class:`KvtierMetrics` owns its own ``CollectorRegistry`` (no global
state): an engine built without one gets a private instance, and several
engines can share one by passing the same object. ``render`` gives the text
exposition for library users; ``serve`` exposes ``/metrics`` over HTTP.
Backend state that the backends already count (entries, bytes held,
evictions, corrupt reads, refused puts) is read from ``stats()`` at scrape
time rather than counted twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvtier.storage.base import BackendStats

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _BackendCollector(Collector):
    def __init__(self, sources: list[Callable[[], Sequence[BackendStats]]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        entries = GaugeMetricFamily("kvtier_tier_entries", "Chunks held by a tier", labels=["tier"])
        used = GaugeMetricFamily("kvtier_tier_used_bytes", "Bytes held by a tier", labels=["tier"])
        budget = GaugeMetricFamily(
            "kvtier_tier_budget_bytes", "Byte budget of a tier (0: managed elsewhere)", labels=["tier"]
        )
        evictions = CounterMetricFamily("kvtier_tier_evictions", "Chunks evicted by a tier", labels=["tier"])
        corrupt = CounterMetricFamily("kvtier_tier_corrupt", "Chunks dropped on read as corrupt", labels=["tier"])
        rejected = CounterMetricFamily("kvtier_tier_rejected_puts", "Chunks a tier refused to store", labels=["tier"])
        stale = CounterMetricFamily(
            "kvtier_tier_stale", "Chunks read in an older chunk format (a miss; a writer removes them)", labels=["tier"]
        )
        forged = CounterMetricFamily(
            "kvtier_tier_forged",
            "Chunks refused by the chunk policy (no valid MAC of their tenant, or another namespace); never decoded",
            labels=["tier"],
        )
        refused = CounterMetricFamily(
            "kvtier_tier_admission_refused", "New chunks a tier's admission filter refused", labels=["tier"]
        )
        for source in self._sources:
            for s in source():
                if s.max_bytes:  # managed elsewhere (Redis): no count beats a wrong one
                    entries.add_metric([s.name], s.entries)
                    used.add_metric([s.name], s.used_bytes)
                budget.add_metric([s.name], s.max_bytes)
                evictions.add_metric([s.name], s.evictions)
                corrupt.add_metric([s.name], s.corrupt)
                rejected.add_metric([s.name], s.rejected_puts)
                stale.add_metric([s.name], s.stale)
                forged.add_metric([s.name], s.forged)
                refused.add_metric([s.name], s.admission_refused)
        yield from (entries, used, budget, evictions, corrupt, rejected, stale, forged, refused)


class KvtierMetrics:
    """The metric families of one or more engines, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.hits = Counter("kvtier_tier_hits", "Chunks found in a tier", ["tier"], registry=r)
        self.misses = Counter("kvtier_tier_misses", "Chunks looked up in a tier and not found", ["tier"], registry=r)
        self.bytes_read = Counter("kvtier_tier_read_bytes", "Payload bytes read from a tier", ["tier"], registry=r)
        self.bytes_written = Counter(
            "kvtier_tier_written_bytes", "Payload bytes written to a tier", ["tier"], registry=r
        )
        self.errors = Counter("kvtier_tier_errors", "Tier operations that raised", ["tier", "op"], registry=r)
        self.latency = Histogram(
            "kvtier_tier_op_seconds",
            "Latency of one batched tier operation",
            ["tier", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.query_tokens = Counter("kvtier_query_tokens", "Prompt tokens looked up by retrieve", registry=r)
        self.hit_tokens = Counter("kvtier_hit_tokens", "Prompt tokens served from a tier", ["tier"], registry=r)
        self.invalid_chunks = Counter(
            "kvtier_invalid_chunks",
            "Chunks refused on read: not the chunk asked for (by what differed)",
            ["reason"],
            registry=r,
        )
        self.dropped_writes = Counter("kvtier_dropped_writes", "Chunk writes dropped by a full queue", registry=r)
        self.deadline_exceeded = Counter(
            "kvtier_deadline_exceeded",
            "Engine calls (lookup, retrieve) that reached their deadline and returned the prefix found so far",
            ["op"],
            registry=r,
        )
        self.queued_bytes = Gauge("kvtier_write_queue_bytes", "Bytes waiting in write-behind queues", registry=r)
        self.queued_chunks = Gauge("kvtier_write_queue_chunks", "Chunks waiting in write-behind queues", registry=r)
        self.engine_latency = Histogram(
            "kvtier_engine_op_seconds",
            "Wall time of one engine call (lookup, retrieve, store) as its caller sees it",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.load_failures = Counter(
            "kvtier_load_failures", "Promised KV an engine adapter could not load (recomputed instead)", registry=r
        )
        # the vLLM connector's transfers between kvtier and the engine's KV blocks
        self.load_seconds = Histogram(
            "kvtier_load_seconds",
            "Wall time of one request's load into the engine's KV blocks (queueing included)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "kvtier_store_seconds",
            "Wall time of one finished request's store, from queueing to its blocks being released",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loads_in_flight = Gauge("kvtier_loads_in_flight", "Requests whose KV is being loaded", registry=r)
        self.store_queue_bytes = Gauge(
            "kvtier_store_queue_bytes", "KV bytes of finished requests waiting to be copied out", registry=r
        )
        self.dropped_stores = Counter(
            "kvtier_dropped_stores", "Finished requests not stored because the store queue was full", registry=r
        )
        self.load_timeouts = Counter(
            "kvtier_load_timeouts", "Loads cut short at their deadline (the rest is recomputed)", registry=r
        )
        self._backend_sources: list[Callable[[], Sequence[BackendStats]]] = []
        self.registry.register(_BackendCollector(self._backend_sources))

    def watch_backends(self, source: Callable[[], Sequence[BackendStats]]) -> None:
        """Report the stats ``source()`` returns at every scrape."""
        self._backend_sources.append(source)

    @contextmanager
    def timed(self, tier: str, op: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.errors.labels(tier, op).inc()
            raise
        finally:
            self.latency.labels(tier, op).observe(time.perf_counter() - start)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> object:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server (call ``shutdown()``)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
