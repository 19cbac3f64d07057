"""Ranking instances for one request: prefix hit against load. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One healthy instance as the scorer sees it for one request."""

    name: str
    local_tokens: int  # leading prompt tokens its own tiers hold
    shared_tokens: int  # leading prompt tokens the shared tier (Redis) holds, as far as anyone knows
    in_flight: int
    queued_prefill_tokens: int


def load(c: Candidate, prefill_norm_tokens: int) -> float:
    """Requests in flight plus queued prefill tokens in units of ``prefill_norm_tokens``."""
    return c.in_flight + c.queued_prefill_tokens / prefill_norm_tokens


def hit(c: Candidate, prompt_tokens: int, shared_credit: float) -> float:
    """The share of the prompt this instance would not prefill: its own hit, plus ``shared_credit`` times what
    only the shared tier adds beyond it."""
    if prompt_tokens <= 0:
        return 0.0
    extra = max(0, c.shared_tokens - c.local_tokens)
    return (c.local_tokens + shared_credit * extra) / prompt_tokens


def rank(
    candidates: Sequence[Candidate],
    prompt_tokens: int,
    *,
    beta: float,
    shared_credit: float,
    prefill_norm_tokens: int,
) -> list[tuple[Candidate, float]]:
    """Candidates best first, with their scores: ``hit - beta * (load - least load)``.

    Ties go to the lower load, then to the order given (the caller rotates it so that ties spread).
    """
    if not candidates:
        return []
    loads = [load(c, prefill_norm_tokens) for c in candidates]
    least = min(loads)
    scored = [
        (c, hit(c, prompt_tokens, shared_credit) - beta * (ld - least), ld, i)
        for i, (c, ld) in enumerate(zip(candidates, loads, strict=True))
    ]
    scored.sort(key=lambda t: (-t[1], t[2], t[3]))
    return [(c, s) for c, s, _, _ in scored]
