"""KV events in vLLM's format: every tier's chunk stores and removals, published over ZMQ.

The wire format is vLLM's (``vllm/distributed/kv_events.py``, 0.32), so a
consumer of vLLM's KV events (llm-d's prefix-cache scorer, Dynamo's KV
router, Ray Serve's KVAwareRouter, ``kvtier router``) can index kvtier's
tiers as it indexes vLLM's own blocks:

* a message is three ZMQ frames ``(topic, seq, payload)``: ``seq`` an 8-byte
  big-endian sequence number (0, 1, 2, … per publisher), ``payload`` one
  msgpack ``EventBatch``;
* ``EventBatch`` is an array ``[ts, events]`` (``data_parallel_rank``
  omitted); each event is a tagged map (msgspec ``tag=True``: the field
  ``type`` is the class name) ``BlockStored`` {``block_hashes``,
  ``parent_block_hash``, ``token_ids``, ``block_size``, ``lora_id``,
  ``medium``, ``lora_name``}, ``BlockRemoved`` {``block_hashes``,
  ``medium``} or ``AllBlocksCleared`` {};
* with a replay endpoint, a ROUTER socket answers a request whose last frame
  is a start sequence number (8 bytes, big-endian) with every buffered
  message from there on, each as ``(topic, seq, payload)`` behind the
  requester's envelope, then ``("", -1 as 8 bytes, "")``.

kvtier's mapping: one ``BlockStored`` per chunk (``block_hashes`` = the
chunk key's 32 bytes, ``parent_block_hash`` its parent's or None,
``token_ids`` its tokens, ``block_size`` its token count: a trailing partial
chunk is shorter than ``chunk_size``), ``medium`` = the tier's name (``l1``,
``node``, ``l2``, ``l3``). A removal (eviction, a discarded corrupt chunk, a
delete) is a ``BlockRemoved``; ``clear`` of a tier is ``BlockRemoved`` of
the keys it held, or ``AllBlocksCleared`` (it has no ``medium``: every tier
of that publisher) when the stack clears every tier. A store of a chunk the
tier already held is published again (consumers keep sets).

The store path never waits: events go into a bounded queue and a full queue
drops them (counted, :attr:`EventPublisher.dropped`). A consumer notices a
lost message by a gap in ``seq`` and asks the replay endpoint; a dropped
event never got a ``seq``, so a publisher that dropped events says so in its
counters (and a consumer should treat its index as approximate). What one
process publishes is what *it* did: another process's evictions in a shared
folder, and Redis's own (``maxmemory``) evictions, are not seen here.

The structs are defined here with vLLM's field order and options, so the
core needs neither vLLM nor its import; only ``msgspec`` and ``pyzmq``
(both also vLLM's dependencies).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from kvtier.chunk import Chunk
from kvtier.keys import ChunkKey, cache_salt_of
from kvtier.threads import spread

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
ANY = object()  # EventIndex.match: chunks of any tenant
_MAX_NAMESPACES = 100_000  # tenants whose cache_salt root events name (beyond: their roots carry none)
REPLAY_WAIT_S = 5.0  # a subscriber waits this long for a replay's next message (a busy publisher is slow)


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):  # type: ignore[call-arg]
    """Base of the events (vLLM's ``KVCacheEvent``)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_decoder = msgspec.msgpack.Decoder(type=KVEventBatch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """One ``payload`` frame as a :class:`KVEventBatch`; msgspec.DecodeError if it is not one."""
    return _decoder.decode(payload)


class TierEvents:
    """What a :class:`~kvtier.storage.tiers.TierStack` and its backends report: stores, removals, clears.

    The base class reports nowhere (a null observer); :class:`EventPublisher` publishes.
    Every method must return at once: they are called on the store path.
    """

    def stored(self, tier: str, chunks: Sequence[Chunk]) -> None:
        pass

    def namespace(self, digest: bytes, tenant: str | None) -> None:
        """An engine over the stack uses this namespace (its root chunks' events name its cache_salt)."""

    def removed(self, tier: str, keys: Sequence[ChunkKey]) -> None:
        pass

    def all_cleared(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Stored:
    tier: str
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class _Removed:
    tier: str
    keys: tuple[ChunkKey, ...]


_CLEARED = object()
_STOP = object()


def _to_events(item: object, salts: dict[bytes, str | None]) -> list[KVCacheEvent]:
    if isinstance(item, _Stored):
        return [
            BlockStored(
                block_hashes=[c.key.digest],
                parent_block_hash=c.parent.digest if c.parent is not None else None,
                token_ids=[int(t) for t in c.tokens],
                block_size=len(c.tokens),
                lora_id=None,
                medium=item.tier,
                lora_name=None,
                # as vLLM: the cache_salt is an extra key of the first block (the one whose hash includes it)
                extra_keys=[(salt,)] if c.parent is None and (salt := salts.get(c.namespace)) is not None else None,
            )
            for c in item.chunks
        ]
    if isinstance(item, _Removed):
        return [BlockRemoved(block_hashes=[k.digest for k in item.keys], medium=item.tier)]
    return [AllBlocksCleared()]


class EventPublisher(TierEvents):
    """Publishes tier events on a ZMQ PUB socket from its own thread, vLLM's way (see the module docstring).

    ``endpoint`` is bound (``tcp://127.0.0.1:5557``, ``ipc://…``; port 0
    picks a free one: :attr:`endpoint` is then the bound address), or
    connected with ``connect=True`` (to a consumer's bound SUB socket).
    ``replay_endpoint`` (bound) serves the last ``buffer_steps`` messages.
    At most ``max_queue`` reports wait for the thread; beyond that they are
    dropped and counted. ``batch_max`` reports at most go into one batch.
    Raises zmq.ZMQError when an endpoint cannot be bound.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        topic: str = "",
        replay_endpoint: str | None = None,
        connect: bool = False,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        max_queue: int = 100_000,
        batch_max: int = 256,
    ) -> None:
        if max_queue <= 0 or buffer_steps <= 0 or batch_max <= 0:
            raise ValueError("max_queue, buffer_steps and batch_max must be positive")
        self.topic = topic.encode()
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._replay: zmq.Socket | None = None
        try:
            if connect:
                self._pub.connect(endpoint)
                self.endpoint = endpoint
            else:
                self.endpoint = _bind(self._pub, endpoint)
            self.replay_endpoint = None
            if replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self.replay_endpoint = _bind(self._replay, replay_endpoint)
        except zmq.ZMQError:
            self._pub.close(linger=0)
            if self._replay is not None:
                self._replay.close(linger=0)
            raise
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._batch_max = batch_max
        self._lock = threading.Lock()
        self._dropped = 0
        self._published = 0
        self._seq = 0
        self._salts: dict[bytes, str | None] = {}  # namespace digest -> the cache_salt of its tenant
        # spread: not on the one core vLLM's CPU worker pins its main thread (and so this thread) to
        self._thread = threading.Thread(target=spread(self._loop), name="kvtier-events", daemon=True)
        self._thread.start()
        log.info("kvtier events on %s (replay %s, topic %r)", self.endpoint, self.replay_endpoint, topic)

    # -- the store path: never blocks ------------------------------------------------------------------------------

    def _offer(self, item: object) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def stored(self, tier: str, chunks: Sequence[Chunk]) -> None:
        if chunks:
            self._offer(_Stored(tier, tuple(chunks)))

    def removed(self, tier: str, keys: Sequence[ChunkKey]) -> None:
        if keys:
            self._offer(_Removed(tier, tuple(keys)))

    def namespace(self, digest: bytes, tenant: str | None) -> None:
        if len(self._salts) < _MAX_NAMESPACES:
            self._salts[digest] = cache_salt_of(tenant)

    def all_cleared(self) -> None:
        self._offer(_CLEARED)

    @property
    def dropped(self) -> int:
        """Reports dropped because the queue was full (each a store, removal or clear of one call)."""
        with self._lock:
            return self._dropped

    @property
    def published(self) -> int:
        """Batches sent (the next batch's sequence number)."""
        with self._lock:
            return self._published

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued report is published; False on timeout (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.002)
        return self._queue.unfinished_tasks == 0

    def close(self) -> None:
        """Publish what is queued (up to a second), stop the thread, close the sockets. Idempotent."""
        if not self._thread.is_alive():
            return
        self.flush(1.0)
        while True:
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    break
        self._thread.join(timeout=2.0)

    # -- the publisher thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        try:
            while True:
                if self._replay is not None and self._replay.poll(0):
                    try:
                        self._serve_replay()
                    except zmq.ZMQError:
                        log.exception("kvtier events: replay request failed")
                try:
                    first = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                items = [first]
                while len(items) < self._batch_max and first is not _STOP:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = any(i is _STOP for i in items)
                events: list[KVCacheEvent] = []
                for item in items:
                    if item is not _STOP:
                        events.extend(_to_events(item, self._salts))
                if events:
                    self._send(encoder.encode(EventBatch(ts=time.time(), events=events)))
                for _ in items:
                    self._queue.task_done()
                if stop:
                    return
        finally:
            self._pub.close(linger=200)
            if self._replay is not None:
                self._replay.close(linger=0)

    def _send(self, payload: bytes) -> None:
        seq = self._seq
        try:
            self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
        except zmq.ZMQError:
            log.exception("kvtier events: publish failed (batch %d kept for replay)", seq)
        self._buffer.append((seq, payload))
        self._seq += 1
        with self._lock:
            self._published = self._seq

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) < 2 or len(frames[-1]) != 8:
            log.warning("kvtier events: ignoring a malformed replay request (%d frames)", len(frames))
            return
        envelope, start = frames[:-1], int.from_bytes(frames[-1], "big")
        for seq, payload in list(self._buffer):
            if seq >= start:
                self._replay.send_multipart((*envelope, self.topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((*envelope, b"", END_SEQ, b""))


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind ``endpoint``; a tcp port 0 binds a free port. Returns the bound endpoint."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        port = sock.bind_to_random_port(endpoint[: -len(":0")])
        return f"{endpoint[: -len(':0')]}:{port}"
    sock.bind(endpoint)
    return endpoint


class EventIndex:
    """A consumer's view: which chunk hashes each medium holds, rebuilt from event batches.

    ``apply`` takes decoded batches in sequence order; ``gap`` is set when a
    sequence number was skipped (the caller asks for a replay, or treats
    the index as stale). Thread-safe. ``parents`` and ``tokens`` remember
    every stored chunk's parent and token ids (for prefix matching).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held: dict[str, set[bytes]] = {}
        self.parents: dict[bytes, bytes | None] = {}
        self.tokens: dict[bytes, tuple[int, ...]] = {}
        # parent -> its children's token ids -> their hashes (several where tenants share tokens)
        self.children: dict[bytes | None, dict[tuple[int, ...], set[bytes]]] = {}
        self.lengths: dict[bytes | None, set[int]] = {}
        self.salts: dict[bytes, str | None] = {}  # root chunk -> the cache_salt in its extra keys (None: none)
        self.next_seq = 0
        self.gap = False
        self.last_event_at = 0.0

    def reset(self) -> None:
        """Forget everything (the publisher restarted: its sequence began again at 0)."""
        with self._lock:
            self.held.clear()
            self.parents.clear()
            self.tokens.clear()
            self.children.clear()
            self.lengths.clear()
            self.salts.clear()
            self.next_seq = 0
            self.gap = False

    def apply(self, seq: int, batch: KVEventBatch) -> bool:
        """Apply one batch; False (nothing applied) if it is one already seen. Sets ``gap`` past a missing seq."""
        with self._lock:
            if seq < self.next_seq:
                return False
            if seq > self.next_seq:
                self.gap = True
            self.next_seq = seq + 1
            self.last_event_at = time.monotonic()
            for event in batch.events:
                self._apply(event)
            return True

    def _apply(self, event: object) -> None:
        if isinstance(event, BlockStored):
            parent = event.parent_block_hash
            held = self.held.setdefault(event.medium or "", set())
            per = event.block_size
            for i, h in enumerate(event.block_hashes):
                if not isinstance(h, bytes):
                    h = int(h).to_bytes(8, "big", signed=True)
                held.add(h)
                self.parents[h] = parent  # type: ignore[assignment]
                self.tokens[h] = tuple(event.token_ids[i * per : (i + 1) * per])
                if parent is None:
                    extra = event.extra_keys[i] if event.extra_keys and i < len(event.extra_keys) else None
                    self.salts[h] = next((x for x in extra or () if isinstance(x, str)), None)
                self.children.setdefault(parent, {}).setdefault(self.tokens[h], set()).add(h)  # type: ignore[arg-type]
                self.lengths.setdefault(parent, set()).add(len(self.tokens[h]))  # type: ignore[arg-type]
                parent = h
        elif isinstance(event, BlockRemoved):
            held = self.held.setdefault(event.medium or "", set())
            for h in event.block_hashes:
                held.discard(h if isinstance(h, bytes) else int(h).to_bytes(8, "big", signed=True))
        elif isinstance(event, AllBlocksCleared):
            for held in self.held.values():
                held.clear()

    def snapshot(self) -> dict[str, set[bytes]]:
        """medium -> the hashes it holds (a copy; empty media left out)."""
        with self._lock:
            return {m: set(h) for m, h in self.held.items() if h}

    def match(
        self, tokens: Sequence[int], media: Iterable[str] | None = None, *, cache_salt: object = ANY
    ) -> dict[str, int]:
        """For a token sequence: per medium, how many leading tokens its chunks cover (a prefix walk).

        A chunk counts for a medium only while every chunk before it is held there too. With
        ``cache_salt`` (a string, or None for requests without one) only chains whose root names
        that salt count (tenants never share chunks); by default any tenant's.
        """
        toks = tuple(int(t) for t in tokens)
        with self._lock:
            names = list(media) if media is not None else list(self.held)
            return {m: self._walk(toks, [self.held.get(m, set())], cache_salt) for m in names}

    def match_any(self, tokens: Sequence[int], media: Iterable[str], *, cache_salt: object = ANY) -> int:
        """Leading tokens covered by chunks each held in at least one of ``media`` (a prefix split across tiers)."""
        toks = tuple(int(t) for t in tokens)
        with self._lock:
            return self._walk(toks, [self.held.get(m, set()) for m in media], cache_salt)

    def _walk(self, toks: tuple[int, ...], helds: list[set[bytes]], salt: object) -> int:
        """At each step the longest stored child whose token ids match and that one of ``helds`` holds."""
        pos, parents, size = 0, [None], 0
        while True:
            step: list[bytes] = []
            for parent in parents:
                kids = self.children.get(parent, {})
                for n in sorted(self.lengths.get(parent, ()), reverse=True):
                    if pos + n > len(toks):
                        continue
                    found = [
                        h
                        for h in kids.get(toks[pos : pos + n], ())
                        if any(h in held for held in helds)
                        and (parent is not None or salt is ANY or self.salts.get(h) == salt)
                    ]
                    if found:
                        step, size = found, n
                        break
                if step:
                    break
            if not step:
                return pos
            pos += size
            parents = step  # type: ignore[assignment]


class EventSubscriber:
    """Subscribes to one publisher and keeps an :class:`EventIndex`, asking the replay endpoint after a gap.

    Runs its own thread. ``stale`` is True while a gap could not be replayed
    (no replay endpoint, or the batches are gone from its buffer) and until
    the publisher has been heard from since (the caller decides what stale means).
    """

    def __init__(
        self, endpoint: str, *, topic: str = "", replay_endpoint: str | None = None, index: EventIndex | None = None
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.index = index if index is not None else EventIndex()
        self.stale = False
        self.bad_messages = 0
        self._ctx = zmq.Context.instance()
        self._running = True
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvtier-events-sub", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)

    def _loop(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(self.endpoint)
        self._ready.set()
        try:
            while self._running:
                if not sub.poll(50):
                    continue
                frames = sub.recv_multipart()
                self._take(frames)
        finally:
            sub.close(linger=0)

    def _take(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.bad_messages += 1
            return
        seq = int.from_bytes(frames[1], "big")
        if seq == 0 and self.index.next_seq > 0:  # a restarted publisher: what it held before is not known now
            self.index.reset()
            self.stale = False
        if seq > self.index.next_seq and self.replay_endpoint is not None:
            self._replay(self.index.next_seq)
        try:
            batch = decode_batch(frames[2])
        except msgspec.DecodeError:
            self.bad_messages += 1
            return
        had_gap = self.index.gap
        self.index.apply(seq, batch)
        if self.index.gap and not had_gap:
            self.stale = True

    def _replay(self, start: int) -> None:
        """Ask for batches from ``start`` and apply them (waits up to ``REPLAY_WAIT_S`` for each message)."""
        assert self.replay_endpoint is not None
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.connect(self.replay_endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            deadline = time.monotonic() + REPLAY_WAIT_S
            while time.monotonic() < deadline:
                if not sock.poll(100):
                    continue
                deadline = time.monotonic() + REPLAY_WAIT_S  # still answering: keep listening
                frames = sock.recv_multipart()[1:]  # drop the empty delimiter
                if len(frames) != 3:
                    self.bad_messages += 1
                    continue
                if frames[1] == END_SEQ:
                    return
                seq = int.from_bytes(frames[1], "big")
                try:
                    self.index.apply(seq, decode_batch(frames[2]))
                except msgspec.DecodeError:
                    self.bad_messages += 1
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2.0)
