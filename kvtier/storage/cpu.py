"""L1: chunks in this process's CPU memory, within a byte budget that is never exceeded."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvtier.chunk import CODEC_RAW, Chunk, decode, decode_header
from kvtier.codec import Codec
from kvtier.eviction import PrefixLRU
from kvtier.keys import ChunkKey
from kvtier.storage.base import BackendStats, ChunkInfo, RemovalListener, encode_or_none


class MemoryBackend:
    """Holds :class:`Chunk` objects by reference (no copy, no serialization).

    Data in process memory is trusted: it entered through ``put`` from the
    engine or from a lower tier that verified its checksum, so ``get`` does
    not re-checksum. The budget counts payload and token bytes.

    With a non-raw ``codec`` chunks are held encoded (smaller, so more fit the
    budget) and decoded on every ``get``; the budget then counts encoded bytes.
    """

    in_process = True  # written on the caller's thread (see TierStack)
    read_only = False
    on_removed: RemovalListener | None = None  # told of evictions (see storage/base.py)

    def __init__(self, max_bytes: int, *, codec: Codec | None = None, name: str = "l1") -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.name = name
        self.max_bytes = max_bytes
        self.codec = codec if codec is not None and codec.name != CODEC_RAW else None
        self._chunks: dict[ChunkKey, Chunk | bytes] = {}
        self._lru = PrefixLRU()
        self._lock = threading.Lock()
        self._evictions = 0
        self._rejected = 0

    def start(self) -> None:
        pass

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._chunks for k in keys]

    def get(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        with self._lock:
            held = [self._chunks.get(k) for k in keys]
            self._lru.touch([k for k, c in zip(keys, held, strict=True) if c is not None])
        return [decode(bytearray(c)) if isinstance(c, bytes) else c for c in held]

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        results: list[bool] = []
        # encode outside the lock; None: the codec cannot encode this chunk (refused like a full tier)
        held = [encode_or_none(c, self.codec, self.name) if self.codec is not None else c for c in chunks]
        with self._lock:
            for chunk, form in zip(chunks, held, strict=True):
                if form is None:
                    self._rejected += 1
                results.append(form is not None and self._put_one(chunk, form))
        return results

    def _put_one(self, chunk: Chunk, held: Chunk | bytes) -> bool:
        if chunk.key in self._chunks:
            self._lru.touch([chunk.key])
            return True
        self._lru.add(chunk.key, chunk.parent, chunk.nbytes if isinstance(held, Chunk) else len(held))
        victims = self._lru.plan_eviction(0, self.max_bytes, protect=[chunk.key])
        if victims is None:
            self._lru.remove(chunk.key)
            self._rejected += 1
            return False
        for victim in victims:
            self._lru.remove(victim)
            del self._chunks[victim]
        self._evictions += len(victims)
        if victims and self.on_removed is not None:
            self.on_removed(victims)
        self._chunks[chunk.key] = held
        assert self._lru.used_bytes <= self.max_bytes
        return True

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            removed = 0
            for k in keys:
                if self._chunks.pop(k, None) is not None:
                    self._lru.remove(k)
                    removed += 1
            return removed

    def clear(self) -> int:
        with self._lock:
            n = len(self._chunks)
            self._chunks.clear()
            self._lru = PrefixLRU()
            return n

    def keys_lru_order(self) -> list[ChunkKey]:
        """Keys from least to most recently used (for inspection and tests)."""
        with self._lock:
            return list(self._lru)

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(
                self.name, len(self._chunks), self._lru.used_bytes, self.max_bytes, self._evictions, self._rejected, 0
            )

    def close(self) -> None:
        self.clear()

    def inventory(self) -> dict[ChunkKey, ChunkInfo]:
        """Every held chunk's parent, namespace and tokens (the ``Inventoried`` ability)."""
        with self._lock:
            held = list(self._chunks.items())
        out: dict[ChunkKey, ChunkInfo] = {}
        for key, c in held:
            if isinstance(c, bytes):
                h = decode_header(c)
                out[key] = ChunkInfo(h.parent, h.namespace, tuple(int(t) for t in h.tokens))
            else:
                out[key] = ChunkInfo(c.parent, c.namespace, tuple(int(t) for t in c.tokens))
        return out
