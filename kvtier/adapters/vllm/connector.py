"""``KvtierConnector``: kvtier behind vLLM's KV-connector interface (vLLM 0.32, ``KVConnectorBase_V1``).

vLLM builds two instances in two processes:

* the **scheduler side** (EngineCore process, :mod:`.scheduler`) answers
  "how many prompt tokens can kvtier supply?" from :meth:`CacheEngine.lookup`
  and tells the worker, in each step's metadata (:mod:`.metadata`), what to
  load and what to store;
* the **worker side** (the process that runs the model, :mod:`.worker`) loads
  chunks into vLLM's paged blocks on its own threads while vLLM steps other
  requests (``get_num_new_matched_tokens`` answers ``(n, True)``: the request
  waits in ``WAITING_FOR_REMOTE_KVS`` until ``get_finished`` reports it), and
  stores each finished request from its held blocks on a store thread.

How the scheduler sees what the worker stored: through the shared tiers.
The scheduler's engine is an *observer* (``TierAccess.observer()``): no L1,
the disk tier read-only and watched (a folder whose mtime moved is
re-listed), Redis as configured. So chunks the worker writes become visible
once its write-behind lands them on disk or in Redis (milliseconds), and
everything on disk or in Redis is visible after a restart. The worker's L1
is a read cache in front of those tiers; a chunk held only in L1 (its disk
write dropped or evicted) is a missed opportunity, never a wrong answer. A
lookup is a promise the worker may fail to keep (a chunk evicted or corrupt
in between): the worker then reports the blocks it could not fill in
``get_block_ids_with_load_errors`` and vLLM recomputes them
(``kv_load_failure_policy="recompute"``, which ``kvtier serve`` sets).

Tenants (:mod:`.tenants`): a request's ``cache_salt`` becomes the tenant salt
of its namespace (combined with the configured ``tenant``), so different
salts never share a chunk. A request is stored when it finishes, trailing
partial chunk included (``store_partial``): its blocks are held
(``request_finished`` returns True) until the worker's store thread has copied
them (``get_finished``'s sending set).

Logging: the connector logs to the ``kvtier.*`` loggers and configures no
logging itself. ``kvtier serve`` hands vLLM a logging config with a
``kvtier`` logger (``VLLM_LOGGING_CONFIG_PATH``), so these logs appear in
vLLM's output of every process. Embedding the connector with ``LLM(...)``
yourself, configure logging yourself: e.g. point ``VLLM_LOGGING_CONFIG_PATH``
at a file written from :func:`kvtier.adapters.vllm.compat.logging_config`
(or :func:`kvtier.serve.vllm_logging_env`) before creating the ``LLM``; vLLM
applies it in its engine and worker processes too.

Only :mod:`.compat` reaches into vLLM beyond the base class imported here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.adapters.vllm import compat
from kvtier.adapters.vllm.metadata import KvtierMetadata
from kvtier.adapters.vllm.scheduler import SchedulerSide
from kvtier.adapters.vllm.settings import ConnectorSettings, check_kv_cache_groups, describe_groups
from kvtier.adapters.vllm.worker import WorkerSide

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kvtier.adapters.vllm.compat import KVCacheBlocks, KVCacheConfig, Request, SchedulerOutput, VllmConfig


class KvtierConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by kvtier's tiers. See the module docstring for the design."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = ConnectorSettings.from_vllm(vllm_config)
        groups = compat.cache_groups(kv_cache_config)
        check_kv_cache_groups(groups, settings.namespace.layout.num_layers)
        log.info("kvtier connector (%s): KV-cache groups %s", role.name.lower(), describe_groups(groups))
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._quiet = settings.config.vllm.quiet_idle_waits and compat.install_quiet_waits()
        if settings.config.vllm.quiet_idle_waits and not self._quiet:
            log.warning("kvtier connector: this vLLM has no hook for quiet idle waits; its idle steps spin")
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(settings)
        else:
            self._worker = WorkerSide(settings)

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache is best effort: a store that never happens is only a later miss.
        return False

    # -- scheduler side ------------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.matched(compat.RequestView(request), num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(compat.RequestView(request), compat.block_ids(blocks), num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        idle = compat.scheduled_tokens(scheduler_output) == 0
        if self._quiet:  # this step computes nothing: wait for the worker's reply asleep
            compat.quiet_waits(idle)
        return self._scheduler.build_meta(list(compat.scheduled_requests(scheduler_output)), idle=idle)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(compat.RequestView(request), block_ids), None

    def update_connector_output(self, connector_output: Any) -> None:
        if self._scheduler is not None:
            self._scheduler.loads_done(
                compat.finished_loads(connector_output), compat.invalid_block_ids(connector_output)
            )

    # -- worker side ---------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_loads(self._step().loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # a load fills whole requests, before vLLM schedules them (async) or before the forward (sync)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # stores copy finished requests' held blocks on the worker's store thread

    def wait_for_save(self) -> None:
        assert self._worker is not None
        for op in self._step().stores:
            self._worker.store(op)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        idle = self._step().idle
        stored, loaded = self._worker.take_finished(idle=idle)
        if self._quiet:  # after an idle step the next one comes only after the engine core's own wait
            compat.quiet_waits(idle)
        return stored or None, loaded or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_load_errors()

    def _step(self) -> KvtierMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierMetadata)
        return meta

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()
