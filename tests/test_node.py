"""The node tier and shared disk folders across real processes: one budget, no lag, crash safety, privacy."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.config import load_config
from kvtier.errors import StorageError
from kvtier.keys import Namespace
from kvtier.storage import DiskBackend, NodeBackend, TierAccess, build_backends, build_tiers
from kvtier.storage.ledger import LEDGER_FILE

TESTS = str(Path(__file__).parent)
MakeChain = Callable[..., list[Chunk]]


def _tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, size=n).astype("<u4")


def _folder_bytes(root: Path) -> int:
    """Bytes of every chunk and temporary file under ``root`` now (the ledger's own files excluded)."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if not name.startswith(LEDGER_FILE):
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:  # evicted while walking
                    pass
    return total


def _open(kind: str, root: Path, budget: int, **kwargs: object):
    backend = (NodeBackend if kind == "node" else DiskBackend)(root, budget, **kwargs)  # type: ignore[arg-type]
    backend.start()
    return backend


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import SMALL_LAYOUT, build_chain
    from kvtier.keys import Namespace
    from kvtier.storage import DiskBackend, NodeBackend
    cls = NodeBackend if {kind!r} == "node" else DiskBackend
    tier = cls({root!r}, {budget})
    tier.start()
    ns = Namespace("test-model-fingerprint", SMALL_LAYOUT)
    rng = np.random.default_rng({seed})
    print("ready", flush=True)
    for i in range({chains}):
        n = int(rng.integers(4, 40))
        chain = build_chain(ns, rng.integers(0, 50_000, size=n).astype("<u4"), int(rng.integers(2, 9)), seed=i)
        tier.put(chain)
        if i % 5 == 0:
            tier.get([c.key for c in chain[: len(chain) // 2]])  # reads move recency too
    s = tier.stats()
    print("done", s.evictions, s.rejected_puts, flush=True)
    """
)


@pytest.mark.parametrize("kind", ["node", "disk"])
def test_two_processes_writing_one_folder_keep_one_budget(tmp_path: Path, kind: str) -> None:
    """Two writers, each with budget B, on one folder: it never holds more than B (exact at the end)."""
    root = tmp_path / "tier"
    budget = 30_000  # ~35 chunks of 2-8 tokens x 128 B: both writers evict all the time
    errs = [tmp_path / f"writer{seed}.err" for seed in (1, 2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER.format(tests=TESTS, kind=kind, root=str(root), budget=budget, seed=seed, chains=120),
            ],
            stdout=subprocess.PIPE,
            stderr=err.open("w"),  # a file, not a pipe: a chatty writer never blocks on it
            text=True,
        )
        for seed, err in zip((1, 2), errs)
    ]
    try:
        for p, err in zip(procs, errs):
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            assert line == "ready", f"writer exited before it was ready: {err.read_text()[-3000:]}"
        peak = samples = 0
        ledger = sqlite3.connect(root / LEDGER_FILE, timeout=30, isolation_level=None)
        while any(p.poll() is None for p in procs):
            ledger.execute("BEGIN IMMEDIATE")  # the writers' lock: no reservation or eviction while we count
            peak = max(peak, _folder_bytes(root))
            ledger.execute("ROLLBACK")
            samples += 1
            time.sleep(0.005)  # SQLite's lock is not fair: let the writers in
        ledger.close()
        outs = [p.stdout.read() for p in procs if p.stdout is not None]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], (outs, [err.read_text()[-3000:] for err in errs])
    assert all(int(out.split()[1]) > 0 for out in outs)  # both evicted
    # Exact: files appear only after their bytes are reserved, rows go only after their files (a temporary
    # file grows within its reservation, renames change nothing), so under the lock the folder fits the budget.
    assert samples > 10 and 0.5 * budget < peak <= budget
    tier = _open(kind, root, budget)
    entries, used, pending = tier._ledger.totals() if kind == "disk" else tier.ledger.totals()
    assert pending == 0
    assert _folder_bytes(root) == used <= budget  # exact: every byte in the folder is in the ledger
    assert len(list(root.glob("*/*.kvc"))) == entries


_STORE_AND_EXIT = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import SMALL_LAYOUT, build_chain
    from kvtier.keys import Namespace
    from kvtier.storage import NodeBackend
    tier = NodeBackend({root!r}, 10**6)
    tier.start()
    tokens = np.random.default_rng(7).integers(0, 50_000, size=16).astype("<u4")
    assert all(tier.put(build_chain(Namespace("test-model-fingerprint", SMALL_LAYOUT), tokens, 4, seed=7)))
    """
)


def test_a_second_process_reads_what_the_first_stored(tmp_path: Path, make_chain: MakeChain) -> None:
    root = tmp_path / "node"
    subprocess.run([sys.executable, "-c", _STORE_AND_EXIT.format(tests=TESTS, root=str(root))], check=True)
    chain = make_chain(_tokens(16, 7), 4, seed=7)  # the same chunks, built here
    tier = _open("node", root, 10**6)  # the writer is gone: the tier outlived it
    got = tier.get([c.key for c in chain])
    assert all(g is not None and torch.equal(g.payload, c.payload) for g, c in zip(got, chain, strict=True))
    assert tier.stats().corrupt == 0


_STACK_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import SMALL_LAYOUT, build_chain
    from kvtier.config import load_config
    from kvtier.keys import Namespace
    from kvtier.storage import TierAccess, build_tiers
    config = load_config(env={{}}, overrides={overrides!r})
    with build_tiers(config, TierAccess.shared()) as stack:
        ns = Namespace("test-model-fingerprint", SMALL_LAYOUT)
        for seed in range(5):
            tokens = np.random.default_rng(seed).integers(0, 50_000, size=8).astype("<u4")
            stack.put(build_chain(ns, tokens, 4, seed=seed))
            print("stored", seed, flush=True)
            sys.stdin.readline()  # the observer has looked
    """
)


def test_an_observer_sees_a_chunk_in_the_node_tier_as_soon_as_put_returns(
    tmp_path: Path, make_chain: MakeChain
) -> None:
    """vLLM's roles: a worker stack (l1, node, l2) stores; the scheduler's observer stack finds it at once."""
    overrides = {
        "node.enabled": "true",
        "node.path": str(tmp_path / "node"),
        "node.max_bytes": "1MB",
        "l2.path": str(tmp_path / "chunks"),
        "cache_dir": str(tmp_path / "cache"),
    }
    observer = build_tiers(load_config(env={}, overrides=overrides), TierAccess.observer())
    observer.start()  # before the writer created anything
    assert observer.names == ["node", "l2"]
    code = _STACK_WRITER.format(tests=TESTS, overrides=overrides)
    writer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None and writer.stdout is not None
    try:
        for seed in range(5):
            assert writer.stdout.readline().split() == ["stored", str(seed)]
            keys = [c.key for c in make_chain(_tokens(8, seed), 4, seed=seed)]
            assert observer.locate(keys) == [0, 0]  # in the node tier, with no flush and no wait
            writer.stdin.write("\n")
            writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
        observer.close()


_BIG_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import build_chain
    from kvtier.keys import Namespace
    from kvtier.layout import KVLayout
    from kvtier.storage import NodeBackend
    tier = NodeBackend({root!r}, 10**9)
    tier.start()
    ns = Namespace("test-model-fingerprint", KVLayout(30, 3, 64))  # 46 KB a token
    chain = build_chain(ns, np.arange(2048, dtype="<u4"), 2048, seed=3)  # one 94 MB chunk
    print("ready", flush=True)
    while True:
        tier.put(chain)
        tier.delete([chain[0].key])
    """
)


def test_a_writer_killed_mid_put_leaves_nothing_that_reads_as_valid(tmp_path: Path) -> None:
    root = tmp_path / "node"
    writer = subprocess.Popen(
        [sys.executable, "-c", _BIG_WRITER.format(tests=TESTS, root=str(root))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while not any((root / ".tmp").iterdir()):  # its temporary file exists: the put is under way
            assert time.monotonic() < deadline and writer.poll() is None
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        writer.kill()
        writer.wait()
    reader = NodeBackend(root, 10**9, read_only=True)
    reader.start()
    entries, _, pending = reader.ledger.totals()
    assert entries == 0 and pending > 0  # its reservation: not present, still counted in the budget
    tier = _open("node", root, 10**9)  # a new writer: start reclaims the dead one's reservation and files
    assert tier.ledger.totals() == (0, 0, 0)
    assert _folder_bytes(root) == 0 and not any((root / ".tmp").iterdir())
    assert reader.stats().corrupt == 0


def test_folders_and_files_are_private_under_umask_022(tmp_path: Path, make_chain: MakeChain) -> None:
    root = tmp_path / "node"
    old = os.umask(0o022)
    try:
        tier = _open("node", root, 10**6)
        tier.put(make_chain(_tokens(8, 1), 4))
    finally:
        os.umask(old)
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    assert modes[".tmp"] == 0o700 and modes["."] == 0o700
    assert {m for p, m in modes.items() if p.endswith(".kvc")} == {0o600}
    assert {m for p, m in modes.items() if len(p) == 2} == {0o700}
    assert {m for p, m in modes.items() if p.startswith(LEDGER_FILE)} == {0o600}  # -wal and -shm too
    assert len(modes) == 1 + 1 + 2 + 2 + 3  # the folder, .tmp, 2 chunk folders, 2 chunks, the ledger's 3 files


def test_a_folder_open_to_others_or_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    open_to_all = tmp_path / "open"
    open_to_all.mkdir(mode=0o755)
    os.chmod(open_to_all, 0o755)
    with pytest.raises(StorageError, match="open to other users"):
        _open("node", open_to_all, 10**6)
    if os.getuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 12345, 12345)
        with pytest.raises(StorageError, match="belongs to uid 12345"):
            _open("node", foreign, 10**6)


def test_the_node_tier_sits_between_l1_and_l2_and_an_observer_opens_it_read_only(tmp_path: Path) -> None:
    overrides = {"node.enabled": "true", "node.path": str(tmp_path / "n"), "node.max_bytes": "1MB"}
    config = load_config(env={}, overrides={**overrides, "l2.path": str(tmp_path / "c")})
    assert [b.name for b in build_backends(config)] == ["l1", "node", "l2"]
    observed = build_backends(config, TierAccess.observer())
    assert [(b.name, b.read_only) for b in observed] == [("node", True), ("l2", True)]
    stack = build_tiers(config)
    assert stack.sync_tiers == 2  # l1 and node on the caller's thread, l2 behind


def test_node_tier_round_trip_counts_and_clear(tmp_path: Path, namespace: Namespace, make_chain: MakeChain) -> None:
    tier = _open("node", tmp_path / "n", 10**6)
    chain = make_chain(_tokens(12, 4), 4)
    assert tier.put(chain) == [True, True, True]
    assert tier.contains([c.key for c in chain]) == [True, True, True]
    assert tier.stats().entries == 3 and tier.stats().used_bytes == _folder_bytes(tmp_path / "n")
    path = next((tmp_path / "n").glob("*/*.kvc"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))  # damaged in place
    got = tier.get([c.key for c in chain])
    assert sum(g is None for g in got) == 1 and tier.stats().corrupt == 1
    assert not path.exists() and tier.stats().entries == 2
    assert tier.clear() == 2 and _folder_bytes(tmp_path / "n") == 0


def test_a_disk_hit_is_promoted_into_l1_at_once_and_into_node_behind(tmp_path: Path, make_chain: MakeChain) -> None:
    overrides = {"node.enabled": "true", "node.path": str(tmp_path / "n"), "node.max_bytes": "1MB"}
    config = load_config(env={}, overrides={**overrides, "l2.path": str(tmp_path / "c")})
    chain = make_chain(_tokens(12, 4), 4)
    keys = [c.key for c in chain]
    with build_tiers(config) as stack:
        l1, node, l2 = stack.tiers
        assert l2.put(chain) == [True] * 3
        stack.promote([(c, 2) for c in l2.get(keys)])  # type: ignore[misc]
        assert l1.contains(keys) == [True] * 3  # in-process: on the reader's thread
        assert stack.flush(10)
        assert node.contains(keys) == [True] * 3  # shared memory: through the write-behind queue
        got = node.get(keys)
        assert all(g is not None and torch.equal(g.payload, c.payload) for g, c in zip(got, chain, strict=True))
