"""Storage backends: one shared suite run against MemoryBackend and DiskBackend, then disk-only behaviour."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import v1_blob

from kvtier.chunk import Chunk, encode
from kvtier.keys import ChunkKey, Namespace
from kvtier.layout import KVLayout
from kvtier.storage import DiskBackend, MemoryBackend, StorageBackend, TierStack
from kvtier.storage import disk as disk_module

MakeChain = Callable[..., list[Chunk]]


def _tokens(n: int, seed: int) -> np.ndarray:
    """Ids in [100, 1000): chunk headers of the same kind (root or child) then encode to the same length."""
    return np.random.default_rng(seed).integers(100, 1000, size=n).astype("<u4")


@dataclass
class Kit:
    kind: str
    make: Callable[[int], StorageBackend]
    cost: Callable[[Chunk], int]  # bytes one chunk counts against the budget

    def present(self, backend: StorageBackend) -> list[ChunkKey]:
        return backend.keys_lru_order()  # type: ignore[attr-defined]


@pytest.fixture(params=["memory", "disk"])
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kit]:
    made: list[StorageBackend] = []

    def make(max_bytes: int) -> StorageBackend:
        # the contract's exact orders are LRU's (tests/test_policies.py covers the other policies)
        if request.param == "memory":
            backend: StorageBackend = MemoryBackend(max_bytes, eviction="lru")
        else:
            backend = DiskBackend(tmp_path / f"disk{len(made)}", max_bytes, eviction="lru")
        backend.start()
        made.append(backend)
        return backend

    def cost(chunk: Chunk) -> int:
        return chunk.nbytes if request.param == "memory" else len(encode(chunk))

    yield Kit(request.param, make, cost)
    for backend in made:
        backend.close()


def _chunk_files(root: Path) -> set[Path]:
    return set(root.glob("??/*.kvc"))


def _assert_same(got: Chunk | None, want: Chunk) -> None:
    assert got is not None
    assert got.key == want.key
    assert got.parent == want.parent
    assert got.namespace == want.namespace
    assert got.layout == want.layout
    assert got.tokens.tolist() == want.tokens.tolist()
    assert torch.equal(got.payload, want.payload)


class TestBackendContract:
    """The StorageBackend contract, identical for every backend."""

    def test_is_a_storage_backend(self, kit: Kit) -> None:
        backend = kit.make(10_000)
        assert isinstance(backend, StorageBackend)
        assert backend.name == {"memory": "l1", "disk": "l2"}[kit.kind]

    def test_put_get_contains_delete_clear_stats(self, kit: Kit, make_chain: MakeChain) -> None:
        chain = make_chain(_tokens(12, 1))
        other = make_chain(_tokens(4, 2))[0]
        backend = kit.make(100_000)
        assert backend.put(chain) == [True, True, True]
        used = sum(kit.cost(c) for c in chain)
        s = backend.stats()
        assert (s.entries, s.used_bytes, s.max_bytes, s.evictions, s.rejected_puts, s.corrupt) == (
            3,
            used,
            100_000,
            0,
            0,
            0,
        )

        assert backend.contains([chain[0].key, other.key, chain[2].key]) == [True, False, True]
        got = backend.get([chain[0].key, other.key, chain[2].key])
        assert got[1] is None
        _assert_same(got[0], chain[0])
        _assert_same(got[2], chain[2])

        assert backend.put([chain[1]]) == [True]  # already there: accepted, nothing added
        assert (backend.stats().entries, backend.stats().used_bytes) == (3, used)

        assert backend.delete([chain[2].key, other.key]) == 1
        assert backend.delete([chain[2].key]) == 0
        assert backend.contains([c.key for c in chain]) == [True, True, False]
        assert backend.get([chain[2].key]) == [None]
        assert backend.stats().used_bytes == used - kit.cost(chain[2])

        assert backend.clear() == 2
        assert backend.contains([c.key for c in chain]) == [False, False, False]
        s = backend.stats()
        assert (s.entries, s.used_bytes, s.evictions, s.rejected_puts, s.corrupt) == (0, 0, 0, 0, 0)
        assert backend.clear() == 0

        assert backend.put([other]) == [True]
        _assert_same(backend.get([other.key])[0], other)

    def test_empty_batches(self, kit: Kit) -> None:
        backend = kit.make(1000)
        assert backend.put([]) == []
        assert backend.get([]) == []
        assert backend.contains([]) == []
        assert backend.delete([]) == 0

    def test_contains_keeps_recency_and_get_touches_prefix(self, kit: Kit, make_chain: MakeChain) -> None:
        a = make_chain(_tokens(12, 3))
        b = make_chain(_tokens(8, 4))
        backend = kit.make(100_000)
        backend.put(a)
        backend.put(b)
        order = [a[0].key, a[1].key, a[2].key, b[0].key, b[1].key]
        assert kit.present(backend) == order
        backend.contains([a[2].key, a[0].key])
        assert kit.present(backend) == order
        backend.get([a[0].key, a[1].key])
        assert kit.present(backend) == [a[2].key, b[0].key, b[1].key, a[1].key, a[0].key]
        backend.get([b[0].key, ChunkKey(b"\1" * 32), b[1].key])  # a miss in between touches only the hits
        assert kit.present(backend) == [a[2].key, a[1].key, a[0].key, b[1].key, b[0].key]

    def test_exact_eviction_order(self, kit: Kit, make_chain: MakeChain) -> None:
        base = _tokens(12, 5)
        r, a1, a2 = make_chain(base)
        b1 = make_chain(np.concatenate([base[:4], _tokens(4, 6)]))[1]
        assert b1.parent == r.key
        xs = [make_chain(_tokens(4, 100 + i))[0] for i in range(5)]
        assert {kit.cost(x) for x in xs} == {kit.cost(r)}
        assert kit.cost(r) <= kit.cost(a1) == kit.cost(a2) == kit.cost(b1)

        backend = kit.make(kit.cost(r) + 3 * kit.cost(a1))
        assert backend.put([r, a1, a2]) == [True] * 3
        assert backend.put([b1]) == [True]
        backend.get([r.key, a1.key])
        assert kit.present(backend) == [a2.key, b1.key, a1.key, r.key]

        # leaves go first, the least recently used leaf first; a parent only once its children are gone
        expected_victims = [a2, b1, a1, r, xs[0]]
        remaining = [a2.key, b1.key, a1.key, r.key]
        for i, (x, victim) in enumerate(zip(xs, expected_victims, strict=True)):
            assert backend.put([x]) == [True]
            remaining = [k for k in remaining if k != victim.key] + [x.key]
            assert kit.present(backend) == remaining, f"after putting x{i}"
            assert backend.stats().evictions == i + 1
        assert backend.contains([a2.key, b1.key, a1.key, r.key]) == [False] * 4
        if kit.kind == "disk":
            assert _chunk_files(backend.root) == set(backend.files())  # type: ignore[attr-defined]
            assert len(_chunk_files(backend.root)) == 4  # type: ignore[attr-defined]

    def test_parent_is_not_evicted_for_its_own_child(self, kit: Kit, make_chain: MakeChain) -> None:
        r, a1 = make_chain(_tokens(8, 7))
        backend = kit.make(kit.cost(a1))
        assert backend.put([r, a1]) == [True, False]
        assert backend.contains([r.key, a1.key]) == [True, False]
        s = backend.stats()
        assert (s.entries, s.used_bytes, s.evictions, s.rejected_puts) == (1, kit.cost(r), 0, 1)

    def test_chunk_larger_than_budget_is_rejected(self, kit: Kit, make_chain: MakeChain) -> None:
        small = make_chain(_tokens(4, 8))[0]
        big = make_chain(_tokens(16, 9), chunk_size=16)[0]
        backend = kit.make(kit.cost(big) - 1)
        assert backend.put([small]) == [True]
        assert backend.put([big]) == [False]
        assert backend.contains([small.key, big.key]) == [True, False]  # nothing was evicted in vain
        s = backend.stats()
        assert (s.entries, s.used_bytes, s.evictions, s.rejected_puts) == (1, kit.cost(small), 0, 1)
        if kit.kind == "disk":
            assert len(_chunk_files(backend.root)) == 1  # type: ignore[attr-defined]
            assert list((backend.root / ".tmp").iterdir()) == []  # type: ignore[attr-defined]

    def test_budget_holds_under_a_workload_five_times_larger(self, kit: Kit, make_chain: MakeChain) -> None:
        rng = random.Random(11)
        chains = []
        for i in range(12):
            shared = chains[rng.randrange(len(chains))][0] if chains and i % 3 == 0 else None
            prefix = shared.tokens if shared is not None else _tokens(4, 1000 + i)
            chain = make_chain(np.concatenate([prefix, _tokens(12, 2000 + i)]), seed=i)
            if shared is not None:  # the same root chunk, not one with the same key and other bytes
                assert chain[0].key == shared.key
                chain[0] = shared
            chains.append(chain)
        by_key = {c.key: c for chain in chains for c in chain}
        assert len(by_key) == 12 * 4 - 3
        chunk_cost = max(kit.cost(c) for c in by_key.values())
        backend = kit.make(8 * chunk_cost)
        assert sum(kit.cost(c) for c in by_key.values()) >= 5 * backend.stats().max_bytes
        for chain in chains:
            for chunk in chain:
                assert backend.put([chunk]) == [True]
                s = backend.stats()
                assert s.used_bytes <= s.max_bytes
                present = kit.present(backend)
                assert s.entries == len(present)
                assert s.used_bytes == sum(kit.cost(by_key[k]) for k in present)
                for k in present:  # prefix-closed: nothing is stranded without its parent
                    assert by_key[k].parent is None or by_key[k].parent in present
                if kit.kind == "disk":
                    files = _chunk_files(backend.root)  # type: ignore[attr-defined]
                    assert sum(p.stat().st_size for p in files) == s.used_bytes
            touched = chains[rng.randrange(len(chains))]
            for key, got in zip([c.key for c in touched], backend.get([c.key for c in touched]), strict=True):
                if got is not None:
                    _assert_same(got, by_key[key])
        s = backend.stats()
        assert s.evictions == len(by_key) - s.entries
        assert s.rejected_puts == 0


# -- disk only ------------------------------------------------------------------------------------------------


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    return tmp_path / "chunks"


def _open(root: Path, max_bytes: int = 10**7) -> DiskBackend:
    backend = DiskBackend(root, max_bytes)
    backend.start()
    return backend


def _file(root: Path, chunk: Chunk) -> Path:
    h = chunk.key.hex()
    return root / h[:2] / f"{h}.{chunk.parent.hex() if chunk.parent else 'root'}.kvc"


def test_disk_file_naming_and_content(disk_dir: Path, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(8, 20))
    disk = _open(disk_dir)
    disk.put(chain)
    assert _chunk_files(disk_dir) == {_file(disk_dir, c) for c in chain}
    for c in chain:
        assert _file(disk_dir, c).read_bytes() == encode(c)
    assert disk.files() == [_file(disk_dir, c) for c in chain]
    assert list((disk_dir / ".tmp").iterdir()) == []


def test_disk_restart_recovers_index_order_and_data(disk_dir: Path, make_chain: MakeChain) -> None:
    base = _tokens(12, 21)
    r, a1, a2 = make_chain(base)
    b1 = make_chain(np.concatenate([base[:4], _tokens(4, 22)]))[1]
    solo = make_chain(_tokens(4, 23))[0]
    disk = _open(disk_dir)
    disk.put([r, a1, a2, b1, solo])
    # reads set each file's mtime, so the order below is what the files say, too
    disk.get([solo.key])
    disk.get([r.key, b1.key])
    disk.get([r.key, a1.key, a2.key])
    order = [solo.key, b1.key, a2.key, a1.key, r.key]
    assert disk.keys_lru_order() == order
    stats = disk.stats()
    disk.close()

    again = _open(disk_dir)
    assert again.keys_lru_order() == order
    s = again.stats()
    assert (s.entries, s.used_bytes, s.corrupt) == (5, stats.used_bytes, 0)
    for chunk, got in zip([r, a1, a2, b1, solo], again.get([c.key for c in (r, a1, a2, b1, solo)]), strict=True):
        _assert_same(got, chunk)
    again.close()


def test_disk_restart_with_smaller_budget_evicts_leaves_lru_first(disk_dir: Path, make_chain: MakeChain) -> None:
    r, a1, a2 = make_chain(_tokens(12, 24))
    solo = make_chain(_tokens(4, 25))[0]
    disk = _open(disk_dir)
    disk.put([r, a1, a2, solo])
    disk.get([r.key, a1.key, a2.key])
    disk.get([solo.key])  # order: a2, a1, r, solo
    disk.close()
    budget = len(encode(r)) + len(encode(solo))
    again = _open(disk_dir, budget)
    assert again.keys_lru_order() == [r.key, solo.key]
    assert _chunk_files(disk_dir) == {_file(disk_dir, r), _file(disk_dir, solo)}
    assert again.stats().used_bytes == budget


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate_payload(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _truncate_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:30])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _append(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


def _bad_magic(path: Path) -> None:
    path.write_bytes(b"NOPE" + path.read_bytes()[4:])


@pytest.mark.parametrize("damage", [_flip_last_byte, _truncate_payload, _truncate_header, _empty, _append, _bad_magic])
@pytest.mark.parametrize("restart", [False, True], ids=["live", "restarted"])
def test_disk_damaged_file_is_a_counted_miss(
    disk_dir: Path, make_chain: MakeChain, damage: Callable[[Path], None], restart: bool
) -> None:
    chain = make_chain(_tokens(12, 30))
    disk = _open(disk_dir)
    disk.put(chain)
    damage(_file(disk_dir, chain[1]))
    if restart:
        disk.close()
        disk = _open(disk_dir)
    got = disk.get([c.key for c in chain])
    _assert_same(got[0], chain[0])
    assert got[1] is None
    _assert_same(got[2], chain[2])  # a later chunk is still served: the prefix rule is the engine's job
    s = disk.stats()
    assert (s.corrupt, s.entries) == (1, 2)
    assert s.used_bytes == len(encode(chain[0])) + len(encode(chain[2]))
    assert not _file(disk_dir, chain[1]).exists()
    assert disk.contains([c.key for c in chain]) == [True, False, True]
    assert disk.get([chain[1].key]) == [None]
    assert disk.stats().corrupt == 1  # the second miss is a plain miss


def test_disk_file_renamed_to_another_key_is_a_miss(disk_dir: Path, make_chain: MakeChain) -> None:
    a = make_chain(_tokens(4, 31))[0]
    b = make_chain(_tokens(4, 32))[0]
    disk = _open(disk_dir)
    disk.put([a, b])
    os.replace(_file(disk_dir, a), _file(disk_dir, b))  # b's name now holds a's bytes
    assert disk.get([b.key]) == [None]
    assert disk.stats().corrupt == 1
    assert not _file(disk_dir, b).exists()
    assert disk.get([a.key]) == [None]  # its file is gone: a plain miss, not corruption
    assert disk.stats().corrupt == 1
    assert disk.stats().entries == 0
    assert _chunk_files(disk_dir) == set()


def test_disk_renamed_file_after_restart_is_a_miss(disk_dir: Path, make_chain: MakeChain) -> None:
    a, a_child = make_chain(_tokens(8, 33))
    b = make_chain(_tokens(4, 34))[0]
    disk = _open(disk_dir)
    disk.put([a, a_child])
    disk.close()
    _file(disk_dir, b).parent.mkdir(exist_ok=True)
    os.rename(_file(disk_dir, a_child), _file(disk_dir, b))
    again = _open(disk_dir)
    assert set(again.keys_lru_order()) == {a.key, b.key}
    assert again.get([b.key]) == [None]
    assert again.stats().corrupt == 1
    _assert_same(again.get([a.key])[0], a)


def test_disk_stale_tmp_files_removed_on_start(disk_dir: Path, make_chain: MakeChain) -> None:
    chunk = make_chain(_tokens(4, 35))[0]
    disk = _open(disk_dir)
    disk.put([chunk])
    disk.close()
    (disk_dir / ".tmp" / f"{chunk.key.hex()}.123.456").write_bytes(encode(chunk)[:50])
    (disk_dir / ".tmp" / "junk").write_bytes(b"x" * 100)
    again = _open(disk_dir)
    assert list((disk_dir / ".tmp").iterdir()) == []
    assert again.keys_lru_order() == [chunk.key]
    assert again.stats().used_bytes == len(encode(chunk))


def test_disk_garbage_files_are_ignored(disk_dir: Path, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(8, 36))
    disk = _open(disk_dir)
    disk.put(chain)
    disk.close()
    h = chain[0].key.hex()
    garbage = [
        disk_dir / "README.txt",
        disk_dir / h[:2] / "notes.txt",
        disk_dir / h[:2] / f"{h}.kvc",  # no parent part
        disk_dir / h[:2] / f"{h}.root.extra.kvc",
        disk_dir / h[:2] / f"{'zz' * 32}.root.kvc",  # not hex
        disk_dir / h[:2] / f"{h[:-2]}.root.kvc",  # too short for a key
        disk_dir / h[:2] / f"{h}.{'zz' * 32}.kvc",  # parent not hex
        disk_dir / "abc" / f"{h}.root.kvc",  # not a two-character folder
    ]
    for path in garbage:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"garbage")
    (disk_dir / "zz.kvc").write_bytes(b"garbage")  # a file where a folder would be
    again = _open(disk_dir)
    assert set(again.keys_lru_order()) == {c.key for c in chain}
    s = again.stats()
    assert (s.entries, s.used_bytes, s.corrupt) == (2, sum(len(encode(c)) for c in chain), 0)
    for chunk, got in zip(chain, again.get([c.key for c in chain]), strict=True):
        _assert_same(got, chunk)
    assert all(p.exists() for p in garbage)  # not ours: left alone


def test_disk_write_error_is_a_counted_rejection(disk_dir: Path, make_chain: MakeChain) -> None:
    chunk = make_chain(_tokens(4, 37))[0]
    disk = _open(disk_dir)
    (disk_dir / chunk.key.hex()[:2]).write_bytes(b"a file where the folder must go")
    assert disk.put([chunk]) == [False]
    s = disk.stats()
    assert (s.entries, s.used_bytes, s.rejected_puts) == (0, 0, 1)
    assert disk.contains([chunk.key]) == [False]
    assert list((disk_dir / ".tmp").iterdir()) == []


def test_disk_close_is_idempotent_and_start_too(disk_dir: Path, make_chain: MakeChain) -> None:
    chunk = make_chain(_tokens(4, 38))[0]
    disk = _open(disk_dir)
    disk.start()
    disk.put([chunk])
    disk.close()
    disk.close()
    assert _chunk_files(disk_dir) == {_file(disk_dir, chunk)}


def test_disk_index_of_10000_tiny_chunks_rebuilt(disk_dir: Path, make_chain: MakeChain) -> None:
    tiny = Namespace("tiny", KVLayout(1, 1, 1))
    chunks = make_chain(_tokens(10_000, 40), 1, namespace_=tiny)
    disk = _open(disk_dir, 10**9)
    assert all(disk.put(chunks))
    used = disk.stats().used_bytes
    assert used == sum(len(encode(c)) for c in chunks)
    disk.close()

    start = time.perf_counter()
    again = _open(disk_dir, 10**9)
    elapsed = time.perf_counter() - start
    print(f"\nrebuilt an index of 10,000 chunk files in {elapsed * 1000:.0f} ms")
    s = again.stats()
    assert (s.entries, s.used_bytes, s.evictions, s.corrupt) == (10_000, used, 0, 0)
    assert set(again.keys_lru_order()) == {c.key for c in chunks}
    picks = [chunks[0], chunks[4321], chunks[-1]]
    for chunk, got in zip(picks, again.get([c.key for c in picks]), strict=True):
        _assert_same(got, chunk)


# -- disk bugs ------------------------------------------------------------------------------------------------


def test_disk_chunk_with_large_header_round_trips(disk_dir: Path, make_chain: MakeChain) -> None:
    tiny = Namespace("tiny", KVLayout(1, 1, 1))
    chunk = make_chain(np.full(20_000, 123_456, dtype="<u4"), 20_000, namespace_=tiny)[0]
    assert len(encode(chunk)) - chunk.payload.nbytes > 64 * 1024
    disk = _open(disk_dir)
    assert disk.put([chunk]) == [True]
    _assert_same(disk.get([chunk.key])[0], chunk)
    assert disk.stats().corrupt == 0


@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "observer"])
def test_disk_file_in_an_older_format_is_a_stale_miss(disk_dir: Path, make_chain: MakeChain, read_only: bool) -> None:
    """A chunk file written by format 1 (JSON header): a miss counted as stale, not corrupt; a writer removes it."""
    a, b = make_chain(_tokens(8, 41))
    disk = _open(disk_dir)
    disk.put([a, b])
    _file(disk_dir, b).write_bytes(v1_blob(b))
    reader = DiskBackend(disk_dir, 10**7, read_only=True) if read_only else disk
    reader.start()
    got = reader.get([a.key, b.key])
    _assert_same(got[0], a)
    assert got[1] is None
    assert (reader.stats().stale, reader.stats().corrupt) == (1, 0)
    assert _file(disk_dir, b).exists() == read_only  # an observer never deletes: the writer removes it on its read
    if not read_only:
        assert reader.contains([b.key]) == [False]


def test_disk_reput_recency_survives_restart(disk_dir: Path, make_chain: MakeChain) -> None:
    a = make_chain(_tokens(4, 42))[0]
    b = make_chain(_tokens(4, 43))[0]
    disk = _open(disk_dir)
    disk.put([a, b])
    disk.get([a.key])
    disk.get([b.key])
    assert disk.put([a]) == [True]  # already present: made most recent
    assert disk.keys_lru_order() == [b.key, a.key]
    disk.close()
    assert _open(disk_dir).keys_lru_order() == [b.key, a.key]


def test_disk_pending_write_is_not_evicted(
    disk_dir: Path, make_chain: MakeChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_chain(_tokens(4, 44))[0]
    second = make_chain(_tokens(4, 45))[0]
    disk = _open(disk_dir, len(encode(first)))  # room for one chunk
    entered, release = threading.Event(), threading.Event()
    real_replace = os.replace

    def slow_replace(src: str | Path, dst: str | Path) -> None:
        if Path(src).name.startswith(first.key.hex()):
            entered.set()
            release.wait(10)
        real_replace(src, dst)

    monkeypatch.setattr(disk_module.os, "replace", slow_replace)
    writer = threading.Thread(target=disk.put, args=([first],))
    writer.start()
    assert entered.wait(10)
    disk.put([second])  # the first write is still in flight
    release.set()
    writer.join(10)
    on_disk = _chunk_files(disk_dir)
    assert on_disk == set(disk.files())
    assert sum(p.stat().st_size for p in on_disk) <= disk.max_bytes


# -- disk tier shared between processes (watch / read_only) ---------------------------------------------------------


def test_disk_watch_sees_files_another_process_writes_and_removes(disk_dir: Path, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(16, 40))
    writer = _open(disk_dir)
    watcher = DiskBackend(disk_dir, 10**7, watch=True)
    watcher.start()
    plain = _open(disk_dir)  # indexes at start only
    assert watcher.contains([c.key for c in chain]) == [False] * 4
    assert writer.put(chain) == [True] * 4
    assert watcher.contains([c.key for c in chain]) == [True] * 4
    assert plain.contains([c.key for c in chain]) == [False] * 4
    for got, want in zip(watcher.get([c.key for c in chain]), chain, strict=True):
        _assert_same(got, want)
    writer.delete([chain[-1].key])
    assert watcher.contains([c.key for c in chain]) == [True, True, True, False]


def test_disk_watch_costs_one_stat_per_folder_when_nothing_changed(
    disk_dir: Path, make_chain: MakeChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = make_chain(_tokens(16, 41))
    _open(disk_dir).put(chain)
    watcher = DiskBackend(disk_dir, 10**7, watch=True)
    watcher.start()
    past = time.time_ns() - 10**9  # folders last changed a second ago: no same-tick race possible
    for sub in {c.key.hex()[:2] for c in chain}:
        os.utime(disk_dir / sub, ns=(past, past))
    assert watcher.contains([c.key for c in chain]) == [True] * 4  # re-lists once (mtimes moved)
    listed = []
    real = watcher._list_dir
    monkeypatch.setattr(watcher, "_list_dir", lambda sub: listed.append(sub) or real(sub))
    assert watcher.contains([c.key for c in chain]) == [True] * 4
    assert listed == []


def test_disk_read_only_never_writes_touches_or_deletes(disk_dir: Path, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(12, 42))
    writer = _open(disk_dir, max_bytes=10**7)
    writer.put(chain)
    files = {p: p.stat().st_mtime_ns for p in _chunk_files(disk_dir)}
    # A budget far below what is on disk: a writer would evict at start; an observer must not.
    observer = DiskBackend(disk_dir, 1, read_only=True)
    observer.start()
    assert observer.contains([c.key for c in chain]) == [True] * 3
    _assert_same(observer.get([chain[0].key])[0], chain[0])
    with pytest.raises(ValueError, match="read-only"):
        observer.put(chain)
    assert observer.delete([chain[-1].key]) == 1  # forgotten by the observer only
    assert {p: p.stat().st_mtime_ns for p in _chunk_files(disk_dir)} == files
    # A corrupt file is a miss for the observer but stays for its owner to judge.
    victim = _file(disk_dir, chain[1])
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    assert observer.get([chain[1].key]) == [None]
    assert victim.exists()


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_a_chunk_the_codec_cannot_encode_is_a_refused_put(backend: str, tmp_path: Path, make_chain: MakeChain) -> None:
    from kvtier.codec import get_codec

    chain = make_chain(_tokens(12, 43))
    chain[1].payload.fill_(1e30)  # beyond what int8's float16 scales can express
    codec = get_codec("int8")
    tier = MemoryBackend(10**7, codec=codec) if backend == "memory" else DiskBackend(tmp_path / "c", 10**7, codec=codec)
    tier.start()
    assert tier.put(chain) == [True, False, True]  # each judged alone: orphans are the stack's rule
    assert tier.stats().rejected_puts == 1
    tier.clear()
    with TierStack([tier], write_queue_bytes=10**8) as stack:
        stack.put(chain)
        assert stack.flush(timeout=10)
        assert tier.contains([c.key for c in chain]) == [True, False, False]  # the child of a refused chunk too
