"""The disk tier under concurrent eviction and replacement: a file that vanishes or is replaced mid-read is a
plain miss, never counted as corruption, and never the cause of deleting a valid newer file.

Counts are exact: every test asserts ``corrupt == 0`` (or exactly the damage it made itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.keys import Namespace
from kvtier.storage import DiskBackend, TierAccess
from kvtier.storage import files as files_module

MakeChain = Callable[..., list[Chunk]]


def _tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, size=n).astype("<u4")


def _file(root: Path, chunk: Chunk) -> Path:
    h = chunk.key.hex()
    return root / h[:2] / f"{h}.{chunk.parent.hex() if chunk.parent else 'root'}.kvc"


def _open(root: Path, max_bytes: int = 10**7, **kwargs: object) -> DiskBackend:
    backend = DiskBackend(root, max_bytes, **kwargs)  # type: ignore[arg-type]
    backend.start()
    return backend


def _replace_during_read(
    monkeypatch: pytest.MonkeyPatch, newer: Path, path: Path, mapped: bool = False
) -> Callable[[], None]:
    """Make the next read first move ``newer`` over ``path`` (another writer lands mid-read); returns an undo.

    The hook is where the file is open and its body being read: ``read_payload`` for reads into new memory,
    ``decode_payload`` after the mapping is made for mapped reads (``map_reads``).
    """
    name = "decode_payload" if mapped else "read_payload"
    real = getattr(files_module, name)

    def replace_then_read(*args):
        os.replace(newer, path)
        return real(*args)

    monkeypatch.setattr(files_module, name, replace_then_read)
    return lambda: monkeypatch.setattr(files_module, name, real)


def test_file_removed_before_the_read_is_a_plain_miss(tmp_path: Path, make_chain: MakeChain) -> None:
    a, b = make_chain(_tokens(8, 1))
    disk = _open(tmp_path)
    disk.put([a, b])
    _file(tmp_path, b).unlink()  # another process evicted it
    assert disk.get([a.key, b.key])[1] is None
    assert disk.stats().corrupt == 0
    assert disk.contains([a.key, b.key]) == [True, False]  # forgotten, since it is really gone
    assert _file(tmp_path, a).exists()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_file_replaced_mid_read_is_read_whole_and_not_counted(
    tmp_path: Path, make_chain: MakeChain, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    (a,) = make_chain(_tokens(4, 2))
    disk = _open(tmp_path, map_reads=mapped)
    disk.put([a])
    newer = tmp_path / "newer"
    newer.write_bytes(_file(tmp_path, a).read_bytes())
    _replace_during_read(monkeypatch, newer, _file(tmp_path, a), mapped)
    got = disk.get([a.key])[0]
    assert got is not None and torch.equal(got.payload, a.payload)
    assert disk.stats().corrupt == 0


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_damaged_file_replaced_by_a_valid_one_mid_read_keeps_the_valid_one(
    tmp_path: Path, make_chain: MakeChain, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    (a,) = make_chain(_tokens(4, 3))
    disk = _open(tmp_path, map_reads=mapped)
    disk.put([a])
    path = _file(tmp_path, a)
    valid = path.read_bytes()
    damaged = bytearray(valid)
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    newer = tmp_path / "newer"
    newer.write_bytes(valid)  # a newer, valid write of the same chunk lands while the damaged one is read
    undo = _replace_during_read(monkeypatch, newer, path, mapped)
    assert disk.get([a.key]) == [None]  # what was read was damaged: a miss
    assert disk.stats().corrupt == 0  # ...but it is not there any more: nothing to count or delete
    assert path.read_bytes() == valid
    undo()
    got = disk.get([a.key])[0]
    assert got is not None and torch.equal(got.payload, a.payload)


def test_damaged_file_is_still_counted_and_removed(tmp_path: Path, make_chain: MakeChain) -> None:
    (a,) = make_chain(_tokens(4, 4))
    disk = _open(tmp_path)
    disk.put([a])
    path = _file(tmp_path, a)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert disk.get([a.key]) == [None]
    assert disk.stats().corrupt == 1
    assert not path.exists()


def _engine(root: Path, namespace: Namespace, **overrides: object) -> CacheEngine:
    values = {"cache_dir": str(root), "chunk_size": 16, "l1.max_bytes": 32 * 2048, "l2.max_bytes": 96 * 2048}
    values.update(overrides)
    return CacheEngine.from_config(load_config(env={}, overrides=values), namespace, access=TierAccess.shared())


def test_threads_storing_and_retrieving_under_eviction_count_no_corruption(
    tmp_path: Path, namespace: Namespace
) -> None:
    """8 threads, one engine with small L1 + L2 budgets: write-behind and eviction on, every hit checked."""
    engine = _engine(tmp_path, namespace).start()
    prompts = [_tokens(64, 100 + i) for i in range(24)]
    kvs = [torch.randn(namespace.layout.chunk_shape(64), generator=torch.Generator().manual_seed(i)) for i in range(24)]
    wrong: list[str] = []
    deadline = time.monotonic() + 2.0

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < deadline:
            i = int(rng.integers(len(prompts)))
            engine.store(prompts[i], kvs[i])
            engine.lookup(prompts[i])
            hit = engine.retrieve(prompts[i])
            if hit.num_tokens and not torch.equal(torch.stack(hit.layers), kvs[i][:, :, :, : hit.num_tokens]):
                wrong.append(f"prompt {i}: wrong KV")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.flush()
    disk = engine.tiers.tiers[1].stats()
    stats = engine.stats()
    engine.close()
    assert wrong == []
    assert disk.evictions > 0  # the budgets were small enough to evict
    assert (disk.corrupt, stats.invalid_chunks) == (0, {})


_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from conftest import SMALL_LAYOUT, build_chain
    from kvtier.keys import Namespace
    from kvtier.storage import DiskBackend
    disk = DiskBackend({root!r}, {budget}, watch=True)
    disk.start()
    ns = Namespace("test-model-fingerprint", SMALL_LAYOUT)
    print("ready", flush=True)
    deadline = time.monotonic() + {seconds}
    i = 0
    while time.monotonic() < deadline:
        tokens = np.random.default_rng(i % 40).integers(0, 50_000, size=16).astype("<u4")
        chain = build_chain(ns, tokens, 4, seed=i % 40)
        if i % 3 == 0:
            disk.delete([c.key for c in chain])  # replaced: removed, then written again below
        disk.put(chain)
        i += 1
    print("writes", i, "evictions", disk.stats().evictions, flush=True)
    """
)


def test_a_reader_next_to_a_writer_process_counts_no_corruption(tmp_path: Path, namespace: Namespace) -> None:
    """Another process keeps evicting, deleting and rewriting chunks while this one reads them (watch mode)."""
    from conftest import build_chain

    root = tmp_path / "chunks"
    budget = 40 * 4 * 128 * 4 // 3  # a third of the working set: constant eviction
    code = _WRITER.format(tests=str(Path(__file__).parent), root=str(root), budget=budget, seconds=3.0)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        reader = _open(root, 10**9, read_only=True)
        chains = [build_chain(namespace, _tokens(16, s), 4, seed=s) for s in range(40)]
        hits = wrong = 0
        while writer.poll() is None:
            for chain in chains:
                keys = [c.key for c in chain]
                present = reader.contains(keys)
                got = reader.get([k for k, p in zip(keys, present, strict=True) if p])
                want = [c for c, p in zip(chain, present, strict=True) if p]
                for g, w in zip(got, want, strict=True):
                    if g is not None:
                        hits += 1
                        wrong += not torch.equal(g.payload, w.payload)
        out = writer.stdout.read()
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0, out
    assert "evictions 0" not in out
    assert hits > 0 and wrong == 0
    assert reader.stats().corrupt == 0
