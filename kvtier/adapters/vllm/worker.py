"""The worker side of the connector (the process that runs the model): loads into vLLM's blocks, stores out of them.

Its engine has every configured tier, the disk folder shared with the
scheduler's (:meth:`TierAccess.shared`: watched).

**Loads** (:class:`_Load`) run on kvtier's own threads (``vllm.load_threads``)
while vLLM keeps stepping the other requests; the request waits in vLLM's
``WAITING_FOR_REMOTE_KVS`` until :meth:`WorkerSide.take_finished` reports it.
Each chunk goes from the tier straight into the request's blocks
(:meth:`CacheEngine.retrieve` with a sink, :meth:`PagedLayout.scatter`): no
prefix-sized temporary. A load is split into up to ``vllm.load_parts``
chunk-aligned parts, each its own ``retrieve`` on a load thread, so reads,
checks and writes into the blocks of different chunks run on several cores at
once (the copies release the GIL). A load still running at its deadline
(``vllm.load_deadline_s``) is cancelled under its lock, so no write into the
blocks can happen once it is reported, and the gap-free prefix it had written
is kept. Whatever a load did not fill becomes load errors; vLLM recomputes it.
With ``vllm.async_loads = false`` the same load runs inline before the forward.

**Stores** (:class:`_Store`) happen once per request, when it finishes: the
scheduler holds its blocks (``request_finished`` returns True) and the
worker's store thread copies them out as they are (one gather per layer), then
reports the request as finished sending, so vLLM frees the blocks; only then
does it cut the copies into chunks and hand them to the tiers. The forward
never waits for a store. The store queue is bounded in KV bytes
(``vllm.store_queue_bytes``, which also bounds the copies): a store that does
not fit is dropped, counted, and its blocks are released at once.

Nothing here raises into vLLM: a kvtier fault is a recompute or a later miss.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

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
from kvtier.threads import spread, thread_pool

log = logging.getLogger("kvtier.vllm")

# Longest wait of an idle step for a load or store to end: what a request that arrives meanwhile may wait
# before vLLM schedules it (vLLM runs idle steps only while every request waits for the connector).
IDLE_WAIT_S = 0.02


class _Load:
    """One request's load, split into chunk-aligned parts that may run on several load threads at once.

    Part ``i`` fills [parts[i][0], parts[i][1]); ``progress[i]`` is how far it
    got. The blocks hold [op.start, filled) where ``filled`` is the
    contiguous prefix of the parts' progress. A write into the blocks starts
    only under ``lock`` while the load is not cancelled, and :meth:`cancel`
    returns only once no write is running, so nothing lands in the blocks
    after a cancelled load is reported.
    """

    def __init__(self, op: LoadOp, parts: list[tuple[int, int]]) -> None:
        self.op = op
        self.parts = parts
        self.progress = [lo for lo, _ in parts]
        self.queued = time.perf_counter()
        self.lock = threading.Lock()
        self._quiet = threading.Condition(self.lock)  # notified when the last running write ends
        self.writing = 0
        self.cancelled = False
        self.left = len(parts)  # parts not ended yet
        self.tier_tokens: dict[str, int] = {}
        self.started: float | None = None  # when the first part began
        self.fetch_s = 0.0  # per part, lookup + read + verify of its first chunks (until its first write), summed
        self.scatter_s = 0.0  # time in writes into the blocks, summed over parts
        self.future: Future[int] = Future()

    @property
    def tiers(self) -> str:
        return "+".join(f"{t}:{n}" for t, n in self.tier_tokens.items() if n) or "none"

    def filled_locked(self) -> int:
        """How far the blocks are filled from ``op.start`` without a gap (call with ``lock`` held)."""
        for (_, hi), got in zip(self.parts, self.progress, strict=True):
            if got < hi:
                return got
        return self.op.end

    @property
    def filled(self) -> int:
        with self.lock:
            return self.filled_locked()

    def begin_write(self) -> bool:
        with self.lock:
            if self.cancelled:
                return False
            self.writing += 1
            return True

    def end_write(self, part: int, end: int | None, seconds: float) -> None:
        with self.lock:
            self.writing -= 1
            self.scatter_s += seconds
            if end is not None:
                self.progress[part] = end
            if not self.writing:
                self._quiet.notify_all()

    def cancel(self) -> int:
        """Stop all further writes into the blocks (waiting for a running one); returns how far they are filled."""
        with self.lock:
            self.cancelled = True
            while self.writing:
                self._quiet.wait()
            return self.filled_locked()


@dataclass
class _Store:
    op: StoreOp
    nbytes: int
    queued: float = field(default_factory=time.perf_counter)


class WorkerSide:
    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.options = settings.config.vllm
        self.base = CacheEngine.from_config(settings.config, settings.namespace, access=TierAccess.shared()).start()
        self.engines = TenantEngines(self.base, settings.config.tenant)
        self.metrics = self.base.metrics
        self.layers: list[torch.Tensor] = []
        self.paged: PagedLayout | None = None
        self.stats = WorkerStats()
        self._lock = threading.Lock()  # guards the sets and counters below (load and store threads report here)
        self._load_errors: set[int] = set()
        self._loads: dict[str, _Load] = {}  # in flight (async)
        self._loaded: set[str] = set()  # async loads done, not yet reported
        self._stored: set[str] = set()  # finished requests whose blocks may be freed, not yet reported
        self._queued_bytes = 0
        self._holding = 0  # queued stores whose blocks vLLM still holds for them
        self._progress = threading.Event()  # set when a load or a store ends (idle steps wait on it)
        self._loader = thread_pool(self.options.load_threads, "kvtier-load")
        self._store_queue: queue.Queue[_Store | None] = queue.Queue()
        self._storer = threading.Thread(
            target=spread(self._store_loop, nice=settings.config.store_nice), name="kvtier-store", daemon=True
        )
        self._storer.start()
        self._metrics = MetricsEndpoint(self.base.metrics, settings.metrics_port)
        self._admin = self._start_admin()

    def _start_admin(self) -> Any:
        """The admin API (``[admin] enabled``) on this engine's tiers: this process holds all of them, L1 included."""
        if not self.settings.config.admin.enabled:
            return None
        from kvtier.admin.server import AdminServer
        from kvtier.admin.service import AdminService

        service = AdminService(
            self.base,
            engine_for=self.engines.get,
            tokenize=compat.tokenizer_encode(self.settings.model_path) if self.settings.model_path else None,
            models=self.settings.served_names,
        )
        return AdminServer(self.settings.config.admin, service)

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
            "kvtier connector (worker): %d layers %s, block layout %s, tiers %s, %s loads",
            len(layers),
            tuple(sample.shape),
            paged.name,
            self.base.tiers.names,
            "asynchronous" if self.options.async_loads else "synchronous",
        )

    # -- loads -------------------------------------------------------------------------------------------------

    def start_loads(self, ops: list[LoadOp]) -> None:
        """Start this step's loads: on the load threads, or (``async_loads = false``) here, one after the other."""
        for op in ops:
            job = _Load(op, self._split(op.start, op.end))
            if not self.options.async_loads:
                for part in range(len(job.parts)):
                    self._run_part(job, part)
                self._finish_load(job, job.future.result())
                continue
            with self._lock:
                self._loads[op.req_id] = job
            self.metrics.loads_in_flight.inc()
            job.future.add_done_callback(lambda _f, req_id=op.req_id: self._mark_loaded(req_id))
            for part in range(len(job.parts)):
                self._loader.submit(self._run_part, job, part)

    def _split(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) as up to ``vllm.load_parts`` ranges of whole chunks (the first may begin mid-chunk)."""
        size = self.settings.config.chunk_size
        first = start // size
        chunks = -(-end // size) - first
        parts = max(1, min(self.options.load_parts, chunks))
        bounds = [start] + [(first + chunks * i // parts) * size for i in range(1, parts)] + [end]
        return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]

    def _mark_loaded(self, req_id: str) -> None:
        with self._lock:
            if req_id in self._loads:
                self._loaded.add(req_id)
        self._progress.set()

    def _run_part(self, job: _Load, part: int) -> None:
        """Fill one part's blocks chunk by chunk; the part's last one to end completes ``job.future``. Never raises.

        Writes only the request's own blocks, each piece between
        ``job.begin_write`` and ``job.end_write`` (see :class:`_Load`).
        """
        assert self.paged is not None
        paged, op = self.paged, job.op
        lo, hi = job.parts[part]
        began = time.perf_counter()
        with job.lock:
            job.started = began if job.started is None else job.started
        first = True

        def sink(start: int, end: int, kv: torch.Tensor) -> bool:
            nonlocal first
            t0 = time.perf_counter()
            if first:
                first = False
                with job.lock:
                    job.fetch_s += t0 - began
            if not job.begin_write():
                return False
            done = None
            try:
                paged.scatter(self.layers, op.block_ids, start, kv)
                done = end
            finally:
                job.end_write(part, done, time.perf_counter() - t0)
            return True

        try:
            found = self.engines.get(op.cache_salt).retrieve(op.tokens, max_tokens=hi, start=lo, sink=sink)
            with job.lock:
                for tier, n in found.tier_tokens.items():
                    job.tier_tokens[tier] = job.tier_tokens.get(tier, 0) + n
        except Exception:  # never run on half-written KV: what is not filled is recomputed
            log.exception("request %s: kvtier load of [%d, %d) failed", op.req_id, lo, hi)
        with job.lock:
            job.left -= 1
            last = not job.left
        if last:
            job.future.set_result(job.filled)

    def _finish_load(self, job: _Load, filled: int) -> None:
        """Account for a load that filled [op.start, filled): the blocks of [filled, op.end) become load errors."""
        op = job.op
        elapsed = time.perf_counter() - job.queued
        self.metrics.load_seconds.observe(elapsed)
        waited = (job.started if job.started is not None else job.queued) - job.queued
        log.info(
            "request %s: loaded %d tokens [%d, %d) from kvtier (%s) in %.1f ms "
            "(queued %.1f ms; %d parts: fetch %.1f ms, scatter %.1f ms, summed over parts)",
            op.req_id,
            filled - op.start,
            op.start,
            filled,
            job.tiers,
            1e3 * elapsed,
            1e3 * waited,
            len(job.parts),
            1e3 * job.fetch_s,
            1e3 * job.scatter_s,
        )
        bs = self.settings.block_size
        bad = op.block_ids[filled // bs : -(-op.end // bs)] if filled < op.end else []
        with self._lock:
            self.stats.loaded_tokens += filled - op.start
            if not bad:
                return
            self._load_errors.update(bad)
            self.stats.failed_loads += 1
        self.metrics.load_failures.inc()
        log.warning(
            "request %s: kvtier loaded %d of %d promised tokens; %d blocks will be recomputed",
            op.req_id,
            filled - op.start,
            op.end - op.start,
            len(bad),
        )

    def _collect_loads(self) -> set[str]:
        """Async loads that finished, or ran past their deadline (cancelled), since the last call."""
        now = time.perf_counter()
        with self._lock:
            done = [self._loads.pop(r) for r in self._loaded]
            self._loaded = set()
            late = [j for j in self._loads.values() if now - j.queued > self.options.load_deadline_s]
            for job in late:
                del self._loads[job.op.req_id]
        for job in done:
            self._finish_load(job, job.future.result())
        for job in late:
            filled = job.cancel()  # from here on the load thread writes nothing into the blocks
            self.metrics.load_timeouts.inc()
            log.warning("request %s: kvtier load past its %.1f s deadline", job.op.req_id, self.options.load_deadline_s)
            self._finish_load(job, filled)
        self.metrics.loads_in_flight.dec(len(done) + len(late))
        return {j.op.req_id for j in done + late}

    # -- stores ------------------------------------------------------------------------------------------------

    def store(self, op: StoreOp) -> None:
        """Queue a finished request's store; its blocks stay held until the store thread has copied them."""
        assert self.paged is not None
        nbytes = len(op.tokens) * self.settings.namespace.layout.bytes_per_token
        with self._lock:
            fits = self._queued_bytes == 0 or self._queued_bytes + nbytes <= int(self.options.store_queue_bytes)
            if fits:
                self._queued_bytes += nbytes
                self._holding += 1
            else:
                self._stored.add(op.req_id)
        if not fits:
            self.metrics.dropped_stores.inc()
            log.warning("request %s: kvtier store queue full, %d tokens not stored", op.req_id, len(op.tokens))
            return
        self.metrics.store_queue_bytes.inc(nbytes)
        self._store_queue.put(_Store(op, nbytes))

    def _store_loop(self) -> None:
        while (job := self._store_queue.get()) is not None:
            self._run_store(job)

    def _run_store(self, job: _Store) -> None:
        """Copy the held blocks out (one gather per layer), hand them back to vLLM, then build and write the chunks.

        vLLM's pool is small next to the requests it serves: a finished request's blocks are held only for the
        raw copy, not for the chunk layout's transposes, checksums and tier writes.
        """
        assert self.paged is not None
        op = job.op
        released = False
        try:
            held = op.block_ids[: -(-len(op.tokens) // self.paged.block_size)]
            copies = self.paged.copy_blocks(self.layers, held)
            self._release(op.req_id)
            released = True
            source = PagedKV(self.paged, copies, range(len(held)), len(op.tokens))
            engine = self.engines.get(op.cache_salt)
            stored = 0
            prompt = op.prompt_tokens or 0
            if engine.store_partial and 0 < prompt < len(op.tokens) and prompt % engine.chunk_size:
                # the prompt's own trailing partial chunk (the answer's tokens give the next one another key):
                # the same prompt again then hits all of it; the full chunks stored here are skipped below
                stored += engine.store(op.tokens[:prompt], source).stored_chunks
            stored += engine.store(op.tokens, source).stored_chunks  # copies out of the blocks
            with self._lock:
                self.stats.stored_chunks += stored
            if stored:
                log.debug("request %s: stored %d chunks (%d tokens)", op.req_id, stored, len(op.tokens))
        except Exception:  # a failed store is a later miss, never a failed request
            log.exception("request %s: kvtier store failed", op.req_id)
        finally:
            if not released:
                self._release(op.req_id)
            with self._lock:
                self._queued_bytes -= job.nbytes
            self._progress.set()
            self.metrics.store_queue_bytes.dec(job.nbytes)
            self.metrics.store_seconds.observe(time.perf_counter() - job.queued)

    def _release(self, req_id: str) -> None:
        """The held blocks of ``req_id`` are no longer read: reported in the next ``get_finished``."""
        with self._lock:
            self._stored.add(req_id)
            self._holding -= 1
        self._progress.set()

    # -- what vLLM polls each step -----------------------------------------------------------------------------

    def take_finished(self, *, idle: bool = False) -> tuple[set[str], set[str]]:
        """(finished requests whose held blocks were copied out, requests whose async load is over).

        On an ``idle`` step (no forward ran) with loads or stores in flight and
        none over yet, first waits up to :data:`IDLE_WAIT_S` for one to end.
        Without the wait vLLM polls in a tight loop, and its busy Python
        thread starves kvtier's load threads of the GIL and the CPU: a lone
        2,560-token hit loaded ~10x slower than the same read in a quiet
        process.
        """
        if idle:
            with self._lock:
                busy = (bool(self._loads) and not self._loaded) or (self._holding > 0 and not self._stored)
            if busy:
                self._progress.wait(IDLE_WAIT_S)
        self._progress.clear()
        loaded = self._collect_loads()
        with self._lock:
            stored, self._stored = self._stored, set()
        return stored, loaded

    def take_load_errors(self) -> set[int]:
        """Blocks promised but not filled, for the loads reported so far (vLLM calls this after take_finished)."""
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued loads and stores are done and the tiers' write-behind has landed; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                busy = self._queued_bytes > 0 or any(not j.future.done() for j in self._loads.values())
            if not busy:
                break
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.base.flush(left)

    def close(self) -> None:
        self._store_queue.put(None)
        self._storer.join()
        self._loader.shutdown(wait=True, cancel_futures=False)
        log.info("kvtier connector (worker): %s", self.stats)
        if self._admin is not None:
            self._admin.close()
        self.base.close()
        self._metrics.close()
