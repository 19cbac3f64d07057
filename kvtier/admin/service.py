"""The admin operations on one engine's tier stack: lookup, pin/unpin, clear (all, tenant, prefix), stats, health.

Tenants are vLLM's ``cache_salt`` values, mapped to namespaces as the connector maps them
(``engine_for``); a tenant's chunks are found by the namespace digest in each chunk's header
(:class:`~kvtier.storage.base.Inventoried`), so a tenant clear removes exactly that tenant's chunks.
Every removal goes through the stack (``TierStack.remove``/``clear``), so KV events report it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from kvtier.admin.models import (
    ClearRequest,
    ClearResponse,
    HealthResponse,
    LookupResponse,
    PinResponse,
    PromptRef,
    StatsResponse,
    TierStatsModel,
)
from kvtier.engine import CacheEngine
from kvtier.errors import PinLimitError
from kvtier.keys import ChunkKey
from kvtier.storage.base import ChunkInfo, Inventoried, is_read_only
from kvtier.storage.events import EventPublisher


class AdminError(Exception):
    """An admin request that cannot be served: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminService:
    """Admin operations over ``base``'s tiers.

    ``engine_for(cache_salt)`` is the engine (namespace) of a tenant (``base`` for None unless the
    mapping says otherwise); ``tokenize`` turns prompt text into token ids as the server does (None:
    token ids only); ``models`` are the names a request's ``model`` may carry (empty: any).
    """

    def __init__(
        self,
        base: CacheEngine,
        *,
        engine_for: Callable[[str | None], CacheEngine] | None = None,
        tokenize: Callable[[str], list[int]] | None = None,
        models: Sequence[str] = (),
    ) -> None:
        self.base = base
        self.engine_for = engine_for or (lambda salt: base)
        self.tokenize = tokenize
        self.models = list(models)

    # -- helpers -----------------------------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and self.models and model not in self.models:
            raise AdminError(404, f"unknown model {model!r}; this server serves {self.models}")

    def _tokens(self, prompt: str | None, token_ids: list[int] | None) -> list[int]:
        if token_ids is not None:
            return token_ids
        assert prompt is not None
        if self.tokenize is None:
            raise AdminError(400, "this server has no tokenizer: send token_ids")
        return list(self.tokenize(prompt))

    def _tiers(self, names: list[str] | None) -> list[str]:
        stack = self.base.tiers
        writable = [t.name for t in stack.tiers if not is_read_only(t)]
        if names is None:
            return writable
        unknown = [n for n in names if n not in stack.names]
        if unknown:
            raise AdminError(400, f"unknown tiers {unknown}; this server has {stack.names}")
        ro = [n for n in names if n not in writable]
        if ro:
            raise AdminError(400, f"tiers {ro} are read-only here")
        return list(dict.fromkeys(names))

    # -- operations --------------------------------------------------------------------------------------------

    def lookup(self, req: PromptRef) -> LookupResponse:
        self._check_model(req.model)
        tokens = self._tokens(req.prompt, req.token_ids)
        result = self.engine_for(req.cache_salt).lookup(tokens)
        return LookupResponse(
            prompt_tokens=len(tokens), matched_tokens=result.num_tokens, tier_tokens=dict(result.tier_tokens)
        )

    def pin(self, req: PromptRef, *, pin: bool = True) -> PinResponse:
        """Pin (never evict, until as many unpins) the prefix's chunks on every tier that can pin.

        The keys are the prefix's full chunks and, with ``store_partial``, its trailing partial chunk,
        held now or stored later; a pinned chunk's ancestors stay as well (the tiers' rule). 501 when no
        tier of this server pins.
        """
        self._check_model(req.model)
        engine = self.engine_for(req.cache_salt)
        tiers = [t.name for t in self.base.tiers.tiers if callable(getattr(t, "pin", None)) and not is_read_only(t)]
        if not tiers:
            raise AdminError(501, "pin/unpin is not supported by this server's tiers")
        tokens = self._tokens(req.prompt, req.token_ids)
        try:  # through the engine: whole chunks, the tenant's cap (pins.max_bytes_per_tenant)
            chunks = engine.pin(tokens).chunks if pin else engine.unpin(tokens)
        except ValueError as exc:  # PinLimitError (over the tenant's cap) or a prompt shorter than one chunk
            raise AdminError(409 if isinstance(exc, PinLimitError) else 400, str(exc)) from exc
        return PinResponse(chunks=chunks, tiers=tiers)

    def clear(self, req: ClearRequest) -> ClearResponse:
        self._check_model(req.model)
        tiers = self._tiers(req.tiers)
        stack = self.base.tiers
        if req.scope == "all":
            everything = req.tiers is None and len(tiers) == len(stack.tiers)
            return ClearResponse(removed=stack.clear(None if everything else tiers))
        digest = self.engine_for(req.cache_salt).namespace.digest
        prefix = self._tokens(req.prompt, req.token_ids) if req.scope == "prefix" else None
        removed: dict[str, int] = {}
        for tier in stack.tiers:
            if tier.name not in tiers:
                continue
            if not isinstance(tier, Inventoried):
                raise AdminError(501, f"tier {tier.name} cannot list its chunks: clear it with scope 'all'")
            inventory = tier.inventory()
            keys = (
                [k for k, info in inventory.items() if info.namespace == digest]
                if prefix is None
                else _covering(inventory, digest, prefix)
            )
            removed |= stack.remove(keys, [tier.name])
        return ClearResponse(removed=removed)

    def stats(self) -> StatsResponse:
        s = self.base.stats()
        events = self.base.tiers.events
        publisher = events if isinstance(events, EventPublisher) else None
        return StatsResponse(
            tiers=[
                TierStatsModel(**dataclasses.asdict(t))
                for t in self.base.tiers.stats()
            ],
            lookups=s.lookups,
            retrieves=s.retrieves,
            query_tokens=s.query_tokens,
            hit_tokens=dict(s.hit_tokens),
            stored_chunks=s.stored_chunks,
            dropped_writes=s.dropped_writes,
            write_errors=s.write_errors,
            events_published=publisher.published if publisher else None,
            events_dropped=publisher.dropped if publisher else None,
        )

    def health(self) -> HealthResponse:
        return HealthResponse(status="ok", tiers=self.base.tiers.names, models=self.models)


def _covering(inventory: dict[ChunkKey, ChunkInfo], digest: bytes, prefix: list[int]) -> list[ChunkKey]:
    """The chunks of namespace ``digest`` whose token path (root to chunk) starts with all of ``prefix``.

    A chunk's path is its ancestors' tokens then its own; a chunk whose chain is broken (an ancestor
    missing from the tier) has no known path and is left alone (nothing can reach it).
    """
    p = tuple(prefix)
    spans: dict[ChunkKey, tuple[int, bool] | None] = {}  # key -> (end of its path, path agrees with p so far)

    def span(key: ChunkKey) -> tuple[int, bool] | None:
        chain: list[ChunkKey] = []
        k: ChunkKey | None = key
        while k is not None and k not in spans:
            info = inventory.get(k)
            if info is None or info.namespace != digest:
                spans[k] = None
                break
            chain.append(k)
            k = info.parent
        for c in reversed(chain):
            info = inventory[c]
            if info.parent is None:
                start, ok = 0, True
            else:
                above = spans.get(info.parent)
                if above is None:
                    spans[c] = None
                    continue
                start, ok = above
            end = start + len(info.tokens)
            overlap = min(end, len(p))
            agrees = ok and (overlap <= start or info.tokens[: overlap - start] == p[start:overlap])
            spans[c] = (end, agrees)
        return spans.get(key)

    out = []
    for key, info in inventory.items():
        if info.namespace != digest:
            continue
        s = span(key)
        if s is not None and s[1] and s[0] >= len(p):
            out.append(key)
    return out
