"""Honest StoreResult (issue 15): chunks refused by every tier, synchronous or write-behind, are reported:
the synchronous tiers' at once, the background tiers' once their write ran (pending until then)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.keys import Namespace
from kvtier.layout import KVLayout

LAYOUT = KVLayout(2, 2, 8)  # 256 bytes per token
C = 4


def _engine(tmp_path: Path, **overrides: object) -> CacheEngine:
    values = {"chunk_size": C, "store_partial": False, "l2.path": str(tmp_path / "chunks"), **overrides}
    return CacheEngine.from_config(load_config(env={}, overrides=values), Namespace("m", LAYOUT)).start()


def _store(engine: CacheEngine, n: int):
    return engine.store(np.arange(n, dtype=np.uint32), torch.randn(LAYOUT.chunk_shape(n)))


def test_a_full_disk_budget_is_reported_once_the_write_behind_ran(tmp_path: Path) -> None:
    with _engine(tmp_path, **{"l1.enabled": False, "l2.max_bytes": 3000}) as engine:  # room for 2 chunks of 1.2 KB
        result = _store(engine, 6 * C)
        assert (result.stored_chunks, result.rejected_chunks, result.dropped_chunks) == (6, 0, 0)  # all queued
        assert result.rejected_by_tier == {} and len(result.pending) == 1
        assert result.background_rejected(timeout=None) == {"l2": 4}  # the 2 first fit; children of a refusal too
        assert not result.is_pending
        assert engine.tiers.tiers[0].stats().rejected_puts >= 1  # the tier's own counter agrees it refused


def test_synchronous_refusals_are_known_at_once_per_tier(tmp_path: Path) -> None:
    with _engine(tmp_path, **{"l1.max_bytes": 2500}) as engine:  # l1 holds 2 chunks; l2 all of them
        result = _store(engine, 6 * C)
        assert result.rejected_by_tier == {"l1": 4} and result.rejected_chunks == 4
        assert result.background_rejected(timeout=None) == {}


def test_a_full_write_queue_drops_are_reported(tmp_path: Path) -> None:
    with _engine(tmp_path, **{"l1.enabled": False, "write_queue_bytes": 100}) as engine:
        result = _store(engine, 2 * C)
        assert (result.dropped_chunks, result.rejected_chunks, result.pending) == (2, 2, ())
        assert result.background_rejected() == {}


def test_failing_disk_writes_are_reported(tmp_path: Path) -> None:
    """A real failing write: the process may not grow a file beyond 64 KiB (RLIMIT_FSIZE, EFBIG)."""
    script = textwrap.dedent(
        f"""
        import json, resource, signal, sys
        import numpy as np, torch
        from kvtier.config import load_config
        from kvtier.engine import CacheEngine
        from kvtier.keys import Namespace
        from kvtier.layout import KVLayout
        layout = KVLayout(4, 4, 64)  # 8 KiB per token: a 16-token chunk is 128 KiB, over the limit
        values = {{"chunk_size": 16, "store_partial": False, "l1.enabled": False, "l2.path": {str(tmp_path / "c")!r}}}
        engine = CacheEngine.from_config(load_config(env={{}}, overrides=values), Namespace("m", layout)).start()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        result = engine.store(np.arange(48, dtype=np.uint32), torch.randn(layout.chunk_shape(48)))
        late = result.background_rejected(timeout=30)
        engine.close()
        print(json.dumps({{"now": result.rejected_chunks, "late": late}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"now": 0, "late": {"l2": 3}}
    assert "write of" in out.stderr and "File too large" in out.stderr  # logged by the disk tier
