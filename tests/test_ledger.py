"""The chunk-folder ledger: one budget and one eviction order for every process, reservations, dead writers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvtier.chunk import Chunk
from kvtier.keys import ChunkKey
from kvtier.storage.files import chunk_path, private_dir, tmp_path, write_file
from kvtier.storage.ledger import Ledger, process_token

MakeChain = Callable[..., list[Chunk]]


def _key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "big"))


def _ledger(root: Path) -> Ledger:
    private_dir(root)
    ledger = Ledger(root)
    ledger.open()
    return ledger


def _store(ledger: Ledger, key: ChunkKey, parent: ChunkKey | None, size: int, budget: int) -> list[ChunkKey] | None:
    """Reserve, write ``size`` bytes, commit; the victims' keys (None: refused)."""
    tmp = tmp_path(ledger.root, key)
    r = ledger.reserve(key, parent, size, budget, tmp)
    if r is None:
        return None
    if not r.held:
        private_dir(ledger.root / ".tmp")
        write_file(tmp, chunk_path(ledger.root, key, parent), [bytes(size)])
        assert ledger.commit(key)
    return [k for k, _ in r.victims]


def test_victims_are_leaves_least_recently_used_first_and_files_go_with_their_rows(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "f")
    a, b, c, d = (_key(i) for i in range(4))
    assert _store(ledger, a, None, 100, 400) == []
    assert _store(ledger, b, a, 100, 400) == []  # a <- b
    assert _store(ledger, c, None, 100, 400) == []
    ledger.touch([a, b])  # the prefix a, b is now the most recent: order c, b, a (ancestors last)
    assert [k for k, _, _ in ledger.entries()] == [c, b, a]
    assert _store(ledger, d, None, 100, 400) == []  # 400: fits exactly
    assert _store(ledger, _key(9), None, 150, 400) == [c, b]  # c (LRU leaf), then b (a is b's parent)
    assert not chunk_path(ledger.root, c, None).exists() and not chunk_path(ledger.root, b, a).exists()
    assert ledger.totals() == (3, 350, 0)
    assert ledger.present([a, b, c, d]) == [True, False, False, True]


def test_a_parent_is_never_evicted_for_its_own_child_and_no_room_changes_nothing(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "f")
    a, b = _key(1), _key(2)
    assert _store(ledger, a, None, 300, 400) == []
    assert _store(ledger, b, a, 200, 400) is None  # only a could go, and it is b's parent
    assert ledger.present([a, b]) == [True, False] and ledger.totals() == (1, 300, 0)
    assert _store(ledger, a, None, 300, 400) == []  # already there: held, only touched
    assert _store(ledger, _key(3), None, 401, 400) is None  # larger than the budget


def test_a_reservation_is_not_present_until_committed_and_abort_frees_it(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "f")
    other = Ledger(ledger.root, read_only=True)  # another process's view
    assert other.open()
    k = _key(1)
    r = ledger.reserve(k, None, 100, 1000, tmp_path / "t")
    assert r is not None and not r.held
    assert other.present([k]) == [False] and other.totals() == (0, 0, 100)
    assert ledger.reserve(k, None, 100, 1000, tmp_path / "t").held  # someone is writing it
    ledger.abort(k)
    assert other.totals() == (0, 0, 0)


def test_a_read_only_ledger_creates_nothing_and_sees_one_created_later(tmp_path: Path) -> None:
    root = tmp_path / "f"
    reader = Ledger(root, read_only=True)
    assert not reader.open() and reader.present([_key(1)]) == [False] and not root.exists()
    writer = _ledger(root)
    _store(writer, _key(1), None, 10, 100)
    assert reader.present([_key(1)]) == [True]


_DEAD_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from kvtier.keys import ChunkKey
    from kvtier.storage.files import chunk_path, private_dir, tmp_path, write_file
    from kvtier.storage.ledger import Ledger
    root = Path({root!r})
    ledger = Ledger(root)
    ledger.open()
    private_dir(root / ".tmp")
    for i, renamed in ((1, False), (2, True)):
        key = ChunkKey(i.to_bytes(32, "big"))
        tmp = tmp_path(root, key)
        assert not ledger.reserve(key, None, 64, 10_000, tmp).held
        if renamed:  # died after the rename, before the commit: the file is whole but was never committed
            write_file(tmp, chunk_path(root, key, None), [bytes(64)])
        else:  # died mid-write
            tmp.write_bytes(bytes(10))
    os._exit(0)  # no commit, no abort, no cleanup: as after SIGKILL
    """
)


def test_reservations_of_dead_writers_are_reclaimed_with_their_files(tmp_path: Path) -> None:
    root = tmp_path / "f"
    ledger = _ledger(root)
    subprocess.run([sys.executable, "-c", _DEAD_WRITER.format(root=str(root))], check=True)
    assert ledger.totals() == (0, 0, 128)  # two reservations, nothing present
    assert ledger.present([_key(1), _key(2)]) == [False, False]
    assert any((root / ".tmp").iterdir()) and chunk_path(root, _key(2), None).exists()
    assert ledger.reclaim() == 128
    assert ledger.totals() == (0, 0, 0)
    assert not any((root / ".tmp").iterdir()) and not chunk_path(root, _key(2), None).exists()


def test_process_token_tells_a_reused_pid_apart() -> None:
    token = process_token()
    assert token is not None and token.startswith(f"{__import__('os').getpid()}:")
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process_token(int(done.stdout)) is None  # exited


def test_sync_adopts_unknown_files_drops_rows_of_missing_ones_and_trims_to_budget(tmp_path: Path) -> None:
    root = tmp_path / "f"
    ledger = _ledger(root)
    _store(ledger, _key(1), None, 100, 1000)
    chunk_path(root, _key(1), None).unlink()  # gone behind the ledger's back
    found = [(10 + i, _key(10 + i), None, 100) for i in range(5)]  # files from before the ledger (mtime order)
    for _, k, p, size in found:
        write_file(root / f"t{k.hex()[:4]}", chunk_path(root, k, p), [bytes(size)])
    evicted = ledger.sync(found, 300)
    assert evicted == [_key(10), _key(11)]  # oldest mtimes first
    assert [k for k, _, _ in ledger.entries()] == [_key(12), _key(13), _key(14)]
    assert sorted(p.name for p in root.glob("*/*.kvc")) == sorted(
        chunk_path(root, k, None).name for k in (_key(12), _key(13), _key(14))
    )
    assert np.array_equal(ledger.present([_key(1)]), [False])


def test_present_asks_once_per_batch_of_keys_not_once_per_key(tmp_path: Path) -> None:
    """A lookup asks about up to 255 partial-chunk candidates at once, on vLLM's scheduler loop: one query."""
    ledger = _ledger(tmp_path / "f")
    assert _store(ledger, _key(7), None, 100, 10_000) == []
    reader = Ledger(ledger.root, read_only=True)
    assert reader.open()
    db = reader._connect()
    assert db is not None
    queries: list[str] = []
    db.set_trace_callback(queries.append)
    keys = [_key(i) for i in range(255)]
    assert reader.present(keys) == [i == 7 for i in range(255)]
    assert len([q for q in queries if q.lstrip().upper().startswith("SELECT")]) == 1


def test_sync_does_not_adopt_a_file_removed_between_the_scan_and_its_transaction(tmp_path: Path) -> None:
    """A writer's start scans the folder first; another writer may evict a scanned file before the sync's lock."""
    root = tmp_path / "f"
    ledger = _ledger(root)
    found = [(10 + i, _key(10 + i), None, 100) for i in range(3)]
    for _, k, p, size in found:
        write_file(root / f"t{k.hex()[:4]}", chunk_path(root, k, p), [bytes(size)])
    chunk_path(root, _key(11), None).unlink()  # evicted by another process after the scan
    assert ledger.sync(found, 10_000) == []
    assert [k for k, _, _ in ledger.entries()] == [_key(10), _key(12)]
    assert ledger.totals() == (2, 200, 0)  # no row without its file: the budget counts real bytes only
