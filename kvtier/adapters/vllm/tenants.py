"""Tenants: a request's ``cache_salt`` refines the configured tenant, and each tenant gets its engine view."""

from __future__ import annotations

import threading
from collections import OrderedDict

from kvtier.engine import CacheEngine
from kvtier.keys import tenant_salt

__all__ = ["MAX_TENANT_ENGINES", "TenantEngines", "tenant_salt"]

MAX_TENANT_ENGINES = 1024


class TenantEngines:
    """One :class:`CacheEngine` per tenant over one shared tier stack (engines are cheap views), LRU-bounded."""

    def __init__(self, base: CacheEngine, configured_tenant: str | None) -> None:
        self.base = base
        self._configured = configured_tenant
        self._by_tenant: OrderedDict[str | None, CacheEngine] = OrderedDict({configured_tenant: base})
        self._lock = threading.Lock()

    def get(self, cache_salt: str | None) -> CacheEngine:
        tenant = tenant_salt(self._configured, cache_salt)
        with self._lock:
            engine = self._by_tenant.get(tenant)
            if engine is None:
                engine = CacheEngine(
                    self.base.namespace.with_tenant(tenant),
                    self.base.tiers,
                    chunk_size=self.base.chunk_size,
                    store_partial=self.base.store_partial,
                )
                self._by_tenant[tenant] = engine
                if len(self._by_tenant) > MAX_TENANT_ENGINES:
                    self._by_tenant.popitem(last=False)
            else:
                self._by_tenant.move_to_end(tenant)
            return engine

    def close(self) -> None:
        self.base.close()
