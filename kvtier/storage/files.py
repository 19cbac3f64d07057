"""The chunk-folder file conventions (disk ``l2`` and ``node`` tiers): names, private folders and files,
temporary files, the one verified read, mtimes, the page cache.

A chunk file is ``<root>/<k[:2]>/<key hex>.<parent hex or "root">.kvc``; a
write in progress is ``<root>/.tmp/<key hex>.<pid>.<thread id>``. A chunk file
is written once, to its temporary name, and renamed into place: its contents
never change after that, so a reader either sees the whole file or no file.
Files are created ``0600`` and folders ``0700`` (whatever the umask, parents
this code creates included), so another user on the machine cannot read a
tenant's KV (a chunk header holds the prompt's token ids in clear). A
:class:`FolderAccess` with a group opens a folder to that one group on
purpose (``l2.shared_group``): folders ``2770`` (setgid, so new ones inherit
the group), files ``0660``, owned by that group.
"""

from __future__ import annotations

import grp
import logging
import mmap
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.chunk import PREFIX_BYTES, Chunk, ChunkHeader, decode_header, decode_payload, header_length
from kvtier.errors import ChunkFormatError, StorageError
from kvtier.keys import ChunkKey
from kvtier.security import ChunkPolicy

SUFFIX = ".kvc"
ROOT_PARENT = "root"
TMP_DIR = ".tmp"
FILE_MODE = 0o600
DIR_MODE = 0o700
GROUP_FILE_MODE = 0o660
GROUP_DIR_MODE = 0o2770

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderAccess:
    """Who may use a chunk folder: its owner only (``gid`` None, the default), or also the group ``gid``."""

    gid: int | None = None

    @classmethod
    def for_group(cls, group: str | int | None) -> FolderAccess:
        """Private for None; else the group by name or number (ValueError if there is no such group)."""
        if group is None:
            return cls()
        try:
            gid = grp.getgrgid(group).gr_gid if isinstance(group, int) else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no such group: {group!r}") from None
        return cls(gid)

    @property
    def dir_mode(self) -> int:
        return DIR_MODE if self.gid is None else GROUP_DIR_MODE

    @property
    def file_mode(self) -> int:
        return FILE_MODE if self.gid is None else GROUP_FILE_MODE

    def make_dir(self, path: Path) -> None:
        """Create ``path`` and any missing parents with this access's mode (the umask cannot widen or narrow it)."""
        missing: list[Path] = []
        p = Path(path)
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for folder in reversed(missing):
            try:
                os.mkdir(folder, self.dir_mode)
            except FileExistsError:  # another process made it meanwhile: judged by check_dir
                continue
            self.fix(folder, self.dir_mode)

    def fix(self, path: Path | int, mode: int) -> None:
        """Give a just-created file or folder (a path or an open fd) exactly ``mode`` and this access's group."""
        if isinstance(path, int):
            if self.gid is not None:
                os.fchown(path, -1, self.gid)
            os.fchmod(path, mode)
        else:
            if self.gid is not None:
                os.chown(path, -1, self.gid)
            os.chmod(path, mode)

    def looser(self, path: Path) -> str | None:
        """Why an existing folder is open wider than this access allows (or to someone else), or None."""
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        mode = stat.S_IMODE(st.st_mode)
        if self.gid is None:
            if st.st_uid != os.getuid():
                return f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
            if mode & 0o077:
                return f"{path} is open to other users (mode {mode:o}); chmod 700 it"
            return None
        if st.st_gid != self.gid:
            return f"{path} belongs to group {st.st_gid}, not the shared group {self.gid}"
        if mode & 0o007:
            return f"{path} is open to users outside its group (mode {mode:o}); chmod o-rwx it"
        return None

    def prepare(self, path: Path, *, create: bool = True, strict: bool = False) -> None:
        """Create ``path`` if missing (``create``), then check an existing folder's owner and mode.

        A folder looser than this access allows is a StorageError with ``strict``, else a logged warning.
        """
        if create:
            self.make_dir(path)
        elif not path.exists():
            return
        why = self.looser(path)
        if why is None:
            return
        if strict:
            raise StorageError(f"{why}: not using it")
        log.warning("chunk folder %s: %s (whoever can write there can plant chunks; docs/security.md)", path, why)


PRIVATE = FolderAccess()
_HEAD_READ = 1 << 16  # one read gets the header, the token ids and the start of the body


def chunk_path(root: Path, key: ChunkKey, parent: ChunkKey | None) -> Path:
    """Where the chunk ``key`` (child of ``parent``) lives under ``root``."""
    h = key.hex()
    return root / h[:2] / f"{h}.{parent.hex() if parent is not None else ROOT_PARENT}{SUFFIX}"


def tmp_path(root: Path, key: ChunkKey) -> Path:
    """The temporary name this thread writes ``key`` to before renaming it into place."""
    return root / TMP_DIR / f"{key.hex()}.{os.getpid()}.{threading.get_ident()}"


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as a folder only its owner may enter, or check an existing one.

    Raises StorageError if the folder belongs to another user or others may
    read or enter it (someone else could read or plant chunks there).
    """
    PRIVATE.prepare(path, strict=True)


def write_file(
    tmp: Path,
    path: Path,
    parts: Iterable[bytes | memoryview],
    *,
    fsync: bool = False,
    access: FolderAccess = PRIVATE,
) -> None:
    """Write ``parts`` to ``tmp`` (created ``0600``, never an existing file) and rename it to ``path``.

    ``path``'s folder is created (``0700``) if missing; with a group ``access``
    folders are ``2770`` and files ``0660``. On an OSError the temporary file
    is removed and the error raised; ``path`` is then untouched.
    """
    try:
        if not path.parent.exists():
            try:
                os.mkdir(path.parent, access.dir_mode)
                if access.gid is not None:
                    access.fix(path.parent, access.dir_mode)
            except FileExistsError:
                pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, access.file_mode)
        if access.gid is not None:  # the umask may have taken the group's bits
            access.fix(fd, access.file_mode)
        with open(fd, "wb", buffering=0) as f:
            for part in parts:
                view = memoryview(part)
                while view:  # unbuffered writes may be partial
                    view = view[f.write(view) :]
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def read_header(path: Path) -> ChunkHeader | None:
    """The header (and token ids) of the chunk file at ``path``, body unread; None if it is gone or not a chunk."""
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(PREFIX_BYTES)
            needed = header_length(head)
            head += f.read(needed - len(head))
        return decode_header(head)
    except (OSError, ChunkFormatError):
        return None


def read_chunk(f, size: int, key: ChunkKey, policy: ChunkPolicy | None = None) -> Chunk:
    """Read and verify the chunk file open as ``f`` (unbuffered, ``size`` bytes), which must hold ``key``.

    The body is read straight into fresh, uninitialised memory that the
    returned chunk owns (no zero-fill, no second copy), and only once the
    header passed ``policy`` and its lengths match the file's size. Raises
    ChunkFormatError if the file is not a valid chunk for ``key`` (a
    ChunkVersionError if it is one in another format, a ChunkAuthError if the
    policy does not accept it), OSError if it cannot be read.
    """
    head = f.read(_HEAD_READ)
    needed = header_length(head[:PREFIX_BYTES])
    if needed > len(head):
        head += f.read(needed - len(head))
    header = decode_header(head, policy=policy)
    if header.key != key:
        raise ChunkFormatError("file holds another key")
    if size != header.offset + header.payload_len:
        raise ChunkFormatError(f"file is {size} bytes, header says {header.offset + header.payload_len}")
    return decode_payload(header, read_payload(f, head, header))


def map_chunk(f, size: int, key: ChunkKey, policy: ChunkPolicy | None = None) -> Chunk:
    """Like :func:`read_chunk`, but the body is not copied: the chunk's payload maps the file itself.

    For files in memory (tmpfs, the node tier): a read-only shared mapping,
    populated in one call, is checked and decoded where it lies, so a raw
    chunk costs no copy and no fresh memory at all (a later copy into an
    engine's blocks is the only one). The mapping lives as long as the
    chunk: an evicted (unlinked) file stays readable until then, and since
    files are only ever replaced by rename, never rewritten in place, the
    mapped bytes never change. A chunk's payload is never written (see
    :class:`~kvtier.chunk.Chunk`); here writing would fault.
    """
    if size < PREFIX_BYTES:
        raise ChunkFormatError(f"file is {size} bytes, too short for a chunk header")
    mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
    view = memoryview(mm)
    needed = header_length(bytes(view[:PREFIX_BYTES]))
    if needed > size:
        raise ChunkFormatError(f"file is {size} bytes, its header needs {needed}")
    header = decode_header(bytes(view[:needed]), policy=policy)
    if header.key != key:
        raise ChunkFormatError("file holds another key")
    if size != header.offset + header.payload_len:
        raise ChunkFormatError(f"file is {size} bytes, header says {header.offset + header.payload_len}")
    return decode_payload(header, view[header.offset :])


def subdirs(root: Path, *, missing_ok: bool) -> list[str]:
    """The ``<k[:2]>`` folder names under ``root`` (none if it does not exist and ``missing_ok``)."""
    try:
        return [e.name for e in os.scandir(root) if len(e.name) == 2 and e.is_dir()]
    except FileNotFoundError:
        if missing_ok:
            return []
        raise


def scan_chunks(root: Path) -> list[tuple[int, ChunkKey, ChunkKey | None, int]]:
    """(mtime ns, key, parent, size) of every chunk file under ``root`` (names parsed, no file opened)."""
    found: list[tuple[int, ChunkKey, ChunkKey | None, int]] = []
    for sub in subdirs(root, missing_ok=True):
        try:
            entries = list(os.scandir(root / sub))
        except FileNotFoundError:
            continue
        for entry in entries:
            parsed = parse_name(entry.name)
            if parsed is None:
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # removed by another process while listing
                continue
            found.append((st.st_mtime_ns, parsed[0], parsed[1], st.st_size))
    return found


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


def read_payload(f, head: bytes, header: ChunkHeader) -> memoryview:
    """The body of the chunk file ``f`` whose first bytes are ``head``, in fresh memory (raises if truncated)."""
    # torch.empty: uninitialised (bytearray would zero-fill every page first); the chunk's tensor shares it
    view = memoryview(torch.empty(header.payload_len, dtype=torch.uint8).numpy())
    buf = view
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
