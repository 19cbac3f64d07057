"""Private by default (issue 15): the disk tier's folders are 0700 and its files 0600 whatever the umask;
``l2.shared_group`` opens a folder to one group on purpose; an existing looser folder is warned about."""

from __future__ import annotations

import grp
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.keys import Namespace
from kvtier.layout import KVLayout

LAYOUT = KVLayout(2, 2, 4)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _store(cache_dir: Path, **overrides: object) -> CacheEngine:
    values = {"cache_dir": str(cache_dir), "chunk_size": 4, "l1.enabled": False, **overrides}
    engine = CacheEngine.from_config(load_config(env={}, overrides=values), Namespace("m", LAYOUT)).start()
    tokens = np.arange(10, dtype=np.uint32)
    assert engine.store(tokens, torch.randn(LAYOUT.chunk_shape(10))).stored_chunks == 3
    engine.flush()
    return engine


def _modes(top: Path) -> dict[str, tuple[int, int]]:
    """(mode, gid) of ``top`` and everything under it, by relative path."""
    return {
        p.relative_to(top).as_posix(): (stat.S_IMODE(p.stat().st_mode), p.stat().st_gid) for p in [top, *top.rglob("*")]
    }


def test_new_folders_are_0700_and_files_0600_under_umask_022(tmp_path: Path, umask_022: None) -> None:
    cache = tmp_path / "home" / ".cache" / "kvtier"  # none of it exists yet
    _store(cache).close()
    modes = _modes(tmp_path / "home")
    dirs = {p: m for p, (m, _) in modes.items() if (tmp_path / "home" / p).is_dir()}
    files = {p: m for p, (m, _) in modes.items() if not (tmp_path / "home" / p).is_dir()}
    assert set(dirs.values()) == {0o700}, dirs  # the parents this code created too
    assert set(files.values()) == {0o600}, files
    assert sum(p.endswith(".kvc") for p in files) == 3 and any("ledger" in p for p in files)


def test_an_existing_looser_folder_is_warned_about_and_still_used(tmp_path: Path, umask_022: None, caplog) -> None:
    folder = tmp_path / "chunks"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    with caplog.at_level(logging.WARNING, logger="kvtier.storage.files"):
        engine = _store(tmp_path, **{"l2.path": str(folder)})
    assert "is open to other users (mode 755)" in caplog.text
    assert engine.retrieve(np.arange(10, dtype=np.uint32)).num_tokens == 10
    engine.close()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # told, not changed behind the owner's back


def _a_group() -> grp.struct_group:
    """A group this process may give files to: another one when root (so the chown is visible), else its own."""
    if os.getuid() == 0:
        for g in grp.getgrall():
            if g.gr_gid != os.getgid():
                return g
    return grp.getgrgid(os.getgid())


def test_shared_group_opens_the_folder_to_that_group_only(tmp_path: Path, umask_022: None) -> None:
    group = _a_group()
    folder = tmp_path / "team" / "chunks"
    _store(tmp_path, **{"l2.path": str(folder), "l2.shared_group": group.gr_name}).close()
    modes = _modes(folder)
    dirs = {p: v for p, v in modes.items() if (folder / p).is_dir()}
    files = {p: v for p, v in modes.items() if not (folder / p).is_dir()}
    assert set(dirs.values()) == {(0o2770, group.gr_gid)}, dirs
    assert set(files.values()) == {(0o660, group.gr_gid)}, files
    # by number too; an unknown group is a clear configuration error
    _store(tmp_path, **{"l2.path": str(tmp_path / "n"), "l2.shared_group": str(group.gr_gid)}).close()
    with pytest.raises(ConfigError, match=r"l2\.shared_group: no such group"):
        _store(tmp_path, **{"l2.path": str(tmp_path / "x"), "l2.shared_group": "no-such-group-kvtier"})
