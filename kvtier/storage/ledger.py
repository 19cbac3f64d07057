"""The ledger of a chunk folder shared by several processes: one index and one byte budget for all of them.

A folder of chunk files (the ``node`` tier in ``/dev/shm``, or an ``l2`` disk
folder) may be written by any number of processes at once. Each keeps the
folder within budget through this ledger, an SQLite database in the folder
(``ledger.sqlite3``, WAL mode: readers never block the writer). One row per
chunk: key, parent, size in bytes, recency, and while the file is being
written, the writer's identity (pid and process start time) and temporary
file.

The invariant, for every process and at every instant: **the bytes of the
chunk files and temporary files in the folder never exceed the sum of the
ledger's rows, and that sum never exceeds the budget.** It holds because

* a writer inserts its row (a *reservation*) before it creates the temporary
  file, in the same transaction that picks and removes victims: rows of
  complete files, leaves only (no row names them as parent), least recently
  used first; each victim's file is unlinked *before* its row goes;
* a row is deleted only after its file is gone (eviction, ``remove``,
  ``abort``, reclaiming a dead writer's reservation).

A reservation becomes a row of a complete file (``commit``) only after the
file was renamed into place, so ``present`` never answers True for a file
still being written. The reservations of a writer that died (SIGKILL, OOM)
are reclaimed by the next transaction that needs room, or by ``reclaim``:
its temporary file and, if it got that far, its renamed file are unlinked,
then the row is deleted. A pid that was reused by another process is told
apart by the process start time.

A transaction that dies half-way (a writer killed inside it) is rolled back
by SQLite; files it had already unlinked are then rows without a file: a
plain miss for readers, and fewer bytes on the folder than the ledger says,
never more. ``sync`` (a writer's start) reconciles such rows and adopts files
the ledger does not know (written before the folder had a ledger).

Every process passes its own budget; the folder stays within the largest
budget of the processes writing it (with one configuration: exactly it).

Thread-safe: one connection per ledger, behind a lock. A method raises
StorageError when the database fails (or stays locked past the busy
timeout); the backends turn that into a miss or a refused put. ``touch``,
``forget`` and ``abort`` are best effort instead (logged, not raised): a
missed one costs recency or room until the next ``sync``, never correctness.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvtier.errors import StorageError
from kvtier.keys import ChunkKey
from kvtier.storage.files import FILE_MODE, chunk_path

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite3"
_BUSY_TIMEOUT_S = 10.0  # writers hold the lock for well under a millisecond
_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    key BLOB PRIMARY KEY,
    parent BLOB,
    size INTEGER NOT NULL,
    used INTEGER NOT NULL,
    writer TEXT,
    tmp TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_parent ON chunks(parent);
CREATE INDEX IF NOT EXISTS chunks_used ON chunks(used);
"""
_BATCH = 500  # keys per IN (...) query, well under SQLite's variable limit


@dataclass(frozen=True)
class Reservation:
    """What :meth:`Ledger.reserve` did.

    ``held``: the key already has a row (a complete file, or another
    writer's reservation): nothing was reserved, nothing is to be written.
    ``victims``: (key, parent) of the chunks evicted to make room (files
    already unlinked, rows deleted).
    """

    held: bool
    victims: tuple[tuple[ChunkKey, ChunkKey | None], ...] = ()


def process_token(pid: int | None = None) -> str | None:
    """``"<pid>:<start time>"`` of a running process (this one by default), or None if it is not running.

    The start time (clock ticks since boot, from ``/proc``) tells a reused pid apart.
    """
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return f"{pid}:{int(fields[19])}"  # field 22 of stat(5); fields[0] is field 3
    except FileNotFoundError:
        return None
    except (OSError, IndexError, ValueError):  # no /proc here: the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return f"{pid}:0"


def _alive(token: str) -> bool:
    pid = int(token.split(":", 1)[0])
    return process_token(pid) == token


class Ledger:
    """The index and byte budget of the chunk folder ``root``, shared with every process that opens it.

    ``read_only``: never writes the ledger and creates nothing; until a
    writer has created the ledger, the folder reads as empty (each call looks
    again). Methods that change the ledger raise ValueError on a read-only one.
    """

    def __init__(self, root: Path, *, read_only: bool = False, file_mode: int = FILE_MODE) -> None:
        self.root = Path(root)
        self.file_mode = file_mode  # 0600; 0660 for a folder shared with a group
        self.path = self.root / LEDGER_FILE
        self.read_only = read_only
        self._pid = os.getpid()
        self._token = process_token()
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._clock = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def open(self) -> bool:
        """Open (a writer: create) the ledger; False if read-only and there is none yet. Idempotent.

        Raises StorageError if the database cannot be opened.
        """
        with self._lock:
            return self._connect() is not None

    def _connect(self) -> sqlite3.Connection | None:
        if self._pid != os.getpid():  # forked: a connection must not cross a fork, and this is another writer
            self._pid, self._token, self._db = os.getpid(), process_token(), None
        if self._db is not None:
            return self._db
        try:
            if self.read_only:
                if not self.path.exists():
                    return None
                db = sqlite3.connect(
                    f"file:{self.path}?mode=ro",
                    uri=True,
                    timeout=_BUSY_TIMEOUT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                # created 0600 here, so SQLite's -wal and -shm files (which copy its mode) are private too
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, self.file_mode)
                try:
                    if self.file_mode != FILE_MODE and os.fstat(fd).st_uid == os.getuid():
                        os.fchmod(fd, self.file_mode)  # the umask may have taken the group's bits
                finally:
                    os.close(fd)
                db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # a lost commit after a power cut: sync() repairs it
                db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"chunk ledger {self.path}: cannot open: {exc}") from exc
        self._db = db
        return db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection | None]:
        with self._lock:
            try:
                yield self._connect()
            except sqlite3.Error as exc:
                raise StorageError(f"chunk ledger {self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction (the ledger's write lock, across processes), committed on success."""
        if self.read_only:
            raise ValueError(f"chunk ledger {self.path} is open read-only")
        with self._lock:
            db = self._connect()
            assert db is not None
            try:
                db.execute("BEGIN IMMEDIATE")  # waits up to _BUSY_TIMEOUT_S for other processes' transactions
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"chunk ledger {self.path}: {exc}") from exc

    @contextmanager
    def _best_effort(self, what: str) -> Iterator[None]:
        try:
            yield
        except StorageError as exc:
            log.warning("%s skipped: %s", what, exc)

    def _now(self) -> int:
        """A recency stamp: wall-clock ns, strictly increasing in this process (other processes' are close)."""
        self._clock = max(time.time_ns(), self._clock + 1)
        return self._clock

    # -- reads -------------------------------------------------------------------------------------------------

    def present(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys have a complete file (reservations do not count). No change to anything."""
        found = self.parents(keys)  # one query per batch of keys (not per key: a lookup asks up to 255 at once)
        return [k in found for k in keys]

    def parents(self, keys: Sequence[ChunkKey]) -> dict[ChunkKey, ChunkKey | None]:
        """The parent of each key that has a complete file (absent keys are left out)."""
        found: dict[ChunkKey, ChunkKey | None] = {}
        with self._read() as db:
            if db is None:
                return found
            for batch in _batches([k.digest for k in keys]):
                rows = db.execute(
                    f"SELECT key, parent FROM chunks WHERE writer IS NULL AND key IN ({_marks(batch)})", batch
                )
                for key, parent in rows:
                    found[ChunkKey(key)] = ChunkKey(parent) if parent is not None else None
        return found

    def entries(self) -> list[tuple[ChunkKey, ChunkKey | None, int]]:
        """(key, parent, size) of every complete file, least recently used first."""
        with self._read() as db:
            if db is None:
                return []
            rows = db.execute("SELECT key, parent, size FROM chunks WHERE writer IS NULL ORDER BY used").fetchall()
        return [(ChunkKey(k), ChunkKey(p) if p is not None else None, s) for k, p, s in rows]

    def totals(self) -> tuple[int, int, int]:
        """(complete files, their bytes, bytes of reservations in flight)."""
        with self._read() as db:
            if db is None:
                return 0, 0, 0
            n, done, pending = db.execute(
                "SELECT COUNT(*) FILTER (WHERE writer IS NULL), "
                "COALESCE(SUM(size) FILTER (WHERE writer IS NULL), 0), "
                "COALESCE(SUM(size) FILTER (WHERE writer IS NOT NULL), 0) FROM chunks"
            ).fetchone()
        return n, done, pending

    # -- writes ------------------------------------------------------------------------------------------------

    def reserve(
        self,
        key: ChunkKey,
        parent: ChunkKey | None,
        size: int,
        max_bytes: int,
        tmp: Path,
        *,
        prefer: Sequence[ChunkKey] = (),
        protect: Sequence[ChunkKey] = (),
    ) -> Reservation | None:
        """Reserve ``size`` bytes for ``key`` (to be written to ``tmp``), evicting leaves to stay within ``max_bytes``.

        One transaction: a key that already has a row is only touched
        (``held``); otherwise victims are picked (complete files, leaves,
        least recently used first; dead writers' reservations are reclaimed
        first), their files unlinked, their rows deleted, and the
        reservation inserted. None (nothing changed) when no choice of
        victims makes room. Blocks while another process holds the ledger's
        write lock (milliseconds). The caller must ``commit`` or ``abort``.

        ``prefer``: victims the caller's eviction policy would choose, in
        order: they go first (each only if it is still a leaf of a complete
        file), then the least recently used leaves. ``protect``: keys never
        chosen (the caller's pins).
        """
        if size > max_bytes:
            return None
        with self._write() as db:
            row = db.execute("SELECT writer FROM chunks WHERE key = ?", (key.digest,)).fetchone()
            if row is not None and row[0] is not None and row[0] != self._token and not _alive(row[0]):
                self._reclaim(db)  # a dead writer's reservation of this very key
                row = None
            if row is not None:
                if row[0] is None:
                    db.execute("UPDATE chunks SET used = ? WHERE key = ?", (self._now(), key.digest))
                return Reservation(held=True)
            used = db.execute("SELECT COALESCE(SUM(size), 0) FROM chunks").fetchone()[0]
            if used + size > max_bytes:
                used -= self._reclaim(db)
            keep = {k.digest for k in protect} | ({parent.digest} if parent is not None else set())
            victims = _plan(db, used + size - max_bytes, protect=keep, prefer=[k.digest for k in prefer])
            if victims is None:
                return None
            self._evict(db, victims)
            db.execute(
                "INSERT INTO chunks (key, parent, size, used, writer, tmp) VALUES (?, ?, ?, ?, ?, ?)",
                (key.digest, parent.digest if parent is not None else None, size, self._now(), self._token, str(tmp)),
            )
        return Reservation(held=False, victims=tuple(_pair(k, p) for k, p, _ in victims))

    def commit(self, key: ChunkKey) -> bool:
        """The reserved file of ``key`` is in place: it counts as present from now on, most recently used.

        False if this process holds no reservation for ``key`` (the caller
        should then remove the file it wrote: the ledger no longer counts it).
        """
        with self._write() as db:
            cur = db.execute(
                "UPDATE chunks SET writer = NULL, tmp = NULL, used = ? WHERE key = ? AND writer = ?",
                (self._now(), key.digest, self._token),
            )
            return cur.rowcount == 1

    def abort(self, key: ChunkKey) -> None:
        """Drop this process's reservation of ``key`` (the caller has removed its temporary file)."""
        with self._best_effort("chunk ledger abort"), self._write() as db:
            db.execute("DELETE FROM chunks WHERE key = ? AND writer = ?", (key.digest, self._token))

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        """Mark a prefix (given root first) as just used: ancestors end up more recent than descendants."""
        if not keys:
            return
        with self._best_effort("chunk ledger touch"), self._write() as db:
            base = self._now()
            self._clock = base + len(keys)
            db.executemany(
                "UPDATE chunks SET used = ? WHERE key = ? AND writer IS NULL",
                [(base + len(keys) - i, k.digest) for i, k in enumerate(keys)],
            )

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        """Unlink the files of ``keys`` and delete their rows (complete files only); returns how many there were."""
        removed = 0
        with self._write() as db:
            for key in keys:
                row = db.execute("SELECT parent FROM chunks WHERE key = ? AND writer IS NULL", (key.digest,)).fetchone()
                if row is None:
                    continue
                chunk_path(self.root, key, ChunkKey(row[0]) if row[0] is not None else None).unlink(missing_ok=True)
                db.execute("DELETE FROM chunks WHERE key = ?", (key.digest,))
                removed += 1
        return removed

    def forget(self, key: ChunkKey) -> None:
        """Delete the row of a complete file that is already gone (the caller removed it or found it missing)."""
        with self._best_effort("chunk ledger forget"), self._write() as db:
            db.execute("DELETE FROM chunks WHERE key = ? AND writer IS NULL", (key.digest,))

    def reclaim(self) -> int:
        """Remove the reservations (and files) of writers that are no longer running; returns the bytes freed."""
        with self._write() as db:
            return self._reclaim(db)

    def _reclaim(self, db: sqlite3.Connection) -> int:
        freed = 0
        rows = db.execute("SELECT key, parent, size, writer, tmp FROM chunks WHERE writer IS NOT NULL").fetchall()
        for key, parent, size, writer, tmp in rows:
            if writer == self._token or _alive(writer):
                continue
            # the writer may have died after its rename: that file was never committed, so it goes too
            Path(tmp).unlink(missing_ok=True)
            chunk_path(self.root, ChunkKey(key), ChunkKey(parent) if parent is not None else None).unlink(
                missing_ok=True
            )
            db.execute("DELETE FROM chunks WHERE key = ?", (key,))
            log.info("chunk ledger %s: reclaimed the reservation of dead writer %s", self.root, writer)
            freed += size
        return freed

    def sync(self, found: Iterable[tuple[int, ChunkKey, ChunkKey | None, int]], max_bytes: int) -> list[ChunkKey]:
        """Reconcile the ledger with a scan of the folder (a writer's start), then evict down to ``max_bytes``.

        ``found`` is (mtime ns, key, parent, size) of the chunk files seen.
        Files the ledger does not know are adopted (recency = mtime); rows of
        complete files that no longer exist are deleted; dead writers'
        reservations are reclaimed. Returns the keys evicted (files unlinked).
        """
        seen = {key: (mtime, parent, size) for mtime, key, parent, size in found}
        with self._write() as db:
            self._reclaim(db)
            known = {ChunkKey(k): w for k, w in db.execute("SELECT key, writer FROM chunks")}
            for key, (mtime, parent, size) in seen.items():
                # the scan ran before this transaction: a file another writer evicted since then (its unlink
                # and row deletion happen under this lock) must not come back as a row without a file
                if key not in known and chunk_path(self.root, key, parent).exists():
                    db.execute(
                        "INSERT INTO chunks (key, parent, size, used) VALUES (?, ?, ?, ?)",
                        (key.digest, parent.digest if parent is not None else None, size, mtime),
                    )
            for key, writer in known.items():
                if writer is None and key not in seen:
                    rows = db.execute("SELECT parent FROM chunks WHERE key = ?", (key.digest,)).fetchone()
                    parent = ChunkKey(rows[0]) if rows[0] is not None else None
                    if not chunk_path(self.root, key, parent).exists():  # not one written since the scan
                        db.execute("DELETE FROM chunks WHERE key = ?", (key.digest,))
            used = db.execute("SELECT COALESCE(SUM(size), 0) FROM chunks").fetchone()[0]
            planned = _plan(db, used - max_bytes, protect=set(), partial=True) or []
            self._evict(db, planned)
        return [ChunkKey(k) for k, _, _ in planned]

    def _evict(self, db: sqlite3.Connection, victims: list[tuple[bytes, bytes | None, int]]) -> None:
        """Unlink each victim's file, then delete its row (inside the caller's transaction)."""
        for key, parent, _ in victims:
            chunk_path(self.root, *_pair(key, parent)).unlink(missing_ok=True)
            db.execute("DELETE FROM chunks WHERE key = ?", (key,))


def _pair(key: bytes, parent: bytes | None) -> tuple[ChunkKey, ChunkKey | None]:
    return ChunkKey(key), ChunkKey(parent) if parent is not None else None


def _plan(
    db: sqlite3.Connection,
    need: int,
    *,
    protect: set[bytes],
    partial: bool = False,
    prefer: Sequence[bytes] = (),
) -> list[tuple[bytes, bytes | None, int]] | None:
    """Victims freeing ``need`` bytes: complete files that are leaves (no row names them as parent, counting
    victims already chosen), outside ``protect``, least recently used first. None when that cannot free enough
    (``partial``: the victims found so far instead). ``prefer``: keys taken first, in that order, when they
    qualify. Pure: reads the ledger only.
    """
    if need <= 0:
        return []
    rows = db.execute(
        "SELECT key, parent, size, (SELECT COUNT(*) FROM chunks d WHERE d.parent = c.key) "
        "FROM chunks c WHERE writer IS NULL ORDER BY used"
    ).fetchall()
    if prefer:
        first = {k: i for i, k in enumerate(prefer)}
        rows.sort(key=lambda r: first.get(r[0], len(first)))  # stable: the rest stay least recently used first
    children = {key: n for key, _, _, n in rows}
    chosen: list[tuple[bytes, bytes | None, int]] = []
    taken: set[bytes] = set()
    freed = 0
    while freed < need:
        victim = next((r for r in rows if r[0] not in taken and r[0] not in protect and children[r[0]] <= 0), None)
        if victim is None:
            return chosen if partial else None
        key, parent, size, _ = victim
        chosen.append((key, parent, size))
        taken.add(key)
        freed += size
        if parent in children:
            children[parent] -= 1
    return chosen


def _batches(items: list[bytes]) -> Iterator[list[bytes]]:
    for i in range(0, len(items), _BATCH):
        yield items[i : i + _BATCH]


def _marks(batch: Sequence[object]) -> str:
    return ",".join("?" * len(batch))
