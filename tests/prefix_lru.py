"""kvtier's original prefix-consistent LRU, kept as the reference the ``lru`` policy is property-tested against.

Was kvtier/eviction/lru.py; no tier runs it any more. The text below is its original contract.

Prefix-consistent LRU: the eviction order of one tier.

Order: least recently used first, but only *leaves* may go: an entry with a
child in the same tier is never evicted before that child, because a chunk
whose parent is gone can never be reached by a prefix lookup. Callers touch a
whole prefix at once with :meth:`PrefixLRU.touch`, which makes ancestors more
recent than their descendants, so the LRU end is nearly always a leaf and the
scan for a victim is short.

Not thread-safe: the owning backend holds its lock around every call.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from kvtier.keys import ChunkKey


class PrefixLRU:
    """Tracks entries (key, parent, size) of one tier and chooses victims."""

    def __init__(self) -> None:
        self._order: OrderedDict[ChunkKey, None] = OrderedDict()  # LRU first
        self._parent: dict[ChunkKey, ChunkKey | None] = {}
        self._size: dict[ChunkKey, int] = {}
        self._children: Counter[ChunkKey] = Counter()
        self.used_bytes = 0

    def __contains__(self, key: object) -> bool:
        return key in self._size

    def __len__(self) -> int:
        return len(self._size)

    def __iter__(self) -> Iterator[ChunkKey]:
        """Keys from least to most recently used."""
        return iter(list(self._order))

    def size_of(self, key: ChunkKey) -> int:
        return self._size[key]

    def add(self, key: ChunkKey, parent: ChunkKey | None, nbytes: int) -> None:
        """Insert ``key`` as most recently used (an existing key is only touched)."""
        if key in self._size:
            self._order.move_to_end(key)
            return
        self._parent[key] = parent
        self._size[key] = nbytes
        self._order[key] = None
        if parent is not None:
            self._children[parent] += 1
        self.used_bytes += nbytes

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        """Mark a prefix (given root first) as just used; ancestors end up more recent than descendants."""
        for key in reversed(keys):
            if key in self._size:
                self._order.move_to_end(key)

    def remove(self, key: ChunkKey) -> int:
        """Forget ``key``; returns its size (0 if absent)."""
        if key not in self._size:
            return 0
        nbytes = self._size.pop(key)
        del self._order[key]
        parent = self._parent.pop(key)
        if parent is not None:
            self._children[parent] -= 1
            if self._children[parent] <= 0:
                del self._children[parent]
        self.used_bytes -= nbytes
        return nbytes

    def plan_eviction(self, need: int, budget: int, protect: Iterable[ChunkKey] = ()) -> list[ChunkKey] | None:
        """Victims (in eviction order) that make room for ``need`` more bytes within ``budget``.

        Pure: nothing is removed; the caller removes the victims it acts on.
        Returns None when no choice of leaves outside ``protect`` frees enough.
        """
        protected = set(protect)
        chosen: list[ChunkKey] = []
        taken: set[ChunkKey] = set()
        lost_children: Counter[ChunkKey] = Counter()
        freed = 0
        while self.used_bytes - freed + need > budget:
            victim = next(
                (
                    k
                    for k in self._order
                    if k not in taken and k not in protected and self._children[k] - lost_children[k] <= 0
                ),
                None,
            )
            if victim is None:
                return None
            chosen.append(victim)
            taken.add(victim)
            freed += self._size[victim]
            parent = self._parent[victim]
            if parent is not None:
                lost_children[parent] += 1
        return chosen
