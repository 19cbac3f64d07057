"""Per-call deadlines (issue 15): an engine call's time bound, seen by every tier it reaches.

``CacheEngine.lookup`` and ``retrieve`` open a :func:`deadline_after` scope;
inside it :func:`remaining` says how long is left (None: no deadline). The
tier stack skips tiers once it has passed, and the Redis tier bounds each of
its calls by it, aborting a read still running at the deadline (see
:mod:`kvtier.storage.redis`). The caller then gets the prefix read so far.
The scope is a context variable: it follows the calling thread (and asyncio
tasks), not the disk tier's reader threads (local reads are not bounded).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("kvtier_deadline", default=None)


@contextmanager
def deadline_after(seconds: float | None) -> Iterator[None]:
    """Within the block, calls must end ``seconds`` from now (None: no new bound; an outer, earlier one stays)."""
    if seconds is None:
        yield
        return
    if seconds <= 0:
        raise ValueError(f"a deadline must be positive, got {seconds}")
    at = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(at if outer is None else min(outer, at))
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left before the current deadline (<= 0 once it has passed), or None without one."""
    at = _deadline.get()
    return None if at is None else at - time.monotonic()


def expired() -> bool:
    """Whether the current deadline has passed (False without one)."""
    left = remaining()
    return left is not None and left <= 0
