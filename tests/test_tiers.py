"""kvtier.storage.TierStack over MemoryBackend + DiskBackend: write-behind, locate, promote, failures."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.keys import ChunkKey
from kvtier.storage import BackendStats, DiskBackend, MemoryBackend, StorageBackend, TierStack

MakeChain = Callable[..., list[Chunk]]


def _tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, size=n).astype("<u4")


class GatedBackend:
    """A test double: a real backend whose ``put`` waits for a gate (a disk that is slow right now)."""

    def __init__(self, inner: StorageBackend, gate: threading.Event) -> None:
        self.inner = inner
        self.name = inner.name
        self.gate = gate
        self.put_calls = 0

    def start(self) -> None:
        self.inner.start()

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self.inner.contains(keys)

    def get(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        return self.inner.get(keys)

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        assert self.gate.wait(10), "gate never opened"
        self.put_calls += 1
        return self.inner.put(chunks)

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return self.inner.delete(keys)

    def clear(self) -> int:
        return self.inner.clear()

    def stats(self) -> BackendStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


class RefusingBackend:
    """A test double: a memory tier (in process or not) that refuses the keys in ``refuse`` and records offers."""

    def __init__(self, name: str, *, in_process: bool, refuse: set[ChunkKey], read_only: bool = False) -> None:
        self.inner = MemoryBackend(10**7, name=name)
        self.name, self.in_process, self.read_only = name, in_process, read_only
        self.refuse = refuse
        self.offered: list[ChunkKey] = []
        self.start, self.contains, self.get = self.inner.start, self.inner.contains, self.inner.get
        self.delete, self.clear, self.stats, self.close = (
            self.inner.delete,
            self.inner.clear,
            self.inner.stats,
            self.inner.close,
        )

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        assert not self.read_only, "a read-only tier was written"
        self.offered.extend(c.key for c in chunks)
        return [c.key not in self.refuse and self.inner.put([c])[0] for c in chunks]


class FailingBackend:
    """A test double for a broken device: every put raises."""

    name = "broken"

    def __init__(self) -> None:
        self.put_calls = 0

    def start(self) -> None:
        pass

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [False] * len(keys)

    def get(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        return [None] * len(keys)

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        self.put_calls += 1
        raise RuntimeError("device on fire")

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        return 0

    def clear(self) -> int:
        return 0

    def stats(self) -> BackendStats:
        return BackendStats(self.name, 0, 0, 1, 0, 0, 0)

    def close(self) -> None:
        pass


@pytest.fixture
def l1() -> MemoryBackend:
    return MemoryBackend(10**7)


@pytest.fixture
def disk(tmp_path: Path) -> DiskBackend:
    return DiskBackend(tmp_path / "chunks", 10**7)


@pytest.fixture
def stack(l1: MemoryBackend, disk: DiskBackend) -> Iterator[TierStack]:
    with TierStack([l1, disk], write_queue_bytes=10**7) as s:
        yield s


def test_test_doubles_implement_the_protocol(disk: DiskBackend) -> None:
    assert isinstance(GatedBackend(disk, threading.Event()), StorageBackend)
    assert isinstance(FailingBackend(), StorageBackend)


def test_put_writes_l1_now_and_disk_after_flush(l1: MemoryBackend, disk: DiskBackend, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(12, 1))
    keys = [c.key for c in chain]
    gate = threading.Event()
    with TierStack([l1, GatedBackend(disk, gate)], write_queue_bytes=10**7) as stack:
        assert stack.names == ["l1", "l2"]
        assert stack.put(chain) == 3
        assert l1.contains(keys) == [True] * 3
        assert disk.contains(keys) == [False] * 3
        assert stack.locate(keys) == [0, 0, 0]
        assert stack.flush(timeout=0.05) is False
        gate.set()
        assert stack.flush(timeout=10) is True
        assert disk.contains(keys) == [True] * 3
        assert len(disk.files()) == 3
        assert [s.entries for s in stack.stats()] == [3, 3]
        assert stack.dropped_writes == 0 and stack.write_errors == 0


def test_put_nothing(stack: TierStack) -> None:
    assert stack.put([]) == 0
    assert stack.flush(timeout=1) is True


def test_locate_answers_the_highest_tier(
    stack: TierStack, l1: MemoryBackend, disk: DiskBackend, make_chain: MakeChain
) -> None:
    c = make_chain(_tokens(16, 2))
    l1.put([c[0], c[2]])
    disk.put([c[1], c[2]])
    keys = [ch.key for ch in c]
    assert stack.locate(keys) == [0, 1, 0, None]
    assert stack.locate([]) == []
    got = stack.get(keys, [0, 1, 1, None])  # type: ignore[list-item]
    assert [g.key if g is not None else None for g in got] == [keys[0], keys[1], keys[2], None]
    assert torch.equal(got[1].payload, c[1].payload)  # type: ignore[union-attr]
    assert stack.get([keys[1]], [0]) == [None]  # asked of the wrong tier: a miss, not a search


def test_promote_copies_into_l1(stack: TierStack, l1: MemoryBackend, disk: DiskBackend, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(8, 3))
    keys = [c.key for c in chain]
    disk.put(chain)
    assert stack.locate(keys) == [1, 1]
    from_disk = stack.get(keys, [1, 1])
    stack.promote([(c, 1) for c in from_disk])  # type: ignore[misc]
    assert l1.contains(keys) == [True, True]
    assert stack.locate(keys) == [0, 0]
    assert [torch.equal(a.payload, b.payload) for a, b in zip(l1.get(keys), chain, strict=True)] == [True, True]  # type: ignore[union-attr]
    assert stack.flush(timeout=5)
    assert disk.stats().entries == 2


def test_promote_from_top_tier_or_nothing_is_a_no_op(
    stack: TierStack, l1: MemoryBackend, make_chain: MakeChain
) -> None:
    chunk = make_chain(_tokens(4, 4))[0]
    stack.promote([(chunk, 0)])
    stack.promote([])
    assert l1.stats().entries == 0


def test_promote_through_three_tiers(tmp_path: Path, make_chain: MakeChain) -> None:
    top, mid = MemoryBackend(10**6, name="l1"), MemoryBackend(10**6, name="mid")
    bottom = DiskBackend(tmp_path / "chunks", 10**6)
    chain = make_chain(_tokens(8, 5))
    keys = [c.key for c in chain]
    with TierStack([top, mid, bottom], write_queue_bytes=10**6) as stack:
        bottom.put(chain)
        stack.promote([(c, 2) for c in stack.get(keys, [2, 2])])  # type: ignore[misc]
        assert top.contains(keys) == [True, True]
        assert stack.flush(timeout=5)
        assert mid.contains(keys) == [True, True]
        assert stack.locate(keys) == [0, 0]


def test_full_write_queue_drops_and_counts(l1: MemoryBackend, disk: DiskBackend, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(12, 6))
    one_chunk = chain[0].nbytes
    with TierStack([l1, disk], write_queue_bytes=one_chunk - 1) as stack:
        assert stack.put(chain) == 3
        assert stack.put(chain[:1]) == 1
        assert stack.flush(timeout=5) is True
        assert stack.dropped_writes == 4
        assert l1.stats().entries == 3
        assert disk.stats().entries == 0
        assert disk.files() == []


def test_queue_bytes_are_released_after_writing(l1: MemoryBackend, disk: DiskBackend, make_chain: MakeChain) -> None:
    c0, c1, c2 = make_chain(_tokens(12, 7))
    gate = threading.Event()
    with TierStack([l1, GatedBackend(disk, gate)], write_queue_bytes=c0.nbytes) as stack:
        stack.put([c0])  # queued: the queue is now full
        stack.put([c1])  # dropped
        assert stack.dropped_writes == 1
        gate.set()
        assert stack.flush(timeout=5)
        stack.put([c2])  # room again
        assert stack.flush(timeout=5)
        assert stack.dropped_writes == 1
        assert disk.contains([c0.key, c1.key, c2.key]) == [True, False, True]


def test_failing_tier_does_not_kill_the_writer(l1: MemoryBackend, disk: DiskBackend, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(12, 8))
    broken = FailingBackend()
    with TierStack([l1, broken, disk], write_queue_bytes=10**7) as stack:
        stack.put(chain[:1])
        stack.put(chain[1:])
        assert stack.flush(timeout=5)
        assert stack.write_errors == 2
        assert broken.put_calls == 2
        assert disk.contains([c.key for c in chain]) == [True] * 3  # the tier below the broken one still got them
        later = make_chain(_tokens(4, 9))[0]
        stack.put([later])
        assert stack.flush(timeout=5)
        assert stack.write_errors == 3
        assert disk.contains([later.key]) == [True]
        assert stack.dropped_writes == 0


def test_close_finishes_queued_writes(tmp_path: Path, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(16, 10))
    l1, disk = MemoryBackend(10**6), DiskBackend(tmp_path / "chunks", 10**6)
    stack = TierStack([l1, disk], write_queue_bytes=10**6)
    stack.start()
    for c in chain:
        stack.put([c])
    stack.close()
    reopened = DiskBackend(tmp_path / "chunks", 10**6)
    reopened.start()
    assert reopened.contains([c.key for c in chain]) == [True] * 4
    assert l1.stats().entries == 0  # closing the memory tier frees it


def test_discard_removes_from_every_tier(
    stack: TierStack, l1: MemoryBackend, disk: DiskBackend, make_chain: MakeChain
) -> None:
    a, b = make_chain(_tokens(8, 11))
    stack.put([a, b])
    assert stack.flush(timeout=5)
    stack.discard(b.key)
    assert stack.locate([a.key, b.key]) == [0, None]
    assert disk.contains([b.key]) == [False]
    assert len(disk.files()) == 1


def test_single_tier_stack_writes_synchronously(make_chain: MakeChain) -> None:
    l1 = MemoryBackend(10**6)
    chunk = make_chain(_tokens(4, 12))[0]
    with TierStack([l1], write_queue_bytes=1) as stack:
        assert stack.put([chunk]) == 1
        assert stack.flush(timeout=1)
        assert stack.dropped_writes == 0
        assert stack.locate([chunk.key]) == [0]


def test_put_counts_only_chunks_the_top_tier_accepted(disk: DiskBackend, make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(8, 13))
    tiny_l1 = MemoryBackend(chain[0].nbytes)
    with TierStack([tiny_l1, disk], write_queue_bytes=10**6) as stack:
        assert stack.put(chain) == 1  # the child cannot evict its own parent
        assert stack.flush(timeout=5)
        assert disk.contains([c.key for c in chain]) == [True, True]
        assert stack.locate([c.key for c in chain]) == [0, 1]


def test_constructor_validation(disk: DiskBackend) -> None:
    with pytest.raises(ValueError, match="at least one tier"):
        TierStack([], write_queue_bytes=1)
    with pytest.raises(ValueError, match="unique"):
        TierStack([MemoryBackend(10), MemoryBackend(10)], write_queue_bytes=1)


@pytest.mark.parametrize("in_process", [True, False], ids=["sync", "write-behind"])
def test_orphans_are_refused_by_the_stack_for_any_tier(make_chain: MakeChain, in_process: bool) -> None:
    """A chunk whose parent a tier refused is never offered to that tier; its siblings' chains are unaffected."""
    chain = make_chain(_tokens(16, 21))  # 4 chunks: a root and three descendants
    tier = RefusingBackend("t", in_process=in_process, refuse={chain[1].key})
    with TierStack([tier], write_queue_bytes=10**7) as stack:
        assert stack.sync_tiers == (1 if in_process else 0)
        stack.put(chain)
        assert stack.flush(timeout=5)
        assert tier.offered == [chain[0].key, chain[1].key]
        assert stack.locate([c.key for c in chain]) == [0, None, None, None]


def test_read_only_tiers_are_never_written_or_promoted_into(make_chain: MakeChain) -> None:
    chain = make_chain(_tokens(8, 22))
    l1 = MemoryBackend(10**7)
    frozen = RefusingBackend("ro", in_process=False, refuse=set(), read_only=True)
    bottom = RefusingBackend("bottom", in_process=False, refuse=set())
    with TierStack([l1, frozen, bottom], write_queue_bytes=10**7) as stack:
        stack.put(chain)
        bottom.inner.put(chain)
        stack.promote([(c, 2) for c in chain])
        assert stack.flush(timeout=5)
    assert frozen.offered == []
    assert bottom.offered == [c.key for c in chain]


def test_in_process_tiers_must_come_first(disk: DiskBackend) -> None:
    with pytest.raises(ValueError, match="in-process and shared-memory tiers must come before"):
        TierStack([disk, MemoryBackend(10)], write_queue_bytes=1)


def test_absent_counts_queued_writes_as_held(disk: DiskBackend, make_chain: MakeChain) -> None:
    gate = threading.Event()
    chain = make_chain(_tokens(8, 23))
    with TierStack([GatedBackend(disk, gate)], write_queue_bytes=10**7) as stack:
        assert stack.absent([c.key for c in chain]) == [True, True]
        stack.put(chain[:1])
        assert stack.absent([c.key for c in chain]) == [False, True]  # queued, not yet on disk
        gate.set()
        assert stack.flush(timeout=5)
        assert stack.absent([c.key for c in chain]) == [False, True]
