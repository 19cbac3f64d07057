"""Deadlines (issue 15): a Redis that answers slowly (+0.2 s per reply, within its socket timeout) cannot
stretch one ``retrieve`` or ``lookup`` past its deadline; the prefix read so far comes back, the timeout is
counted, and the breaker opens on the slowness."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server not installed", allow_module_level=True)

from redis_servers import BlackHoleProxy, RedisServer, redis_only

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.keys import Namespace
from kvtier.layout import KVLayout

pytestmark = pytest.mark.redis

C = 16
LAYOUT = KVLayout(2, 2, 8)  # 256 bytes per token: one chunk is one small reply
SLACK = 0.05  # the target: within the deadline + 50 ms


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as srv:
        yield srv


def _engine(url: str, **overrides: object) -> CacheEngine:
    # each slow reply (0.2 s) is well within the socket timeout
    values = redis_only(url, C, **({"l3.timeout_s": 1.0, "l3.retry_interval_s": 5.0} | overrides))
    return CacheEngine.from_config(load_config(env={}, overrides=values), Namespace("m", LAYOUT)).start()


def test_slow_redis_retrieve_returns_within_its_deadline_with_the_prefix_it_got(server: RedisServer) -> None:
    n = 40 * C  # 40 chunks: 10 GET pipelines of 4, each a slow reply
    tokens = np.arange(n, dtype=np.uint32)
    kv = torch.randn(LAYOUT.chunk_shape(n))
    with _engine(server.url) as writer:
        assert writer.store(tokens, kv).stored_chunks == 40
        writer.flush()
    with BlackHoleProxy(server.port, reply_delay_s=0.2) as proxy:
        # timeout_s 2 s: the start-up's few slow replies (connect, PING) stay within it and keep the breaker closed
        deadlines = {"l3.retrieve_deadline_s": 1.0, "l3.lookup_deadline_s": 5.0, "l3.timeout_s": 2.0}
        engine = _engine(proxy.url, **deadlines)
        try:
            assert engine.lookup(tokens).num_tokens == n  # one EXISTS pipeline: one slow reply, within 5 s
            t0 = time.monotonic()
            got = engine.retrieve(tokens)
            elapsed = time.monotonic() - t0
            assert elapsed < 1.0 + SLACK, f"retrieve took {elapsed:.3f}s"
            assert 0 < got.num_tokens < n and got.num_tokens % C == 0  # the prefix it got, nothing after
            assert torch.equal(torch.stack(got.layers), kv[:, :, :, : got.num_tokens])
            assert engine.stats().deadline_exceeded == {"retrieve": 1}
            assert b'kvtier_deadline_exceeded_total{op="retrieve"} 1.0' in engine.metrics.render()
            l3 = engine.tiers.tiers[-1]
            assert l3.counters()["deadline"] >= 1
            # the slowness opened the breaker: the next call is an immediate miss, no network
            t0 = time.monotonic()
            assert engine.retrieve(tokens).num_tokens == 0
            assert time.monotonic() - t0 < 0.05
        finally:
            engine.close()


def test_slow_redis_lookup_is_cut_at_its_deadline(server: RedisServer) -> None:
    tokens = np.arange(8 * C, dtype=np.uint32)
    with _engine(server.url) as writer:
        writer.store(tokens, torch.randn(LAYOUT.chunk_shape(8 * C)))
        writer.flush()
    with BlackHoleProxy(server.port, reply_delay_s=0.3) as proxy:
        engine = _engine(proxy.url, **{"l3.lookup_deadline_s": 0.1, "l3.retry_interval_s": 0})  # (start-up was slow)
        try:
            t0 = time.monotonic()
            assert engine.lookup(tokens).num_tokens == 0  # its one EXISTS reply comes after the deadline
            assert time.monotonic() - t0 < 0.1 + SLACK
            assert engine.stats().deadline_exceeded == {"lookup": 1}
        finally:
            engine.close()


def test_a_fast_redis_is_not_cut(server: RedisServer) -> None:
    tokens = np.arange(8 * C, dtype=np.uint32)
    kv = torch.randn(LAYOUT.chunk_shape(8 * C))
    with _engine(server.url) as engine:
        engine.store(tokens, kv)
        engine.flush()
        got = engine.retrieve(tokens)
        assert got.num_tokens == 8 * C and torch.equal(torch.stack(got.layers), kv)
        assert engine.stats().deadline_exceeded == {} and engine.tiers.tiers[-1].counters()["deadline"] == 0
