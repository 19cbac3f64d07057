"""The narrow protocol every storage backend implements."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvtier.chunk import Chunk, encode
from kvtier.codec import Codec
from kvtier.keys import ChunkKey

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
        """Store chunks (parents before children), evicting as needed; False where one was not stored."""
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


def encode_or_none(chunk: Chunk, codec: Codec | None, tier: str) -> bytes | None:
    """The stored form of ``chunk``, or None (logged) when ``codec`` cannot encode it (e.g. out-of-range values).

    A tier refuses such a chunk like a full one: the caller counts a rejected put.
    """
    try:
        return encode(chunk, codec)
    except ValueError as exc:  # CodecError, or a codec refusing the values (e.g. non-finite)
        log.warning("%s tier: cannot encode chunk %s with %s: %s", tier, chunk.key.hex()[:16], codec, exc)
        return None
