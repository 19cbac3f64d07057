"""The eviction-policy protocol of a tier, and the bookkeeping every policy shares.

A tier tells its policy what happens to its entries (tier events):

* :meth:`EvictionPolicy.add` -- an entry was inserted (key, parent, bytes,
  token count, depth in the prefix tree, time);
* :meth:`EvictionPolicy.touch` -- a prefix was hit (keys given root first);
* :meth:`EvictionPolicy.remove` -- an entry left the tier (``evicted=True``
  when the policy's own plan chose it, so ghost lists learn from it);

and asks it for victims with :meth:`EvictionPolicy.plan_eviction`, which is
pure: it returns the victims, in order, that make room, and the caller
removes the ones it acts on.

The rule every policy keeps: **victims are leaves**. An entry with a child
in the same tier never goes before that child (a chunk whose parent is gone
can never be reached by a prefix lookup), and a *pinned* entry never goes at
all (so neither do its ancestors, which keep it as a child). Each policy
only decides the order among the evictable leaves.

How a policy orders them: every resident entry has a rank (a tuple, smallest
evicted first) in one of the policy's *segments* (LRU has one; ARC two:
T1/T2; S3-FIFO two: small/main). Only evictable leaves are live in the
segments' binary heaps (lazy deletion: an entry that stopped being an
evictable leaf, or was replaced by a newer rank, goes stale in place and is
dropped when it reaches the top or at a compaction; S3-FIFO, which ranges
over its main queue, keeps ``SortedList``s instead). An access or insert
costs O(log n) amortized, a one-victim plan O(1) plus the stale tops it
drops, a longer plan O(victims x log n) (a best-first walk of the heap),
whatever the shape of the tree. A policy with several segments says which
one gives the next victim (:meth:`_choose`).

Keys are any hashable values (tiers use :class:`~kvtier.keys.ChunkKey`,
``bench/eviction.py`` replays trace block ids through the same classes).
Not thread-safe: the owning tier holds its lock around every call.
"""

from __future__ import annotations

import heapq
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from heapq import heappop, heappush, heapreplace
from typing import Any, ClassVar

from sortedcontainers import SortedList

Key = Hashable
Rank = tuple[float, ...]
_Entry = tuple[Any, ...]  # (*rank, seq, key): seq makes entries unique, so keys are never compared


class EvictionPolicy(ABC):
    """Resident entries of one tier (key, parent, size) and the order in which leaves are evicted.

    Subclasses set :attr:`name` and :attr:`segments` and implement
    :meth:`_rank_new` (the rank of an inserted key) and :meth:`_rank_hit`
    (the rank after a hit); they may override :meth:`_choose`,
    :meth:`_on_remove` and :meth:`_candidates`.
    """

    name: ClassVar[str] = ""
    segments: ClassVar[int] = 1
    #: keep the evictable leaves in ``SortedList``s (``self._lists``, for policies that range over them, as
    #: S3-FIFO does); the default is a binary heap per segment with lazy deletion (``self._heaps``), cheaper
    #: per insert and eviction. Both give the very same order (entries are unique tuples).
    sorted_segments: ClassVar[bool] = False

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._parent: dict[Key, Key | None] = {}
        self._size: dict[Key, int] = {}
        # resident children per key (absent parents included); a key with none has no entry (a plain dict:
        # Counter's __missing__ is a Python call on every miss, and leaves are looked up on every insert)
        self._children: dict[Key, int] = {}
        self._entry: dict[Key, _Entry] = {}  # current rank entry of every resident key
        self._seg: dict[Key, int] = {}
        self._listed: set[Key] = set()  # keys now in a segment list (the evictable leaves)
        self._lists: list[SortedList] = [SortedList() for _ in range(self.segments)] if self.sorted_segments else []
        # heap mode: an entry in a heap is live iff its key is listed and it is the key's current entry; the
        # rest are stale and dropped when they reach the top (or at a compaction). _inheap: the current entry
        # of a key while it is physically in its heap, so a relisted key is not pushed twice.
        self._heaps: list[list[_Entry]] = [[] for _ in range(self.segments)]
        self._inheap: dict[Key, _Entry] = {}
        self._heap_len = 0
        self._seg_bytes = [0] * self.segments  # bytes of all resident keys per segment
        self._pins: Counter[Key] = Counter()
        self._tracks_removals = type(self)._on_remove is not EvictionPolicy._on_remove
        self._seq = 0
        self._budget = 0  # the budget of the last plan (ARC bounds p and its ghosts by it)
        self.used_bytes = 0

    # -- inspection --------------------------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._size

    def __len__(self) -> int:
        return len(self._size)

    def __iter__(self) -> Iterator[Key]:
        """Resident keys, first to be evicted first if they were all leaves (segment, then rank). O(n log n)."""
        return iter(sorted(self._size, key=lambda k: (self._seg[k], self._entry[k][:-1])))

    def size_of(self, key: Key) -> int:
        return self._size[key]

    def parent_of(self, key: Key) -> Key | None:
        return self._parent[key]

    def evictable(self) -> int:
        """How many resident keys could be evicted now (unpinned leaves)."""
        return len(self._listed)

    # -- events ------------------------------------------------------------------------------------------------

    def add(
        self,
        key: Key,
        parent: Key | None,
        nbytes: int,
        *,
        tokens: int = 0,
        depth: int | None = None,
        now: float | None = None,
    ) -> None:
        """Insert ``key`` (an existing key is only touched: its parent and size stay).

        ``depth`` defaults to the parent's depth + 1 (0 for a root or a
        child of a non-resident parent); ``now`` to the policy's clock.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        size = self._size
        if key in size:
            self.touch([key], now=now)
            return
        now = self._clock() if now is None else now
        self._parent[key] = parent
        size[key] = nbytes
        self.used_bytes += nbytes
        children, listed = self._children, self._listed
        if parent is not None:
            children[parent] = children.get(parent, 0) + 1
            if parent in listed:
                self._unlist(parent)  # no longer a leaf
        seg, rank = self._rank_new(key, parent, nbytes, tokens, depth, now)
        # _place of a new key, inlined (the hot path of every insert)
        self._seg[key] = seg
        self._seg_bytes[seg] += nbytes
        self._seq += 1
        e = self._entry[key] = (*rank, self._seq, key)
        if key not in children and key not in self._pins:
            listed.add(key)
            if self.sorted_segments:
                self._lists[seg].add(e)
            else:  # a new entry: never in a heap yet
                heappush(self._heaps[seg], e)
                self._inheap[key] = e
                self._heap_len += 1
                if self._heap_len > 4 * len(listed) + 1024:
                    self._compact()

    def touch(self, keys: Sequence[Key], *, now: float | None = None) -> None:
        """A prefix (root first) was just used: each resident key is hit, the deepest first, the root last."""
        now = self._clock() if now is None else now
        for key in reversed(keys):
            if key in self._size:
                seg, rank = self._rank_hit(key, now)
                self._place(key, seg, rank)

    def remove(self, key: Key, *, evicted: bool = False) -> int:
        """Forget ``key``; returns its size (0 if absent). ``evicted``: it goes because a plan chose it."""
        size = self._size
        if key not in size:
            return 0
        if self._tracks_removals:
            self._on_remove(key, evicted)
        if key in self._listed:
            if self.sorted_segments:
                self._unlist(key)
            else:  # _unlist, inlined
                self._listed.discard(key)
                h = self._heaps[self._seg[key]]
                if h and h[-1] is self._entry[key]:
                    h.pop()
                    self._heap_len -= 1
        nbytes = size.pop(key)
        self._seg_bytes[self._seg.pop(key)] -= nbytes
        del self._entry[key]
        self._inheap.pop(key, None)
        parent = self._parent.pop(key)
        self.used_bytes -= nbytes
        if parent is not None:
            children = self._children
            left = children.get(parent, 0) - 1
            if left > 0:
                children[parent] = left
            else:
                children.pop(parent, None)
                if parent in size:
                    self._relist(parent)
        return nbytes

    def pin(self, key: Key) -> None:
        """Never evict ``key`` (resident now or later) until as many :meth:`unpin` calls. Its ancestors keep it
        as a child, so they stay too."""
        self._pins[key] += 1
        if key in self._listed:
            self._unlist(key)

    def unpin(self, key: Key) -> None:
        """Undo one :meth:`pin` of ``key`` (a key that is not pinned is left alone)."""
        if self._pins[key] <= 1:
            self._pins.pop(key, None)
            self._relist(key)
        else:
            self._pins[key] -= 1

    def pinned(self, key: Key) -> bool:
        return key in self._pins

    def pinned_keys(self) -> list[Key]:
        """Every key pinned now (resident or not)."""
        return list(self._pins)

    # -- the fused insert of a budgeted tier ----------------------------------------------------------------------

    def insert_evict(
        self, key: Key, parent: Key | None, nbytes: int, budget: int, *, tokens: int = 0, now: float | None = None
    ) -> list[Key] | None:
        """Insert a key that is not resident and evict what the budget then asks for; returns the victims.

        Exactly ``add``, then ``plan_eviction(0, budget, protect={key})``,
        then ``remove(victim, evicted=True)`` for each victim, or, with no
        plan, ``remove(key)`` and None: what :class:`BudgetIndex` did in
        three calls, fused into one for the common case (one victim, the top
        of a heap): no protect set, no stale entry left behind (the victim's
        entry is popped at once, and a parent it exposes takes its place in
        the same heap with one ``heapreplace``). Any other case (sorted
        segments, several victims, the new key or a pinned key in the way)
        goes through the three calls themselves.
        """
        size = self._size
        if self.sorted_segments or key in size or nbytes < 0:
            return self._insert_evict_calls(key, parent, nbytes, budget, tokens, now)
        if now is None:
            now = self._clock()
        # add(), inlined for a new key
        self._parent[key] = parent
        size[key] = nbytes
        used = self.used_bytes = self.used_bytes + nbytes
        children, listed, entries, heaps, inheap = self._children, self._listed, self._entry, self._heaps, self._inheap
        segs = self._seg
        if parent is not None:
            children[parent] = children.get(parent, 0) + 1
            if parent in listed:  # _unlist(parent), inlined
                listed.discard(parent)
                h = heaps[segs[parent]]
                if h and h[-1] is entries[parent]:
                    h.pop()
                    self._heap_len -= 1
                    del inheap[parent]
        seg, rank = self._rank_new(key, parent, nbytes, tokens, None, now)
        self._budget = budget  # as plan_eviction would record it (ARC bounds p and its ghosts by it)
        segs[key] = seg
        seg_bytes = self._seg_bytes
        seg_bytes[seg] += nbytes
        self._seq += 1
        e = entries[key] = (*rank, self._seq, key)
        if key not in children and key not in self._pins:
            listed.add(key)
            heappush(heaps[seg], e)
            inheap[key] = e
            self._heap_len += 1
            if self._heap_len > 4 * len(listed) + 1024:
                self._compact()
                heaps = self._heaps
        excess = used - budget
        if excess <= 0:
            return []
        # the plan's first candidate, as plan_eviction's fast paths find it
        nseg = self.segments
        if nseg == 1:
            h = heaps[0]
            if h and not (h[0][-1] in listed and entries[h[0][-1]] is h[0]):
                h = self._clean(0)
            if not h:
                return self._plan_and_remove(key, budget)
            top = h[0]
            s = 0
        else:
            heads: list[_Entry | None] = []
            for i in range(nseg):
                h = heaps[i]
                if h and not (h[0][-1] in listed and entries[h[0][-1]] is h[0]):
                    h = self._clean(i)
                if h:
                    if h[0][-1] == key:
                        return self._plan_and_remove(key, budget)
                    heads.append(h[0])
                else:
                    heads.append(None)
            if heads.count(None) == nseg:
                return self._plan_and_remove(key, budget)
            s = self._choose(heads, seg_bytes[:], budget)
            top = heads[s]
            if top is None:
                return self._plan_and_remove(key, budget)
            h = heaps[s]
        victim = top[-1]
        if victim == key or size[victim] < excess:
            return self._plan_and_remove(key, budget)
        # remove(victim, evicted=True), inlined: the victim is a listed leaf at the top of heap s
        if self._tracks_removals:
            self._on_remove(victim, True)  # heap-mode hooks leave the heaps alone (see _on_remove)
        listed.discard(victim)
        nb = size.pop(victim)
        seg_bytes[segs.pop(victim)] -= nb
        del entries[victim]
        inheap.pop(victim, None)
        self.used_bytes -= nb
        vp = self._parent.pop(victim)
        relist = None
        if vp is not None:
            left = children.get(vp, 0) - 1
            if left > 0:
                children[vp] = left
            else:
                children.pop(vp, None)
                if vp in size and vp not in self._pins and vp not in listed:
                    relist = vp
        if relist is None:
            heappop(h)
            self._heap_len -= 1
        else:  # _relist(vp), inlined; its entry replaces the victim's when it goes to the same heap
            pe = entries[relist]
            listed.add(relist)
            if inheap.get(relist) is pe:
                heappop(h)
                self._heap_len -= 1
            else:
                ps = segs[relist]
                if ps == s:
                    heapreplace(h, pe)
                else:
                    heappop(h)
                    heappush(heaps[ps], pe)
                inheap[relist] = pe
        return [victim]

    def _plan_and_remove(self, key: Key, budget: int) -> list[Key] | None:
        """The rest of :meth:`insert_evict` after its ``add``, by the three calls."""
        victims = self.plan_eviction(0, budget, protect={key})
        if victims is None:
            self.remove(key)
            return None
        for victim in victims:
            self.remove(victim, evicted=True)
        return victims

    def _insert_evict_calls(
        self, key: Key, parent: Key | None, nbytes: int, budget: int, tokens: int, now: float | None
    ) -> list[Key] | None:
        """:meth:`insert_evict` by the protocol's calls (the reference the fused path must equal)."""
        self.add(key, parent, nbytes, tokens=tokens, now=now)
        return self._plan_and_remove(key, budget)

    # -- planning ----------------------------------------------------------------------------------------------

    def plan_eviction(self, need: int, budget: int, protect: Iterable[Key] = ()) -> list[Key] | None:
        """Victims (in eviction order) that make room for ``need`` more bytes within ``budget``.

        Pure: nothing changes; the caller removes (``evicted=True``) the
        victims it acts on. Only unpinned leaves outside ``protect`` are
        chosen, counting the victims chosen before (a parent becomes a
        candidate once its last resident child is chosen). Returns None when
        no such choice frees enough.
        """
        excess = self.used_bytes + need - budget
        if excess <= 0:
            return []
        protected = protect if isinstance(protect, (set, frozenset)) else set(protect)
        nseg = self.segments
        listed, entry = self._listed, self._entry
        if nseg == 1 and not self.sorted_segments:
            # fast path: the first candidate is the heap's top (once stale tops are dropped); if it is not
            # protected and frees enough, that is the whole plan (the loop below would choose just it).
            h = self._heaps[0]
            if h and not (h[0][-1] in listed and entry[h[0][-1]] is h[0]):
                h = self._clean(0)
            if h:
                k = h[0][-1]
                if k not in protected and self._size[k] >= excess:
                    return [k]
        elif not self.sorted_segments:
            # the same with several segments: their heaps' tops, and the one _choose picks
            heads: list[_Entry | None] = []
            fast = True
            for s in range(nseg):
                h = self._heaps[s]
                if h and not (h[0][-1] in listed and entry[h[0][-1]] is h[0]):
                    h = self._clean(s)
                if h:
                    if h[0][-1] in protected:
                        fast = False
                        break
                    heads.append(h[0])
                else:
                    heads.append(None)
            if fast:
                if heads.count(None) == nseg:
                    return None
                first = heads[self._choose(heads, self._seg_bytes[:], budget)]
                if first is not None and self._size[first[-1]] >= excess:
                    return [first[-1]]
        cursors = [self._candidates(s, protected) for s in range(nseg)]
        heads = [next(c, None) for c in cursors]
        exposed: list[list[_Entry]] = [[] for _ in range(nseg)]  # parents whose children all went
        lost: dict[Key, int] = {}
        seg_bytes = list(self._seg_bytes)
        size, parents, children, pins, entries = self._size, self._parent, self._children, self._pins, self._entry
        chosen: list[Key] = []
        freed = 0
        while freed < excess:
            if nseg == 1:
                s = 0
                head, ex = heads[0], exposed[0]
                if ex and (head is None or ex[0] < head):
                    first = heapq.heappop(ex)
                elif head is not None:
                    first = head
                    heads[0] = next(cursors[0], None)
                else:
                    return None
            else:
                firsts: list[_Entry | None] = []
                for h, ex in zip(heads, exposed, strict=True):
                    firsts.append(ex[0] if ex and (h is None or ex[0] < h) else h)
                if all(f is None for f in firsts):
                    return None
                s = self._choose(firsts, seg_bytes, budget)
                first = firsts[s]
                assert first is not None
                if exposed[s] and exposed[s][0] is first:
                    heapq.heappop(exposed[s])
                else:
                    heads[s] = next(cursors[s], None)
            victim = first[-1]
            chosen.append(victim)
            nbytes = size[victim]
            freed += nbytes
            seg_bytes[s] -= nbytes
            parent = parents[victim]
            if parent is not None and parent in size:
                n = lost[parent] = lost.get(parent, 0) + 1
                if children[parent] - n <= 0 and parent not in protected and parent not in pins:
                    heapq.heappush(exposed[self._seg[parent]], entries[parent])
        return chosen

    def _candidates(self, seg: int, protected: set[Key]) -> Iterator[_Entry]:
        """Evictable leaves of segment ``seg``, in eviction order (the plan merges in exposed parents)."""
        if self.sorted_segments:
            return (e for e in self._lists[seg] if e[-1] not in protected)
        return self._heap_order(seg, protected)

    def _heap_order(self, seg: int, protected: set[Key]) -> Iterator[_Entry]:
        """The live entries of segment ``seg``'s heap, smallest first, without changing the heap: a best-first
        walk of the heap's tree (O(log k) per entry yielded). The heap must not change while it runs."""
        h = self._heaps[seg]
        if not h:
            return
        listed, entries = self._listed, self._entry
        n = len(h)
        frontier = [(h[0], 0)]
        while frontier:
            e, i = heappop(frontier)
            k = e[-1]
            if k in listed and entries[k] is e and k not in protected:
                yield e
            j = 2 * i + 1
            if j < n:
                heappush(frontier, (h[j], j))
                j += 1
                if j < n:
                    heappush(frontier, (h[j], j))

    def _clean(self, seg: int) -> list[_Entry]:
        """Drop the stale entries at the top of segment ``seg``'s heap (not observable); returns the heap."""
        h = self._heaps[seg]
        listed, entries, inheap = self._listed, self._entry, self._inheap
        while h:
            e = h[0]
            k = e[-1]
            if k in listed and entries[k] is e:
                break
            heappop(h)
            self._heap_len -= 1
            if inheap.get(k) is e:
                del inheap[k]
        return h

    def _compact(self) -> None:
        """Rebuild the heaps from the listed keys alone (when stale entries outnumber the live ones)."""
        heaps: list[list[_Entry]] = [[] for _ in range(self.segments)]
        entries, segs = self._entry, self._seg
        for k in self._listed:
            heaps[segs[k]].append(entries[k])
        for h in heaps:
            heapq.heapify(h)
        self._heaps = heaps
        self._inheap = {k: entries[k] for k in self._listed}
        self._heap_len = len(self._listed)

    def _choose(self, firsts: list[_Entry | None], seg_bytes: list[int], budget: int) -> int:
        """The segment that gives the next victim (only called with several segments): default, the smallest."""
        return min((s for s in range(self.segments) if firsts[s] is not None), key=lambda s: firsts[s])

    # -- hooks -------------------------------------------------------------------------------------------------

    @abstractmethod
    def _rank_new(
        self, key: Key, parent: Key | None, nbytes: int, tokens: int, depth: int | None, now: float
    ) -> tuple[int, Rank]:
        """(segment, rank) of a newly inserted key."""

    @abstractmethod
    def _rank_hit(self, key: Key, now: float) -> tuple[int, Rank]:
        """(segment, rank) of a resident key that was just hit."""

    def _on_remove(self, key: Key, evicted: bool) -> None:
        """``key`` is about to leave (still resident); policies keeping ghosts or statistics look here.

        In heap mode (not :attr:`sorted_segments`) it must not re-rank keys: :meth:`insert_evict` pops the
        victim's heap entry right after it."""
        return None

    # -- internals ---------------------------------------------------------------------------------------------

    def _stamp(self) -> int:
        self._seq += 1
        return self._seq

    def _place(self, key: Key, seg: int, rank: Rank) -> None:
        """Give ``key`` its new (segment, rank); keep it listed iff it is an evictable leaf."""
        if key in self._listed:
            self._unlist(key)
        old = self._seg.get(key)
        if old is not None:
            self._seg_bytes[old] -= self._size[key]
        self._seg[key] = seg
        self._seg_bytes[seg] += self._size[key]
        self._entry[key] = (*rank, self._stamp(), key)
        self._relist(key)

    def _unlist(self, key: Key) -> None:
        self._listed.discard(key)
        if self.sorted_segments:
            self._lists[self._seg[key]].remove(self._entry[key])
            return
        # heap mode: its entry goes stale in place, unless it is the heap's last item (the newest entry of
        # its segment usually is: a chain's tail that just got a child), which goes at once
        h = self._heaps[self._seg[key]]
        if h and h[-1] is self._entry[key]:
            h.pop()
            self._heap_len -= 1
            del self._inheap[key]

    def _relist(self, key: Key) -> None:
        if key in self._listed or key not in self._size or key in self._children or key in self._pins:
            return
        e = self._entry[key]
        self._listed.add(key)
        if self.sorted_segments:
            self._lists[self._seg[key]].add(e)
        elif self._inheap.get(key) is not e:
            heappush(self._heaps[self._seg[key]], e)
            self._inheap[key] = e
            self._heap_len += 1
            if self._heap_len > 4 * len(self._listed) + 1024:
                self._compact()



_REGISTRY: dict[str, type[EvictionPolicy]] = {}


def register(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Class decorator: make a policy available to :func:`make_policy` under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"policy name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    """Names :func:`make_policy` accepts."""
    return sorted(_REGISTRY)


def make_policy(name: str, **kwargs: Any) -> EvictionPolicy:
    """A new, empty policy by name (``lru``, ``lfu``, ``arc``, ``s3fifo``, ``adaptive``)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(policy_names())}") from None
    return cls(**kwargs)
