"""The worker side of the connector (the process that runs the model): loads before the forward, stores after it.

Its engine has every configured tier, the disk folder shared with the
scheduler's (:meth:`TierAccess.shared`: watched). Loads are synchronous:
:meth:`WorkerSide.load` retrieves and writes one request's KV through vLLM's
own cache kernel and touches no other state, so an asynchronous version can
run it on an I/O thread and hand its result to :meth:`WorkerSide.finish_load`.
Whatever a load cannot fill is reported as load errors; vLLM recomputes it.
"""

from __future__ import annotations

import logging
import time

import torch

from kvtier.adapters.vllm import compat
from kvtier.adapters.vllm.metadata import LoadOp, StoreOp
from kvtier.adapters.vllm.paged import PagedKV, PagedLayout, layout_matches, probe_layout
from kvtier.adapters.vllm.settings import ConnectorSettings
from kvtier.adapters.vllm.stats import MetricsEndpoint, WorkerStats
from kvtier.adapters.vllm.tenants import TenantEngines
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.storage import TierAccess

log = logging.getLogger("kvtier.vllm")


class WorkerSide:
    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.base = CacheEngine.from_config(settings.config, settings.namespace, access=TierAccess.shared()).start()
        self.engines = TenantEngines(self.base, settings.config.tenant)
        self.layers: list[torch.Tensor] = []
        self.paged: PagedLayout | None = None
        self.stats = WorkerStats()
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests whose load failed in the current step
        self._finished: set[str] = set()
        self._metrics = MetricsEndpoint(self.base.metrics, settings.metrics_port)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Probe how vLLM packs KV into the registered layer tensors; refuse a packing kvtier cannot read."""
        layout = self.settings.namespace.layout
        layers = list(kv_caches.values())
        if len(layers) != layout.num_layers:
            raise ConfigError(f"vLLM registered {len(layers)} KV tensors, the model has {layout.num_layers} layers")
        sample = layers[0]
        write = compat.cache_writer(sample, layout.head_dim)
        if write is None:
            raise ConfigError(f"the kvtier connector supports vLLM's CPU build only; KV is on {sample.device}")
        paged = probe_layout(sample, layout.num_kv_heads, layout.head_dim, self.settings.block_size, write)
        if paged is None:
            raise ConfigError(
                "kvtier cannot read this vLLM build's KV block layout (no known packing matches what its "
                "cache kernel writes); run vLLM without the kvtier connector"
            )
        why = layout_matches(paged, layout, sample)
        if why is not None:
            raise ConfigError(why)
        self.layers = layers
        self.paged = paged
        log.info(
            "kvtier connector (worker): %d layers %s, block layout %s, tiers %s",
            len(layers),
            tuple(sample.shape),
            paged.name,
            self.base.tiers.names,
        )

    def start_loads(self, ops: list[LoadOp]) -> None:
        """This step's loads, one after the other, before the forward."""
        for op in ops:
            self.finish_load(op, self.load(op))

    def load(self, op: LoadOp) -> int:
        """Write [op.start, got) into the request's blocks and return ``got`` (``op.start``: nothing written).

        Never raises, and changes only the request's blocks: a failed write
        returns ``op.start``, so the blocks are recomputed, never run half-written.
        """
        assert self.paged is not None
        t0 = time.perf_counter()
        got = op.start
        tiers = "none"
        try:
            found = self.engines.get(op.cache_salt).retrieve(op.tokens, max_tokens=op.end, start=op.start)
            if found.num_tokens > op.start:
                slots = self.paged.slots(op.block_ids, op.start, found.num_tokens)
                self.paged.write_tokens(self.layers, found.layers, slots)
                got = found.num_tokens
                tiers = found.tiers
        except Exception:  # never run on half-written KV: report the blocks, vLLM recomputes them
            log.exception("request %s: kvtier load failed", op.req_id)
            got = op.start
        log.info(
            "request %s: loaded %d tokens [%d, %d) from kvtier (%s) in %.1f ms",
            op.req_id,
            got - op.start,
            op.start,
            got,
            tiers,
            1e3 * (time.perf_counter() - t0),
        )
        return got

    def finish_load(self, op: LoadOp, got: int) -> None:
        """Account for a load that filled [op.start, got): the blocks of [got, op.end) become load errors."""
        self.stats.loaded_tokens += got - op.start
        if got >= op.end:
            return
        bs = self.settings.block_size
        bad = op.block_ids[got // bs : -(-op.end // bs)]
        self._load_errors.update(bad)
        self._failed_reqs.add(op.req_id)
        self.stats.failed_loads += 1
        self.base.metrics.load_failures.inc()
        log.warning(
            "request %s: kvtier loaded %d of %d promised tokens; %d blocks will be recomputed",
            op.req_id,
            got - op.start,
            op.end - op.start,
            len(bad),
        )

    def store(self, op: StoreOp) -> None:
        """Store the chunks of ``op`` not stored yet (copied out of the blocks before returning)."""
        assert self.paged is not None
        if op.req_id in self._failed_reqs:
            # This step ran on blocks a failed load left unfilled; vLLM recomputes them, stores come later.
            return
        try:
            source = PagedKV(self.paged, self.layers, op.block_ids, len(op.tokens))
            result = self.engines.get(op.cache_salt).store(op.tokens, source)
            self.stats.stored_chunks += result.stored_chunks
            if result.stored_chunks:
                log.debug("request %s: stored %d chunks (%d tokens)", op.req_id, result.stored_chunks, len(op.tokens))
        except Exception:  # a failed store is a later miss, never a failed request
            log.exception("request %s: kvtier store failed", op.req_id)
        if op.final:
            self._finished.add(op.req_id)

    def take_finished(self) -> set[str]:
        """Finished requests whose held blocks the worker has copied (vLLM may free them)."""
        done, self._finished = self._finished, set()
        return done

    def take_load_errors(self) -> set[int]:
        """Blocks this step promised but could not fill (called once per step, after the stores)."""
        errors, self._load_errors = self._load_errors, set()
        self._failed_reqs = set()
        return errors

    def close(self) -> None:
        log.info("kvtier connector (worker): %s", self.stats)
        self.base.close()
        self._metrics.close()
