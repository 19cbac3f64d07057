"""``adaptive``: kvtier's default policy, ARC adapted to prefix trees of chunks.

Two lists of evictable leaves, both least recently used first: T1 (chunks
not hit since they were stored) and T2 (chunks hit at least once, or
stored again soon after an eviction). The share of the budget that T1 may
hold, ``p`` (bytes), adapts online to the workload as in ARC (Megiddo &
Modha): a chunk stored again while it is remembered as recently evicted from
T1 (a ghost of B1) says T1 was too small, so ``p`` grows; a ghost of T2 (B2)
says the opposite. Under one-off prompts (most chunks never come back) T1
shrinks to a trickle and the reused prefixes in T2 survive them; when
recency pays (a burst of new prompts that return soon), T1 grows.

What is specific to prefixes:

* victims are leaves only (the protocol's rule), so a list's least recent
  entry that still has children waits, and the chunks of a returning prefix
  are evicted tail first: a later lookup still hits the head;
* a *short tail chunk* (fewer than half the tier's mean tokens per chunk:
  the partial last block of a prompt, which only the very same prompt can
  reuse) that has not been hit goes before every full chunk of its list;
* adaptation is weighted by bytes: a whole returning prefix moves ``p`` by
  its size, not by its number of chunks.

``ghost_factor`` sets how many budgets' worth of bytes each ghost list
remembers (ARC: 1, the default; 2 helps where prompts return after long
think times and hurts where they do not, see docs/eviction.md).

The other ideas measured on the way (value = reuse probability learned per
hit-history class, GreedyDual with sketch frequencies, LRFU, a probation
segment for first-seen chains, inheriting a parent's list) are in
docs/eviction.md; none beat this on every trace. Costs: O(log n) per
insert, hit or eviction; ghosts cost one dict entry per remembered chunk.
"""

from __future__ import annotations

from kvtier.eviction.base import Key, Rank, register
from kvtier.eviction.policies import ARCPolicy


@register
class AdaptivePolicy(ARCPolicy):
    """ARC over prefix trees; short tail chunks first; ghost lists of ``ghost_factor`` budgets (default 1)."""

    name = "adaptive"
    ghost_factor = 1.0
    short_share = 0.5  # a chunk with fewer tokens than this share of the mean is a short tail chunk

    def __init__(self, *, ghost_factor: float | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if ghost_factor is not None:
            if ghost_factor <= 0:
                raise ValueError(f"ghost_factor must be positive, got {ghost_factor}")
            self.ghost_factor = ghost_factor
        self._tokens_sum = 0
        self._chunks_seen = 0

    def _ghost_limit(self) -> float:
        return max(self._budget * self.ghost_factor, 1.0)

    def _rank_new(
        self, key: Key, parent: Key | None, nbytes: int, tokens: int, depth: int | None, now: float
    ) -> tuple[int, Rank]:
        seg = 0
        if key in self._b1 or key in self._b2:  # a ghost: ARC adapts p and takes it to T2
            seg, _ = ARCPolicy._rank_new(self, key, parent, nbytes, tokens, depth, now)
        short = False
        if tokens > 0:
            self._tokens_sum += tokens
            self._chunks_seen += 1
            short = tokens < self.short_share * self._tokens_sum / self._chunks_seen
        return seg, (0,) if short else (1,)

    def _rank_hit(self, key: Key, now: float) -> tuple[int, Rank]:
        return 1, (1,)
