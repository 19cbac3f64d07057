"""The scheduler side of the connector (vLLM's EngineCore process): lookups, and the plan of loads and stores.

Its engine is an *observer* (:meth:`TierAccess.observer`): no L1, the disk
tier read-only and watched, Redis as configured. It sees what the worker
stored once the worker's write-behind lands it on disk or in Redis. Each
step it tells the worker what to load (the kvtier hit it promised vLLM) and
what to store (chunks whose tokens are all computed), in :class:`KvtierMetadata`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kvtier.adapters.vllm.compat import RequestView, ScheduledRequest
from kvtier.adapters.vllm.metadata import KvtierMetadata, LoadOp, StoreOp
from kvtier.adapters.vllm.settings import ConnectorSettings
from kvtier.adapters.vllm.tenants import TenantEngines
from kvtier.engine import CacheEngine
from kvtier.storage import TierAccess

log = logging.getLogger("kvtier.vllm")


@dataclass
class _Tracked:
    """Scheduler-side state of one live request."""

    request: RequestView
    block_ids: list[int] = field(default_factory=list)
    stored: int = 0  # tokens up to which stores were issued
    load_tokens: int = 0  # external tokens promised by the last after_alloc, not yet sent


class SchedulerSide:
    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.chunk_size = settings.config.chunk_size
        base = CacheEngine.from_config(settings.config, settings.namespace, access=TierAccess.observer()).start()
        self.engines = TenantEngines(base, settings.config.tenant)
        self.tracked: dict[str, _Tracked] = {}
        self.finishing: list[StoreOp] = []
        self.hit_tiers: dict[str, str] = {}  # req id -> "l2:512+l3:256" of the last lookup
        log.info(
            "kvtier connector (scheduler): chunk_size %d, tiers %s, namespace %s",
            self.chunk_size,
            base.tiers.names,
            base.namespace.digest.hex()[:16],
        )

    def matched(self, request: RequestView, num_computed_tokens: int) -> int:
        """kvtier tokens beyond vLLM's own ``num_computed_tokens``; at most all prompt tokens but one."""
        if request.unsupported() is not None:
            return 0
        n = request.num_tokens
        try:
            found = self.engines.get(request.cache_salt).lookup(request.tokens(n), max_tokens=n - 1)
        except Exception:  # a kvtier fault is a miss, never a scheduler crash
            log.exception("request %s: kvtier lookup failed", request.id)
            return 0
        self.hit_tiers[request.id] = found.tiers
        return max(0, found.num_tokens - num_computed_tokens)

    def after_alloc(self, request: RequestView, num_external_tokens: int) -> None:
        tracked = self.tracked.setdefault(request.id, _Tracked(request))
        tracked.load_tokens = num_external_tokens
        if num_external_tokens:
            log.info(
                "request %s: %d of %d prompt tokens from kvtier (%s)",
                request.id,
                num_external_tokens,
                request.num_tokens,
                self.hit_tiers.get(request.id, "?"),
            )
        self.hit_tiers.pop(request.id, None)

    def failed_blocks(self, block_ids: set[int]) -> None:
        """The worker could not fill these blocks: vLLM recomputes them, and they must be stored again."""
        for tracked in self.tracked.values():
            if block_ids.intersection(tracked.block_ids):
                tracked.stored = 0

    def build_meta(self, scheduled: list[ScheduledRequest]) -> KvtierMetadata:
        """This step's loads and stores, plus the stores of requests that finished since the last step."""
        meta = KvtierMetadata()
        for s in scheduled:
            tracked = self.tracked.get(s.req_id)
            if tracked is None:
                continue
            if s.replace:
                tracked.block_ids = s.block_ids
            else:
                tracked.block_ids.extend(s.block_ids)
            self._plan(meta, tracked, s.num_computed_tokens, s.num_scheduled_tokens)
        meta.stores.extend(self.finishing)
        self.finishing = []
        return meta

    def _plan(self, meta: KvtierMetadata, tracked: _Tracked, computed_before: int, scheduled: int) -> None:
        request = tracked.request
        if tracked.load_tokens:
            start = computed_before - tracked.load_tokens
            meta.loads.append(
                LoadOp(
                    request.id,
                    request.tokens(computed_before),
                    start,
                    computed_before,
                    list(tracked.block_ids),
                    request.cache_salt,
                )
            )
            tracked.load_tokens = 0
        if request.unsupported() is not None:
            return
        full = self._storable(request, computed_before + scheduled) // self.chunk_size * self.chunk_size
        if full > tracked.stored:
            meta.stores.append(StoreOp(request.id, request.tokens(full), list(tracked.block_ids), request.cache_salt))
            tracked.stored = full

    def _storable(self, request: RequestView, computed: int) -> int:
        """How many leading tokens of a request may be stored once ``computed`` tokens have KV."""
        limit = min(computed, request.num_tokens)
        if not self.settings.config.store_generated:
            limit = min(limit, request.num_prompt_tokens)
        return limit

    def finished(self, request: RequestView, block_ids: list[int]) -> bool:
        """Queue the trailing partial chunk of a finished request; True holds its blocks until it is copied."""
        tracked = self.tracked.pop(request.id, None)
        self.hit_tiers.pop(request.id, None)
        if tracked is None or not self.settings.config.store_partial or request.unsupported() is not None:
            return False
        n = self._storable(tracked.request, request.num_computed_tokens)
        if n <= tracked.stored or not block_ids:
            return False
        self.finishing.append(StoreOp(request.id, request.tokens(n), list(block_ids), request.cache_salt, True))
        return True

    def close(self) -> None:
        self.engines.close()
