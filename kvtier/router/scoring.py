"""Ranking instances for one request: prefix hit against load, both in prefill tokens. Pure functions."""

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
    queued_prefill_tokens: int  # prompt tokens it has yet to prefill for requests still waiting for a first token
    decoding: int = 0  # requests past their first token, still generating


def hit_tokens(c: Candidate, shared_credit: float) -> float:
    """Prompt tokens this instance would not prefill: its own hit, plus ``shared_credit`` times what only the
    shared tier adds beyond it (a load from Redis is cheaper than a prefill, dearer than a local hit)."""
    return c.local_tokens + shared_credit * max(0, c.shared_tokens - c.local_tokens)


def load_tokens(c: Candidate, decode_tokens_per_request: int) -> float:
    """The work ahead of a new request there, in prefill tokens: queued prefills, and each decoding request
    as ``decode_tokens_per_request`` tokens (a running decode adds a token to each of the engine's steps,
    the new request's prefill step included)."""
    return c.queued_prefill_tokens + decode_tokens_per_request * c.decoding


def score(c: Candidate, *, beta: float, shared_credit: float, decode_tokens_per_request: int) -> float:
    """``hit - beta * load``, in tokens: the instance with the least prefill ahead of this request's first token
    scores highest (the prompt's own length is the same everywhere and left out)."""
    return hit_tokens(c, shared_credit) - beta * load_tokens(c, decode_tokens_per_request)


def rank(
    candidates: Sequence[Candidate],
    *,
    beta: float,
    shared_credit: float,
    decode_tokens_per_request: int,
) -> list[tuple[Candidate, float]]:
    """Candidates best first, with their scores. Ties go to fewer requests in flight, then to the order given
    (the caller rotates it so that ties spread)."""
    scored = [
        (c, score(c, beta=beta, shared_credit=shared_credit, decode_tokens_per_request=decode_tokens_per_request), i)
        for i, c in enumerate(candidates)
    ]
    scored.sort(key=lambda t: (-t[1], t[0].in_flight, t[2]))
    return [(c, s) for c, s, _ in scored]
