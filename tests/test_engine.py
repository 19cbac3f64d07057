"""kvtier.engine.CacheEngine end to end over real tiers (CPU memory + a tmp disk directory)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.config import KvtierConfig, load_config
from kvtier.engine import CacheEngine, LookupResult, StoreResult
from kvtier.keys import Namespace, chunk_spans
from kvtier.layout import KVLayout, LayerKV
from kvtier.storage import DiskBackend, MemoryBackend

C = 16  # chunk size used throughout
FULL_CHUNK_BYTES = C * 128 + C * 4  # payload of the small layout + token ids
EngineFactory = Callable[..., CacheEngine]


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, size=n).astype(np.int64)


def _kv(layout: KVLayout, n: int, seed: int = 0) -> torch.Tensor:
    # kv: [L, 2, H, N, D]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layout.chunk_shape(n), generator=gen)


def _config(cache_dir: Path, **overrides: object) -> KvtierConfig:
    values: dict[str, object] = {
        "cache_dir": str(cache_dir),
        "chunk_size": C,
        "l1.max_bytes": "10MB",
        "l2.max_bytes": "10MB",
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(env={}, overrides=values)


@pytest.fixture
def make_engine(tmp_path: Path, namespace: Namespace) -> Iterator[EngineFactory]:
    """``make_engine(ns=None, **overrides)``: a started engine (``l1__max_bytes=...`` sets ``l1.max_bytes``)."""
    engines: list[CacheEngine] = []

    def make(ns: Namespace | None = None, **overrides: object) -> CacheEngine:
        engine = CacheEngine.from_config(_config(tmp_path / "cache", **overrides), ns or namespace).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def _assert_kv(layers: list[torch.Tensor], kv: torch.Tensor, n: int) -> None:
    assert len(layers) == kv.shape[0]
    for layer, got in enumerate(layers):
        assert got.shape == (2, kv.shape[2], n, kv.shape[4])
        assert torch.equal(got, kv[layer, :, :, :n])


def _disk(engine: CacheEngine) -> DiskBackend:
    disk = engine.tiers.tiers[-1]
    assert isinstance(disk, DiskBackend)
    return disk


def _l1(engine: CacheEngine) -> MemoryBackend:
    l1 = engine.tiers.tiers[0]
    assert isinstance(l1, MemoryBackend)
    return l1


def test_store_then_retrieve_returns_exactly_the_stored_kv(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    assert engine.tiers.names == ["l1", "l2"]
    tokens, kv = _tokens(100), _kv(layout, 100)
    assert engine.store(tokens, kv) == StoreResult(
        stored_chunks=7, skipped_chunks=0, stored_tokens=100, rejected_chunks=0
    )
    result = engine.retrieve(tokens)
    assert result.num_tokens == 100
    assert result.tier_tokens == {"l1": 100, "l2": 0}
    assert result.tiers == "l1:100"
    _assert_kv(result.layers, kv, 100)
    kv.zero_()  # the cache copied the KV; the caller's tensor is its own
    assert torch.equal(engine.retrieve(tokens).layers[1][0], _kv(layout, 100)[1, 0])


def test_retrieved_layers_are_owned_by_the_caller(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(32), _kv(layout, 32)
    engine.store(tokens, kv)
    first = engine.retrieve(tokens).layers
    first[0].fill_(0)
    _assert_kv(engine.retrieve(tokens).layers, kv, 32)


def test_token_forms(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(40), _kv(layout, 40)
    engine.store(torch.from_numpy(tokens)[None, :], kv)  # a [1, N] batch of one
    assert engine.lookup(tokens.tolist()).num_tokens == 40
    assert engine.retrieve(torch.from_numpy(tokens)).num_tokens == 40


def test_store_from_per_layer_tensors(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(40), _kv(layout, 40)
    source = LayerKV([kv[layer, 0] for layer in range(2)], [kv[layer, 1] for layer in range(2)], layout)
    assert engine.store(tokens, source).stored_tokens == 40
    _assert_kv(engine.retrieve(tokens).layers, kv, 40)


def test_lookup(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens = _tokens(100)
    engine.store(tokens, _kv(layout, 100))
    order = _l1(engine).keys_lru_order()
    assert engine.lookup(tokens) == LookupResult(100, {"l1": 100, "l2": 0})
    assert engine.lookup(np.concatenate([tokens, _tokens(30, 1)])).num_tokens == 100
    assert engine.lookup(tokens[:50]).num_tokens == 48  # chunk 3 is not wholly in the query
    assert engine.lookup(tokens[:64]).num_tokens == 64
    other = engine.lookup(_tokens(100, 2))
    assert (other.num_tokens, other.tier_tokens, other.tiers) == (0, {"l1": 0, "l2": 0}, "none")
    assert engine.lookup([]).num_tokens == 0
    assert _l1(engine).keys_lru_order() == order  # a lookup changes no recency
    stats = engine.stats()
    assert (stats.lookups, stats.retrieves, stats.query_tokens) == (6, 0, 0)


def test_lookup_after_write_behind_sees_disk_too(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens = _tokens(64)
    engine.store(tokens, _kv(layout, 64))
    assert engine.flush(timeout=5)
    assert _disk(engine).stats().entries == 4
    _l1(engine).clear()
    assert engine.lookup(tokens).tier_tokens == {"l1": 0, "l2": 64}


def test_max_tokens(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(100), _kv(layout, 100)
    engine.store(tokens, kv)
    for max_tokens, expected in (
        (20, 20),
        (16, 16),
        (1, 1),
        (96, 96),
        (99, 99),
        (100, 100),
        (1000, 100),
        (0, 0),
        (-5, 0),
    ):
        assert engine.lookup(tokens, max_tokens=max_tokens).num_tokens == expected
        result = engine.retrieve(tokens, max_tokens=max_tokens)
        assert result.num_tokens == expected
        assert result.tier_tokens == {"l1": expected, "l2": 0}
        if expected:
            _assert_kv(result.layers, kv, expected)
        else:
            assert result.layers == []
    assert engine.stats().query_tokens == 20 + 16 + 1 + 96 + 99 + 100 + 100


def test_multi_turn_reuses_the_partial_trailing_chunk(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(120), _kv(layout, 120)
    assert engine.store(tokens[:100], kv[:, :, :, :100]).stored_chunks == 7
    assert engine.lookup(tokens).num_tokens == 100
    result = engine.retrieve(tokens)  # the previous turn plus 20 new tokens
    assert result.num_tokens == 100
    _assert_kv(result.layers, kv, 100)
    # the next turn stores chunk 6 (96..112) and a new partial (112..120); chunks 0-5 are skipped
    assert engine.store(tokens, kv) == StoreResult(2, 6, 24, 0)
    assert engine.retrieve(np.concatenate([tokens, _tokens(5, 3)])).num_tokens == 120


def test_short_sequence_is_one_partial_chunk(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(40), _kv(layout, 40)
    assert engine.store(tokens[:10], kv[:, :, :, :10]) == StoreResult(1, 0, 10, 0)
    assert engine.lookup(tokens).num_tokens == 10
    _assert_kv(engine.retrieve(tokens).layers, kv, 10)


def test_without_store_partial(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine(store_partial=False)
    tokens, kv = _tokens(120), _kv(layout, 120)
    assert engine.store(tokens[:100], kv) == StoreResult(6, 0, 96, 0)
    result = engine.retrieve(tokens)
    assert result.num_tokens == 96
    _assert_kv(result.layers, kv, 96)
    assert engine.store(tokens[:10], kv) == StoreResult(0, 0, 0, 0)


def test_second_store_skips_existing_chunks(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(100), _kv(layout, 100)
    assert engine.store(tokens, kv) == StoreResult(7, 0, 100, 0)
    assert engine.store(tokens, _kv(layout, 100, seed=9)) == StoreResult(0, 7, 0, 0)
    _assert_kv(engine.retrieve(tokens).layers, kv, 100)  # the first KV stays
    stats = engine.stats()
    assert (stats.stored_chunks, stats.skipped_chunks) == (7, 7)


def test_store_covers_only_the_kv_it_is_given(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(100), _kv(layout, 50)
    assert engine.store(tokens, kv) == StoreResult(4, 0, 50, 0)
    assert engine.lookup(tokens).num_tokens == 50


def test_fresh_engine_hits_disk_then_l1(make_engine: EngineFactory, layout: KVLayout) -> None:
    tokens, kv = _tokens(100), _kv(layout, 100)
    first = make_engine()
    first.store(tokens, kv)
    first.close()  # flushes the write-behind queue

    second = make_engine()
    assert second.lookup(tokens).tier_tokens == {"l1": 0, "l2": 100}
    from_disk = second.retrieve(tokens)
    assert (from_disk.num_tokens, from_disk.tier_tokens, from_disk.tiers) == (100, {"l1": 0, "l2": 100}, "l2:100")
    _assert_kv(from_disk.layers, kv, 100)
    assert second.lookup(tokens).tier_tokens == {"l1": 100, "l2": 0}  # promoted
    from_l1 = second.retrieve(tokens)
    assert from_l1.tier_tokens == {"l1": 100, "l2": 0}
    _assert_kv(from_l1.layers, kv, 100)
    stats = second.stats()
    assert (stats.retrieves, stats.query_tokens, stats.hit_tokens) == (2, 200, {"l1": 100, "l2": 100})
    assert stats.invalid_chunks == {}


def test_mixed_tiers_in_one_prefix(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(64), _kv(layout, 64)
    engine.store(tokens, kv)
    assert engine.flush(timeout=5)
    spans = chunk_spans(engine.namespace, tokens, C)
    _l1(engine).delete([spans[2].key, spans[3].key])
    result = engine.retrieve(tokens)
    assert result.tier_tokens == {"l1": 32, "l2": 32}
    _assert_kv(result.layers, kv, 64)
    assert engine.lookup(tokens).tier_tokens == {"l1": 64, "l2": 0}


def _chunk_file(engine: CacheEngine, tokens: np.ndarray, index: int) -> Path:
    key = chunk_spans(engine.namespace, tokens, C)[index].key.hex()
    (path,) = _disk(engine).root.glob(f"{key[:2]}/{key}.*.kvc")
    return path


def test_tampered_disk_file_gives_a_shorter_counted_hit(make_engine: EngineFactory, layout: KVLayout) -> None:
    tokens, kv = _tokens(100), _kv(layout, 100)
    first = make_engine()
    first.store(tokens, kv)
    first.close()

    second = make_engine()
    path = _chunk_file(second, tokens, 2)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    assert second.lookup(tokens).num_tokens == 100  # the index cannot know yet
    result = second.retrieve(tokens)
    assert result.num_tokens == 32
    assert result.tier_tokens == {"l1": 0, "l2": 32}
    _assert_kv(result.layers, kv, 32)
    assert second.stats().invalid_chunks == {}  # not a wrong chunk: a damaged file, counted by its tier
    assert _disk(second).stats().corrupt == 1
    assert not path.exists()
    assert second.lookup(tokens).tier_tokens == {"l1": 32, "l2": 0}
    # storing again repairs the hole
    assert second.store(tokens, kv) == StoreResult(1, 6, 16, 0)
    _assert_kv(second.retrieve(tokens).layers, kv, 100)


def _planted(namespace: Namespace, other: Namespace, tokens: np.ndarray, reason: str) -> Chunk:
    """A chunk stored under ``namespace``'s key for tokens[:C] that is wrong in one way."""
    span = chunk_spans(namespace, tokens, C)[0]
    digest, layout, ids = namespace.digest, namespace.layout, tokens[:C].astype("<u4")
    if reason == "namespace":
        digest = other.digest
    elif reason == "layout":
        layout = KVLayout(2, 2, 4, "float16")
    elif reason == "tokens":
        ids = ids[::-1].copy()
    payload = torch.ones(layout.chunk_shape(C), dtype=layout.torch_dtype)
    return Chunk(span.key, None, digest, layout, ids, payload)


@pytest.mark.parametrize("tier", [0, 1], ids=["l1", "l2"])
@pytest.mark.parametrize("reason", ["namespace", "layout", "tokens"])
def test_planted_wrong_chunk_is_rejected_and_discarded(
    make_engine: EngineFactory, namespace: Namespace, layout: KVLayout, reason: str, tier: int
) -> None:
    model_a = Namespace("model-a", layout)
    model_b = Namespace("model-b", layout)
    tokens = _tokens(40)
    engine = make_engine(model_b)
    chunk = _planted(model_b, model_a, tokens, reason)
    assert engine.tiers.tiers[tier].put([chunk]) == [True]
    assert engine.lookup(tokens).num_tokens == C  # the index only knows the key
    result = engine.retrieve(tokens)
    assert (result.num_tokens, result.layers) == (0, [])
    if tier == 1 and reason != "tokens":
        # a shared tier's chunk policy refuses another namespace or layout from the header, before decoding
        stats = engine.tiers.tiers[tier].stats()
        assert (stats.forged, stats.corrupt) == ((1, 0) if reason == "namespace" else (0, 1))
        assert engine.stats().invalid_chunks == {}
    else:
        assert engine.stats().invalid_chunks == {reason: 1}
    assert engine.tiers.locate([chunk.key]) == [None]  # discarded from every tier
    assert engine.lookup(tokens).num_tokens == 0
    kv = _kv(layout, 40)
    assert engine.store(tokens, kv).stored_chunks == 3
    _assert_kv(engine.retrieve(tokens).layers, kv, 40)


def test_other_model_chunk_in_shared_directory_is_never_returned(make_engine: EngineFactory, layout: KVLayout) -> None:
    """Model A's real chunk, filed under model B's key in the shared directory."""
    model_a, model_b = Namespace("model-a", layout), Namespace("model-b", layout)
    tokens, kv = _tokens(32), _kv(layout, 32)
    a = make_engine(model_a)
    a.store(tokens, kv)
    a.flush()
    a_chunk = _disk(a).get([chunk_spans(model_a, tokens, C)[0].key])[0]
    a.close()
    b = make_engine(model_b)
    assert b.lookup(tokens).num_tokens == 0  # different namespaces never share keys
    assert a_chunk is not None and a_chunk.namespace == model_a.digest
    b_key = chunk_spans(model_b, tokens, C)[0].key
    forged = Chunk(b_key, None, a_chunk.namespace, a_chunk.layout, a_chunk.tokens, a_chunk.payload)
    assert _disk(b).put([forged]) == [True]
    result = b.retrieve(tokens)
    assert result.num_tokens == 0
    assert _disk(b).stats().forged == 1  # refused from its header: model A's namespace is not b's
    assert _disk(b).contains([b_key]) == [False]


def test_tenants_do_not_share(make_engine: EngineFactory, namespace: Namespace, layout: KVLayout) -> None:
    tokens = _tokens(48)
    a = make_engine(namespace.with_tenant("a"))
    a.store(tokens, _kv(layout, 48))
    a.close()
    assert make_engine(namespace.with_tenant("b")).lookup(tokens).num_tokens == 0
    assert make_engine(namespace.with_tenant("a")).lookup(tokens).num_tokens == 48


def test_out_buffer_is_filled_and_returned_as_views(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(100), _kv(layout, 100)
    engine.store(tokens, kv)
    out = torch.full((2, 2, 2, 128, 4), -7.0)  # [L, 2, H, capacity, D]
    result = engine.retrieve(tokens, out=out)
    assert result.num_tokens == 100
    for layer, got in enumerate(result.layers):
        assert got.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
        assert got.data_ptr() == out[layer].data_ptr()
        assert got.shape == (2, 2, 100, 4)
        assert torch.equal(got, kv[layer])
    assert torch.equal(out[:, :, :, :100], kv)
    assert bool((out[:, :, :, 100:] == -7.0).all())
    with pytest.raises(ValueError):
        engine.retrieve(tokens, out=torch.empty(2, 2, 2, 50, 4))  # too short
    with pytest.raises(ValueError):
        engine.retrieve(tokens, out=torch.empty(2, 2, 2, 128, 4, dtype=torch.float16))
    with pytest.raises(ValueError):
        engine.retrieve(tokens, out=torch.empty(1, 2, 2, 128, 4))  # one layer missing


def test_single_tier_engines(make_engine: EngineFactory, layout: KVLayout) -> None:
    tokens, kv = _tokens(40), _kv(layout, 40)
    only_disk = make_engine(l1__enabled=False)
    assert only_disk.tiers.names == ["l2"]
    assert only_disk.tiers.sync_tiers == 0  # without L1, disk I/O stays off the caller's thread
    disk = _disk(only_disk)
    gate = threading.Event()
    real_put = disk.put
    disk.put = lambda chunks: gate.wait(10) and real_put(chunks)  # type: ignore[method-assign]
    first = only_disk.store(tokens, kv)  # returns while the disk write is held back
    assert first.stored_chunks == 3 and only_disk.lookup(tokens).num_tokens == 0
    assert only_disk.store(tokens, kv).stored_chunks == 0  # queued chunks are not queued twice
    gate.set()
    assert only_disk.flush(10)
    result = only_disk.retrieve(tokens)
    assert result.tier_tokens == {"l2": 40}
    _assert_kv(result.layers, kv, 40)
    only_l1 = make_engine(l2__enabled=False)
    assert only_l1.tiers.names == ["l1"]
    only_l1.store(tokens, kv)
    assert only_l1.retrieve(tokens).tier_tokens == {"l1": 40}


def test_no_tier_is_an_error(tmp_path: Path, namespace: Namespace) -> None:
    with pytest.raises(ValueError, match="enable at least one of l1, node, l2 or l3"):
        CacheEngine.from_config(_config(tmp_path, l1__enabled=False, l2__enabled=False), namespace)
    with pytest.raises(ValueError):
        CacheEngine(namespace, None, chunk_size=0)  # type: ignore[arg-type]


def test_chunks_larger_than_l1_are_counted_rejections(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine(l1__max_bytes=1000, l2__enabled=False)
    tokens, kv = _tokens(100), _kv(layout, 100)
    # six full chunks (2112 bytes each) do not fit; the 4-token partial (528 bytes) would, but its
    # parent was refused, so storing it would only waste room: refused too
    assert engine.store(tokens, kv) == StoreResult(7, 0, 100, 7, {"l1": 7})
    assert engine.lookup(tokens).num_tokens == 0


def test_store_longer_than_budget_keeps_a_reachable_prefix(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine(l1__max_bytes=3 * FULL_CHUNK_BYTES, l2__enabled=False)
    tokens, kv = _tokens(100), _kv(layout, 100)
    engine.store(tokens, kv)
    assert engine.lookup(tokens).num_tokens == 48


def test_concurrent_store_and_retrieve(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    common_tokens, common_kv = _tokens(64, 99), _kv(layout, 64, 99)
    engine.store(common_tokens, common_kv)
    seqs = [(_tokens(80, 10 + t), _kv(layout, 80, 10 + t)) for t in range(4)]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    rounds = 8

    def work(t: int) -> None:
        try:
            barrier.wait(10)
            tokens, kv = seqs[t]
            for i in range(rounds):
                engine.store(tokens, kv)
                mine = engine.retrieve(tokens)
                assert mine.num_tokens == 80
                _assert_kv(mine.layers, kv, 80)
                other_tokens, other_kv = seqs[(t + 1 + i) % 4]
                theirs = engine.retrieve(other_tokens)
                assert theirs.num_tokens in (0, 80)  # chunks appear in one batch
                if theirs.num_tokens:
                    _assert_kv(theirs.layers, other_kv, 80)
                shared = engine.retrieve(common_tokens, max_tokens=40 + i)
                assert shared.num_tokens == 40 + i
                _assert_kv(shared.layers, common_kv, 40 + i)
                assert engine.lookup(common_tokens).num_tokens == 64
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    if errors:
        raise errors[0]
    stats = engine.stats()
    assert stats.stored_chunks == 4 + 4 * 5
    assert stats.skipped_chunks == 4 * (rounds - 1) * 5
    assert stats.retrieves == 4 * rounds * 3
    assert stats.invalid_chunks == {}
    assert (stats.dropped_writes, stats.write_errors) == (0, 0)
    assert engine.flush(timeout=10)
    assert _disk(engine).stats().entries == 4 + 4 * 5


def test_retrieve_from_start_reads_only_what_the_caller_lacks(make_engine: EngineFactory, layout: KVLayout) -> None:
    engine = make_engine()
    tokens, kv = _tokens(4 * C + 5), _kv(layout, 4 * C + 5)
    engine.store(tokens, kv)
    for start in (0, 1, C, C + 3, 4 * C, 4 * C + 4):
        hit = engine.retrieve(tokens, start=start)
        assert hit.num_tokens == 4 * C + 5
        assert sum(hit.tier_tokens.values()) == 4 * C + 5 - start
        for layer, got in enumerate(hit.layers):
            assert torch.equal(got, kv[layer, :, :, start:])
    assert engine.retrieve(tokens, start=4 * C + 5).layers == []
    out = torch.zeros(layout.chunk_shape(3 * C))
    hit = engine.retrieve(tokens, start=C + 1, max_tokens=3 * C, out=out)
    assert hit.num_tokens == 3 * C and torch.equal(out[:, :, :, : 2 * C - 1], kv[:, :, :, C + 1 : 3 * C])
    with pytest.raises(ValueError):
        engine.retrieve(tokens, start=-1)


def test_retrieve_from_start_skips_chunks_before_it(make_engine: EngineFactory, layout: KVLayout) -> None:
    """Chunks ending at or before ``start`` are not read: a damaged one there does not shorten the hit."""
    engine = make_engine(l1__enabled=False)
    tokens, kv = _tokens(3 * C), _kv(layout, 3 * C)
    engine.store(tokens, kv)
    engine.flush()
    first = chunk_spans(engine.namespace, tokens, C)[0].key
    path = _disk(engine)._path_of(first)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    hit = engine.retrieve(tokens, start=C)
    assert hit.num_tokens == 3 * C
    assert torch.equal(hit.layers[0], kv[0, :, :, C:])
    assert engine.retrieve(tokens).num_tokens == 0  # read from 0, the damaged chunk ends the prefix
    assert _disk(engine).stats().corrupt == 1
