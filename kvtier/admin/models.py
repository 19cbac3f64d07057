"""The admin API's JSON bodies: strict pydantic models (an unknown field or a wrong type is a 400)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptRef(_Strict):
    """A token sequence: prompt text (tokenized by the server) or token ids, exactly one; and its tenant."""

    prompt: str | None = Field(default=None, min_length=1)
    token_ids: list[int] | None = Field(default=None, min_length=1)
    model: str | None = Field(default=None, description="if given, must be a model this server serves")
    cache_salt: str | None = Field(default=None, min_length=1, description="vLLM's per-request salt (the tenant)")

    @model_validator(mode="after")
    def _one_source(self) -> PromptRef:
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        if self.token_ids is not None and any(t < 0 or t >= 2**32 for t in self.token_ids):
            raise ValueError("token ids must lie in [0, 2**32)")
        return self


class LookupResponse(_Strict):
    prompt_tokens: int
    matched_tokens: int
    tier_tokens: dict[str, int]


class ClearRequest(_Strict):
    """``all``: every chunk of the tiers; ``tenant``: the chunks of one ``cache_salt`` (None: requests
    without a salt); ``prefix``: every chunk whose token path covers the whole prefix (``prompt`` or
    ``token_ids``), in that tenant. ``tiers`` limits it to the named tiers (default: every writable one).
    """

    scope: Literal["all", "tenant", "prefix"]
    cache_salt: str | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, min_length=1)
    token_ids: list[int] | None = Field(default=None, min_length=1)
    model: str | None = None
    tiers: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _fits_scope(self) -> ClearRequest:
        has_prefix = self.prompt is not None or self.token_ids is not None
        if self.scope == "prefix" and (self.prompt is None) == (self.token_ids is None):
            raise ValueError("scope 'prefix' needs exactly one of prompt and token_ids")
        if self.scope != "prefix" and has_prefix:
            raise ValueError(f"scope {self.scope!r} takes no prompt or token_ids")
        if self.scope == "all" and self.cache_salt is not None:
            raise ValueError("scope 'all' takes no cache_salt (use scope 'tenant')")
        return self


class ClearResponse(_Strict):
    removed: dict[str, int]


class PinResponse(_Strict):
    """How many chunk keys of the prefix were pinned (or unpinned) on each tier that pins."""

    chunks: int
    tiers: list[str]


class TierStatsModel(_Strict):
    """One tier's :class:`~kvtier.storage.base.BackendStats`, field for field (built from it with ``asdict``)."""

    name: str
    entries: int
    used_bytes: int
    max_bytes: int
    evictions: int
    rejected_puts: int
    corrupt: int
    stale: int
    forged: int
    admission_refused: int


class StatsResponse(_Strict):
    tiers: list[TierStatsModel]
    lookups: int
    retrieves: int
    query_tokens: int
    hit_tokens: dict[str, int]
    stored_chunks: int
    dropped_writes: int
    write_errors: int
    events_published: int | None
    events_dropped: int | None


class HealthResponse(_Strict):
    status: Literal["ok"]
    tiers: list[str]
    models: list[str]
