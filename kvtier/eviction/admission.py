"""Admission: whether a tier takes a new chunk at all.

``always`` takes every chunk. ``second_sight`` (TinyLFU's doorkeeper idea)
takes a chunk only if its key was offered before within the sketch's
window: a count-min sketch (4 rows of 4-bit-like saturating counters,
halved every ``window`` offers, so old sightings fade) remembers the keys
offered, and a key is admitted on its second offer. One-off prompts then
never push out chunks that are reused; a chunk that is reused pays one
extra miss. Refusals are counted by the tier (``rejected_puts`` and its own
``admission_refused``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

_MASK64 = (1 << 64) - 1
_SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)


def _key_hash(key: Hashable) -> int:
    """A hash that is the same in every process (Python's str/bytes hash is salted)."""
    digest = getattr(key, "digest", None)
    if isinstance(digest, bytes):
        return int.from_bytes(digest[:8], "little")
    if isinstance(key, bytes):
        return int.from_bytes(key[:8].ljust(8, b"\0"), "little") ^ len(key)
    if isinstance(key, int):
        return key & _MASK64
    return hash(key) & _MASK64


class Admission(Protocol):
    name: str

    def admit(self, key: Hashable) -> bool:
        """Record that ``key`` is offered to the tier; True if the tier should take it."""
        ...

    def sighted(self, key: Hashable) -> None:
        """Record that ``key`` was offered but cannot be taken anyway (its parent was refused)."""
        ...


class AlwaysAdmit:
    """Every chunk is taken (kvtier's behaviour before admission existed)."""

    name = "always"

    def admit(self, key: Hashable) -> bool:
        return True

    def sighted(self, key: Hashable) -> None:
        pass


_HALF = bytes(v >> 1 for v in range(256))


class FrequencySketch:
    """How often each key was seen recently: a count-min sketch (4 rows of saturating counters up to 15,
    conservative update) whose counters are all halved every ``window`` records, so old sightings fade.

    Memory: 4 x ``width`` bytes. Estimates are exact unless keys collide (then too high).
    """

    def __init__(self, width: int = 1 << 16, window: int | None = None) -> None:
        if width < 16 or width & (width - 1):
            raise ValueError(f"width must be a power of two >= 16, got {width}")
        self.width = width
        self.window = window if window is not None else 8 * width
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        self._rows = [bytearray(width) for _ in _SEEDS]
        self._records = 0

    def _slots(self, key: Hashable) -> list[int]:
        h = _key_hash(key)
        shift = 64 - self.width.bit_length() + 1
        return [(((h ^ seed) * 0xFF51AFD7ED558CCD) & _MASK64) >> shift for seed in _SEEDS]

    def estimate(self, key: Hashable) -> int:
        """How often ``key`` was recorded within the window (an overestimate only on hash collisions)."""
        return min(row[s] for row, s in zip(self._rows, self._slots(key), strict=True))

    def record(self, key: Hashable) -> int:
        """Count one sighting of ``key``; returns the estimate from before it."""
        slots = self._slots(key)
        seen = min(row[s] for row, s in zip(self._rows, slots, strict=True))
        if seen < 15:
            for row, s in zip(self._rows, slots, strict=True):
                if row[s] == seen:  # conservative update: only the counters at the minimum grow
                    row[s] += 1
        self._records += 1
        if self._records >= self.window:
            self._records = 0
            for row in self._rows:
                row[:] = row.translate(_HALF)
        return seen


class SecondSight:
    """Admit a key on its second offer within the sketch's window ("store on second sight")."""

    name = "second_sight"

    def __init__(self, width: int = 1 << 16, window: int | None = None) -> None:
        self.sketch = FrequencySketch(width, window)

    def admit(self, key: Hashable) -> bool:
        return self.sketch.record(key) >= 1

    def sighted(self, key: Hashable) -> None:
        """``key`` was offered to the tier but could not be taken anyway (its parent was refused)."""
        self.sketch.record(key)


ADMISSIONS = ("always", "second_sight")


def make_admission(name: str) -> Admission:
    """``always`` or ``second_sight``."""
    if name == "always":
        return AlwaysAdmit()
    if name == "second_sight":
        return SecondSight()
    raise ValueError(f"unknown admission {name!r}; known: {', '.join(ADMISSIONS)}")
