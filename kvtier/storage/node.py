"""The ``node`` tier: chunk files in memory shared by every engine process of this user on the machine.

The folder (``config.node_dir``, default ``/dev/shm/kvtier-<uid>``, a tmpfs:
its files are memory) holds chunks in the one chunk format, one file per chunk, named as in
the disk tier (:mod:`.files`). It outlives the processes that write it: after
an engine restart its chunks are still there, at memory speed. Its index and
its one byte budget, whatever the number of processes, are the folder's
:class:`~kvtier.storage.ledger.Ledger`: ``contains`` asks the ledger (no
in-process copy that could lag), ``put`` reserves bytes there and picks
victims in one transaction before it writes, so the folder never holds more
than the budget. Which victims: this process's eviction policy (``node.policy``,
default ``adaptive``, :mod:`kvtier.eviction`) orders the chunks it knows (the
ones it wrote or read, and those in the folder when it started); its plan goes
with each reservation as the ledger's preferred victims, with this process's
pins as keys never to evict (as ``l2`` does; docs/eviction.md). Chunks only
other processes know fall back to the ledger's least-recently-used order.

Crash safety is the disk tier's: a chunk is written to a temporary file and
renamed into place, every read verifies the header, the key, the length and
the checksum, and the ledger counts a file as present only once its writer
has committed it. A writer killed mid-``put`` leaves a temporary file or an
uncommitted file, both removed when its reservation is reclaimed, never a
chunk that reads as valid and wrong.

The stack writes this tier on the caller's thread (the ``SharedMemory``
ability): when ``put`` returns, every process, vLLM's scheduler included,
sees the chunk. Tenants are told apart by their keys (the namespace, tenant
included, is hashed into every key); the folder is ``0700`` and its files
``0600``, so other users see nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtier.chunk import Chunk, encode_parts
from kvtier.codec import Codec
from kvtier.eviction import DEFAULT_POLICY, make_policy
from kvtier.errors import ChunkAuthError, ChunkFormatError, ChunkVersionError, StorageError
from kvtier.keys import ChunkKey
from kvtier.security import ChunkPolicy
from kvtier.storage.base import BackendStats, ChunkInfo, RemovalListener
from kvtier.storage.files import (
    TMP_DIR,
    chunk_path,
    map_chunk,
    private_dir,
    read_header,
    remove_orphaned_tmp,
    scan_chunks,
    tmp_path,
    write_file,
)
from kvtier.storage.ledger import Ledger
from kvtier.threads import thread_pool

log = logging.getLogger(__name__)


class NodeBackend:
    """Chunk files in a folder shared by processes, indexed and budgeted by its ledger. Thread-safe.

    ``read_only``: an observer (vLLM's scheduler, ``kvtier stats``): never
    writes, evicts, touches or deletes, and creates nothing (a missing
    folder or ledger is an empty tier until a writer creates it).
    """

    in_process = False
    shared_memory = True  # written on the caller's thread (see TierStack)
    on_removed: RemovalListener | None = None  # told of evictions and dropped files (see storage/base.py)

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        codec: Codec | None = None,
        name: str = "node",
        read_only: bool = False,
        read_threads: int | None = None,
        policy: ChunkPolicy | None = None,
        eviction: str = DEFAULT_POLICY,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if read_threads is not None and read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {read_threads}")
        self.name = name
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.codec = codec  # None: raw payload bytes
        self.read_only = read_only
        self.read_threads = read_threads or min(4, os.cpu_count() or 1)
        self.ledger = Ledger(self.root, read_only=read_only)
        self._lock = threading.Lock()
        self._readers: ThreadPoolExecutor | None = None
        self._started = False
        self._evictions = 0
        self._rejected = 0
        self._corrupt = 0
        self._stale = 0
        self._forged = 0
        self.policy = policy  # signs what is written, and judges every file read before it is decoded
        self.eviction = eviction
        # this process's view of the folder (under _lock): what it wrote, read, or found at start; its plan is
        # the ledger's preferred victims, its pins the keys the ledger must keep
        self._view = make_policy(eviction)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Writer: create the folder (``0700``), reconcile the ledger with the files there. Idempotent.

        Raises StorageError if the folder belongs to another user or is open to others.
        """
        with self._lock:
            if self._started:
                return
            self._started = True
        try:
            if self.read_only:
                if self.root.exists():
                    private_dir(self.root)  # exists: only checks owner and mode
                self.ledger.open()
                return
            private_dir(self.root)
            private_dir(self.root / TMP_DIR)
            remove_orphaned_tmp(self.root / TMP_DIR)
            self.ledger.open()
            evicted = self.ledger.sync(scan_chunks(self.root), self.max_bytes)
        except OSError as exc:
            raise StorageError(f"node tier {self.root}: cannot open: {exc.strerror or exc}") from exc
        entries, used, _ = self.ledger.totals()
        with self._lock:
            for key, parent, size in self.ledger.entries():  # least recently used first: the view's order too
                if key not in self._view:
                    self._view.add(key, parent, size)
        self._evictions += len(evicted)
        if evicted and self.on_removed is not None:
            self.on_removed(evicted)
        log.info("node tier %s: %d chunks, %d bytes, budget %d", self.root, entries, used, self.max_bytes)

    def close(self) -> None:
        with self._lock:
            self._started = False
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)
        self.ledger.close()

    # -- protocol ----------------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys have a committed file now, in any process (one ledger query; all False if it fails)."""
        try:
            return self.ledger.present(keys)
        except StorageError as exc:
            log.warning("%s tier: lookup failed: %s", self.name, exc)
            return [False] * len(keys)

    def get(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        """Read and verify the chunks (several at once on reader threads); a writer touches the hits."""
        try:
            parents = self.ledger.parents(keys)
        except StorageError as exc:
            log.warning("%s tier: lookup failed: %s", self.name, exc)
            return [None] * len(keys)
        todo = [(i, chunk_path(self.root, k, parents[k])) for i, k in enumerate(keys) if k in parents]
        found: list[Chunk | None] = [None] * len(keys)
        sizes: dict[ChunkKey, int] = {}
        if len(todo) < 2 or self.read_threads < 2:
            got = [self._read(keys[i], path) for i, path in todo]
        else:
            got = list(self._pool().map(lambda t: self._read(keys[t[0]], t[1]), todo))
        for (i, _), read in zip(todo, got, strict=True):
            if read is not None:
                found[i], sizes[keys[i]] = read
        if not self.read_only:
            hits = [k for k, c in zip(keys, found, strict=True) if c is not None]
            with self._lock:
                for k in hits:  # written by another process: this one knows it now
                    if k not in self._view:
                        self._view.add(k, parents[k], sizes[k])
                self._view.touch(hits)
            self.ledger.touch(hits)
        return found

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._readers is None:
                self._readers = thread_pool(self.read_threads, f"kvtier-{self.name}-read")
            return self._readers

    def _read(self, key: ChunkKey, path: Path) -> tuple[Chunk, int] | None:
        """The verified chunk and its file's size, or None."""
        inode = None
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                inode = st.st_ino
                return map_chunk(f, st.st_size, key, self.policy), st.st_size
        except FileNotFoundError:  # evicted or removed meanwhile: a plain miss
            if not self.read_only and not path.exists():
                self.ledger.forget(key)  # a row left by a writer killed mid-eviction
                self._unview([key])
                if self.on_removed is not None:
                    self.on_removed([key])
        except (ChunkFormatError, OSError) as exc:
            if inode is None:
                log.warning("%s tier: cannot open %s: %s", self.name, path, exc)
            else:
                stale, forged = isinstance(exc, ChunkVersionError), isinstance(exc, ChunkAuthError)
                self._drop(key, path, inode, str(exc), stale=stale, forged=forged)
        return None

    def _drop(self, key: ChunkKey, path: Path, inode: int, reason: str, *, stale: bool, forged: bool = False) -> None:
        """``path`` failed verification: count it; a writer removes it if the name still points at that file."""
        try:
            same = os.stat(path).st_ino == inode
        except OSError:
            same = False
        if not same:  # replaced or removed since it was read
            return
        log.log(logging.INFO if stale else logging.WARNING, "%s tier: dropping %s: %s", self.name, path.name, reason)
        with self._lock:
            if forged:
                self._forged += 1
            elif stale:
                self._stale += 1
            else:
                self._corrupt += 1
        if not self.read_only:
            path.unlink(missing_ok=True)
            self.ledger.forget(key)
            self._unview([key])
            if self.on_removed is not None:
                self.on_removed([key])

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Store each chunk: reserve its bytes in the ledger (evicting there), write tmp + rename, commit.

        A chunk already present (or being written by another process) counts as stored.
        """
        if self.read_only:
            raise ValueError(f"node tier {self.root} is open read-only: put is not allowed")
        return [self._put_one(chunk) for chunk in chunks]

    def _put_one(self, chunk: Chunk) -> bool:
        try:
            header, payload = encode_parts(chunk, self.codec, policy=self.policy)
        except ValueError as exc:  # the codec refuses these values: like a full tier
            log.warning("%s tier: cannot encode chunk %s with %s: %s", self.name, chunk.key.hex()[:16], self.codec, exc)
            return self._count_rejected()
        tmp = tmp_path(self.root, chunk.key)
        size = len(header) + len(payload)
        prefer, pinned = self._plan(chunk.key, chunk.parent, size)
        try:
            reservation = self.ledger.reserve(
                chunk.key, chunk.parent, size, self.max_bytes, tmp, prefer=prefer, protect=pinned
            )
        except StorageError as exc:
            log.warning("%s tier: cannot reserve room for %s: %s", self.name, chunk.key.hex()[:16], exc)
            reservation = None
        self._settle(chunk.key, prefer, reservation)
        if reservation is None:
            return self._count_rejected()
        if reservation.held:
            return True
        with self._lock:
            self._evictions += len(reservation.victims)
        if reservation.victims and self.on_removed is not None:
            self.on_removed([v for v, _ in reservation.victims])
        path = chunk_path(self.root, chunk.key, chunk.parent)
        try:
            write_file(tmp, path, (header, payload))
        except OSError as exc:
            log.warning("%s tier: write of %s failed: %s", self.name, chunk.key.hex()[:16], exc)
            self.ledger.abort(chunk.key)
            self._unview([chunk.key])
            return self._count_rejected()
        try:
            committed = self.ledger.commit(chunk.key)  # False: our reservation is gone, the file is not counted
        except StorageError as exc:
            log.warning("%s tier: cannot commit %s: %s", self.name, chunk.key.hex()[:16], exc)
            committed = False
        if not committed:
            path.unlink(missing_ok=True)
            self.ledger.abort(chunk.key)
            self._unview([chunk.key])
            return self._count_rejected()
        return True

    def _plan(self, key: ChunkKey, parent: ChunkKey | None, size: int) -> tuple[list[ChunkKey], list[ChunkKey]]:
        """Put ``key`` in this process's view; the victims its policy would choose to keep the view within the
        budget (the ledger takes them first, as many as it needs, then its own order), and the pins.

        With one process writing the folder the view is the ledger's content
        and its plan is what the ledger needs; with several, a view within the
        budget plans nothing and the ledger falls back to its own
        least-recently-used order.
        """
        with self._lock:
            view = self._view
            if key in view:
                view.touch([key])
            else:
                view.add(key, parent, size)
            protect = [key] + ([parent] if parent is not None else [])
            prefer = view.plan_eviction(0, self.max_bytes, protect=protect) or []
            return prefer, view.pinned_keys()

    def _settle(self, key: ChunkKey, prefer: list[ChunkKey], reservation: object) -> None:
        """After a reservation: its victims leave the view (evicted), the key too if it was refused; preferred
        victims the ledger no longer had (another process evicted them) leave it as well."""
        victims = [v for v, _ in reservation.victims] if reservation is not None else []  # type: ignore[attr-defined]
        taken = set(victims)
        left = [k for k in prefer if k not in taken]
        gone: list[ChunkKey] = []
        if left and len(taken) > len(prefer) - len(left):  # it evicted past preferred keys it skipped: gone ones?
            try:
                gone = [k for k, there in zip(left, self.ledger.present(left), strict=True) if not there]
            except StorageError:
                gone = []
        with self._lock:
            for v in victims:
                self._view.remove(v, evicted=True)
            for k in gone:
                self._view.remove(k)
            if reservation is None:
                self._view.remove(key)

    def _unview(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for k in keys:
                self._view.remove(k)

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        """Never evict these chunks (present now or later) from the folder, nor their ancestors, until as many
        :meth:`unpin`. Kept by this process: the ledger honours them in this process's reservations (each writer
        passes its own pins), so another process writing the folder may still evict them."""
        with self._lock:
            for k in keys:
                self._view.pin(k)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for k in keys:
                self._view.unpin(k)

    def _count_rejected(self) -> bool:
        with self._lock:
            self._rejected += 1
        return False

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove keys and their files; a read-only tier keeps nothing of its own, so it removes nothing."""
        if self.read_only:
            return 0
        self._unview(keys)
        try:
            return self.ledger.remove(keys)
        except StorageError as exc:
            log.warning("%s tier: delete failed: %s", self.name, exc)
            return 0

    def clear(self) -> int:
        """Remove every chunk of the folder (all tenants: the folder is shared); returns how many."""
        if self.read_only:
            raise ValueError(f"node tier {self.root} is open read-only: clear is not allowed")
        keys = [k for k, _, _ in self.ledger.entries()]
        self._unview(keys)
        return self.ledger.remove(keys)

    def keys_lru_order(self) -> list[ChunkKey]:
        """Keys from least to most recently used, across every process (for inspection and tests)."""
        return [k for k, _, _ in self.ledger.entries()]

    def stats(self) -> BackendStats:
        """Entries and bytes of the whole folder (every process); event counters of this process."""
        entries, used, pending = self.ledger.totals()
        with self._lock:
            return BackendStats(
                name=self.name,
                entries=entries,
                used_bytes=used + pending,
                max_bytes=self.max_bytes,
                evictions=self._evictions,
                rejected_puts=self._rejected,
                corrupt=self._corrupt,
                stale=self._stale,
                forged=self._forged,
            )

    def inventory(self) -> dict[ChunkKey, ChunkInfo]:
        """Every committed chunk's parent, namespace and tokens, from the file headers (``Inventoried``)."""
        out: dict[ChunkKey, ChunkInfo] = {}
        for key, parent, _ in self.ledger.entries():
            h = read_header(chunk_path(self.root, key, parent))
            if h is not None and h.key == key:
                out[key] = ChunkInfo(h.parent, h.namespace, tuple(int(t) for t in h.tokens))
        return out
