"""The disk tier's file conventions: names, temporary files, reads into one buffer, mtimes, the page cache.

A chunk file is ``<root>/<k[:2]>/<key hex>.<parent hex or "root">.kvc``; a
write in progress is ``<root>/.tmp/<key hex>.<pid>.<thread id>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from kvtier.chunk import ChunkHeader
from kvtier.errors import ChunkFormatError
from kvtier.keys import ChunkKey

SUFFIX = ".kvc"
ROOT_PARENT = "root"


def subdirs(root: Path, *, missing_ok: bool) -> list[str]:
    """The ``<k[:2]>`` folder names under ``root`` (none if it does not exist and ``missing_ok``)."""
    try:
        return [e.name for e in os.scandir(root) if len(e.name) == 2 and e.is_dir()]
    except FileNotFoundError:
        if missing_ok:
            return []
        raise


def remove_orphaned_tmp(tmp: Path) -> None:
    """Delete temporary files left by writers that are no longer running (named ``<key>.<pid>.<thread>``)."""
    for entry in os.scandir(tmp):
        parts = entry.name.split(".")
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        # this process's own writes (another backend on the same folder) and live writers' are in flight
        if pid is not None and (pid == os.getpid() or _running(pid)):
            continue
        Path(entry.path).unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def parse_name(name: str) -> tuple[ChunkKey, ChunkKey | None] | None:
    if not name.endswith(SUFFIX):
        return None
    parts = name[: -len(SUFFIX)].split(".")
    if len(parts) != 2:
        return None
    try:
        key = ChunkKey.from_hex(parts[0])
        parent = None if parts[1] == ROOT_PARENT else ChunkKey.from_hex(parts[1])
    except ValueError:
        return None
    return key, parent


def read_payload(f, head: bytes, header: ChunkHeader) -> bytearray:
    buf = bytearray(header.payload_len)
    view = memoryview(buf)
    already = head[header.offset : header.offset + header.payload_len]
    view[: len(already)] = already
    pos = len(already)
    while pos < len(buf):
        n = f.readinto(view[pos:])
        if not n:
            raise ChunkFormatError("file truncated")
        pos += n
    return buf


def touch_file(path: Path, mtime_ns: int) -> None:
    try:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    except OSError:
        pass


def drop_page_cache(paths: Iterable[Path]) -> int:
    """Ask the kernel to drop these files from the page cache; returns how many it was asked for."""
    dropped = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped += 1
        finally:
            os.close(fd)
    return dropped
