"""The narrow protocol every storage backend implements, and the optional abilities a backend may have.

A backend stores chunks; it does not decide *when* it is written. Tier policy
(which tiers are written on the caller's thread, promotion, refusing orphans,
write-behind) is :class:`~kvtier.storage.tiers.TierStack`'s. What the stack
needs to know about a backend beyond the protocol comes from small ability
protocols, checked with ``isinstance`` against the protocol, never against a
backend class:

* :class:`InProcess` -- ``in_process`` True: the tier holds chunks in this
  process's memory, so writing it costs no I/O and happens on the caller's
  thread.
* :class:`SharedMemory` -- ``shared_memory`` True: the tier is memory shared
  with other processes on this machine (the ``node`` tier): also written on
  the caller's thread, so every process sees a chunk once ``put`` returns.
  Every other tier is written in the background.
* :class:`ReadOnly` -- ``read_only`` True: the tier was opened as an
  observer; the stack never writes or promotes into it (a discard only
  makes it forget the key).

Noticing other processes' writes (a shared disk folder) is chosen when a tier
is built (:class:`~kvtier.storage.builder.TierAccess`), not asked of it later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvtier.chunk import Chunk, encode
from kvtier.codec import Codec
from kvtier.keys import ChunkKey
from kvtier.security import ChunkPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendStats:
    """A snapshot of one backend's counters."""

    name: str
    entries: int
    used_bytes: int
    max_bytes: int
    evictions: int
    rejected_puts: int
    corrupt: int
    stale: int = 0  # entries in an older chunk format: a counted miss, removed by a writer
    forged: int = 0  # entries the chunk policy refused (no valid MAC, or another namespace): a counted miss
    admission_refused: int = 0  # new chunks the tier's admission filter refused (also in rejected_puts)


@runtime_checkable
class InProcess(Protocol):
    """A tier held in this process's memory: the stack writes it on the caller's thread."""

    in_process: bool


@runtime_checkable
class ReadOnly(Protocol):
    """A tier that may be opened read-only (never written, evicted, touched or deleted)."""

    read_only: bool


@runtime_checkable
class SharedMemory(Protocol):
    """A tier in memory shared by the processes of this machine: the stack writes it on the caller's thread."""

    shared_memory: bool


def is_in_process(backend: object) -> bool:
    return isinstance(backend, InProcess) and backend.in_process


def is_synchronous(backend: object) -> bool:
    """Whether the stack writes ``backend`` on the caller's thread (in-process or shared-memory tiers)."""
    return is_in_process(backend) or (isinstance(backend, SharedMemory) and backend.shared_memory)


def is_read_only(backend: object) -> bool:
    return isinstance(backend, ReadOnly) and backend.read_only


@dataclass(frozen=True)
class ChunkInfo:
    """What a chunk's header says about it: its parent, namespace digest (tenant) and token ids."""

    parent: ChunkKey | None
    namespace: bytes
    tokens: tuple[int, ...]


@runtime_checkable
class Inventoried(Protocol):
    """A tier that can list what it holds, header by header (no body read): for admin clears by tenant or prefix."""

    def inventory(self) -> dict[ChunkKey, ChunkInfo]: ...


RemovalListener = Callable[[Sequence[ChunkKey]], None]
"""``on_removed``: a writable backend that removes chunks by itself (evictions, dropped corrupt or vanished
files) calls it with their keys, if set (the stack sets it to report tier events). It must return at once."""


@runtime_checkable
class StorageBackend(Protocol):
    """Batched storage of chunks under their keys, within a byte budget.

    Every method is thread-safe. ``get`` returns chunks whose framing and
    checksum are valid (a corrupt entry is dropped, counted and reported as
    None); whether a chunk is the *expected* one (tokens, namespace) is the
    caller's check. A backend never raises for an expected failure (missing
    key, full budget, I/O error): it answers None/False and counts it.
    """

    name: str

    def start(self) -> None:
        """Acquire resources (create folders, scan an index). Idempotent."""
        ...

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys are present; no recency change, no I/O beyond the index."""
        ...

    def get(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        """The chunks for ``keys`` (given root first), touched as one recently used prefix."""
        ...

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Store chunks, evicting as needed; False where one was not stored.

        Each chunk is judged on its own: whether a child of a refused chunk
        should be stored is the stack's decision, not the backend's.
        """
        ...

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """Remove keys; returns how many were present."""
        ...

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        ...

    def stats(self) -> BackendStats: ...

    def close(self) -> None:
        """Release resources. Idempotent."""
        ...


def encode_or_none(chunk: Chunk, codec: Codec | None, tier: str, policy: ChunkPolicy | None = None) -> bytes | None:
    """The stored form of ``chunk``, or None (logged) when ``codec`` cannot encode it (e.g. out-of-range values).

    A tier refuses such a chunk like a full one: the caller counts a rejected put.
    """
    try:
        return encode(chunk, codec, policy=policy)
    except ValueError as exc:  # CodecError, or a codec refusing the values (e.g. non-finite)
        log.warning("%s tier: cannot encode chunk %s with %s: %s", tier, chunk.key.hex()[:16], codec, exc)
        return None
