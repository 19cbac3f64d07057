"""The budgeted index of one tier: its policy, its admission filter and its byte budget, in one place.

:class:`BudgetIndex` is what an in-process tier (``l1``) runs on every
insert and hit, and what ``bench/eviction.py`` replays traces through, so
the benchmark measures the very code the tier runs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from kvtier.eviction.admission import Admission, AlwaysAdmit
from kvtier.eviction.base import EvictionPolicy


class BudgetIndex:
    """Keys held within ``budget`` bytes: admission, then victims chosen by ``policy`` (never the new key).

    ``insert`` returns the victims it removed, or None if the key was not
    taken (refused by admission, counted in ``admission_refused``; or no
    choice of unpinned leaves frees enough room, counted in ``no_room``).
    The caller drops the victims' data. Not thread-safe (the tier's lock).
    """

    def __init__(self, budget: int, policy: EvictionPolicy, admission: Admission | None = None) -> None:
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        self.budget = budget
        self.policy = policy
        self.admission: Admission = admission if admission is not None else AlwaysAdmit()
        self._always = type(self.admission) is AlwaysAdmit
        self.admission_refused = 0
        self.no_room = 0
        self.evictions = 0

    def __contains__(self, key: object) -> bool:
        return key in self.policy

    def hit(self, keys: Sequence[Hashable], now: float | None = None) -> None:
        """The resident keys among ``keys`` (a prefix, root first) were just read."""
        self.policy.touch(keys, now=now)

    def insert(
        self,
        key: Hashable,
        parent: Hashable | None,
        nbytes: int,
        *,
        tokens: int = 0,
        now: float | None = None,
    ) -> list[Hashable] | None:
        """Take ``key`` if admitted and there is room (evicting), else None. A resident key is only hit."""
        policy = self.policy
        if key in policy._size:  # resident (policy.__contains__ without the call)
            policy.touch([key], now=now)
            return []
        if not self._always and not self.admission.admit(key):
            self.admission_refused += 1
            return None
        if nbytes > self.budget:
            self.no_room += 1
            return None
        # add, plan_eviction(0, budget, protect={key}), remove of each victim (or of the key without a plan)
        victims = policy.insert_evict(key, parent, nbytes, self.budget, tokens=tokens, now=now)
        if victims is None:
            self.no_room += 1
            return None
        self.evictions += len(victims)
        assert policy.used_bytes <= self.budget
        return victims

    def sighted(self, key: Hashable) -> None:
        """``key`` was offered but not passed to :meth:`insert` (its parent was refused): admission counts it."""
        self.admission.sighted(key)

    def remove(self, key: Hashable) -> int:
        """Forget ``key`` (deleted, not evicted); returns its size (0 if absent)."""
        return self.policy.remove(key)
