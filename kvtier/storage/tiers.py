"""The tier stack: every tier policy decision, in one place.

Tiers are ordered fastest first. The stack decides, for every backend:

* **who is written when.** Memory tiers (:class:`~kvtier.storage.base.InProcess`,
  the process's own ``l1``, and :class:`~kvtier.storage.base.SharedMemory`, the
  machine's ``node`` tier) are written on the caller's thread; every other tier
  (disk, Redis) by one background writer thread, so no disk or network I/O
  runs in ``put``. The queue is bounded in bytes: when it is full the write
  is dropped and counted, never waited for, so a slow disk cannot stall
  inference. Read-only tiers (:class:`~kvtier.storage.base.ReadOnly`) are
  never written.
* **orphans.** Chunks are written parents first; a chunk whose parent the
  same tier refused in the same call is refused too, without asking the
  tier (it would only push reachable prefixes out). One rule, every tier.
* **promotion.** A chunk read from a lower tier is copied into the writable
  tiers above it: memory ones now, the others through the queue.
* **what counts as held.** ``absent`` is "no tier holds it and no queued
  write will": ``CacheEngine.store`` encodes only those.

``locate`` answers from the tiers' in-memory indexes, top tier first.

**events.** With a :class:`~kvtier.storage.events.TierEvents` observer the
stack reports every chunk a tier took, deleted or cleared, and hands each
writable backend that evicts by itself (the ``on_removed`` attribute) a
callback for its evictions: one observer for every tier.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.chunk import Chunk
from kvtier.deadline import expired
from kvtier.keys import ChunkKey
from kvtier.metrics import KvtierMetrics
from kvtier.security import ChunkPolicy
from kvtier.storage.base import BackendStats, StorageBackend, is_in_process, is_read_only, is_synchronous
from kvtier.storage.events import TierEvents
from kvtier.threads import spread

log = logging.getLogger(__name__)


class WriteBehind:
    """The outcome of one queued write, known once the background writer has run it. Thread-safe.

    ``rejected`` maps each background tier of the job to the chunks it did
    not store (full, refused, or the write failed: ``errors`` counts tiers
    whose write raised).
    """

    def __init__(self, tiers: Sequence[str]) -> None:
        self.tiers = tuple(tiers)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._rejected: dict[str, int] = {}
        self._errors = 0

    def _record(self, tier: str, rejected: int, *, error: bool = False) -> None:
        with self._lock:
            self._rejected[tier] = self._rejected.get(tier, 0) + rejected
            self._errors += error

    def _finish(self) -> None:
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the write ran (True) or ``timeout`` passed (False)."""
        return self._done.wait(timeout)

    @property
    def rejected(self) -> dict[str, int]:
        """Chunks each tier did not store (tiers with none are left out); ValueError while still pending."""
        if not self.done:
            raise ValueError("the write-behind is still pending: wait() first")
        with self._lock:
            return {t: n for t, n in self._rejected.items() if n}

    @property
    def errors(self) -> int:
        with self._lock:
            return self._errors

    def __repr__(self) -> str:
        return f"WriteBehind({list(self.tiers)}, {'done' if self.done else 'pending'})"


@dataclass(frozen=True)
class PutResult:
    """What :meth:`TierStack.put_chunks` did now: the first writable tier's count, every synchronous tier's
    refusals, the chunks a full queue dropped, and the queued write's outcome handle (None: nothing queued)."""

    accepted: int
    rejected: dict[str, int]
    dropped: int
    pending: WriteBehind | None


@dataclass(frozen=True)
class _WriteJob:
    chunks: tuple[Chunk, ...]
    tiers: tuple[int, ...]
    nbytes: int
    outcome: WriteBehind


_STOP = object()


class TierStack:
    """An ordered list of backends, fastest first. Thread-safe.

    Tiers written on the caller's thread (memory: ``l1``, ``node``) must come
    first (a memory tier below a disk tier would be written before the disk
    tier it caches): anything else is a ValueError.
    """

    def __init__(
        self,
        tiers: Sequence[StorageBackend],
        *,
        write_queue_bytes: int,
        metrics: KvtierMetrics | None = None,
        policy: ChunkPolicy | None = None,
        events: TierEvents | None = None,
        store_nice: int = 0,
    ) -> None:
        if not tiers:
            raise ValueError("a TierStack needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        synchronous = [is_synchronous(t) for t in tiers]
        self.sync_tiers = next((i for i, p in enumerate(synchronous) if not p), len(tiers))
        if any(synchronous[self.sync_tiers :]):
            raise ValueError(f"in-process and shared-memory tiers must come before the others, got {names}")
        if write_queue_bytes <= 0:
            raise ValueError(f"write_queue_bytes must be positive, got {write_queue_bytes}")
        self.tiers: tuple[StorageBackend, ...] = tuple(tiers)
        # the shared tiers' chunk policy (builder): engines over this stack register their namespace in it
        self.policy = policy
        self._writable = tuple(not is_read_only(t) for t in tiers)
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
        self._store_nice = store_nice  # the write-behind's added OS niceness (kvtier/threads.py)
        self.events = events if events is not None else TierEvents()
        if events is not None:
            for tier, writable in zip(self.tiers, self._writable, strict=True):
                if writable and hasattr(tier, "on_removed"):
                    tier.on_removed = functools.partial(events.removed, tier.name)  # type: ignore[attr-defined]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def _sync(self, below: int | None = None) -> list[int]:
        """Writable tiers written on the caller's thread (above ``below``)."""
        end = self.sync_tiers if below is None else min(self.sync_tiers, below)
        return [i for i in range(end) if self._writable[i]]

    def _background(self, below: int | None = None) -> tuple[int, ...]:
        """Writable tiers written by the background thread (above ``below``)."""
        end = len(self.tiers) if below is None else below
        return tuple(i for i in range(self.sync_tiers, end) if self._writable[i])

    def start(self) -> None:
        """Start every backend and the writer thread. Idempotent."""
        for t in self.tiers:
            t.start()
        if self._writer is None and self._background():
            self._writer = threading.Thread(
                target=spread(self._write_loop, nice=self._store_nice), name="kvtier-write-behind", daemon=True
            )
            self._writer.start()

    def close(self) -> None:
        """Finish queued writes, stop the writer and close every backend."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        for t in self.tiers:
            t.close()
        self.events.close()

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
            if not todo or expired():  # past the call's deadline: the prefix located so far is the answer
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

    def absent(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys no tier holds and no queued write is about to store (what a ``put`` should add)."""
        where = self.locate(keys, count_misses=False)
        with self._lock:
            return [w is None and k not in self._queued_keys for k, w in zip(keys, where, strict=True)]

    def get(self, keys: Sequence[ChunkKey], where: Sequence[int]) -> list[Chunk | None]:
        """Fetch each key from the tier ``where`` says holds it (one batched call per tier).

        None where the tier no longer has it (evicted, removed by another
        process) or it proved corrupt (the tier counts that).
        """
        found: list[Chunk | None] = [None] * len(keys)
        for ti, tier in enumerate(self.tiers):
            idx = [i for i, w in enumerate(where) if w == ti]
            if idx and expired():  # the call's deadline passed: what the tiers above gave is the prefix
                break
            if idx:
                with self.metrics.timed(tier.name, "get"):
                    got = tier.get([keys[i] for i in idx])
                for i, chunk in zip(idx, got, strict=True):
                    found[i] = chunk
                hits = [c for c in got if c is not None]
                self.metrics.hits.labels(tier.name).inc(len(hits))
                self.metrics.bytes_read.labels(tier.name).inc(sum(c.payload.nbytes for c in hits))
        return found

    def discard(self, key: ChunkKey) -> None:
        """Remove a key from every tier (used when a chunk proves to be wrong); read-only tiers only forget it."""
        for t in self.tiers:
            if t.delete([key]):
                self.events.removed(t.name, [key])

    def remove(self, keys: Sequence[ChunkKey], tiers: Sequence[str] | None = None) -> dict[str, int]:
        """Delete ``keys`` from the named writable tiers (default: all of them); chunks removed per tier.

        Queued writes are finished first, so a removed chunk is not written again behind the caller's back.
        """
        self.flush()
        out: dict[str, int] = {}
        for t, writable in zip(self.tiers, self._writable, strict=True):
            if writable and (tiers is None or t.name in tiers):
                present = [k for k, ok in zip(keys, t.contains(keys), strict=True) if ok]
                out[t.name] = t.delete(present) if present else 0
                self.events.removed(t.name, present)
        return out

    def clear(self, tiers: Sequence[str] | None = None) -> dict[str, int]:
        """Remove every chunk of the named writable tiers (default: all); chunks removed per tier.

        A shared tier's ``clear`` is the backend's (the node and disk folders: every chunk of every process;
        Redis: this prefix and tenant). Clearing every tier publishes ``AllBlocksCleared``, one tier a
        ``BlockRemoved`` of the keys it listed before clearing (where it can list them).
        """
        self.flush()
        out: dict[str, int] = {}
        chosen = [(t, w) for t, w in zip(self.tiers, self._writable, strict=True) if tiers is None or t.name in tiers]
        for t, writable in chosen:
            if not writable:
                continue
            listed = t.keys_lru_order() if tiers is not None and hasattr(t, "keys_lru_order") else []
            out[t.name] = t.clear()
            if listed:
                self.events.removed(t.name, listed)
        if tiers is None:
            self.events.all_cleared()
        return out

    # -- writes ------------------------------------------------------------------------------------------------

    def _put(self, ti: int, chunks: Sequence[Chunk]) -> int:
        """Write ``chunks`` (parents first) to tier ``ti``, one at a time; children of a refused chunk are refused.

        Returns how many the tier holds afterwards.
        """
        tier = self.tiers[ti]
        refused: set[ChunkKey] = set()
        accepted = 0
        written = 0
        with self.metrics.timed(tier.name, "put"):
            for chunk in chunks:
                if chunk.parent is not None and chunk.parent in refused:
                    refused.add(chunk.key)
                    sighted = getattr(tier, "sighted", None)  # an admission filter counts it as offered
                    if sighted is not None:
                        sighted(chunk.key)
                    continue
                if tier.put([chunk])[0]:
                    self.events.stored(tier.name, [chunk])  # now: an eviction by the next put is reported after it
                    accepted += 1
                    written += chunk.payload.nbytes
                else:
                    refused.add(chunk.key)
        self.metrics.bytes_written.labels(tier.name).inc(written)
        return accepted

    def put(self, chunks: Sequence[Chunk]) -> int:
        """Store new chunks (parents first): memory tiers now, the rest in the background.

        Returns how many chunks the first writable tier took (when that tier
        is written in the background: how many were queued; a full queue
        drops them, counted in ``dropped_writes``). :meth:`put_chunks` says more.
        """
        return self.put_chunks(chunks).accepted

    def put_chunks(self, chunks: Sequence[Chunk]) -> PutResult:
        """:meth:`put`, reporting every tier: the synchronous tiers' refusals now, the background ones' through
        the returned :class:`WriteBehind` (or the chunks a full queue dropped)."""
        if not chunks:
            return PutResult(0, {}, 0, None)
        sync = self._sync()
        accepted = [self._put(ti, chunks) for ti in sync]
        rejected = {self.names[ti]: len(chunks) - n for ti, n in zip(sync, accepted, strict=True) if n < len(chunks)}
        background = self._background()
        pending = self._enqueue(chunks, background)
        dropped = len(chunks) if background and pending is None else 0
        first = accepted[0] if accepted else (len(chunks) if pending is not None else 0)
        return PutResult(first, rejected, dropped, pending)

    def promote(self, found: Sequence[tuple[Chunk, int]]) -> None:
        """Copy chunks read from lower tiers into the writable tiers above where each was found.

        ``found`` pairs each (verified) chunk with the index of the tier it was
        read from, in prefix order. In-process tiers (``l1``) are written now,
        every other one through the write-behind queue, shared-memory tiers
        (``node``) included: unlike a store, a promotion is only a copy of
        what a lower tier already holds (every process sees it there), so it
        need not cost the reader its time (a 2,560-token disk hit spent 236 ms
        of its load writing it into ``node``).
        """
        for source in sorted({ti for _, ti in found if ti > 0}):
            chunks = [c for c, ti in found if ti == source]
            now = [ti for ti in self._sync(below=source) if is_in_process(self.tiers[ti])]
            for ti in now:
                self._put(ti, chunks)
            later = tuple(ti for ti in range(source) if self._writable[ti] and ti not in now)
            if later and self._writer is not None:
                self._enqueue(chunks, later)
            else:  # no writer thread (every tier is synchronous): write them here after all
                for ti in later:
                    self._put(ti, chunks)

    def _enqueue(self, chunks: Sequence[Chunk], tiers: tuple[int, ...]) -> WriteBehind | None:
        """Queue a write of ``chunks`` to ``tiers``; its outcome handle, or None if nothing was queued (full)."""
        if not tiers:
            return None
        nbytes = sum(c.nbytes for c in chunks)
        with self._lock:
            if self._queued_bytes + nbytes > self.write_queue_bytes:
                self._dropped_writes += len(chunks)
                self.metrics.dropped_writes.inc(len(chunks))
                log.warning(
                    "write-behind queue full: dropped %d chunks for %s", len(chunks), [self.names[t] for t in tiers]
                )
                return None
            self._queued_bytes += nbytes
            self._in_flight += 1
            self._queued_keys.update(c.key for c in chunks)
        self.metrics.queued_bytes.inc(nbytes)
        self.metrics.queued_chunks.inc(len(chunks))
        outcome = WriteBehind([self.names[t] for t in tiers])
        self._queue.put(_WriteJob(tuple(chunks), tiers, nbytes, outcome))
        return outcome

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            assert isinstance(job, _WriteJob)
            for ti in job.tiers:
                try:
                    job.outcome._record(self.names[ti], len(job.chunks) - self._put(ti, job.chunks))
                except Exception:  # a failing tier must not kill the writer; it is counted and logged
                    log.exception("write-behind to %s failed", self.tiers[ti].name)
                    job.outcome._record(self.names[ti], len(job.chunks), error=True)
                    with self._lock:
                        self._write_errors += 1
            job.outcome._finish()
            self.metrics.queued_bytes.dec(job.nbytes)
            self.metrics.queued_chunks.dec(len(job.chunks))
            with self._lock:
                self._queued_bytes -= job.nbytes
                self._in_flight -= 1
                self._queued_keys.subtract(c.key for c in job.chunks)
                self._queued_keys = +self._queued_keys
                self._idle.notify_all()

    def pin(self, keys: Sequence[ChunkKey]) -> list[str]:
        """Pin ``keys`` in every tier that evicts by itself here (``l1``, ``l2`` writers); returns those tiers.

        A pinned chunk (held now or stored later) and its ancestors are never evicted until :meth:`unpin`.
        """
        done = []
        for t in self.tiers:
            op = getattr(t, "pin", None)
            if op is not None and not getattr(t, "read_only", False):
                op(keys)
                done.append(t.name)
        return done

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        """Undo one :meth:`pin` of ``keys``."""
        for t in self.tiers:
            op = getattr(t, "unpin", None)
            if op is not None and not getattr(t, "read_only", False):
                op(keys)

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
