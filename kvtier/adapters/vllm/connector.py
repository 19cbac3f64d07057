"""``KvtierConnector``: kvtier behind vLLM's KV-connector interface (vLLM 0.32, ``KVConnectorBase_V1``).

vLLM builds two instances in two processes:

* the **scheduler side** (EngineCore process) answers "how many prompt
  tokens can kvtier supply?" from :meth:`CacheEngine.lookup` and tells the
  worker, in each step's metadata, what to load and what to store;
* the **worker side** (the process that runs the model) loads chunks into
  vLLM's paged blocks before the forward and stores new full chunks after it.

How the scheduler sees what the worker stored: through the shared tiers.
The scheduler's engine is an *observer* (:meth:`CacheEngine.from_config`
with ``observer=True``): no L1, the disk tier read-only and watched (a
folder whose mtime moved is re-listed), Redis as configured. So chunks the
worker writes become visible once its write-behind lands them on disk or in
Redis (milliseconds), and everything on disk or in Redis is visible after a
restart. The worker's L1 is a read cache in front of those tiers; a chunk
held only in L1 (its disk write dropped or evicted) is a missed opportunity,
never a wrong answer. A lookup is a promise the worker may fail to keep (a
chunk evicted or corrupt in between): the worker then reports the blocks it
could not fill in ``get_block_ids_with_load_errors`` and vLLM recomputes
them (``kv_load_failure_policy="recompute"``, which ``kvtier serve`` sets).

Tenants: a request's ``cache_salt`` becomes the tenant salt of its namespace
(combined with the configured ``tenant``), so different salts never share a
chunk. The trailing partial chunk of a finished request is stored too
(``store_partial``): its blocks are held (``request_finished`` returns True)
until the worker has copied them, one step later.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.adapters.vllm.paged import PagedKV, PagedLayout, layout_matches, probe_layout
from kvtier.config import KvtierConfig, load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.fingerprint import folder_fingerprint
from kvtier.keys import Namespace
from kvtier.layout import KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.vllm")

_EXTRA_KEYS = frozenset({"config", "set", "metrics_port"})
_MAX_TENANT_ENGINES = 1024


# -- settings shared by both sides ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectorSettings:
    """What both sides derive identically from vLLM's config and the kvtier config."""

    config: KvtierConfig
    namespace: Namespace
    block_size: int
    metrics_port: int | None

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> ConnectorSettings:
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        unknown = set(extra) - _EXTRA_KEYS
        if unknown:
            raise ConfigError(
                f"unknown kv_connector_extra_config keys {sorted(unknown)}; kvtier takes {sorted(_EXTRA_KEYS)}"
            )
        overrides = extra.get("set") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f'kv_connector_extra_config "set" must map config keys to values, got {overrides!r}')
        config = load_config(extra.get("config"), overrides=overrides)
        block_size = int(vllm_config.cache_config.block_size)
        if config.chunk_size % block_size:
            raise ConfigError(
                f"kvtier chunk_size {config.chunk_size} must be a multiple of vLLM's block size {block_size} "
                f"(set chunk_size to e.g. {block_size * max(1, round(config.chunk_size / block_size))})"
            )
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise ConfigError("the kvtier connector supports tensor/pipeline parallel size 1 only")
        model = vllm_config.model_config
        cache_dtype = str(vllm_config.cache_config.cache_dtype)
        if cache_dtype != "auto":
            raise ConfigError(f"the kvtier connector needs kv_cache_dtype 'auto' (the model dtype), got {cache_dtype}")
        layout = KVLayout.from_torch_dtype(
            model.get_num_layers(parallel), model.get_num_kv_heads(parallel), model.get_head_size(), model.dtype
        )
        fingerprint = folder_fingerprint(model.model, config.cache_dir)
        namespace = Namespace(fingerprint, layout, config.tenant, config.hash)
        port = extra.get("metrics_port")
        return cls(config, namespace, block_size, int(port) if port is not None else None)

    def tenant(self, cache_salt: str | None) -> str | None:
        """The tenant salt for a request: the configured tenant, refined by the request's ``cache_salt``."""
        if cache_salt is None:
            return self.config.tenant
        return "cache_salt:" + json.dumps([self.config.tenant, cache_salt])


class _Engines:
    """One :class:`CacheEngine` per tenant over one shared tier stack (engines are cheap views)."""

    def __init__(self, settings: ConnectorSettings, base: CacheEngine) -> None:
        self._settings = settings
        self.base = base
        self._by_tenant: OrderedDict[str | None, CacheEngine] = OrderedDict({settings.config.tenant: base})
        self._lock = threading.Lock()

    def get(self, cache_salt: str | None) -> CacheEngine:
        tenant = self._settings.tenant(cache_salt)
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
                if len(self._by_tenant) > _MAX_TENANT_ENGINES:
                    self._by_tenant.popitem(last=False)
            else:
                self._by_tenant.move_to_end(tenant)
            return engine


# -- step metadata (scheduler -> worker) --------------------------------------------------------------------------


@dataclass
class LoadOp:
    """Write kvtier's KV for positions [start, end) of ``tokens`` into the request's blocks."""

    req_id: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]
    cache_salt: str | None


@dataclass
class StoreOp:
    """Store the chunks of ``tokens`` (all computed) read from the request's blocks.

    ``final``: the request has finished and its blocks are held for this store;
    the worker reports it in ``get_finished`` so vLLM frees them.
    """

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    cache_salt: str | None
    final: bool = False


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)


@dataclass
class _Tracked:
    """Scheduler-side state of one live request."""

    request: Request
    block_ids: list[int] = field(default_factory=list)
    stored: int = 0  # tokens up to which stores were issued
    load_tokens: int = 0  # external tokens promised by the last update_state_after_alloc, not yet sent


# -- the connector ---------------------------------------------------------------------------------------------


class KvtierConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by kvtier's tiers. See the module docstring for the design."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._settings = ConnectorSettings.from_vllm(vllm_config)
        _setup_logging(self._settings.config.log_level)
        self._scheduler: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(self._settings)
        else:
            self._worker = _WorkerSide(self._settings)

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache is best effort: a store that never happens is only a later miss.
        return False

    # scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.matched(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(request, block_ids), None

    def update_connector_output(self, connector_output: Any) -> None:
        if self._scheduler is not None and connector_output.invalid_block_ids:
            self._scheduler.failed_blocks(set(connector_output.invalid_block_ids))

    # worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierMetadata)
        for op in meta.loads:
            self._worker.load(op)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous, done in start_load_kv before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # stores read whole chunks from the blocks in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierMetadata)
        for op in meta.stores:
            self._worker.store(op)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        return self._worker.take_finished() or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()


# -- scheduler side --------------------------------------------------------------------------------------------


class _SchedulerSide:
    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.chunk_size = settings.config.chunk_size
        base = CacheEngine.from_config(settings.config, settings.namespace, observer=True).start()
        self.engines = _Engines(settings, base)
        self.tracked: dict[str, _Tracked] = {}
        self.finishing: list[StoreOp] = []
        self.hit_tokens: dict[str, str] = {}  # req id -> "disk:512+redis:256" of the last lookup
        log.info(
            "kvtier connector (scheduler): chunk_size %d, tiers %s, namespace %s",
            self.chunk_size,
            base.tiers.names,
            base.namespace.digest.hex()[:16],
        )

    @staticmethod
    def _refusal(request: Request) -> str | None:
        if getattr(request, "lora_request", None) is not None:
            return "LoRA request"
        if getattr(request, "mm_features", None):
            return "multimodal inputs"
        if getattr(request, "prompt_embeds", None) is not None:
            return "prompt embeddings"
        return None

    def matched(self, request: Request, num_computed_tokens: int) -> int:
        """kvtier tokens beyond vLLM's own ``num_computed_tokens``; at most all prompt tokens but one."""
        if self._refusal(request) is not None:
            return 0
        tokens = list(request.all_token_ids[: request.num_tokens])
        try:
            found = self.engines.get(request.cache_salt).lookup(tokens, max_tokens=request.num_tokens - 1)
        except Exception:  # a kvtier fault is a miss, never a scheduler crash
            log.exception("request %s: kvtier lookup failed", request.request_id)
            return 0
        self.hit_tokens[request.request_id] = found.tiers
        return max(0, found.num_tokens - num_computed_tokens)

    def failed_blocks(self, block_ids: set[int]) -> None:
        """The worker could not fill these blocks: vLLM recomputes them, and they must be stored again."""
        for tracked in self.tracked.values():
            if block_ids.intersection(tracked.block_ids):
                tracked.stored = 0

    def after_alloc(self, request: Request, num_external_tokens: int) -> None:
        tracked = self.tracked.setdefault(request.request_id, _Tracked(request))
        tracked.load_tokens = num_external_tokens
        if num_external_tokens:
            log.info(
                "request %s: %d of %d prompt tokens from kvtier (%s)",
                request.request_id,
                num_external_tokens,
                request.num_tokens,
                self.hit_tokens.get(request.request_id, "?"),
            )
        self.hit_tokens.pop(request.request_id, None)

    def _storable(self, tracked: _Tracked, computed: int) -> int:
        """How many leading tokens of a request may be stored once ``computed`` tokens have KV."""
        request = tracked.request
        limit = min(computed, len(request.all_token_ids))
        if not self.settings.config.store_generated:
            limit = min(limit, request.num_prompt_tokens)
        return limit

    def _plan(self, meta: KvtierMetadata, req_id: str, computed_before: int, scheduled: int) -> None:
        tracked = self.tracked.get(req_id)
        if tracked is None:
            return
        request = tracked.request
        if tracked.load_tokens:
            start = computed_before - tracked.load_tokens
            meta.loads.append(
                LoadOp(
                    req_id,
                    list(request.all_token_ids[:computed_before]),
                    start,
                    computed_before,
                    list(tracked.block_ids),
                    request.cache_salt,
                )
            )
            tracked.load_tokens = 0
        if self._refusal(request) is not None:
            return
        full = self._storable(tracked, computed_before + scheduled) // self.chunk_size * self.chunk_size
        if full > tracked.stored:
            meta.stores.append(
                StoreOp(req_id, list(request.all_token_ids[:full]), list(tracked.block_ids), request.cache_salt)
            )
            tracked.stored = full

    def build_meta(self, so: SchedulerOutput) -> KvtierMetadata:
        meta = KvtierMetadata()
        for new in so.scheduled_new_reqs:
            tracked = self.tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
            scheduled = so.num_scheduled_tokens.get(new.req_id, 0)
            self._plan(meta, new.req_id, new.num_computed_tokens, scheduled)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self.tracked.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                tracked.block_ids.extend(new_ids[0])
            self._plan(meta, req_id, cached.num_computed_tokens[i], so.num_scheduled_tokens.get(req_id, 0))
        meta.stores.extend(self.finishing)
        self.finishing = []
        return meta

    def finished(self, request: Request, block_ids: list[int]) -> bool:
        """Queue the trailing partial chunk of a finished request; True holds its blocks until it is copied."""
        tracked = self.tracked.pop(request.request_id, None)
        self.hit_tokens.pop(request.request_id, None)
        if tracked is None or not self.settings.config.store_partial or self._refusal(request) is not None:
            return False
        n = self._storable(tracked, request.num_computed_tokens)
        if n <= tracked.stored or not block_ids:
            return False
        self.finishing.append(
            StoreOp(request.request_id, list(request.all_token_ids[:n]), list(block_ids), request.cache_salt, True)
        )
        return True

    def close(self) -> None:
        self.engines.base.close()


def _setup_logging(level: str) -> None:
    """Give kvtier's loggers a stderr handler in vLLM's processes (vLLM configures only its own loggers)."""
    root = logging.getLogger("kvtier")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False


# -- worker side -----------------------------------------------------------------------------------------------


class _WorkerSide:
    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.base = CacheEngine.from_config(settings.config, settings.namespace, shared_disk=True).start()
        self.engines = _Engines(settings, self.base)
        self.layers: list[torch.Tensor] = []
        self.paged: PagedLayout | None = None
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests whose load failed in the current step
        self._finished: set[str] = set()
        self.loaded_tokens = 0
        self.failed_loads = 0
        self.stored_chunks = 0
        self._metrics_server: Any = None
        if settings.metrics_port is not None:
            self._metrics_server = self.base.metrics.serve(settings.metrics_port)
            log.info("kvtier metrics on http://127.0.0.1:%d/metrics", settings.metrics_port)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = self.settings.namespace.layout
        layers = list(kv_caches.values())
        if len(layers) != layout.num_layers:
            raise ConfigError(f"vLLM registered {len(layers)} KV tensors, the model has {layout.num_layers} layers")
        sample = layers[0]
        if sample.device.type != "cpu":
            raise ConfigError(f"the kvtier connector supports vLLM's CPU build only; KV is on {sample.device}")
        paged = probe_layout(
            sample, layout.num_kv_heads, layout.head_dim, self.settings.block_size, _cpu_writer(sample, layout)
        )
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

    def load(self, op: LoadOp) -> None:
        """Write [op.start, op.end) into the request's blocks; blocks not filled are reported as load errors."""
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
        bs = self.settings.block_size
        if got < op.end:
            bad = op.block_ids[got // bs : -(-op.end // bs)]
            self._load_errors.update(bad)
            self._failed_reqs.add(op.req_id)
            self.failed_loads += 1
            self.base.metrics.load_failures.inc()
            log.warning(
                "request %s: kvtier loaded %d of %d promised tokens; %d blocks will be recomputed",
                op.req_id,
                got - op.start,
                op.end - op.start,
                len(bad),
            )
        self.loaded_tokens += got - op.start
        log.info(
            "request %s: loaded %d tokens [%d, %d) from kvtier (%s) in %.1f ms",
            op.req_id,
            got - op.start,
            op.start,
            got,
            tiers,
            1e3 * (time.perf_counter() - t0),
        )

    def store(self, op: StoreOp) -> None:
        assert self.paged is not None
        if op.req_id in self._failed_reqs:
            # This step ran on blocks a failed load left unfilled; vLLM recomputes them, stores come later.
            return
        try:
            source = PagedKV(self.paged, self.layers, op.block_ids, len(op.tokens))
            result = self.engines.get(op.cache_salt).store(op.tokens, source)
            self.stored_chunks += result.stored_chunks
            if result.stored_chunks:
                log.debug("request %s: stored %d chunks (%d tokens)", op.req_id, result.stored_chunks, len(op.tokens))
        except Exception:  # a failed store is a later miss, never a failed request
            log.exception("request %s: kvtier store failed", op.req_id)
        if op.final:
            self._finished.add(op.req_id)

    def take_finished(self) -> set[str]:
        done, self._finished = self._finished, set()
        return done

    def take_load_errors(self) -> set[int]:
        """Blocks this step promised but could not fill (called once per step, after the stores)."""
        errors, self._load_errors = self._load_errors, set()
        self._failed_reqs = set()
        return errors

    def close(self) -> None:
        log.info(
            "kvtier connector (worker): loaded %d tokens, %d failed loads, stored %d chunks",
            self.loaded_tokens,
            self.failed_loads,
            self.stored_chunks,
        )
        self.base.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()


def _cpu_writer(sample: torch.Tensor, layout: KVLayout):
    """vLLM's own CPU cache-write kernel, bound to the ISA vLLM picks for this dtype and shape."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    heads, block_size = sample.shape[1], sample.shape[2]
    head_dim = layout.head_dim
    isa = _get_attn_isa(sample.dtype, block_size, head_dim)

    def write(key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor, slots: torch.Tensor) -> None:
        kc, vc = layer.view(layer.shape[0], heads, 2 * block_size, head_dim).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)

    return write
