"""The classic policies on the leaf-only protocol: ``lru``, ``lfu`` (with aging), ``arc``, ``s3fifo``.

Each only orders the evictable leaves (see :mod:`kvtier.eviction.base`);
sizes are bytes, so ARC's target and S3-FIFO's small queue are byte shares.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from kvtier.eviction.base import EvictionPolicy, Key, Rank, _Entry, register


@register
class LRUPolicy(EvictionPolicy):
    """Least recently used leaf first: kvtier's original order, exactly (``PrefixLRU``).

    An insert or a hit makes a key the most recent; :meth:`touch` hits a
    prefix deepest first, so ancestors end up more recent than descendants.
    """

    name = "lru"

    def _rank_new(
        self, key: Key, parent: Key | None, nbytes: int, tokens: int, depth: int | None, now: float
    ) -> tuple[int, Rank]:
        return 0, ()

    def _rank_hit(self, key: Key, now: float) -> tuple[int, Rank]:
        return 0, ()


@register
class LFUPolicy(EvictionPolicy):
    """LFU with dynamic aging (LFU-DA): rank = L + hits, L = the rank of the last evicted key.

    Ties go to the least recently used. The aging term L lets keys that
    were popular long ago leave once newer keys have earned as much.
    """

    name = "lfu"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._hits: Counter[Key] = Counter()
        self._age = 0.0

    def _rank_new(
        self, key: Key, parent: Key | None, nbytes: int, tokens: int, depth: int | None, now: float
    ) -> tuple[int, Rank]:
        self._hits[key] = 1
        return 0, (self._age + 1,)

    def _rank_hit(self, key: Key, now: float) -> tuple[int, Rank]:
        self._hits[key] += 1
        return 0, (self._age + self._hits[key],)

    def _on_remove(self, key: Key, evicted: bool) -> None:
        if evicted:
            self._age = max(self._age, self._entry[key][0])
        del self._hits[key]


@register
class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo & Modha) over bytes.

    Segment 0 is T1 (seen once since it came in), 1 is T2 (hit since). Keys
    evicted from T1/T2 are remembered in ghost lists B1/B2 (keys and sizes,
    each at most the budget in bytes); an insert of a B1 ghost grows the
    byte target ``p`` of T1, one of a B2 ghost shrinks it, and both go to T2.
    The next victim is T1's least recent leaf while T1 holds more than ``p``,
    else T2's (the other list when one has no evictable leaf).
    """

    name = "arc"
    segments = 2

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.p = 0.0
        self._b1: OrderedDict[Key, int] = OrderedDict()
        self._b2: OrderedDict[Key, int] = OrderedDict()
        self._b1_bytes = 0
        self._b2_bytes = 0
        self._budget = 0

    def plan_eviction(self, need: int, budget: int, protect: Iterable[Key] = ()) -> list[Key] | None:
        self._budget = budget  # bounds p and the ghosts; the plan itself stays pure
        return EvictionPolicy.plan_eviction(self, need, budget, protect)

    def _rank_new(
        self, key: Key, parent: Key | None, nbytes: int, tokens: int, depth: int | None, now: float
    ) -> tuple[int, Rank]:
        if key in self._b1:
            self.p = min(self.p + max(1.0, self._b2_bytes / max(self._b1_bytes, 1)) * max(nbytes, 1), self._budget)
            self._b1_bytes -= self._b1.pop(key)
            return 1, ()
        if key in self._b2:
            self.p = max(0.0, self.p - max(1.0, self._b1_bytes / max(self._b2_bytes, 1)) * max(nbytes, 1))
            self._b2_bytes -= self._b2.pop(key)
            return 1, ()
        return 0, ()

    def _rank_hit(self, key: Key, now: float) -> tuple[int, Rank]:
        return 1, ()

    def _ghost_limit(self) -> float:
        """Bytes each ghost list remembers: the budget (ARC's c)."""
        return max(self._budget, 1)

    def _choose(self, firsts: list[_Entry | None], seg_bytes: list[int], budget: int) -> int:
        if firsts[0] is not None and (seg_bytes[0] > self.p or firsts[1] is None):
            return 0
        return 1 if firsts[1] is not None else 0

    def _on_remove(self, key: Key, evicted: bool) -> None:
        if not evicted:
            return
        nbytes = self._size[key]
        if self._seg[key] == 0:
            self._b1[key] = nbytes
            self._b1_bytes += nbytes
        else:
            self._b2[key] = nbytes
            self._b2_bytes += nbytes
        limit = self._ghost_limit()
        while self._b1_bytes > limit:
            self._b1_bytes -= self._b1.popitem(last=False)[1]
        while self._b2_bytes > limit:
            self._b2_bytes -= self._b2.popitem(last=False)[1]


@register
class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP '23) over bytes: a small FIFO (10% of the budget), a main FIFO, a ghost FIFO.

    A new key enters the small queue (segment 0), or main (1) if it is in
    the ghost queue. A hit counts (up to 3); a key hit while in the small
    queue moves to main at once (the paper moves it when it reaches the
    queue's head: same membership, earlier). Victims come from the small
    queue while it holds over 10% of the budget, else from main, where a key
    with hits left is passed over (a second chance: it is re-queued with one
    hit less when a key behind it is evicted). Keys evicted from the small
    queue become ghosts (at most as many as there are resident keys).
    """

    name = "s3fifo"
    segments = 2
    sorted_segments = True  # its plan and second chances range over the sorted main queue
    small_share = 0.1

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._freq: Counter[Key] = Counter()
        self._ghost: OrderedDict[Key, None] = OrderedDict()

    def _rank_new(
        self, key: Key, parent: Key | None, nbytes: int, tokens: int, depth: int | None, now: float
    ) -> tuple[int, Rank]:
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            return 1, ()
        return 0, ()

    def _rank_hit(self, key: Key, now: float) -> tuple[int, Rank]:  # see touch: only a promotion moves a key
        return 1, ()

    def touch(self, keys: Sequence[Key], *, now: float | None = None) -> None:
        """Hits count; a key in the small queue moves to main. FIFO order: a hit in main does not move the key."""
        for key in reversed(keys):
            if key not in self._size:
                continue
            if self._seg[key] == 0:
                self._freq[key] = 0
                self._place(key, 1, ())
            else:
                self._freq[key] = min(self._freq[key] + 1, 3)

    def _candidates(self, seg: int, protected: set[Key]) -> Iterator[_Entry]:
        entries = self._lists[seg]
        if seg == 0:
            return (e for e in entries if e[-1] not in protected)
        first = (e for e in entries if e[-1] not in protected and self._freq[e[-1]] == 0)
        rest = (e for e in entries if e[-1] not in protected and self._freq[e[-1]] > 0)
        return _chain_sorted(first, rest)

    def _choose(self, firsts: list[_Entry | None], seg_bytes: list[int], budget: int) -> int:
        if firsts[0] is not None and (seg_bytes[0] > self.small_share * budget or firsts[1] is None):
            return 0
        return 1 if firsts[1] is not None else 0

    def _on_remove(self, key: Key, evicted: bool) -> None:
        if evicted and self._seg[key] == 0:
            self._ghost[key] = None
            while len(self._ghost) > max(len(self._size), 1):
                self._ghost.popitem(last=False)
        elif evicted and self._freq[key] == 0:
            # the keys the plan passed over ahead of this victim get their second chance now
            mine = self._entry[key]
            ahead = [e for e in self._lists[1].irange(maximum=mine) if e is not mine and self._freq[e[-1]] > 0]
            for e in ahead:
                self._freq[e[-1]] -= 1
                self._place(e[-1], 1, ())
        del self._freq[key]


def _chain_sorted(first: Iterator[_Entry], rest: Iterator[_Entry]) -> Iterator[_Entry]:
    """``first`` then ``rest``: entries of ``rest`` are ranked after every entry of ``first`` by the plan,
    which merges candidates by rank, so the second pass is given ranks past the first's."""
    yield from first
    for e in rest:
        yield (float("inf"), *e)
