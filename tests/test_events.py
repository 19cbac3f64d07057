"""KV events: a subscriber's index equals the tiers' contents after a randomized run (evictions, clears).

The publisher and the subscriber are real ZMQ sockets on loopback; the tiers are real (l1, node and l2 in
temporary folders, l3 on a real redis-server when one is installed). The wire format is checked against
vLLM's own msgspec structs when vLLM is installed.
"""

from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
import zmq

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.keys import ChunkKey, Namespace
from kvtier.storage.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventIndex,
    EventPublisher,
    EventSubscriber,
    decode_batch,
)
from tests.redis_servers import REDIS_SERVER, RedisServer

CHUNK = 8
TOKEN_BYTES = 2 * 2 * 2 * 4 * 4  # SMALL_LAYOUT: L=2, K/V, H=2, D=4, float32


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def _config(tmp_path: Path, redis_url: str | None):
    overrides = {
        "cache_dir": str(tmp_path / "cache"),
        "chunk_size": str(CHUNK),
        "l1.max_bytes": str(6 * CHUNK * TOKEN_BYTES),
        "node.enabled": "true",
        "node.path": str(tmp_path / "node"),
        "node.max_bytes": str(12 * (CHUNK * TOKEN_BYTES + 400)),
        "l2.path": str(tmp_path / "disk"),
        "l2.max_bytes": str(20 * (CHUNK * TOKEN_BYTES + 400)),
        "events.enabled": "true",
        "events.endpoint": "tcp://127.0.0.1:0",
        "events.replay_endpoint": "tcp://127.0.0.1:0",
        "events.topic": "kvtier-test",
    }
    if redis_url is not None:
        overrides |= {"l3.enabled": "true", "l3.url": redis_url}
    return load_config(env={}, overrides=overrides)


def _held(engine: CacheEngine, server: RedisServer | None) -> dict[str, set[bytes]]:
    out: dict[str, set[bytes]] = {}
    for tier in engine.tiers.tiers:
        if tier.name == "l3":
            assert server is not None
            with server.client() as client:
                out["l3"] = {bytes.fromhex(k.decode().rsplit(":", 1)[1]) for k in client.scan_iter(match="kvtier:*")}
        else:
            out[tier.name] = {k.digest for k in tier.keys_lru_order()}
    return {m: h for m, h in out.items() if h}


@pytest.fixture(params=["local", "redis"])
def redis_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "local":
        yield None
        return
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_subscriber_rebuilds_every_tier_after_a_randomized_run(
    tmp_path: Path, namespace: Namespace, redis_server: RedisServer | None
) -> None:
    config = _config(tmp_path, redis_server.url if redis_server else None)
    engine = CacheEngine.from_config(config, namespace).start()
    publisher = engine.tiers.events
    assert isinstance(publisher, EventPublisher)
    subscriber = EventSubscriber(publisher.endpoint, topic="kvtier-test", replay_endpoint=publisher.replay_endpoint)
    rng = random.Random(1234)
    tenants = [namespace, namespace.with_tenant("other")]
    bases = [[rng.randrange(1000) for _ in range(5 * CHUNK)] for _ in range(4)]
    try:
        cleared_once = False
        for step in range(120):
            ns = rng.choice(tenants)
            eng = engine if ns is namespace else CacheEngine(ns, engine.tiers, chunk_size=CHUNK)
            base = rng.choice(bases)
            tokens = base[: rng.randrange(1, len(base))] + [rng.randrange(1000) for _ in range(rng.randrange(0, 12))]
            op = rng.random()
            if op < 0.6:
                kv = torch.randn(namespace.layout.chunk_shape(len(tokens)))
                eng.store(np.array(tokens), kv)
            elif op < 0.85:
                eng.retrieve(np.array(tokens))  # promotions into the upper tiers
            elif op < 0.95:
                engine.flush()
                tier = rng.choice(engine.tiers.names[:3])  # a one-tier clear (l1, node or l2)
                engine.tiers.clear([tier])
            elif not cleared_once or step == 100:
                engine.tiers.clear()  # AllBlocksCleared
                cleared_once = True
        engine.flush()
        assert publisher.flush(10.0)
        stats = {s.name: s.evictions for s in engine.tiers.stats()}
        assert stats["l1"] > 0 and stats["node"] > 0 and stats["l2"] > 0, stats  # the run did evict
        assert publisher.dropped == 0
        _wait(lambda: subscriber.index.next_seq == publisher.published)
        assert not subscriber.index.gap or not subscriber.stale
        assert subscriber.index.snapshot() == _held(engine, redis_server)
        # a fresh subscriber, late: the replay endpoint gives it every batch still buffered
        late = EventSubscriber(publisher.endpoint, topic="kvtier-test", replay_endpoint=publisher.replay_endpoint)
        try:
            extra = [rng.randrange(1000) for _ in range(CHUNK * 2)]
            engine.store(np.array(extra), torch.randn(namespace.layout.chunk_shape(len(extra))))
            engine.flush()
            assert publisher.flush(10.0)
            _wait(lambda: late.index.next_seq == publisher.published)
            assert late.index.snapshot() == _held(engine, redis_server) == subscriber.index.snapshot()
            assert not late.stale
        finally:
            late.close()
    finally:
        subscriber.close()
        engine.close()


def test_events_carry_tokens_parent_and_medium(tmp_path: Path, namespace: Namespace) -> None:
    """The raw frames: (topic, 8-byte big-endian seq, msgpack EventBatch), BlockStored with tokens and parent."""
    publisher = EventPublisher("tcp://127.0.0.1:0", topic="t")
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"t")
    sub.connect(publisher.endpoint)
    time.sleep(0.3)  # PUB/SUB: let the subscription reach the publisher
    config = _config(tmp_path, None).model_copy(update={"events": load_config(env={}).events})
    engine = CacheEngine.from_config(config, namespace)
    engine.tiers.events = publisher
    engine.start()
    try:
        tokens = list(range(100, 100 + CHUNK + 3))
        engine.store(np.array(tokens), torch.randn(namespace.layout.chunk_shape(len(tokens))))
        engine.flush()
        assert publisher.flush()
        events, payloads = [], []
        for n in range(publisher.published):
            assert sub.poll(5000)
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"t" and seq == n.to_bytes(8, "big")
            events += decode_batch(payload).events
            payloads.append(payload)
        stored = [e for e in events if isinstance(e, BlockStored) and e.medium == "l1"]
        assert [len(e.token_ids) for e in stored] == [CHUNK, 3]
        assert stored[0].token_ids == tokens[:CHUNK] and stored[1].token_ids == tokens[CHUNK:]
        assert stored[0].parent_block_hash is None and stored[1].parent_block_hash == stored[0].block_hashes[0]
        assert ChunkKey(stored[1].block_hashes[0]) in engine.tiers.tiers[0].keys_lru_order()
        assert {e.medium for e in events} == {"l1", "node", "l2"}
        raw = msgspec.msgpack.decode(payloads[0])
        assert isinstance(raw, list) and raw[1][0]["type"] == "BlockStored"  # array-like batch, tagged events
    finally:
        engine.close()
        publisher.close()
        sub.close(linger=0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_decodes_kvtier_batches() -> None:
    """vLLM's own structs decode what kvtier publishes, and kvtier decodes what vLLM's encoder writes."""
    from vllm.distributed import kv_events as vk

    from kvtier.storage.events import EventBatch

    ours = EventBatch(
        ts=1.5,
        events=[
            BlockStored([b"k" * 32], None, [1, 2, 3], 3, None, "l2", None),
            BlockRemoved([b"k" * 32], "l2"),
            AllBlocksCleared(),
        ],
    )
    theirs = msgspec.msgpack.Decoder(type=vk.KVEventBatch).decode(msgspec.msgpack.encode(ours))
    assert isinstance(theirs.events[0], vk.BlockStored) and theirs.events[0].medium == "l2"
    assert theirs.events[0].token_ids == [1, 2, 3] and theirs.events[0].block_hashes == [b"k" * 32]
    assert isinstance(theirs.events[1], vk.BlockRemoved) and isinstance(theirs.events[2], vk.AllBlocksCleared)
    back = decode_batch(msgspec.msgpack.encode(theirs))
    assert back.events[0] == ours.events[0]


def test_a_full_queue_drops_and_counts_without_blocking() -> None:
    publisher = EventPublisher("tcp://127.0.0.1:0", max_queue=1)
    try:
        key = ChunkKey(b"x" * 32)
        start = time.perf_counter()
        for _ in range(2000):
            publisher.removed("l1", [key])
        assert time.perf_counter() - start < 1.0
        assert publisher.dropped > 0
    finally:
        publisher.close()


def test_index_match_walks_the_prefix() -> None:
    index = EventIndex()
    from kvtier.storage.events import KVEventBatch

    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    index.apply(
        0,
        KVEventBatch(
            ts=0.0,
            events=[
                BlockStored([a], None, [1, 2], 2, None, "l1", None),
                BlockStored([b], a, [3, 4], 2, None, "l1", None),
                BlockStored([c], a, [3], 1, None, "l2", None),
            ],
        ),
    )
    assert index.match([1, 2, 3, 4, 5]) == {"l1": 4, "l2": 0}  # l2 lacks the root
    index.apply(1, KVEventBatch(ts=0.0, events=[BlockRemoved([b], "l1")]))
    assert index.match([1, 2, 3, 4, 5])["l1"] == 2
    index.apply(3, KVEventBatch(ts=0.0, events=[AllBlocksCleared()]))
    assert index.gap and index.snapshot() == {}


def test_root_chunks_name_their_cache_salt_and_the_index_keeps_tenants_apart(
    tmp_path: Path, namespace: Namespace
) -> None:
    from kvtier.keys import tenant_salt

    config = _config(tmp_path, None)
    engine = CacheEngine.from_config(config, namespace).start()
    publisher = engine.tiers.events
    assert isinstance(publisher, EventPublisher)
    sub = EventSubscriber(publisher.endpoint, topic="kvtier-test", replay_endpoint=publisher.replay_endpoint)
    try:
        tokens = list(range(500, 500 + 3 * CHUNK))
        alice = CacheEngine(namespace.with_tenant(tenant_salt(None, "alice")), engine.tiers, chunk_size=CHUNK)
        alice.store(np.array(tokens), torch.randn(namespace.layout.chunk_shape(len(tokens))))
        engine.store(np.array(tokens[:CHUNK]), torch.randn(namespace.layout.chunk_shape(CHUNK)))  # no salt
        engine.flush()
        assert publisher.flush()
        _wait(lambda: sub.index.next_seq == publisher.published)
        index = sub.index
        assert index.match(tokens, ["l1"], cache_salt="alice") == {"l1": 3 * CHUNK}
        assert index.match(tokens, ["l1"], cache_salt="bob") == {"l1": 0}
        assert index.match(tokens, ["l1"], cache_salt=None) == {"l1": CHUNK}  # the unsalted tenant's one chunk
        assert index.match(tokens, ["l1"]) == {"l1": 3 * CHUNK}  # any tenant
        assert set(index.salts.values()) == {None, "alice"}
    finally:
        sub.close()
        engine.close()


def test_a_restarted_publisher_starts_the_index_afresh() -> None:
    first = EventPublisher("tcp://127.0.0.1:0")
    endpoint = first.endpoint
    sub = EventSubscriber(endpoint)
    try:
        time.sleep(0.3)
        a, b = ChunkKey(b"a" * 32), ChunkKey(b"b" * 32)
        for _ in range(3):
            first.removed("l1", [a])
        assert first.flush()
        _wait(lambda: sub.index.next_seq >= 1)
        sub.index.held.setdefault("l1", set()).add(b.digest)  # something the old publisher had reported held
        first.close()
        second = EventPublisher(endpoint)
        try:
            time.sleep(0.3)
            second.removed("l2", [a])
            assert second.flush()
            _wait(lambda: sub.index.next_seq == 1 and "l2" in sub.index.held)
            assert sub.index.snapshot() == {}  # the old publisher's view is gone, the new one's applied
            assert not sub.stale
        finally:
            second.close()
    finally:
        sub.close()
