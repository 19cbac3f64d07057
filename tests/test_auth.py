"""Authenticated chunks on shared tiers (issue 15): forged chunks in a real Redis and a disk folder, tenants, rotation.

An attacker who can write to a shared tier plants a self-consistent chunk
(valid framing and checksum) under a victim's key. Without a secret it is
served; with one it is a counted miss (``forged``), never decoded.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.chunk import FLAG_MAC, Chunk, _checksum, decode, decode_header, encode
from kvtier.config import KvtierConfig, load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ChunkAuthError
from kvtier.keys import Namespace, chunk_spans
from kvtier.layout import KVLayout
from kvtier.security import MAC_LEN, MAC_OFFSET, ChunkPolicy, Secret
from kvtier.storage.files import chunk_path

C = 4
SECRET = "chunk-signing-secret-" + "q" * 20
OLD_SECRET = "the-previous-secret-" + "r" * 20

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server not installed (bash scripts/setup.sh --test)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    from redis_servers import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis-auth")) as srv:
        yield srv


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def _config(tmp_path: Path, *, redis_url: str | None = None, **overrides: object) -> KvtierConfig:
    values: dict[str, object] = {
        "chunk_size": C,
        "store_partial": False,
        "l1.enabled": False,
        "l2.enabled": redis_url is None,
        "l2.path": str(tmp_path / "chunks"),
        "l3.enabled": redis_url is not None,
        "l3.key_prefix": "kvt-auth",
    }
    if redis_url is not None:
        values["l3.url"] = redis_url
    values.update(overrides)
    return load_config(env={}, overrides=values)


@pytest.fixture
def make_engine() -> Iterator[Callable[..., CacheEngine]]:
    engines: list[CacheEngine] = []

    def make(config: KvtierConfig, namespace: Namespace) -> CacheEngine:
        engine = CacheEngine.from_config(config, namespace).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n).astype(np.uint32)


def _kv(layout: KVLayout, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        (layout.num_layers, 2, layout.num_kv_heads, n, layout.head_dim), generator=torch.Generator().manual_seed(seed)
    )


def _forged(namespace: Namespace, tokens: np.ndarray, value: float = 7.0) -> tuple[Chunk, bytes]:
    """The attacker's chunk for tokens[:C]: the victim's key, namespace and tokens, KV of its choosing."""
    span = chunk_spans(namespace, tokens, C)[0]
    layout = namespace.layout
    chunk = Chunk(span.key, None, namespace.digest, layout, tokens[:C].copy(), torch.full(layout.chunk_shape(C), value))
    return chunk, encode(chunk)


def _plant_redis(server: object, engine: CacheEngine, chunk: Chunk, value: bytes) -> None:
    backend = engine.tiers.tiers[-1]
    with server.client() as client:  # type: ignore[attr-defined]
        client.set(backend.redis_key(chunk.key), value)


@needs_redis
def test_forged_chunk_in_redis_is_served_without_a_secret_and_refused_with_one(
    server, tmp_path, secret_file, make_engine, namespace, layout, caplog
) -> None:
    tokens = _tokens(8, 1)
    with server.client() as client:
        client.flushall()
    # no secret: the self-consistent forgery is served as the victim's KV (the attack this issue closes)
    plain = make_engine(_config(tmp_path, redis_url=server.url), namespace)
    chunk, value = _forged(namespace, tokens)
    _plant_redis(server, plain, chunk, value)
    hit = plain.retrieve(tokens)
    assert hit.num_tokens == C and torch.all(hit.layers[0] == 7.0)

    # with the secret: 0 tokens, counted as forged (tier counter and metric), never decoded, dropped
    signed = make_engine(
        _config(tmp_path, redis_url=server.url, **{"security.secret_file": str(secret_file)}), namespace
    )
    _plant_redis(server, signed, chunk, value)
    with caplog.at_level(logging.WARNING):
        miss = signed.retrieve(tokens)
    assert (miss.num_tokens, miss.layers) == (0, [])
    l3 = signed.tiers.tiers[-1]
    assert l3.stats().forged == 1 and l3.stats().corrupt == 0
    assert b'kvtier_tier_forged_total{tier="l3"} 1.0' in signed.metrics.render()
    assert signed.lookup(tokens).num_tokens == 0  # dropped, so a real store can take its place
    assert SECRET not in caplog.text and "q" * 20 not in caplog.text

    # a forgery with the MAC flag and a made-up tag is refused the same way
    fake = bytearray(value)
    fake[6] |= FLAG_MAC
    fake[MAC_OFFSET : MAC_OFFSET + MAC_LEN] = b"\x5a" * MAC_LEN
    n = decode_header(value).tokens.size
    fake[176:192] = _checksum(fake[:176], fake[192 : 192 + 4 * n], fake[192 + 4 * n :])  # self-consistent again
    _plant_redis(server, signed, chunk, bytes(fake))
    assert signed.retrieve(tokens).num_tokens == 0 and l3.stats().forged == 2

    # the signed engine's own chunks round-trip and carry a MAC; a fresh engine with the secret reads them
    kv = _kv(layout, 8, 2)
    assert signed.store(tokens, kv).stored_chunks == 2
    signed.flush()
    with server.client() as client:
        stored = client.get(l3.redis_key(chunk.key))
    assert decode_header(stored).mac != bytes(MAC_LEN)
    again = make_engine(
        _config(tmp_path, redis_url=server.url, **{"security.secret_file": str(secret_file)}), namespace
    )
    got = again.retrieve(tokens)
    assert got.num_tokens == 8 and torch.equal(torch.stack(got.layers), kv)
    # a reader without the secret still reads signed chunks (it authenticates nothing, as before)
    assert plain.retrieve(tokens).num_tokens == 8


@needs_redis
def test_tenant_a_key_cannot_make_a_chunk_tenant_b_accepts(server, tmp_path, secret_file, make_engine, layout) -> None:
    with server.client() as client:
        client.flushall()
    ns_a, ns_b = Namespace("m", layout, tenant="a"), Namespace("m", layout, tenant="b")
    config = _config(tmp_path, redis_url=server.url, **{"security.secret_file": str(secret_file)})
    b = make_engine(config, ns_b)
    tokens = _tokens(8, 3)
    # an attacker holding tenant a's key signs a chunk for b's namespace, key and tokens with it
    attacker = ChunkPolicy(Secret(SECRET.encode()))
    attacker.register(ns_b.digest, "a", layout, C)  # b's namespace, a's key
    chunk, _ = _forged(ns_b, tokens)
    signed_with_a = encode(chunk, policy=attacker)
    assert decode_header(signed_with_a).mac != bytes(MAC_LEN)
    b_l3 = b.tiers.tiers[-1]
    with server.client() as client:
        client.set(b_l3.redis_key(chunk.key), signed_with_a)
    assert b.retrieve(tokens).num_tokens == 0 and b_l3.stats().forged == 1
    # a's honest chunk copied under b's key: another namespace, refused from the header
    a = make_engine(config, ns_a)
    a.store(tokens, _kv(layout, 8))
    a.flush()
    with server.client() as client:
        honest = client.get(a.tiers.tiers[-1].redis_key(chunk_spans(ns_a, tokens, C)[0].key))
        client.set(b_l3.redis_key(chunk.key), honest)
    assert b.retrieve(tokens).num_tokens == 0 and b_l3.stats().forged == 2
    # in one process (one policy, both tenants registered) a's key still cannot sign for b
    both = ChunkPolicy(Secret(SECRET.encode()))
    both.register(ns_a.digest, "a", layout, C)
    both.register(ns_b.digest, "b", layout, C)
    with pytest.raises(ChunkAuthError, match="MAC mismatch"):
        decode(signed_with_a, policy=both)
    assert decode(encode(chunk, policy=both), policy=both).key == chunk.key


def test_forged_file_on_a_shared_disk_folder_is_refused(tmp_path, secret_file, make_engine, namespace, layout) -> None:
    tokens = _tokens(8, 4)
    chunk, value = _forged(namespace, tokens)
    path = chunk_path(tmp_path / "chunks", chunk.key, None)
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_bytes(value)  # planted by someone who can write to the folder
    engine = make_engine(_config(tmp_path, **{"security.secret_file": str(secret_file)}), namespace)
    disk = engine.tiers.tiers[-1]
    assert engine.lookup(tokens).num_tokens == C  # the index knows the name; the read must judge it
    assert engine.retrieve(tokens).num_tokens == 0
    assert disk.stats().forged == 1 and not path.exists()
    kv = _kv(layout, 8, 5)
    engine.store(tokens, kv)
    engine.flush()
    assert torch.equal(torch.stack(engine.retrieve(tokens).layers), kv)


def test_rotation_reads_chunks_of_an_old_secret_only_while_it_is_listed(
    tmp_path, make_engine, namespace, layout
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text(OLD_SECRET)
    new.write_text(SECRET)
    tokens, kv = _tokens(8, 6), _kv(layout, 8, 6)
    writer = make_engine(_config(tmp_path, **{"security.secret_file": str(old)}), namespace)
    writer.store(tokens, kv)
    writer.close()
    rotated = _config(tmp_path, **{"security.secret_file": str(new), "security.old_secret_files": f'["{old}"]'})
    assert make_engine(rotated, namespace).retrieve(tokens).num_tokens == 8
    dropped = make_engine(_config(tmp_path, **{"security.secret_file": str(new)}), namespace)
    assert dropped.retrieve(tokens).num_tokens == 0 and dropped.tiers.tiers[-1].stats().forged == 2  # both read


def test_unsigned_chunks_read_only_without_a_secret(tmp_path, secret_file, make_engine, namespace, layout) -> None:
    tokens, kv = _tokens(8, 7), _kv(layout, 8, 7)
    plain = make_engine(_config(tmp_path), namespace)
    plain.store(tokens, kv)
    plain.close()
    assert make_engine(_config(tmp_path), namespace).retrieve(tokens).num_tokens == 8
    signed = make_engine(_config(tmp_path, **{"security.secret_file": str(secret_file)}), namespace)
    assert signed.retrieve(tokens).num_tokens == 0 and signed.tiers.tiers[-1].stats().forged == 2  # both read


def test_secret_settings_are_checked_and_never_shown(tmp_path, monkeypatch, namespace) -> None:
    from kvtier.errors import ConfigError
    from kvtier.storage.builder import chunk_policy

    short = tmp_path / "short"
    short.write_text("tiny")
    with pytest.raises(ConfigError, match="too short"):
        chunk_policy(_config(tmp_path, **{"security.secret_file": str(short)}))
    with pytest.raises(ConfigError, match="KVT_NOPE is unset"):
        chunk_policy(_config(tmp_path, **{"security.secret_env": "KVT_NOPE"}))
    with pytest.raises(ConfigError, match="not both"):
        _config(tmp_path, **{"security.secret_env": "X", "security.secret_file": str(short)})
    monkeypatch.setenv("KVT_SECRET", SECRET)
    config = _config(tmp_path, **{"security.secret_env": "KVT_SECRET"})
    policy = chunk_policy(config)
    assert policy.signs and SECRET not in repr(policy) + repr(config) + str(config.model_dump())


# -- encryption at rest ------------------------------------------------------------------------------------------


def test_encrypted_chunks_on_disk_hide_the_kv_and_open_only_with_the_tenants_key(
    tmp_path, secret_file, make_engine, layout
) -> None:
    ns = Namespace("m", layout, tenant="a")
    tokens = _tokens(8, 11)
    kv = torch.full((layout.num_layers, 2, layout.num_kv_heads, 8, layout.head_dim), 0.5)  # a recognisable payload
    encrypting = {"security.secret_file": str(secret_file), "security.encrypt": "true"}
    writer = make_engine(_config(tmp_path, **encrypting), ns)
    writer.store(tokens, kv)
    writer.flush()
    files = sorted((tmp_path / "chunks").glob("*/*.kvc"))
    assert len(files) == 2
    plain_kv = kv[:, :, :, :C].contiguous().numpy().tobytes()
    for path in files:
        data = path.read_bytes()
        assert decode_header(data[:4096], policy=writer.tiers.policy).payload_len == len(plain_kv) + 28
        assert plain_kv[:64] not in data  # the KV is not there in clear
    # the same secret reads it back (encrypting or not); without the secret, or as another tenant: refused
    reader = make_engine(_config(tmp_path, **{"security.secret_file": str(secret_file)}), ns)
    got = reader.retrieve(tokens)
    assert got.num_tokens == 8 and torch.equal(torch.stack(got.layers), kv)
    with pytest.raises(ChunkAuthError, match="no key for it here"):
        decode(files[0].read_bytes())
    other = ChunkPolicy(Secret(SECRET.encode()))
    other.register(ns.digest, "b", layout, C)  # b's keys for a's namespace
    with pytest.raises(ChunkAuthError):
        decode(files[0].read_bytes(), policy=other)


@needs_redis
def test_encrypted_chunks_in_redis_round_trip(server, tmp_path, secret_file, make_engine, namespace, layout) -> None:
    with server.client() as client:
        client.flushall()
    config = _config(
        tmp_path, redis_url=server.url, **{"security.secret_file": str(secret_file), "security.encrypt": "true"}
    )
    engine = make_engine(config, namespace)
    tokens, kv = _tokens(8, 12), _kv(layout, 8, 12)
    engine.store(tokens, kv)
    engine.flush()
    with server.client() as client:
        value = client.get(engine.tiers.tiers[-1].redis_key(chunk_spans(namespace, tokens, C)[0].key))
    assert kv[:, :, :, :C].contiguous().numpy().tobytes()[:64] not in value
    again = make_engine(config, namespace)
    got = again.retrieve(tokens)
    assert got.num_tokens == 8 and torch.equal(torch.stack(got.layers), kv)
    plain = make_engine(_config(tmp_path, redis_url=server.url), namespace)  # no secret: cannot open them
    assert plain.retrieve(tokens).num_tokens == 0 and plain.tiers.tiers[-1].stats().forged == 2
