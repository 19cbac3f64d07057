"""Prometheus metrics: exact counts after a known workload, and the /metrics endpoint."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.keys import Namespace
from kvtier.metrics import KvtierMetrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _engine(tmp_path: Path, namespace: Namespace, metrics: KvtierMetrics | None = None) -> CacheEngine:
    config = load_config(env={}, overrides={"cache_dir": str(tmp_path), "chunk_size": 16, "store_partial": False})
    return CacheEngine.from_config(config, namespace, metrics=metrics).start()


def test_counts_after_store_and_retrieve(tmp_path: Path, namespace: Namespace) -> None:
    engine = _engine(tmp_path, namespace)
    tokens = np.arange(64)
    kv = torch.randn(namespace.layout.chunk_shape(64))
    engine.store(tokens, kv)  # 4 chunks
    engine.flush()
    assert engine.retrieve(tokens).num_tokens == 64
    assert engine.retrieve(np.arange(100, 132)).num_tokens == 0  # 2 chunks nowhere
    s = _samples(engine.metrics.render().decode())
    chunk_bytes = kv[:, :, :, :16].nbytes
    assert s[("kvtier_tier_hits_total", (("tier", "l1"),))] == 4
    assert s[("kvtier_tier_misses_total", (("tier", "l1"),))] == 2
    assert s[("kvtier_tier_misses_total", (("tier", "l2"),))] == 2
    assert s[("kvtier_tier_written_bytes_total", (("tier", "l1"),))] == 4 * chunk_bytes
    assert s[("kvtier_tier_written_bytes_total", (("tier", "l2"),))] == 4 * chunk_bytes
    assert s[("kvtier_tier_read_bytes_total", (("tier", "l1"),))] == 4 * chunk_bytes
    assert s[("kvtier_query_tokens_total", ())] == 96
    assert s[("kvtier_hit_tokens_total", (("tier", "l1"),))] == 64
    assert s[("kvtier_tier_entries", (("tier", "l2"),))] == 4
    assert s[("kvtier_tier_op_seconds_count", (("op", "get"), ("tier", "l1")))] == 1
    # engine calls as their callers see them: one store, two retrieves (each also plans, but is one call)
    assert s[("kvtier_engine_op_seconds_count", (("op", "store"),))] == 1
    assert s[("kvtier_engine_op_seconds_count", (("op", "retrieve"),))] == 2
    assert ("kvtier_engine_op_seconds_count", (("op", "lookup"),)) not in s
    assert s[("kvtier_write_queue_bytes", ())] == 0  # flushed
    engine.close()


def test_write_queue_gauges_follow_the_queue(tmp_path: Path, namespace: Namespace) -> None:
    import threading

    engine = _engine(tmp_path, namespace)
    disk = engine.tiers.tiers[1]
    gate = threading.Event()
    real_put = disk.put

    def slow_put(chunks):  # the disk is busy: write-behind waits
        assert gate.wait(10)
        return real_put(chunks)

    disk.put = slow_put  # type: ignore[method-assign]
    tokens = np.arange(48)
    kv = torch.randn(namespace.layout.chunk_shape(48))
    engine.store(tokens, kv)
    s = _samples(engine.metrics.render().decode())
    assert s[("kvtier_write_queue_chunks", ())] == 3
    assert s[("kvtier_write_queue_bytes", ())] == sum(kv[:, :, :, i : i + 16].nbytes + 16 * 4 for i in (0, 16, 32))
    gate.set()
    assert engine.flush(timeout=10)
    s = _samples(engine.metrics.render().decode())
    assert (s[("kvtier_write_queue_chunks", ())], s[("kvtier_write_queue_bytes", ())]) == (0, 0)
    engine.close()


def test_invalid_chunks_are_counted(tmp_path: Path, namespace: Namespace) -> None:
    engine = _engine(tmp_path, namespace)
    tokens = np.arange(32)
    engine.store(tokens, torch.randn(namespace.layout.chunk_shape(32)))
    engine.close()
    files = sorted((tmp_path / "chunks").rglob("*.kvc"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(f.read_bytes()[:-3])  # truncate
    config = load_config(
        env={}, overrides={"cache_dir": str(tmp_path), "chunk_size": 16, "l1.enabled": False, "store_partial": False}
    )
    with CacheEngine.from_config(config, namespace) as fresh:
        assert fresh.retrieve(tokens).num_tokens == 0
        s = _samples(fresh.metrics.render().decode())
    assert not any(name == "kvtier_invalid_chunks_total" for name, _ in s)  # damage is the tier's count
    assert s[("kvtier_tier_corrupt_total", (("tier", "l2"),))] == 2  # both read in one batch, both dropped


def test_engines_can_share_a_registry_and_serve_it(tmp_path: Path, namespace: Namespace) -> None:
    metrics = KvtierMetrics()
    a = _engine(tmp_path / "a", namespace, metrics)
    b = _engine(tmp_path / "b", namespace.with_tenant("t"), metrics)
    a.store(np.arange(16), torch.randn(namespace.layout.chunk_shape(16)))
    b.store(np.arange(16), torch.randn(namespace.layout.chunk_shape(16)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = metrics.serve(port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    samples = _samples(body)
    assert samples[("kvtier_tier_written_bytes_total", (("tier", "l1"),))] == 2 * 16 * namespace.layout.bytes_per_token
    a.close()
    b.close()
