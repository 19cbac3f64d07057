"""The scheduler side of the connector (vLLM's EngineCore process): lookups, and the plan of loads and stores.

Its engine is an *observer* (:meth:`TierAccess.observer`): no L1, the disk
tier read-only and watched, Redis as configured. It sees what the worker
stored once the worker's write-behind lands it on disk or in Redis. Each
step it tells the worker, in :class:`KvtierMetadata`, what to load (the
kvtier hits it promised vLLM: planned at allocation for asynchronous loads,
at scheduling for synchronous ones) and what to store (finished requests,
whose blocks vLLM holds until the worker has copied them).
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
    load_tokens: int = 0  # external tokens promised by the last after_alloc, not yet sent (synchronous loads)
    load_chunk_end: int = 0  # where the chunks of that load end (past the promise when it cuts a chunk)


class SchedulerSide:
    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.chunk_size = settings.config.chunk_size
        self.async_loads = settings.config.vllm.async_loads
        base = CacheEngine.from_config(settings.config, settings.namespace, access=TierAccess.observer()).start()
        self.engines = TenantEngines(base, settings.config.tenant)
        self.tracked: dict[str, _Tracked] = {}
        self.pending_loads: list[LoadOp] = []  # async loads planned in after_alloc, sent with the next metadata
        self.loading: dict[str, set[int]] = {}  # async loads the worker has not reported done -> their blocks
        self.failed: set[str] = set()  # requests whose load came back short: never offered a kvtier hit again
        self.finishing: list[StoreOp] = []
        # req id -> (vLLM's computed tokens, "l2:512+l3:256", where the located chunks end) at lookup
        self.hits: dict[str, tuple[int, str, int]] = {}
        log.info(
            "kvtier connector (scheduler): chunk_size %d, tiers %s, namespace %s, %s loads",
            self.chunk_size,
            base.tiers.names,
            base.namespace.digest.hex()[:16],
            "asynchronous" if self.async_loads else "synchronous",
        )

    def matched(self, request: RequestView, num_computed_tokens: int) -> tuple[int, bool]:
        """(kvtier tokens beyond vLLM's own ``num_computed_tokens``, whether they load asynchronously).

        At most all tokens but one (vLLM must compute the last one to sample). The lookup sees all of them:
        a stored partial chunk that ends with the prompt (the same prompt sent again) is found and loaded but
        for its last token.
        """
        if request.unsupported() is not None or request.id in self.failed:
            return 0, False  # after a short load vLLM may ask again (from 0): recompute, never loop on loads
        n = request.num_tokens
        try:
            found = self.engines.get(request.cache_salt).lookup(request.tokens(n), max_tokens=n - 1)
        except Exception:  # a kvtier fault is a miss, never a scheduler crash
            log.exception("request %s: kvtier lookup failed", request.id)
            return 0, False
        extra = max(0, found.num_tokens - num_computed_tokens)
        self.hits[request.id] = (num_computed_tokens, found.tiers, found.chunk_end)
        return extra, self.async_loads and extra > 0

    def after_alloc(self, request: RequestView, block_ids: list[int], num_external_tokens: int) -> None:
        """vLLM allocated ``block_ids`` (all the request's blocks) for ``num_external_tokens`` kvtier tokens."""
        tracked = self.tracked.setdefault(request.id, _Tracked(request))
        local, tiers, chunk_end = self.hits.pop(request.id, (0, "?", 0))
        if not num_external_tokens:
            return
        log.info(
            "request %s: %d of %d prompt tokens from kvtier (%s)",
            request.id,
            num_external_tokens,
            request.num_tokens,
            tiers,
        )
        if not self.async_loads:
            tracked.load_tokens = num_external_tokens  # sent when the request is scheduled (build_meta)
            tracked.load_chunk_end = chunk_end
            return
        end = local + num_external_tokens
        self.pending_loads.append(
            LoadOp(request.id, request.tokens(max(end, chunk_end)), local, end, list(block_ids), request.cache_salt)
        )
        self.loading[request.id] = set(block_ids[local // self.settings.block_size :])

    def loads_done(self, req_ids: set[str], invalid_blocks: set[int]) -> None:
        """The worker reported these async loads over; ``invalid_blocks``: this step's load errors (all requests)."""
        for req_id in req_ids:
            blocks = self.loading.pop(req_id, set())
            if blocks & invalid_blocks:
                self.failed.add(req_id)

    def build_meta(self, scheduled: list[ScheduledRequest], *, idle: bool = False) -> KvtierMetadata:
        """This step's loads, plus the stores of requests that finished since the last step.

        ``idle``: the step schedules no tokens (no forward runs).
        """
        meta = KvtierMetadata(loads=self.pending_loads, idle=idle)
        self.pending_loads = []
        for s in scheduled:
            tracked = self.tracked.get(s.req_id)
            if tracked is None:
                continue
            if s.replace:
                tracked.block_ids = s.block_ids
            else:
                tracked.block_ids.extend(s.block_ids)
            if tracked.load_tokens:  # a synchronous load: runs before this step's forward
                request, before = tracked.request, s.num_computed_tokens
                meta.loads.append(
                    LoadOp(
                        request.id,
                        request.tokens(max(before, tracked.load_chunk_end)),
                        before - tracked.load_tokens,
                        before,
                        list(tracked.block_ids),
                        request.cache_salt,
                    )
                )
                tracked.load_tokens = 0
        meta.stores.extend(self.finishing)
        self.finishing = []
        return meta

    def _storable(self, request: RequestView, computed: int) -> int:
        """How many leading tokens of a request may be stored once ``computed`` tokens have KV."""
        limit = min(computed, request.num_tokens)
        if not self.settings.config.store_generated:
            limit = min(limit, request.num_prompt_tokens)
        return limit

    def finished(self, request: RequestView, block_ids: list[int]) -> bool:
        """Queue the store of a finished request; True holds its blocks until the worker has copied them.

        A request whose async load is still running is not stored (its blocks
        are not all filled); vLLM frees its blocks once the load is reported.
        """
        self.tracked.pop(request.id, None)
        self.hits.pop(request.id, None)
        self.failed.discard(request.id)
        if request.id in self.loading or request.unsupported() is not None:
            return False
        n = self._storable(request, request.num_computed_tokens)
        if not self.settings.config.store_partial:
            n = n // self.chunk_size * self.chunk_size
        if n <= 0 or not block_ids:
            return False
        self.finishing.append(
            StoreOp(request.id, request.tokens(n), list(block_ids), request.cache_salt, True, request.num_prompt_tokens)
        )
        return True

    def close(self) -> None:
        self.engines.close()
