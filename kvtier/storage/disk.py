"""The ``l2`` tier: chunks as files in a local directory, within a byte budget, surviving restarts.

File names (:mod:`.files`) hold key and parent, so the index (key, parent,
size, recency = mtime) comes back from a directory scan without opening any
file. Writes go to ``<root>/.tmp`` and are renamed into
place, so a torn write is never seen under a chunk's name. Every read checks
the framing, the file's key, its length and the checksum; a file that fails
is deleted and counted as corrupt, and the read is a miss. A file that
vanishes before it is opened (evicted, removed by another process) is a plain
miss: not corruption, and nothing is deleted. A file is only ever deleted for
corruption if the name still points at the very file (inode) that was read,
so a valid file written under the same name meanwhile is never lost.

Several processes may share one directory (vLLM's scheduler and worker do):
``watch=True`` makes ``contains`` notice files other processes added or
removed, by re-listing a ``<k[:2]>`` folder when its mtime moved (one
``stat`` per folder and call otherwise). ``read_only=True`` opens the folder
as an observer: it never writes, evicts, touches or deletes a file, so a
process that only looks up (the scheduler) cannot fight the writer's budget;
it creates nothing either (a missing folder is an empty tier). A writer's
``start`` removes only temporary files of writers that are gone (their pid
is not running), never another live process's in-flight write.

The byte budget is the folder's, not the process's: every writer reserves
a chunk's bytes in the folder's :class:`~kvtier.storage.ledger.Ledger` before
writing it, and the ledger picks the victims (leaves, least recently used
first, across every process), so several processes writing one folder keep
it within one budget. The local index stays this process's view of what is
there (its ``contains`` and the read-only observer need no ledger).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtier.chunk import Chunk, encode_parts
from kvtier.codec import Codec
from kvtier.errors import ChunkAuthError, ChunkFormatError, ChunkVersionError, StorageError
from kvtier.eviction import DEFAULT_POLICY, make_policy
from kvtier.keys import ChunkKey
from kvtier.security import ChunkPolicy
from kvtier.storage.base import BackendStats, ChunkInfo, RemovalListener
from kvtier.storage.files import (
    PRIVATE,
    FolderAccess,
    chunk_path,
    drop_page_cache,
    map_chunk,
    parse_name,
    read_chunk,
    read_header,
    remove_orphaned_tmp,
    subdirs,
    tmp_path,
    touch_file,
    write_file,
)
from kvtier.storage.ledger import Ledger
from kvtier.threads import thread_pool

log = logging.getLogger(__name__)

_RACE_NS = 50_000_000  # 50 ms: longer than a filesystem timestamp tick


class DiskBackend:
    """A directory of chunk files. Thread-safe; file I/O runs outside the index lock."""

    in_process = False  # file I/O: written by TierStack's background writer
    on_removed: RemovalListener | None = None  # told of evictions and dropped files (see storage/base.py)

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        fsync: bool = False,
        codec: Codec | None = None,
        name: str = "l2",
        watch: bool = False,
        read_only: bool = False,
        read_threads: int | None = None,
        policy: ChunkPolicy | None = None,
        access: FolderAccess | None = None,
        eviction: str = DEFAULT_POLICY,
        map_reads: bool = True,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if read_threads is not None and read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {read_threads}")
        self.name = name
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.codec = codec  # None: raw payload bytes
        self.watch = watch or read_only
        self.read_only = read_only
        self._dirs: dict[str, tuple[int, int]] = {}  # watched folder -> (its mtime, when it was listed), ns
        self._in_dir: dict[str, set[ChunkKey]] = {}
        self.eviction = eviction
        self._lru = make_policy(eviction)  # this process's view; its plan is the ledger's preferred victims
        self._parents: dict[ChunkKey, ChunkKey | None] = {}
        self._pending: set[ChunkKey] = set()  # reserved in the index, file not yet in place
        self._last_mtime = 0
        self._lock = threading.Lock()
        self._started = False
        self._evictions = 0
        self._rejected = 0
        self._corrupt = 0
        self._stale = 0
        self._forged = 0
        self.policy = policy  # signs what is written, and judges every file read before it is decoded
        self.access = access if access is not None else PRIVATE  # 0700/0600 unless opened to one group
        # files of one get() are read and decoded in parallel: file reads and the codecs' kernels release the GIL
        self.read_threads = read_threads or min(4, os.cpu_count() or 1)
        self._readers: ThreadPoolExecutor | None = None
        # a file's body is checked and decoded where the page cache holds it (files.map_chunk), not copied
        # into fresh memory: in a fresh process that copy was the load's largest cost (page faults). Safe
        # because kvtier never rewrites a chunk file in place (tmp file + rename; eviction unlinks).
        self.map_reads = map_reads
        # the folder's one budget, shared by its writers
        self._ledger = None if read_only else Ledger(self.root, file_mode=self.access.file_mode)

    # -- paths -------------------------------------------------------------------------------------------------

    def _path(self, key: ChunkKey, parent: ChunkKey | None) -> Path:
        return chunk_path(self.root, key, parent)

    def _path_of(self, key: ChunkKey) -> Path:
        return self._path(key, self._parents[key])

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the directory if needed and rebuild the index from the files there."""
        with self._lock:
            if self._started:
                return
            try:
                # 0700 (or the shared group's 2770) whatever the umask; an existing looser folder is warned about
                self.access.prepare(self.root, create=not self.read_only)
                if not self.read_only:
                    self.access.prepare(self.root / ".tmp")
                    remove_orphaned_tmp(self.root / ".tmp")
                found: list[tuple[int, ChunkKey, ChunkKey | None, int]] = []
                for sub in subdirs(self.root, missing_ok=self.read_only):
                    found.extend(self._list_dir(sub))
            except OSError as exc:
                raise StorageError(f"disk tier {self.root}: cannot open: {exc.strerror or exc}") from exc
            for _, key, parent, size in sorted(found, key=lambda f: f[0]):
                self._index(key, parent, size)
            victims = []
            if self._ledger is not None:  # the ledger evicts (and unlinks) down to the folder's budget
                self._ledger.open()
                victims = self._ledger.sync(found, self.max_bytes)
            for v in victims:
                if v in self._lru:
                    self._forget(v)
            if victims and self.on_removed is not None:
                self.on_removed(victims)
            self._started = True
        log.info("disk tier %s: %d chunks, %d bytes indexed", self.root, len(self._lru), self._lru.used_bytes)

    def close(self) -> None:
        with self._lock:
            self._started = False
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)
        if self._ledger is not None:
            self._ledger.close()

    # -- index helpers (lock held) -----------------------------------------------------------------------------

    def _index(self, key: ChunkKey, parent: ChunkKey | None, size: int) -> None:
        self._lru.add(key, parent, size)
        self._parents[key] = parent
        self._in_dir.setdefault(key.hex()[:2], set()).add(key)

    def _forget(self, key: ChunkKey, *, evicted: bool = False) -> Path:
        path = self._path_of(key)
        self._lru.remove(key, evicted=evicted)
        del self._parents[key]
        self._in_dir.get(key.hex()[:2], set()).discard(key)
        return path

    def _list_dir(self, sub: str) -> list[tuple[int, ChunkKey, ChunkKey | None, int]]:
        """The chunk files in one ``<k[:2]>`` folder as (mtime, key, parent, size); records when it was listed."""
        path = self.root / sub
        found: list[tuple[int, ChunkKey, ChunkKey | None, int]] = []
        try:
            dir_mtime = os.stat(path).st_mtime_ns
            for entry in os.scandir(path):
                parsed = parse_name(entry.name)
                if parsed is None:
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:  # removed by another process while listing
                    continue
                found.append((st.st_mtime_ns, parsed[0], parsed[1], st.st_size))
        except FileNotFoundError:
            dir_mtime = -1
        self._dirs[sub] = (dir_mtime, time.time_ns())
        return found

    def _refresh(self, keys: Sequence[ChunkKey]) -> None:
        """Re-list the folders of ``keys`` that changed since they were listed (other processes' writes)."""
        for sub in {k.hex()[:2] for k in keys}:
            try:
                mtime = os.stat(self.root / sub).st_mtime_ns
            except FileNotFoundError:
                mtime = -1
            seen = self._dirs.get(sub)
            # A folder listed within _RACE_NS of its mtime may have changed again in the same clock tick.
            if seen is not None and seen[0] == mtime and seen[1] - mtime > _RACE_NS:
                continue
            found = self._list_dir(sub)
            on_disk = {key for _, key, _, _ in found}
            for key in list(self._in_dir.get(sub, ())):
                if key not in on_disk and key not in self._pending:
                    self._forget(key)
            for _, key, parent, size in sorted(found, key=lambda f: f[0]):
                if key not in self._lru:
                    self._index(key, parent, size)

    def _present(self, key: ChunkKey) -> bool:
        return key in self._lru and key not in self._pending

    # -- protocol ----------------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            if self.watch and self._started:
                self._refresh(keys)
            return [self._present(k) for k in keys]

    def get(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        with self._lock:
            paths = [self._path_of(k) if self._present(k) else None for k in keys]
        found = self._read_all(keys, paths)
        hits = [k for k, c in zip(keys, found, strict=True) if c is not None]
        if self.read_only:
            return found
        with self._lock:
            self._lru.touch(hits)
            for key in reversed(hits):  # ancestors get the later mtime, as in the LRU
                if self._present(key):
                    touch_file(self._path_of(key), self._next_mtime())
        if self._ledger is not None:
            self._ledger.touch(hits)
        return found

    def _next_mtime(self) -> int:
        """A strictly increasing mtime (ns), so recency survives a restart even on coarse-clock filesystems."""
        self._last_mtime = max(time.time_ns(), self._last_mtime + 1)
        return self._last_mtime

    def _read_all(self, keys: Sequence[ChunkKey], paths: Sequence[Path | None]) -> list[Chunk | None]:
        """``_read`` of each present key, in order; several at once on the reader threads."""
        todo = [i for i, p in enumerate(paths) if p is not None]
        found: list[Chunk | None] = [None] * len(keys)
        if len(todo) < 2 or self.read_threads < 2:
            for i in todo:
                found[i] = self._read(keys[i], paths[i])
            return found
        with self._lock:
            if self._readers is None:
                self._readers = thread_pool(self.read_threads, f"kvtier-{self.name}-read")
            readers = self._readers
        for i, chunk in zip(todo, readers.map(lambda i: self._read(keys[i], paths[i]), todo), strict=True):
            found[i] = chunk
        return found

    def _read(self, key: ChunkKey, path: Path) -> Chunk | None:
        inode = None
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                inode = st.st_ino
                read = map_chunk if self.map_reads else read_chunk
                return read(f, st.st_size, key, self.policy)
        except FileNotFoundError:
            self._vanished(key, path)
        except (ChunkFormatError, OSError) as exc:
            if inode is None:  # could not even open it: not evidence of damage
                log.warning("%s tier: cannot open %s: %s", self.name, path, exc)
            else:
                stale, forged = isinstance(exc, ChunkVersionError), isinstance(exc, ChunkAuthError)
                self._drop(key, path, inode, str(exc), stale=stale, forged=forged)
        return None

    def _vanished(self, key: ChunkKey, path: Path) -> None:
        """A file gone before it was opened: a plain miss. Forget it only if it is still gone."""
        with self._lock:
            if self._present(key) and self._path_of(key) == path and not path.exists():
                self._forget(key)
                if self._ledger is not None:
                    self._ledger.forget(key)
                    if self.on_removed is not None:
                        self.on_removed([key])

    def _drop(
        self, key: ChunkKey, path: Path, inode: int, reason: str, *, stale: bool = False, forged: bool = False
    ) -> None:
        """``path`` (inode ``inode``) failed verification: count it, and remove it if the name still points there.

        ``stale``: it is a chunk in an older format (counted apart from corruption: nothing was damaged).
        """
        with self._lock:
            try:
                same = os.stat(path).st_ino == inode
            except OSError:
                same = False
            if not same:  # replaced or removed since it was read: the name now holds another file, or nothing
                return
            log.log(
                logging.INFO if stale else logging.WARNING, "%s tier: dropping %s: %s", self.name, path.name, reason
            )
            if forged:
                self._forged += 1
            elif stale:
                self._stale += 1
            else:
                self._corrupt += 1
            if self._present(key):
                self._forget(key)
            if self._ledger is not None:
                path.unlink(missing_ok=True)
                self._ledger.forget(key)
                if self.on_removed is not None:
                    self.on_removed([key])

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        if self.read_only:
            raise ValueError(f"disk tier {self.root} is open read-only: put is not allowed")
        return [self._put_one(chunk) for chunk in chunks]

    def _put_one(self, chunk: Chunk) -> bool:
        try:
            header, payload = encode_parts(chunk, self.codec, policy=self.policy)
        except ValueError as exc:  # the codec refuses these values (CodecError included): like a full tier
            log.warning("disk tier: cannot encode chunk %s with %s: %s", chunk.key.hex()[:16], self.codec, exc)
            with self._lock:
                self._rejected += 1
            return False
        size = len(header) + len(payload)
        assert self._ledger is not None  # a writer
        with self._lock:
            if chunk.key in self._lru:
                self._lru.touch([chunk.key])
                if chunk.key not in self._pending:
                    touch_file(self._path_of(chunk.key), self._next_mtime())
                return True
            self._index(chunk.key, chunk.parent, size)
            self._pending.add(chunk.key)
            # this process's policy picks the victims it prefers; the ledger takes them first (if they are
            # still leaves of complete files there), then its own least recently used order
            protect = [chunk.key] + ([chunk.parent] if chunk.parent is not None else [])
            prefer = self._lru.plan_eviction(0, self.max_bytes, protect=protect) or []
            pinned = self._pinned_keys()
        path = self._path(chunk.key, chunk.parent)
        tmp = tmp_path(self.root, chunk.key)
        # the folder's budget: the ledger picks (and unlinks) victims among every process's chunks
        try:
            reservation = self._ledger.reserve(
                chunk.key, chunk.parent, size, self.max_bytes, tmp, prefer=prefer, protect=pinned
            )
        except StorageError as exc:
            log.warning("disk tier: cannot reserve room for %s: %s", chunk.key.hex()[:16], exc)
            reservation = None
        with self._lock:
            for victim, _ in reservation.victims if reservation is not None else ():
                if victim in self._lru and victim not in self._pending:
                    self._forget(victim, evicted=True)
            if reservation is None or reservation.held:  # no room; or another process holds or writes it
                self._pending.discard(chunk.key)
                if reservation is None:
                    self._forget(chunk.key)
                    self._rejected += 1
                return reservation is not None
            self._evictions += len(reservation.victims)
        if reservation.victims and self.on_removed is not None:
            self.on_removed([v for v, _ in reservation.victims])
        try:
            write_file(tmp, path, (header, payload), fsync=self.fsync, access=self.access)
            with self._lock:
                touch_file(path, self._next_mtime())
            if not self._ledger.commit(chunk.key):
                raise OSError("its reservation in the folder's ledger was lost")
        except (OSError, StorageError) as exc:
            with contextlib.suppress(OSError):  # not (or no longer) counted by the ledger
                path.unlink(missing_ok=True)
            log.warning("disk tier: write of %s failed: %s", chunk.key.hex()[:16], exc)
            self._ledger.abort(chunk.key)
            with self._lock:
                self._pending.discard(chunk.key)
                if chunk.key in self._lru:
                    self._forget(chunk.key)
                self._rejected += 1
            return False
        with self._lock:
            self._pending.discard(chunk.key)
        return True

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        """Never evict these chunks (present now or later) from this folder, nor their ancestors, until as many
        :meth:`unpin`. Kept by this process: another process writing the folder honours them only while this one
        is the writer whose reservation evicts (each writer passes its own pins to the ledger)."""
        with self._lock:
            for k in keys:
                self._lru.pin(k)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for k in keys:
                self._lru.unpin(k)

    def _pinned_keys(self) -> list[ChunkKey]:
        return self._lru.pinned_keys()

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove keys and their files (a read-only tier only forgets them)."""
        with self._lock:
            present = [k for k in keys if self._present(k)]
            paths = [self._forget(k) for k in present]
        if self._ledger is not None:
            try:
                self._ledger.remove(present)  # unlinks the files, then drops their rows
            except StorageError as exc:
                log.warning("disk tier: delete failed: %s", exc)
        return len(paths)

    def clear(self) -> int:
        with self._lock:
            keys = [k for k in self._lru if k not in self._pending]
        return self.delete(keys)

    def files(self) -> list[Path]:
        """Paths of all indexed chunk files, least recently used first."""
        with self._lock:
            return [self._path_of(k) for k in self._lru if k not in self._pending]

    def keys_lru_order(self) -> list[ChunkKey]:
        with self._lock:
            return [k for k in self._lru if k not in self._pending]

    def drop_page_cache(self) -> int:
        """Ask the kernel to drop the chunk files from the page cache (for cold-read measurements)."""
        return drop_page_cache(self.files())

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(
                name=self.name,
                entries=len(self._lru) - len(self._pending),
                used_bytes=self._lru.used_bytes,
                max_bytes=self.max_bytes,
                evictions=self._evictions,
                rejected_puts=self._rejected,
                corrupt=self._corrupt,
                stale=self._stale,
                forged=self._forged,
            )

    def inventory(self) -> dict[ChunkKey, ChunkInfo]:
        """Every indexed chunk's parent, namespace and tokens, from the file headers (the ``Inventoried`` ability)."""
        out: dict[ChunkKey, ChunkInfo] = {}
        for path in self.files():
            parsed = parse_name(path.name)
            h = read_header(path) if parsed is not None else None
            if h is not None and h.key == parsed[0]:
                out[h.key] = ChunkInfo(h.parent, h.namespace, tuple(int(t) for t in h.tokens))
        return out
