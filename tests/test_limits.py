"""Limits before work (issue 15): a chunk's header is checked against the engine's layout and chunk size, and
its claimed sizes against the codec's bounds, before anything is allocated or decompressed.

The bomb: a 16.9 KB zstd chunk whose header claims a 512 MiB payload (a layout 2 MiB per token, 256 tokens),
planted under a real chunk key in a real Redis and in a disk folder.
"""

from __future__ import annotations

import shutil
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier.chunk import _FIELDS, FLAG_PARENT, HEADER_BYTES, MAGIC, VERSION, _checksum, decode_header
from kvtier.codec import get_codec
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ChunkFormatError
from kvtier.keys import ChunkKey, Namespace, chunk_spans
from kvtier.layout import KVLayout
from kvtier.storage.files import chunk_path

C = 256
BOMB_LAYOUT = KVLayout(num_layers=64, num_kv_heads=32, head_dim=128)  # float32: 2 MiB per token
_DTYPE_ID = {"float32": 1, "float16": 2, "bfloat16": 3}


def _bomb(key: ChunkKey, parent: ChunkKey | None, namespace: bytes, layout: KVLayout, n: int) -> bytes:
    """A self-consistent chunk (valid checksum, a real zstd frame) whose body inflates to n tokens of ``layout``."""
    zstd = pytest.importorskip("zstandard")
    codec = get_codec("raw+zstd")
    shape, dtype = layout.chunk_shape(n), layout.torch_dtype
    size = codec.stage_size(shape, dtype)
    obj = zstd.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compressobj(size=size)
    zeros = bytes(1 << 20)
    body = b"".join(obj.compress(zeros[: min(len(zeros), size - done)]) for done in range(0, size, len(zeros)))
    body += obj.flush()
    tokens = np.arange(n, dtype="<u4").tobytes()
    fields = _FIELDS.pack(
        MAGIC, VERSION, FLAG_PARENT if parent is not None else 0, n, _DTYPE_ID[layout.dtype],
        codec.base_id, codec.lossless_id, codec.shuffle_size(dtype),
        layout.num_layers, layout.num_kv_heads, layout.head_dim, 0, size, len(body),
        key.digest, parent.digest if parent is not None else bytes(32), namespace, bytes(32),
    )  # fmt: skip
    return fields + _checksum(fields, tokens, body) + tokens + body


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak resident set) to the current RSS


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _measure(fn) -> tuple[object, float, int, int]:
    """(result, seconds, tracemalloc peak bytes, peak RSS growth bytes) of ``fn()``.

    The time is taken under tracemalloc on a shared test machine: the tests bound it loosely (inflating the
    bomb takes seconds); bench/faults.py measures the rejection time itself (the < 10 ms target).
    """
    _peak_rss_reset()
    rss0 = _peak_rss()
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, elapsed, peak, _peak_rss() - rss0


def test_the_bomb_is_a_self_consistent_chunk_the_format_alone_would_inflate() -> None:
    ns = Namespace("m", BOMB_LAYOUT)
    span = chunk_spans(ns, np.arange(C), C)[0]
    bomb = _bomb(span.key, None, ns.digest, BOMB_LAYOUT, C)
    assert 16_000 < len(bomb) < 18_000  # 16.9 KB on the wire
    header = decode_header(bomb)  # the format's own bounds let it through: only the engine knows better
    assert header.layout.chunk_shape(C) and BOMB_LAYOUT.bytes_per_token * C == 512 * 2**20


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator:
    engines: list[CacheEngine] = []

    def make(**overrides: object) -> CacheEngine:
        values = {"chunk_size": C, "l1.enabled": False, "l2.path": str(tmp_path / "chunks"), **overrides}
        engine = CacheEngine.from_config(load_config(env={}, overrides=values), Namespace("m", KVLayout(2, 2, 4)))
        engines.append(engine.start())
        return engine

    yield make
    for engine in engines:
        engine.close()


def _plant_disk(engine: CacheEngine, data: bytes, key: ChunkKey) -> None:
    path = chunk_path(engine.tiers.tiers[-1].root, key, None)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(data)


@pytest.mark.parametrize("claim", ["layout", "tokens"])
def test_bomb_on_disk_is_rejected_fast_with_no_allocation_beyond_its_size(engine_factory, tmp_path, claim) -> None:
    writer = engine_factory()
    tokens = np.arange(2 * C, dtype=np.uint32)
    span = chunk_spans(writer.namespace, tokens, C)[0]
    if claim == "layout":  # 512 MiB: another layout than the engine's
        bomb = _bomb(span.key, None, writer.namespace.digest, BOMB_LAYOUT, C)
    else:  # the engine's layout, but 8x the chunk size (and the 2,048 token ids the header must then hold)
        bomb = _bomb(span.key, None, writer.namespace.digest, writer.layout, 8 * C)
    writer.close()
    _plant_disk(writer, bomb, span.key)
    engine = engine_factory()  # a restart indexes the planted file
    assert engine.lookup(tokens).num_tokens == C
    result, elapsed, traced, rss = _measure(lambda: engine.retrieve(tokens))
    assert result.num_tokens == 0
    assert engine.tiers.tiers[-1].stats().corrupt == 1
    assert elapsed < 0.2, f"{elapsed * 1e3:.1f} ms"
    assert traced < len(bomb) + 256 * 1024, traced  # what was read (the file's first 64 KiB) plus small objects
    assert rss < 8 * 2**20, rss


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_bomb_in_redis_is_rejected_fast_with_no_allocation_beyond_its_size(engine_factory, tmp_path) -> None:
    pytest.importorskip("redis")
    from redis_servers import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        engine = engine_factory(**{"l2.enabled": False, "l3.enabled": True, "l3.url": server.url})
        tokens = np.arange(C, dtype=np.uint32)
        span = chunk_spans(engine.namespace, tokens, C)[0]
        bomb = _bomb(span.key, None, engine.namespace.digest, BOMB_LAYOUT, C)
        l3 = engine.tiers.tiers[-1]
        with server.client() as client:
            client.set(l3.redis_key(span.key), bomb)
        assert engine.lookup(tokens).num_tokens == C
        engine.retrieve(np.arange(C, 2 * C, dtype=np.uint32))  # warm the connection: not part of the measurement
        result, elapsed, traced, rss = _measure(lambda: engine.retrieve(tokens))
        assert result.num_tokens == 0 and l3.stats().corrupt == 1
        assert elapsed < 0.2, f"{elapsed * 1e3:.1f} ms"
        assert traced < 2 * len(bomb) + 256 * 1024, traced  # the value as received, and its header's copy
        assert rss < 8 * 2**20, rss


def test_header_limits_name_the_reason() -> None:
    from kvtier.security import ChunkPolicy

    ns = Namespace("m", KVLayout(2, 2, 4))
    policy = ChunkPolicy()
    policy.register(ns.digest, None, ns.layout, C)
    span = chunk_spans(ns, np.arange(C), C)[0]
    with pytest.raises(ChunkFormatError, match="not this namespace's"):
        decode_header(_bomb(span.key, None, ns.digest, BOMB_LAYOUT, C), policy=policy)
    with pytest.raises(ChunkFormatError, match="at most 256"):
        decode_header(_bomb(span.key, None, ns.digest, ns.layout, C + 1), policy=policy)
    assert decode_header(_bomb(span.key, None, ns.digest, ns.layout, C), policy=policy).payload_len > 0
    assert HEADER_BYTES == 192
