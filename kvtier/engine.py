"""CacheEngine: the API every engine adapter calls.

``lookup`` says how much of a token sequence's prefix is cached and where;
``retrieve`` returns that prefix's KV; ``store`` adds the chunks not yet
cached. All three are thread-safe and never raise for an expected failure
(a missing, evicted or corrupt chunk is a shorter hit).

Chunking: sequences are cut into ``chunk_size``-token chunks at fixed
positions (0, C, 2C, …) so every request that shares a prefix shares its
chunks. With ``store_partial`` the trailing partial chunk is stored too, and a
lookup that stops at position p tries every partial chunk stored at p (one
incremental hash pass). A multi-turn chat therefore reuses its whole previous
turn, not only the previous turn's full chunks.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from kvtier.chunk import Chunk
from kvtier.config import KvtierConfig
from kvtier.deadline import deadline_after, expired
from kvtier.errors import PinLimitError
from kvtier.keys import ChunkKey, ChunkSpan, Namespace, as_token_array, chunk_spans, partial_keys
from kvtier.layout import KVSink, KVSource, TensorKV, assemble_layers
from kvtier.metrics import KvtierMetrics
from kvtier.storage import TierAccess, TierStack, build_tiers
from kvtier.storage.tiers import WriteBehind

log = logging.getLogger(__name__)

Tokens = Sequence[int] | np.ndarray | torch.Tensor
_F = TypeVar("_F", bound=Callable[..., Any])


def _timed(op: str) -> Callable[[_F], _F]:
    """Observe the wall time of an engine method in ``kvtier_engine_op_seconds{op=...}``."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def timed(self: CacheEngine, *args: Any, **kwargs: Any) -> Any:
            with self.metrics.engine_latency.labels(op).time():
                return fn(self, *args, **kwargs)

        return timed  # type: ignore[return-value]

    return wrap


@dataclass(frozen=True)
class LookupResult:
    """How many prefix tokens are cached, and how many of them each tier holds."""

    num_tokens: int
    tier_tokens: Mapping[str, int]
    _plan: tuple[tuple[ChunkSpan, int], ...] = field(default=(), repr=False, compare=False)

    @property
    def tiers(self) -> str:
        """A short human description, e.g. ``"l1:2048+l2:1024"`` or ``"none"``."""
        return "+".join(f"{t}:{n}" for t, n in self.tier_tokens.items() if n) or "none"

    @property
    def chunk_end(self) -> int:
        """Where the located chunks end: ``num_tokens``, or more when ``max_tokens`` cut the last chunk short.

        A retrieve must be given the tokens up to here (with ``max_tokens=num_tokens``) to find that last chunk:
        a partial chunk's key covers all of its tokens.
        """
        return max(self.num_tokens, self._plan[-1][0].end) if self._plan else self.num_tokens


@dataclass(frozen=True)
class RetrieveResult:
    """KV of the longest available prefix.

    ``layers[l]`` is [2, H, num_tokens, D] (K then V) in the layout's dtype;
    the caller owns it (or it is a view into the caller's ``out``).
    """

    num_tokens: int
    layers: list[torch.Tensor]
    tier_tokens: Mapping[str, int]

    @property
    def tiers(self) -> str:
        return "+".join(f"{t}:{n}" for t, n in self.tier_tokens.items() if n) or "none"


@dataclass(frozen=True)
class StoreResult:
    """What a ``store`` call did: chunks written (or queued), already present, refused, per tier.

    ``rejected_chunks`` counts chunks the first writable tier refused (full),
    or, when that tier is written in the background, that a full write-behind
    queue dropped. Every tier's refusals: ``rejected_by_tier`` holds the
    synchronous tiers' (``l1``, ``node``: known when ``store`` returns; tiers
    that took everything are left out), ``dropped_chunks`` what a full queue
    dropped for the background tiers (``l2``, ``l3``), and ``pending`` the
    queued writes, whose outcome is known once they ran:
    :meth:`background_rejected` (or ``None`` while :attr:`is_pending`).
    """

    stored_chunks: int
    skipped_chunks: int
    stored_tokens: int
    rejected_chunks: int
    rejected_by_tier: Mapping[str, int] = field(default_factory=dict)
    dropped_chunks: int = 0
    pending: tuple[WriteBehind, ...] = field(default=(), compare=False, repr=False)

    @property
    def is_pending(self) -> bool:
        """Whether some background write of this store has not run yet."""
        return any(not p.done for p in self.pending)

    def background_rejected(self, timeout: float | None = 0.0) -> dict[str, int] | None:
        """Chunks each background tier did not store (tiers with none left out), waiting up to ``timeout``
        seconds (None: as long as it takes); None if some write is still pending then."""
        out: Counter[str] = Counter()
        for p in self.pending:
            if not p.wait(timeout):
                return None
            out.update(p.rejected)
        return dict(out)

    def combine(self, later: StoreResult) -> StoreResult:
        """This store followed by ``later`` (of a longer sequence): counts added, ``later``'s skips kept."""
        by_tier = Counter(self.rejected_by_tier)
        by_tier.update(later.rejected_by_tier)
        return StoreResult(
            self.stored_chunks + later.stored_chunks,
            later.skipped_chunks,
            self.stored_tokens + later.stored_tokens,
            self.rejected_chunks + later.rejected_chunks,
            dict(by_tier),
            self.dropped_chunks + later.dropped_chunks,
            self.pending + later.pending,
        )


@dataclass(frozen=True)
class PinResult:
    """What one :meth:`CacheEngine.pin` holds: the full chunks of the prefix, their raw KV bytes, and the tenant's
    pinned bytes in all afterwards."""

    chunks: int
    nbytes: int
    tenant_bytes: int
    tiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine was created."""

    lookups: int
    retrieves: int
    hit_tokens: Mapping[str, int]
    query_tokens: int
    stored_chunks: int
    skipped_chunks: int
    invalid_chunks: Mapping[str, int]
    dropped_writes: int
    write_errors: int
    deadline_exceeded: Mapping[str, int] = field(default_factory=dict)  # op ("lookup", "retrieve") -> calls


class CacheEngine:
    """Prefix KV cache over a :class:`TierStack`, for one namespace (model + layout + tenant)."""

    def __init__(
        self,
        namespace: Namespace,
        tiers: TierStack,
        *,
        chunk_size: int = 256,
        store_partial: bool = True,
        lookup_deadline_s: float | None = None,
        retrieve_deadline_s: float | None = None,
        pin_max_bytes: int = 10**9,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        for name, value in (("lookup_deadline_s", lookup_deadline_s), ("retrieve_deadline_s", retrieve_deadline_s)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        self.lookup_deadline_s = lookup_deadline_s
        self.retrieve_deadline_s = retrieve_deadline_s
        self.namespace = namespace
        self.layout = namespace.layout
        self.tiers = tiers
        self.chunk_size = chunk_size
        self.store_partial = store_partial
        self.metrics = tiers.metrics
        if tiers.policy is not None:  # the shared tiers accept (and, with a secret, sign) this namespace's chunks
            # the layout a chunk header records (the attention windows are in the digest)
            tiers.policy.register(namespace.digest, namespace.tenant, self.layout.payload, chunk_size)
        tiers.events.namespace(namespace.digest, namespace.tenant)  # root chunks' events carry the cache_salt
        if pin_max_bytes < 0:
            raise ValueError(f"pin_max_bytes must be >= 0, got {pin_max_bytes}")
        self.pin_max_bytes = pin_max_bytes
        self._pins: dict[tuple[ChunkKey, ...], int] = {}  # pinned prefix (its full chunks' keys) -> raw bytes
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._hits: Counter[str] = Counter()
        self._invalid: Counter[str] = Counter()

    @classmethod
    def from_config(
        cls,
        config: KvtierConfig,
        namespace: Namespace,
        *,
        access: TierAccess = TierAccess(),
        metrics: KvtierMetrics | None = None,
    ) -> CacheEngine:
        """An engine over the tiers ``config`` enables, opened as ``access`` says (not started: ``start`` or ``with``).

        ``metrics`` lets several engines report into one registry; by default the engine has its own.
        Raises ValueError if ``config`` and ``access`` leave no tier.
        """
        tiers = build_tiers(config, access, metrics=metrics)
        remote = config.l3.enabled  # the deadlines bound remote tiers; local ones answer within their I/O
        engine = cls(
            namespace,
            tiers,
            chunk_size=config.chunk_size,
            store_partial=config.store_partial,
            lookup_deadline_s=config.l3.lookup_deadline_s if remote else None,
            retrieve_deadline_s=config.l3.retrieve_deadline_s if remote else None,
            pin_max_bytes=int(config.pins.max_bytes_per_tenant),
        )
        for prefix in config.pins.prefixes:  # raises PinLimitError if the list is over the cap: a config mistake
            engine.pin(prefix)
        return engine

    def start(self) -> CacheEngine:
        self.tiers.start()
        return self

    def close(self) -> None:
        """Flush pending writes and close the tiers."""
        self.tiers.close()

    def __enter__(self) -> CacheEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for write-behind to the lower tiers; False on timeout."""
        return self.tiers.flush(timeout)

    # -- pins ------------------------------------------------------------------------------------------------

    def _pin_keys(self, tokens: Tokens) -> tuple[ChunkKey, ...]:
        return tuple(s.key for s in chunk_spans(self.namespace, _tokens(tokens), self.chunk_size))

    def pin(self, tokens: Tokens) -> PinResult:
        """Keep the full chunks of ``tokens`` (a system prompt, few-shot block) in ``l1``, ``node`` and ``l2``.

        A pinned chunk, held now or stored later, and its ancestors are never
        evicted from those tiers (Redis evicts on its own).
        Only whole chunks are pinned: a trailing partial chunk is reused by
        no longer prompt. Pinning a prefix again is a no-op. Raises
        :class:`~kvtier.errors.PinLimitError` when this engine's tenant would
        pin more than ``pin_max_bytes`` (raw KV bytes of the chunks), and
        ValueError when ``tokens`` holds no whole chunk.
        """
        keys = self._pin_keys(tokens)
        if not keys:
            raise ValueError(f"nothing to pin: fewer tokens than one chunk ({self.chunk_size})")
        nbytes = len(keys) * self.chunk_size * self.layout.bytes_per_token
        with self._lock:
            if keys in self._pins:
                return PinResult(len(keys), nbytes, sum(self._pins.values()))
            total = sum(self._pins.values()) + nbytes
            if total > self.pin_max_bytes:
                raise PinLimitError(
                    f"tenant {self.namespace.tenant!r}: pinning {nbytes} bytes would pin {total}, over its cap of "
                    f"{self.pin_max_bytes} (pins.max_bytes_per_tenant)"
                )
            self._pins[keys] = nbytes
            tiers = self.tiers.pin(keys)
        return PinResult(len(keys), nbytes, total, tuple(tiers))

    def unpin(self, tokens: Tokens) -> int:
        """Undo :meth:`pin` of exactly this prefix; returns the chunks unpinned (0 if it was not pinned)."""
        keys = self._pin_keys(tokens)
        with self._lock:
            if self._pins.pop(keys, None) is None:
                return 0
            self.tiers.unpin(keys)
        return len(keys)

    def pinned_bytes(self) -> int:
        """Raw KV bytes this engine's tenant has pinned."""
        with self._lock:
            return sum(self._pins.values())

    # -- lookup / retrieve -------------------------------------------------------------------------------------

    def _plan(self, tokens: np.ndarray) -> list[tuple[ChunkSpan, int]]:
        spans = chunk_spans(self.namespace, tokens, self.chunk_size)
        plan: list[tuple[ChunkSpan, int]] = []
        for span, where in zip(spans, self.tiers.locate([s.key for s in spans]), strict=True):
            if where is None:
                break
            plan.append((span, where))
        start = len(plan) * self.chunk_size
        tail_end = min(len(tokens), start + self.chunk_size - 1)
        if self.store_partial and tail_end > start:
            parent = plan[-1][0].key if plan else None
            candidates = list(partial_keys(self.namespace, parent, tokens[:tail_end], start))
            located = self.tiers.locate([c.key for c in candidates], count_misses=False)
            for span, where in zip(candidates, located, strict=True):
                if where is not None:
                    plan.append((span, where))
                    break
        return plan

    def _tier_tokens(self, plan: Sequence[tuple[ChunkSpan, int]], limit: int, start: int = 0) -> dict[str, int]:
        counts = dict.fromkeys(self.tiers.names, 0)
        for span, where in plan:
            counts[self.tiers.names[where]] += max(0, min(span.end, limit) - max(span.start, start))
        return counts

    def _deadline(self, op: str, seconds: float | None) -> _DeadlineScope:
        return _DeadlineScope(self, op, seconds)

    @_timed("lookup")
    def lookup(self, tokens: Tokens, *, max_tokens: int | None = None, deadline_s: float | None = None) -> LookupResult:
        """How many leading tokens of ``tokens`` (at most ``max_tokens``) can be retrieved, and from where.

        Reads only the tiers' indexes (Redis: EXISTS); changes no recency. A
        later ``retrieve`` may still return fewer tokens if a chunk is evicted
        or proves corrupt in between. ``deadline_s`` (default: the engine's
        ``lookup_deadline_s``) bounds the call: past it, the prefix located so
        far is the answer, and ``kvtier_deadline_exceeded{op="lookup"}`` counts it.
        """
        with self._deadline("lookup", deadline_s if deadline_s is not None else self.lookup_deadline_s):
            return self._lookup(tokens, max_tokens)

    def _lookup(self, tokens: Tokens, max_tokens: int | None) -> LookupResult:
        arr = _tokens(tokens)
        limit = len(arr) if max_tokens is None else max(0, min(max_tokens, len(arr)))
        plan = self._plan(arr)
        n = min(limit, plan[-1][0].end if plan else 0)
        with self._lock:
            self._counts["lookups"] += 1
        return LookupResult(n, self._tier_tokens(plan, n), tuple(plan))

    @_timed("retrieve")
    def retrieve(
        self,
        tokens: Tokens,
        *,
        max_tokens: int | None = None,
        start: int = 0,
        out: torch.Tensor | None = None,
        sink: KVSink | None = None,
        deadline_s: float | None = None,
    ) -> RetrieveResult:
        """KV for the longest cached prefix of ``tokens`` (at most ``max_tokens`` tokens).

        Every chunk is checked against the expected key, token ids, namespace
        and layout; the first chunk that is missing or wrong ends the prefix
        (a wrong one is counted, logged and discarded from all tiers). Chunks
        read from a lower tier are promoted to the tiers above. With ``out``
        (a caller-owned [L, 2, H, >=N-start, D] tensor) the KV is copied there
        and the layers are views into it; otherwise new tensors are allocated.

        ``start`` is for callers that already hold the first ``start`` tokens'
        KV (e.g. in vLLM's own prefix cache): chunks that end at or before it
        are neither read nor checked, and ``layers`` cover positions
        [start, num_tokens) only (empty when num_tokens <= start). Blocks on
        tier reads.

        With ``sink`` (a :data:`~kvtier.layout.KVSink`) nothing is assembled:
        each chunk's part of [start, num_tokens) goes to the sink as it is, in
        order (no prefix-sized temporary), ``layers`` is empty, and a sink that
        returns False ends the prefix there (``num_tokens`` is what it took).
        ``out`` and ``sink`` exclude each other.

        ``deadline_s`` (default: the engine's ``retrieve_deadline_s``) bounds
        the lookup and the reads: a remote read still running at the deadline
        is cut off, and the prefix read before it is returned (counted in
        ``kvtier_deadline_exceeded{op="retrieve"}``).
        """
        with self._deadline("retrieve", deadline_s if deadline_s is not None else self.retrieve_deadline_s):
            return self._retrieve(tokens, max_tokens, start, out, sink)

    def _retrieve(
        self,
        tokens: Tokens,
        max_tokens: int | None,
        start: int,
        out: torch.Tensor | None,
        sink: KVSink | None,
    ) -> RetrieveResult:
        if out is not None and sink is not None:
            raise ValueError("retrieve takes out or sink, not both")
        arr = _tokens(tokens)
        limit = len(arr) if max_tokens is None else max(0, min(max_tokens, len(arr)))
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        full_plan = self._plan(arr)
        skipped = [(s, w) for s, w in full_plan if s.end <= start]
        plan = [(s, w) for s, w in full_plan if s.start < limit and s.end > start]
        chunks = self.tiers.get([s.key for s, _ in plan], [w for _, w in plan]) if plan else []
        valid: list[tuple[ChunkSpan, int, Chunk]] = []
        for (span, where), chunk in zip(plan, chunks, strict=True):
            if chunk is None:  # gone since lookup (evicted, removed elsewhere) or corrupt (the tier counts that)
                break
            why = chunk.mismatch(span.key, arr[span.start : span.end], self.namespace.digest, self.layout)
            if why is not None:
                log.warning("chunk %s from %s rejected: %s mismatch", span.key.hex()[:16], self.tiers.names[where], why)
                self._count_invalid(why)
                self.tiers.discard(span.key)
                break
            valid.append((span, where, chunk))
        self.tiers.promote([(c, w) for _, w, c in valid])
        # The plan is contiguous from 0; chunks before ``start`` count as held without being read.
        n = min(limit, valid[-1][0].end if valid else skipped[-1][0].end if skipped else 0)
        first = valid[0][0].start if valid else start
        layers: list[torch.Tensor] = []
        if sink is not None:
            if n > start:
                n = self._deliver(valid, start, n, sink)
            valid = [v for v in valid if v[0].start < n]
        elif n > start:
            layers = assemble_layers([c.payload for _, _, c in valid], self.layout, n - start, out, skip=start - first)
        tier_tokens = self._tier_tokens([(s, w) for s, w, _ in valid], n, start)
        with self._lock:
            self._counts["retrieves"] += 1
            self._counts["query_tokens"] += max(0, limit - start)
            self._hits.update(tier_tokens)
        self.metrics.query_tokens.inc(max(0, limit - start))
        for tier, count in tier_tokens.items():
            self.metrics.hit_tokens.labels(tier).inc(count)
        return RetrieveResult(n, layers, tier_tokens)

    @staticmethod
    def _deliver(valid: list[tuple[ChunkSpan, int, Chunk]], start: int, n: int, sink: KVSink) -> int:
        """Hand [start, n) to ``sink`` chunk by chunk; returns where it stopped (``n`` unless the sink said stop)."""
        done = start
        for span, _, chunk in valid:
            lo, hi = max(span.start, start), min(span.end, n)
            if hi <= lo:
                continue
            if not sink(lo, hi, chunk.payload[:, :, :, lo - span.start : hi - span.start]):
                return done
            done = hi
        return done

    def _count_deadline(self, op: str) -> None:
        with self._lock:
            self._counts[f"deadline_{op}"] += 1
        self.metrics.deadline_exceeded.labels(op).inc()

    def _count_invalid(self, reason: str) -> None:
        with self._lock:
            self._invalid[reason] += 1
        self.metrics.invalid_chunks.labels(reason).inc()

    # -- store -------------------------------------------------------------------------------------------------

    @_timed("store")
    def store(self, tokens: Tokens, kv: KVSource | torch.Tensor) -> StoreResult:
        """Store the chunks of ``tokens`` that no tier holds yet; skip the rest.

        ``kv`` covers the first ``kv.num_tokens`` tokens (a [L, 2, H, N, D]
        tensor or any :class:`KVSource`); chunks beyond it are not stored.
        KV is copied out of ``kv`` before this returns, so the caller may
        reuse its memory. The memory tier is written now, disk and Redis in
        the background (a full write queue drops those writes, counted): with
        L1 disabled a stored chunk becomes visible once written (``flush``).
        """
        arr = _tokens(tokens)
        source = TensorKV(kv, self.layout) if isinstance(kv, torch.Tensor) else kv
        n = min(len(arr), source.num_tokens)
        spans = chunk_spans(self.namespace, arr[:n], self.chunk_size)
        full_end = len(spans) * self.chunk_size
        if self.store_partial and n > full_end:
            parent = spans[-1].key if spans else None
            spans.append(next(partial_keys(self.namespace, parent, arr[:n], full_end)))
        keys = [s.key for s in spans]
        new = [s for s, absent in zip(spans, self.tiers.absent(keys), strict=True) if absent]
        chunks = [
            Chunk(
                s.key,
                s.parent,
                self.namespace.digest,
                self.layout,
                arr[s.start : s.end].copy(),
                source.gather(s.start, s.end),
            )
            for s in new
        ]
        put = self.tiers.put_chunks(chunks)
        with self._lock:
            self._counts["stored_chunks"] += len(chunks)
            self._counts["skipped_chunks"] += len(spans) - len(new)
        return StoreResult(
            len(chunks),
            len(spans) - len(new),
            sum(s.num_tokens for s in new),
            len(chunks) - put.accepted,
            put.rejected,
            put.dropped,
            (put.pending,) if put.pending is not None else (),
        )

    # -- inspection --------------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                lookups=self._counts["lookups"],
                retrieves=self._counts["retrieves"],
                hit_tokens=dict(self._hits),
                query_tokens=self._counts["query_tokens"],
                stored_chunks=self._counts["stored_chunks"],
                skipped_chunks=self._counts["skipped_chunks"],
                invalid_chunks=dict(self._invalid),
                dropped_writes=self.tiers.dropped_writes,
                write_errors=self.tiers.write_errors,
                deadline_exceeded={
                    op: self._counts[f"deadline_{op}"]
                    for op in ("lookup", "retrieve")
                    if self._counts[f"deadline_{op}"]
                },
            )


class _DeadlineScope:
    """The deadline scope of one engine call; counts the call when the deadline had passed by its end."""

    def __init__(self, engine: CacheEngine, op: str, seconds: float | None) -> None:
        self._engine, self._op = engine, op
        self._scope = deadline_after(seconds)

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            if expired():
                self._engine._count_deadline(self._op)
        finally:
            self._scope.__exit__(*exc)


def _tokens(tokens: Tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        tokens = tokens.detach().cpu().numpy()
    return as_token_array(tokens)
