"""The L3 tier on real Redis: redis-server processes (standalone and a 3-node cluster) that the tests start.

Skipped when redis-server is not installed (``bash scripts/setup.sh --test``
installs it). Each standalone test gets an empty database on a shared
module server; tests that stop, black-hole or squeeze a server get their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")
if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
    pytest.skip(
        "redis-server/redis-cli not installed (apt-get install redis-server, or bash scripts/setup.sh --test)",
        allow_module_level=True,
    )

from conftest import v1_blob
from redis_servers import BlackHoleProxy, RedisClusterServers, RedisServer, redis_only

from kvtier.chunk import Chunk, encode
from kvtier.codec import Codec
from kvtier.config import KvtierConfig, L3Config, load_config
from kvtier.engine import CacheEngine
from kvtier.errors import StorageError
from kvtier.keys import ChunkKey, Namespace, chunk_spans
from kvtier.layout import KVLayout
from kvtier.storage import StorageBackend
from kvtier.storage.redis import RedisBackend

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[1]
C = 4  # chunk size of the small-layout tests
TIMEOUT = 0.3  # l3.timeout_s of the fault tests
RETRY = 1.0  # l3.retry_interval_s of the fault tests
SLACK = 0.25
MakeChain = Callable[..., list[Chunk]]


# -- fixtures and helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
def url(server: RedisServer) -> str:
    """The module server's URL, its database emptied."""
    with server.client() as client:
        client.flushall()
    return server.url


@pytest.fixture
def make_backend() -> Iterator[Callable[..., RedisBackend]]:
    made: list[RedisBackend] = []

    def make(
        url: str, *, tenant: str | None = None, codec: Codec | None = None, read_only: bool = False, **config: Any
    ) -> RedisBackend:
        backend = RedisBackend(_l3(url, **config), tenant=tenant, codec=codec, read_only=read_only)
        backend.start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def make_engine(namespace: Namespace) -> Iterator[Callable[..., CacheEngine]]:
    """``make_engine(url, ns=None, **overrides)``: a started engine whose only tier is Redis."""
    engines: list[CacheEngine] = []

    def make(url: str, ns: Namespace | None = None, **overrides: object) -> CacheEngine:
        engine = CacheEngine.from_config(_config(url, **overrides), ns or namespace).start()
        assert engine.tiers.sync_tiers == 0  # a Redis-only engine writes in the background
        engines.append(engine)
        store = engine.store

        def store_and_flush(tokens, kv):  # these tests check what reached Redis right after a store
            result = store(tokens, kv)
            engine.flush()
            return result

        engine.store = store_and_flush  # type: ignore[method-assign]
        return engine

    yield make
    for engine in engines:
        engine.close()


def _l3(url: str, **values: Any) -> L3Config:
    return L3Config(**{"enabled": True, "url": url, "key_prefix": "kvt", **values})


def _config(url: str, **overrides: object) -> KvtierConfig:
    values = redis_only(
        url,
        C,
        **{
            "l3.key_prefix": "kvt",
            "l3.timeout_s": TIMEOUT,
            "l3.connect_timeout_s": TIMEOUT,
            "l3.retry_interval_s": RETRY,
        },
    )
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(env={}, overrides=values)


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    """Ids in [100, 1000): encoded headers of the same kind then have the same length."""
    return np.random.default_rng(seed).integers(100, 1000, size=n).astype("<u4")


def _kv(layout: KVLayout, n: int, seed: int = 0) -> torch.Tensor:
    # kv: [L, 2, H, N, D]
    return torch.randn(layout.chunk_shape(n), generator=torch.Generator().manual_seed(seed))


def _stacked(layers: list[torch.Tensor]) -> torch.Tensor:
    # layers[l]: [2, H, N, D] -> [L, 2, H, N, D]
    return torch.stack(layers)


def _assert_same(got: Chunk | None, want: Chunk) -> None:
    assert got is not None
    assert (got.key, got.parent, got.namespace, got.layout) == (want.key, want.parent, want.namespace, want.layout)
    assert got.tokens.tolist() == want.tokens.tolist()
    assert torch.equal(got.payload, want.payload)


def _redis(engine: CacheEngine) -> RedisBackend:
    backend = engine.tiers.tiers[0]
    assert isinstance(backend, RedisBackend)
    return backend


def _scan(server: RedisServer, pattern: str = "*") -> set[bytes]:
    with server.client() as client:
        return set(client.scan_iter(match=pattern, count=1000))


def _elapsed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# -- the storage contract ----------------------------------------------------------------------------------------


class TestBackendContract:
    def test_is_a_storage_backend_and_the_constructor_does_no_io(self) -> None:
        backend = RedisBackend(_l3("redis://127.0.0.1:1/0"), tenant="acme")  # nothing listens on :1
        assert isinstance(backend, StorageBackend)
        assert backend.name == "l3"
        key = ChunkKey(bytes(range(32)))
        assert backend.redis_key(key) == b"kvt:acme:" + bytes(range(32)).hex().encode()
        assert RedisBackend(L3Config(key_prefix="p"), tenant=None).redis_key(key) == b"p:_:" + key.hex().encode()
        # not started: misses, no I/O, no errors
        assert backend.contains([key]) == [False]
        assert backend.counters() == {
            "errors": 0,
            "skipped": 0,
            "corrupt": 0,
            "stale": 0,
            "rejected": 0,
            "forged": 0,
            "deadline": 0,
        }

    def test_the_config_is_the_one_validation(self) -> None:
        from pydantic import ValidationError

        from kvtier.codec import get_codec

        cfg = L3Config(
            enabled=True, url="redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2", key_prefix="kv", ttl_s=60,
            timeout_s=0.2, connect_timeout_s=0.1, max_connections=3, retry_interval_s=5, codec="int8",
        )  # fmt: skip
        backend = RedisBackend(cfg, tenant="t1", codec=get_codec(cfg.codec), read_only=True)  # the engine's call
        assert (backend.config, backend.tenant, backend.read_only, backend.codec.name) == (cfg, "t1", True, "int8")
        assert backend.cluster and backend.target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379))
        assert "pw" not in repr(backend) and "kv:t1:" in repr(backend)
        assert RedisBackend(cfg, tenant=None).codec.name == "int8"  # no codec given: the config's
        assert RedisBackend(cfg, tenant=None, codec=get_codec("raw")).codec.name == "raw"
        bad_values = {"ttl_s": 0, "timeout_s": 0, "max_connections": 0, "retry_interval_s": -1, "key_prefix": ""}
        for field, bad in bad_values.items():  # checked once, by the config
            with pytest.raises(ValidationError):
                L3Config(**{field: bad})
        for url in ("http://h:1", "h:6379", "redis://h:notaport", "redis+cluster://h:notaport", "redis+cluster://"):
            with pytest.raises(ValueError):  # the URL is the one thing the config does not parse
                RedisBackend(_l3(url), tenant=None)

    def test_put_get_contains_delete_clear_stats(self, url: str, server: RedisServer, make_backend, make_chain) -> None:
        chain = make_chain(_tokens(12, 1))
        other = make_chain(_tokens(4, 2))[0]
        backend = make_backend(url)
        assert backend.put(chain) == [True, True, True]
        s = backend.stats()
        assert (s.name, s.entries, s.used_bytes, s.max_bytes, s.evictions, s.rejected_puts, s.corrupt) == (
            "l3", 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        with server.client() as client:
            for c in chain:  # the value is exactly the encoded chunk, with no expiry
                assert client.get(b"kvt:_:" + c.key.hex().encode()) == encode(c)
                assert client.ttl(b"kvt:_:" + c.key.hex().encode()) == -1

        assert backend.contains([chain[0].key, other.key, chain[2].key]) == [True, False, True]
        got = backend.get([chain[0].key, other.key, chain[2].key])
        assert got[1] is None
        _assert_same(got[0], chain[0])
        _assert_same(got[2], chain[2])

        assert backend.delete([chain[2].key, other.key]) == 1
        assert backend.delete([chain[2].key]) == 0
        assert backend.contains([c.key for c in chain]) == [True, True, False]
        assert backend.get([chain[2].key]) == [None]

        assert backend.clear() == 2
        assert backend.contains([c.key for c in chain]) == [False, False, False]
        assert backend.clear() == 0
        assert backend.put([other]) == [True]
        _assert_same(backend.get([other.key])[0], other)
        assert backend.counters() == {
            "errors": 0,
            "skipped": 0,
            "corrupt": 0,
            "stale": 0,
            "rejected": 0,
            "forged": 0,
            "deadline": 0,
        }

    @pytest.mark.parametrize("codec", ["raw", "raw+zstd"])
    def test_get_shares_the_received_bytes_only_with_the_raw_codec(
        self, codec: str, url: str, make_backend, make_chain, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from kvtier.codec import get_codec

        chunk = make_chain(_tokens(4, 21))[0]
        backend = make_backend(url, codec=get_codec(codec))
        assert backend.put([chunk]) == [True]
        received: list[bytes] = []
        pipeline = backend._pipeline

        def spy(*args: object, **kwargs: object) -> list[object]:
            replies = pipeline(*args, **kwargs)
            received.extend(replies)
            return replies

        monkeypatch.setattr(backend, "_pipeline", spy)
        got = backend.get([chunk.key])[0]
        assert got is not None and len(received) == 1 and isinstance(received[0], bytes)
        start = np.frombuffer(received[0], dtype=np.uint8).ctypes.data
        end, ptr = start + len(received[0]), got.payload.data_ptr()
        if codec == "raw":  # a view of the value's tail, the payload bytes: no copy
            assert start < ptr and ptr + got.payload.nbytes == end
        else:  # decoded into new memory
            assert not start <= ptr < end
        received.clear()  # the chunk alone keeps the received bytes alive
        _assert_same(got, chunk)

    def test_read_only_never_writes_or_deletes(self, url: str, server: RedisServer, make_backend, make_chain) -> None:
        chain = make_chain(_tokens(8, 22))
        keys = [c.key for c in chain]
        assert make_backend(url).put(chain) == [True, True]
        reader = make_backend(url, read_only=True)
        with pytest.raises(ValueError, match="read-only"):
            reader.put(chain)
        assert reader.contains(keys) == [True, True]
        _assert_same(reader.get(keys)[1], chain[1])
        assert (reader.delete(keys), reader.clear()) == (0, 0)
        with server.client() as client:
            client.set(reader.redis_key(keys[0]), b"garbage")
        assert reader.get(keys)[0] is None  # a corrupt value is a counted miss, but stays
        assert reader.counters() == {
            "errors": 0,
            "skipped": 0,
            "corrupt": 1,
            "stale": 0,
            "rejected": 0,
            "forged": 0,
            "deadline": 0,
        }
        assert _scan(server) == {reader.redis_key(k) for k in keys}

    def test_value_in_an_older_format_is_a_stale_miss(self, url: str, server: RedisServer, make_backend, make_chain):
        """A value written by chunk format 1: a miss counted as stale (not corrupt) and removed by a writer."""
        chain = make_chain(_tokens(8, 24))
        keys = [c.key for c in chain]
        backend = make_backend(url)
        assert backend.put(chain) == [True, True]
        with server.client() as client:
            client.set(backend.redis_key(keys[1]), v1_blob(chain[1]))
        got = backend.get(keys)
        _assert_same(got[0], chain[0])
        assert got[1] is None
        assert backend.counters() == {
            "errors": 0,
            "skipped": 0,
            "corrupt": 0,
            "stale": 1,
            "rejected": 0,
            "forged": 0,
            "deadline": 0,
        }
        assert backend.stats().stale == 1
        assert _scan(server) == {backend.redis_key(keys[0])}

    def test_each_chunk_is_stored_on_its_own_merits(self, url: str, make_backend, make_chain) -> None:
        """A chunk the codec refuses is a rejected put; its child is still stored (refusing descendants is the
        tier stack's rule, for every tier)."""
        from kvtier.codec import get_codec

        chain = make_chain(_tokens(12, 23))
        payload = chain[1].payload.clone()
        payload.view(-1)[0] = float("nan")  # int8 cannot encode non-finite values
        bad = Chunk(chain[1].key, chain[1].parent, chain[1].namespace, chain[1].layout, chain[1].tokens, payload)
        backend = make_backend(url, codec=get_codec("int8"))
        assert backend.put([chain[0], bad, chain[2]]) == [True, False, True]
        assert backend.contains([c.key for c in chain]) == [True, False, True]
        assert backend.counters() == {
            "errors": 0,
            "skipped": 0,
            "corrupt": 0,
            "stale": 0,
            "rejected": 1,
            "forged": 0,
            "deadline": 0,
        }
        assert backend.stats().rejected_puts == 1

    def test_a_full_redis_rejects_puts_without_opening_the_breaker(
        self, tmp_path: Path, make_backend, make_chain
    ) -> None:
        chain = make_chain(_tokens(64 * 128, 24), chunk_size=128)  # 64 chunks of 32 KiB: 2 MiB
        args = ("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
        with RedisServer(tmp_path, None, *args) as srv:
            backend = make_backend(srv.url)
            ok = [backend.put([c])[0] for c in chain]  # one at a time, as the write-behind may call it
            assert 0 < sum(ok) < len(ok) and ok == sorted(ok, reverse=True)  # stored until Redis was full
            n = backend.counters()
            assert (n["errors"], n["skipped"], n["rejected"]) == (0, 0, ok.count(False))
            assert backend.contains([chain[0].key, chain[-1].key]) == [True, False]  # no breaker: Redis answers

    def test_ttl_sets_an_expiry(self, url: str, server: RedisServer, make_backend, make_chain) -> None:
        chunk = make_chain(_tokens(4, 3))[0]
        backend = make_backend(url, ttl_s=100)
        assert backend.put([chunk]) == [True]
        with server.client() as client:
            assert 99 <= client.ttl(backend.redis_key(chunk.key)) <= 100

    def test_empty_batches(self, url: str, make_backend) -> None:
        backend = make_backend(url)
        assert (backend.put([]), backend.get([]), backend.contains([]), backend.delete([])) == ([], [], [], 0)

    def test_a_codec_is_written_and_any_reader_decodes_it(
        self, url: str, server: RedisServer, make_backend, make_chain
    ) -> None:
        from kvtier.codec import get_codec

        chain = make_chain(_tokens(64, 16), chunk_size=64)
        zstd = make_backend(url, codec=get_codec("raw+zstd"))
        assert zstd.put(chain) == [True]
        with server.client() as client:
            stored = client.get(zstd.redis_key(chain[0].key))
        assert stored == encode(chain[0], get_codec("raw+zstd"))
        raw_reader = make_backend(url)  # reads what the header names, whatever it writes itself
        _assert_same(raw_reader.get([chain[0].key])[0], chain[0])
        assert raw_reader.counters()["corrupt"] == 0

    def test_concurrent_callers_share_a_small_pool(self, url: str, make_backend, make_chain) -> None:
        backend = make_backend(url, max_connections=2)
        chains = [make_chain(_tokens(16, 100 + i), seed=i) for i in range(8)]
        failures: list[str] = []

        def work(chain: list[Chunk]) -> None:
            for _ in range(5):
                if backend.put(chain) != [True] * 4 or backend.contains([c.key for c in chain]) != [True] * 4:
                    failures.append("put/contains")
                got = backend.get([c.key for c in chain])
                if not all(
                    g is not None and torch.equal(g.payload, c.payload) for g, c in zip(got, chain, strict=True)
                ):
                    failures.append("get")

        threads = [threading.Thread(target=work, args=(c,)) for c in chains]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert backend.counters() == {
            "errors": 0,
            "skipped": 0,
            "corrupt": 0,
            "stale": 0,
            "rejected": 0,
            "forged": 0,
            "deadline": 0,
        }

    def test_password_and_acl_user_in_the_url(self, tmp_path: Path, make_backend, make_chain) -> None:
        chunk = make_chain(_tokens(4, 4))[0]
        args = ("--requirepass", "s3cret", "--user", "alice", "on", ">wonder#land", "~kvt:*", "+@all")
        with RedisServer(tmp_path, None, *args) as srv:
            base = f"127.0.0.1:{srv.port}/0"
            assert make_backend(f"redis://:s3cret@{base}").put([chunk]) == [True]
            alice = make_backend(f"redis://alice:wonder%23land@{base}")
            assert alice.contains([chunk.key]) == [True]
            _assert_same(alice.get([chunk.key])[0], chunk)
            with pytest.raises(StorageError, match="authentication failed"):  # a start-up error, not silent misses
                make_backend(f"redis://alice:nope@{base}")
            outsider = make_backend(f"redis://alice:wonder%23land@{base}", key_prefix="other")  # ACL: ~kvt:* only
            assert outsider.put([chunk]) == [False]
            assert outsider.counters()["errors"] == 1


# -- through the engine ------------------------------------------------------------------------------------------


def test_engine_store_retrieve_and_a_fresh_engine_hits(url: str, make_engine, layout: KVLayout) -> None:
    tokens, kv = _tokens(14), _kv(layout, 14)
    a = make_engine(url)
    assert a.tiers.names == ["l3"]
    stored = a.store(tokens, kv)
    assert (stored.stored_chunks, stored.skipped_chunks, stored.stored_tokens, stored.rejected_chunks) == (3, 0, 12, 0)
    hit = a.retrieve(tokens)
    assert (hit.num_tokens, dict(hit.tier_tokens)) == (12, {"l3": 12})
    assert torch.equal(_stacked(hit.layers), kv[:, :, :, :12])

    b = make_engine(url)  # another engine object: another client, another connection pool
    assert _redis(b) is not _redis(a)
    assert b.lookup(tokens).num_tokens == 12
    hit = b.retrieve(tokens)
    assert (hit.num_tokens, dict(hit.tier_tokens)) == (12, {"l3": 12})
    assert torch.equal(_stacked(hit.layers), kv[:, :, :, :12])
    assert b.store(tokens, kv).skipped_chunks == 3


_CHILD = """
import hashlib, json, sys
import numpy as np, torch
sys.path.insert(0, {repo!r})
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.keys import Namespace
from kvtier.layout import KVLayout
cfg = load_config(env={{}}, overrides={overrides!r})
ns = Namespace("test-model-fingerprint", KVLayout(num_layers=2, num_kv_heads=2, head_dim=4))
with CacheEngine.from_config(cfg, ns).start() as engine:
    hit = engine.retrieve(np.array({tokens!r}, dtype=np.uint32))
kv = torch.stack(hit.layers).contiguous()
digest = hashlib.sha256(kv.numpy().tobytes()).hexdigest()
print(json.dumps({{"n": hit.num_tokens, "tiers": dict(hit.tier_tokens), "sha256": digest}}))
"""


def test_another_process_retrieves_the_same_kv(url: str, make_engine, layout: KVLayout) -> None:
    tokens, kv = _tokens(20, 5), _kv(layout, 20, 5)
    overrides = {"chunk_size": C, "store_partial": False, "l1.enabled": False, "l2.enabled": False,
                 "l3.enabled": True, "l3.url": url, "l3.key_prefix": "kvt"}  # fmt: skip
    engine = make_engine(url)
    assert engine.store(tokens, kv).stored_chunks == 5
    mine = engine.retrieve(tokens)
    code = _CHILD.format(repo=str(REPO), overrides=overrides, tokens=tokens.tolist())
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child == {
        "n": 20,
        "tiers": {"l3": 20},
        "sha256": hashlib.sha256(_stacked(mine.layers).contiguous().numpy().tobytes()).hexdigest(),
    }
    assert child["sha256"] == hashlib.sha256(kv.contiguous().numpy().tobytes()).hexdigest()


# -- holes: keys deleted or evicted by Redis ---------------------------------------------------------------------


def test_a_deleted_middle_chunk_is_where_the_prefix_stops(url: str, server: RedisServer, make_engine, layout) -> None:
    tokens, kv = _tokens(20, 6), _kv(layout, 20, 6)
    a = make_engine(url)
    assert a.store(tokens, kv).stored_chunks == 5
    spans = chunk_spans(a.namespace, tokens, C)
    with server.client() as client:
        assert client.delete(_redis(a).redis_key(spans[2].key)) == 1
    b = make_engine(url)
    assert b.lookup(tokens).num_tokens == 8
    hit = b.retrieve(tokens)
    assert (hit.num_tokens, dict(hit.tier_tokens)) == (8, {"l3": 8})
    assert torch.equal(_stacked(hit.layers), kv[:, :, :, :8])
    assert b.stats().invalid_chunks == {}


@pytest.mark.parametrize("policy", ["allkeys-lfu", "allkeys-random"])
def test_maxmemory_eviction_leaves_holes_and_retrieve_stops_at_the_first(
    policy: str, tmp_path: Path, make_engine
) -> None:
    """A 10-chunk prefix whose first 6 chunks are read often, then ~3 MB of other chunks into a 2 MB server.

    Under LFU (log factor 0: every read counts) the hot 6 stay and the cold 4 go, so the hole is exactly at
    chunk 6; under random eviction it is wherever Redis made it. Either way the lookup stops at the first
    hole and retrieve returns exactly the chunks before it.
    """
    big = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64)  # 2 KiB per token
    ns = Namespace("test-model-fingerprint", big)
    chunk = 16  # 32 KiB per chunk
    tokens, kv = _tokens(chunk * 10, 7), _kv(big, chunk * 10, 7)
    filler = _tokens(chunk * 100, 8)
    args = ("--maxmemory", "2mb", "--maxmemory-policy", policy, "--lfu-log-factor", "0")
    with RedisServer(tmp_path, None, *args) as srv:
        engine = make_engine(srv.url, ns, chunk_size=chunk)
        assert engine.store(tokens, kv).stored_chunks == 10
        for r in range(10):
            for _ in range(2):
                engine.retrieve(tokens, max_tokens=6 * chunk)
            engine.store(filler[r * chunk * 10 : (r + 1) * chunk * 10], _kv(big, chunk * 10, r))
        with srv.client() as client:
            assert client.info("stats")["evicted_keys"] > 0
            client.config_set("maxmemory", 0)  # freeze the holes: no eviction races the checks below
            present = [bool(client.exists(_redis(engine).redis_key(s.key))) for s in chunk_spans(ns, tokens, chunk)]
        if policy == "allkeys-lfu":
            assert present == [True] * 6 + [False] * 4
        assert False in present
        first_hole = present.index(False)
        fresh = make_engine(srv.url, ns, chunk_size=chunk)
        assert fresh.lookup(tokens).num_tokens == first_hole * chunk
        hit = fresh.retrieve(tokens)
        assert hit.num_tokens == first_hole * chunk
        if hit.num_tokens:
            assert torch.equal(_stacked(hit.layers), kv[:, :, :, : hit.num_tokens])
        assert fresh.stats().invalid_chunks == {}


# -- bad data ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped_payload_byte", "another_chunk"])
def test_a_bad_value_is_a_counted_miss_and_is_deleted(
    damage: str, url: str, server: RedisServer, make_engine, layout: KVLayout, caplog: pytest.LogCaptureFixture
) -> None:
    tokens, kv = _tokens(12, 8), _kv(layout, 12, 8)
    a = make_engine(url)
    a.store(tokens, kv)
    backend = _redis(a)
    spans = chunk_spans(a.namespace, tokens, C)
    victim = backend.redis_key(spans[1].key)
    with server.client() as client:
        good = client.get(victim)
        bad = {
            "garbage": b"not a chunk" * 50,
            "truncated": good[:-10],
            "flipped_payload_byte": good[:-5] + bytes([good[-5] ^ 1]) + good[-4:],
            "another_chunk": client.get(backend.redis_key(spans[2].key)),  # valid framing, wrong key
        }[damage]
        client.set(victim, bad)

    b = make_engine(url)
    with caplog.at_level(logging.WARNING, logger="kvtier.storage.redis"):
        got = _redis(b).get([s.key for s in spans])
    assert got[1] is None and got[0] is not None and got[2] is not None
    assert _redis(b).stats().corrupt == 1
    drops = [r.getMessage() for r in caplog.records if "dropping chunk" in r.getMessage()]
    assert len(drops) == 1 and spans[1].key.hex()[:16] in drops[0]
    assert _scan(server, victim.decode()) == set()  # deleted, so a later store can repair it

    with server.client() as client:
        client.set(victim, bad)
    hit = b.retrieve(tokens)
    assert (hit.num_tokens, dict(hit.tier_tokens)) == (4, {"l3": 4})
    assert torch.equal(_stacked(hit.layers), kv[:, :, :, :4])
    assert b.stats().invalid_chunks == {}  # not a wrong chunk: a damaged value, counted by its tier
    assert _redis(b).stats().corrupt == 2
    assert b.store(tokens, kv).stored_chunks == 1  # the dropped chunk is written again
    assert b.retrieve(tokens).num_tokens == 12


def test_another_namespaces_chunk_under_a_valid_key_is_never_served(
    url: str, server: RedisServer, make_engine, namespace: Namespace, layout: KVLayout
) -> None:
    tokens = _tokens(8, 9)
    engine = make_engine(url)
    span = chunk_spans(namespace, tokens, C)[0]
    other = Namespace("another-model-fingerprint", layout)
    planted = Chunk(span.key, None, other.digest, layout, tokens[:C].copy(), _kv(layout, C, 9))
    with server.client() as client:
        client.set(_redis(engine).redis_key(span.key), encode(planted))
    assert engine.lookup(tokens).num_tokens == C  # EXISTS cannot tell; the read must
    hit = engine.retrieve(tokens)
    assert (hit.num_tokens, hit.layers) == (0, [])
    assert _redis(engine).stats().forged == 1  # refused from its header: not this engine's namespace
    assert _scan(server) == set()  # the tier dropped it


# -- tenants -----------------------------------------------------------------------------------------------------


def test_tenants_never_share_and_clear_is_per_tenant(
    url: str, server: RedisServer, make_engine, namespace: Namespace, layout: KVLayout
) -> None:
    tokens, kv = _tokens(16, 10), _kv(layout, 16, 10)
    a = make_engine(url, namespace.with_tenant("a"), tenant="a")
    b = make_engine(url, namespace.with_tenant("b"), tenant="b")
    shared = make_engine(url)  # no tenant: keys under kvt:_:
    assert a.store(tokens, kv).stored_chunks == 4
    assert b.lookup(tokens).num_tokens == 0
    assert b.retrieve(tokens).num_tokens == 0
    assert shared.lookup(tokens).num_tokens == 0
    # even with a's namespace, b's key prefix keeps it away from a's chunks
    b_with_a_namespace = make_engine(url, namespace.with_tenant("a"), tenant="b")
    assert b_with_a_namespace.lookup(tokens).num_tokens == 0
    assert b.store(tokens, kv).stored_chunks == 4
    assert shared.store(tokens[:8], kv).stored_chunks == 2

    a_keys = {_redis(a).redis_key(s.key) for s in chunk_spans(a.namespace, tokens, C)}
    b_keys = {_redis(b).redis_key(s.key) for s in chunk_spans(b.namespace, tokens, C)}
    assert _scan(server, "kvt:a:*") == a_keys
    assert _scan(server, "kvt:b:*") == b_keys
    assert len(_scan(server)) == 10
    assert _redis(a).clear() == 4
    assert _scan(server) == b_keys | _scan(server, "kvt:_:*")
    assert len(_scan(server, "kvt:_:*")) == 2
    assert b.retrieve(tokens).num_tokens == 16


def test_clear_matches_only_its_own_tenant_exactly(url: str, server: RedisServer, make_backend, make_chain) -> None:
    chunk = make_chain(_tokens(4, 11))[0]
    a = make_backend(url, tenant="a")
    a_b = make_backend(url, tenant="a:b")  # "kvt:a:*" as a glob would also match "kvt:a:b:<hex>"
    star = make_backend(url, tenant="*")
    for backend in (a, a_b, star):
        assert backend.put([chunk]) == [True]
    with server.client() as client:
        client.set(b"kvt:a:not-a-chunk-key", b"x")
    assert star.clear() == 1
    assert a.clear() == 1
    assert _scan(server) == {a_b.redis_key(chunk.key), b"kvt:a:not-a-chunk-key"}


# -- faults ------------------------------------------------------------------------------------------------------


def test_redis_stopped_mid_run_gives_fast_misses_then_recovers(
    tmp_path: Path, make_engine, layout: KVLayout, caplog: pytest.LogCaptureFixture
) -> None:
    tokens, kv = _tokens(12, 12), _kv(layout, 12, 12)
    srv = RedisServer(tmp_path).start()
    try:
        engine = make_engine(srv.url)
        backend = _redis(engine)
        assert engine.store(tokens, kv).stored_chunks == 3
        srv.stop()
        with caplog.at_level(logging.WARNING, logger="kvtier.storage.redis"):
            hit, took = _elapsed(lambda: engine.lookup(tokens))
            assert hit.num_tokens == 0 and took < TIMEOUT * 3 + SLACK
            hit, took = _elapsed(lambda: engine.lookup(tokens))  # the breaker is open: no network at all
            assert hit.num_tokens == 0 and took < 0.05
            stored, took = _elapsed(lambda: engine.store(tokens, kv))  # queued; the writer skips Redis at once
            assert stored.stored_chunks == 3 and took < 0.05
            assert engine.retrieve(tokens).num_tokens == 0
            n = backend.counters()
            assert (n["errors"], n["skipped"]) == (1, 4)  # lookup, store's contains and put, retrieve's contains
            time.sleep(RETRY + 0.05)
            _, took = _elapsed(lambda: engine.store(tokens, kv))  # one probe (in the writer), still down
            assert took < TIMEOUT * 3 + SLACK
        assert backend.counters()["errors"] == 2
        assert len([r for r in caplog.records if "answering misses" in r.getMessage()]) == 2  # once per interval

        srv.start()  # same port, empty (no persistence)
        assert engine.lookup(tokens).num_tokens == 0  # still inside the interval: skipped
        time.sleep(RETRY + 0.05)
        assert engine.store(tokens, kv).rejected_chunks == 0
        assert _redis(engine) is backend
        hit = engine.retrieve(tokens)
        assert (hit.num_tokens, dict(hit.tier_tokens)) == (12, {"l3": 12})
        assert torch.equal(_stacked(hit.layers), kv[:, :, :, :12])
        assert backend.counters()["errors"] == 2
    finally:
        srv.stop()


def test_a_black_holed_connection_costs_one_timeout_then_the_breaker(tmp_path: Path, make_backend, make_chain) -> None:
    chain = make_chain(_tokens(8, 13))
    keys = [c.key for c in chain]
    with RedisServer(tmp_path) as srv, BlackHoleProxy(srv.port) as proxy:
        backend = make_backend(proxy.url, timeout_s=TIMEOUT, connect_timeout_s=TIMEOUT, retry_interval_s=RETRY)
        assert backend.put(chain) == [True, True]
        proxy.black_hole.set()

        found, took = _elapsed(lambda: backend.contains(keys))
        assert found == [False, False]
        assert TIMEOUT * 0.9 <= took < TIMEOUT * 3 + SLACK  # it did wait for the socket timeout, once
        got, took = _elapsed(lambda: backend.get(keys))
        assert got == [None, None] and took < 0.05
        time.sleep(RETRY + 0.05)
        ok, took = _elapsed(lambda: backend.put(chain))
        assert ok == [False, False] and TIMEOUT * 0.9 <= took < TIMEOUT * 3 + SLACK
        fresh = RedisBackend(
            _l3(proxy.url, timeout_s=TIMEOUT, connect_timeout_s=TIMEOUT, retry_interval_s=RETRY), tenant=None
        )
        _, took = _elapsed(fresh.start)  # a new connection into the hole: the PING times out, start() returns
        assert took < TIMEOUT * 3 + SLACK and fresh.counters()["errors"] == 1
        fresh.close()
        n = backend.counters()
        assert (n["errors"], n["skipped"], n["rejected"]) == (2, 1, 2)

        proxy.black_hole.clear()
        time.sleep(RETRY + 0.05)
        assert backend.contains(keys) == [True, True]
        _assert_same(backend.get(keys)[1], chain[1])


# -- cluster -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    with RedisClusterServers(tmp_path_factory.mktemp("cluster")) as servers:
        yield servers


def test_cluster_store_retrieve_and_clear_across_nodes(
    cluster: RedisClusterServers, make_engine, make_backend, make_chain, layout: KVLayout
) -> None:
    tokens, kv = _tokens(128, 14), _kv(layout, 128, 14)  # 32 chunks: keys spread over the slots
    a = make_engine(cluster.url)
    assert _redis(a).cluster
    assert a.store(tokens, kv).stored_chunks == 32
    other = make_backend(cluster.url, tenant="other")
    assert other.put(make_chain(_tokens(12, 15))) == [True] * 3

    sizes = []
    for node in cluster.nodes:
        with node.client() as client:
            sizes.append(client.dbsize())
    assert sum(sizes) == 35 and sum(1 for s in sizes if s > 0) >= 2

    b = make_engine(cluster.url)
    assert b.lookup(tokens).num_tokens == 128
    hit = b.retrieve(tokens)
    assert (hit.num_tokens, dict(hit.tier_tokens)) == (128, {"l3": 128})
    assert torch.equal(_stacked(hit.layers), kv)
    assert _redis(b).delete([chunk_spans(b.namespace, tokens, C)[5].key]) == 1
    assert b.retrieve(tokens).num_tokens == 5 * C

    assert _redis(b).clear() == 31
    sizes = []
    for node in cluster.nodes:
        with node.client() as client:
            sizes.append(client.dbsize())
    assert sum(sizes) == 3  # only the other tenant's chunks are left
    assert other.clear() == 3
    assert b.lookup(tokens).num_tokens == 0
    assert _redis(b).counters()["errors"] == 0


# -- the real model across two processes -------------------------------------------------------------------------

MODEL_CHUNK = 64
NEW_TOKENS = 8
GPL = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def loaded():
    from kvtier.models import load_model, resolve_model

    return load_model(resolve_model("smollm2-135m", load_config(env={}).cache_dir))


_MODEL_CHILD = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from kvtier.adapters.hf import CachedModel, hf_namespace
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.models import load_model, resolve_model
model, tok = load_model(resolve_model("smollm2-135m", load_config(env={{}}).cache_dir))
cfg = load_config(env={{}}, overrides={overrides!r})
ids = torch.tensor([{ids}])
with CachedModel(model, tok, CacheEngine.from_config(cfg, hf_namespace(model, tenant=cfg.tenant)).start()) as cached:
    gen = cached.generate(ids, max_new_tokens={new_tokens}, do_sample=False)
print(json.dumps({{"reused": gen.reused_tokens, "tiers": gen.tier_tokens, "tokens": gen.sequences[0].tolist()}}))
"""


@pytest.mark.model
def test_model_second_process_hits_redis_and_generates_the_same(url: str, loaded, tmp_path: Path) -> None:
    from kvtier.adapters.hf import CachedModel, hf_namespace

    model, tok = loaded
    text = GPL.read_text() if GPL.is_file() else (Path(os.__file__).parent / "LICENSE.txt").read_text()
    prompt = tok(text, return_tensors="pt").input_ids[:, :300]
    assert prompt.shape[1] == 300

    overrides = {"chunk_size": MODEL_CHUNK, "l1.enabled": False, "l2.enabled": False, "l2.path": str(tmp_path),
                 "l3.enabled": True, "l3.url": url, "l3.key_prefix": "kvt", "tenant": "model-test"}  # fmt: skip
    cfg = load_config(env={}, overrides=overrides)
    engine = CacheEngine.from_config(cfg, hf_namespace(model, tenant=cfg.tenant)).start()
    with CachedModel(model, tok, engine) as cached:
        cold = cached.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        cached.engine.flush()
    assert cold.reused_tokens == 0  # a miss computes like plain generate (tests/test_hf.py checks that)

    code = _MODEL_CHILD.format(
        repo=str(REPO), new_tokens=NEW_TOKENS, overrides=overrides, ids=",".join(map(str, prompt[0].tolist()))
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["reused"] == 299  # 4 full chunks + the 44-token partial one, but never the last prompt token
    assert child["tiers"] == {"l3": 299}
    assert child["tokens"] == cold.sequences[0].tolist()
