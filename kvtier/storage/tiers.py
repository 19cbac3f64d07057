"""The tier stack: L1 -> L2 (-> L3), with promotion and bounded write-behind.

* ``put`` writes the first ``sync_tiers`` tiers synchronously (1: the memory
  tier; 0 when there is none, so disk and Redis I/O never run on the caller's
  thread) and queues the chunks for the other tiers on one background writer
  thread. The queue is bounded in bytes:
  when it is full the write is dropped and counted, never waited for, so a
  slow disk cannot stall inference.
* ``locate`` answers from the tiers' in-memory indexes, top tier first.
* ``promote`` copies chunks found in a lower tier into the tiers above it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.chunk import Chunk
from kvtier.keys import ChunkKey
from kvtier.metrics import KvtierMetrics
from kvtier.storage.base import BackendStats, StorageBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _WriteJob:
    chunks: tuple[Chunk, ...]
    tiers: tuple[int, ...]
    nbytes: int


_STOP = object()


class TierStack:
    """An ordered list of backends, fastest first. Thread-safe."""

    def __init__(
        self,
        tiers: Sequence[StorageBackend],
        *,
        write_queue_bytes: int,
        metrics: KvtierMetrics | None = None,
        sync_tiers: int = 1,
    ) -> None:
        if not tiers:
            raise ValueError("a TierStack needs at least one tier")
        if not 0 <= sync_tiers <= len(tiers):
            raise ValueError(f"sync_tiers must be in [0, {len(tiers)}], got {sync_tiers}")
        self.sync_tiers = sync_tiers
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers: tuple[StorageBackend, ...] = tuple(tiers)
        self.write_queue_bytes = write_queue_bytes
        self.metrics = metrics if metrics is not None else KvtierMetrics()
        self.metrics.watch_backends(self.stats)
        self._queue: queue.Queue[_WriteJob | object] = queue.Queue()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._queued_keys: Counter[ChunkKey] = Counter()
        self._dropped_writes = 0
        self._write_errors = 0
        self._writer: threading.Thread | None = None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def start(self) -> None:
        """Start every backend and the writer thread. Idempotent."""
        for t in self.tiers:
            t.start()
        if self._writer is None and len(self.tiers) > self.sync_tiers:
            self._writer = threading.Thread(target=self._write_loop, name="kvtier-write-behind", daemon=True)
            self._writer.start()

    def close(self) -> None:
        """Finish queued writes, stop the writer and close every backend."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        for t in self.tiers:
            t.close()

    def __enter__(self) -> TierStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -------------------------------------------------------------------------------------------------

    def locate(self, keys: Sequence[ChunkKey], *, count_misses: bool = True) -> list[int | None]:
        """For each key, the index of the highest tier holding it, or None.

        ``count_misses=False`` is for speculative probes (partial-chunk
        candidates) that should not show up as tier misses in the metrics.
        """
        where: list[int | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for ti, tier in enumerate(self.tiers):
            if not todo:
                break
            with self.metrics.timed(tier.name, "contains"):
                present = tier.contains([keys[i] for i in todo])
            for i, ok in zip(todo, present, strict=True):
                if ok:
                    where[i] = ti
            todo = [i for i in todo if where[i] is None]
            if count_misses and todo:
                self.metrics.misses.labels(tier.name).inc(len(todo))
        return where

    def get(self, keys: Sequence[ChunkKey], where: Sequence[int]) -> list[Chunk | None]:
        """Fetch each key from the tier ``where`` says holds it (one batched call per tier)."""
        found: list[Chunk | None] = [None] * len(keys)
        for ti, tier in enumerate(self.tiers):
            idx = [i for i, w in enumerate(where) if w == ti]
            if idx:
                with self.metrics.timed(tier.name, "get"):
                    got = tier.get([keys[i] for i in idx])
                for i, chunk in zip(idx, got, strict=True):
                    found[i] = chunk
                hits = [c for c in got if c is not None]
                self.metrics.hits.labels(tier.name).inc(len(hits))
                self.metrics.bytes_read.labels(tier.name).inc(sum(c.payload.nbytes for c in hits))
        return found

    def _put(self, ti: int, chunks: Sequence[Chunk]) -> int:
        tier = self.tiers[ti]
        with self.metrics.timed(tier.name, "put"):
            accepted = tier.put(chunks)
        self.metrics.bytes_written.labels(tier.name).inc(
            sum(c.payload.nbytes for c, ok in zip(chunks, accepted, strict=True) if ok)
        )
        return sum(accepted)

    def discard(self, key: ChunkKey) -> None:
        """Remove a key from every tier (used when a chunk proves to be wrong)."""
        for t in self.tiers:
            t.delete([key])

    # -- writes ------------------------------------------------------------------------------------------------

    def put(self, chunks: Sequence[Chunk]) -> int:
        """Store new chunks: the first ``sync_tiers`` tiers now, the rest in the background.

        Returns how many chunks the first tier took (with ``sync_tiers=0``: how
        many were queued; a full queue drops them, counted in ``dropped_writes``).
        """
        if not chunks:
            return 0
        accepted = [self._put(ti, chunks) for ti in range(self.sync_tiers)]
        queued = self._enqueue(chunks, tuple(range(self.sync_tiers, len(self.tiers))))
        return accepted[0] if accepted else (len(chunks) if queued else 0)

    def promote(self, chunks: Sequence[Chunk], source_tier: int) -> None:
        """Copy chunks read from ``source_tier`` into the tiers above it (the synchronous ones now)."""
        if source_tier <= 0 or not chunks:
            return
        for ti in range(min(self.sync_tiers, source_tier)):
            self._put(ti, chunks)
        self._enqueue(chunks, tuple(range(self.sync_tiers, source_tier)))

    def _enqueue(self, chunks: Sequence[Chunk], tiers: tuple[int, ...]) -> bool:
        if not tiers:
            return False
        nbytes = sum(c.nbytes for c in chunks)
        with self._lock:
            if self._queued_bytes + nbytes > self.write_queue_bytes:
                self._dropped_writes += len(chunks)
                self.metrics.dropped_writes.inc(len(chunks))
                log.warning(
                    "write-behind queue full: dropped %d chunks for %s", len(chunks), [self.names[t] for t in tiers]
                )
                return False
            self._queued_bytes += nbytes
            self._in_flight += 1
            self._queued_keys.update(c.key for c in chunks)
        self._queue.put(_WriteJob(tuple(chunks), tiers, nbytes))
        return True

    def queued(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys wait in the write-behind queue (not yet readable from their tiers)."""
        with self._lock:
            return [k in self._queued_keys for k in keys]

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            assert isinstance(job, _WriteJob)
            for ti in job.tiers:
                try:
                    self._put(ti, job.chunks)
                except Exception:  # a failing tier must not kill the writer; it is counted and logged
                    log.exception("write-behind to %s failed", self.tiers[ti].name)
                    with self._lock:
                        self._write_errors += 1
            with self._lock:
                self._queued_bytes -= job.nbytes
                self._in_flight -= 1
                self._queued_keys.subtract(c.key for c in job.chunks)
                self._queued_keys = +self._queued_keys
                self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Block until queued writes are done; False if ``timeout`` passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    # -- inspection --------------------------------------------------------------------------------------------

    def stats(self) -> list[BackendStats]:
        return [t.stats() for t in self.tiers]

    @property
    def dropped_writes(self) -> int:
        with self._lock:
            return self._dropped_writes

    @property
    def write_errors(self) -> int:
        with self._lock:
            return self._write_errors
