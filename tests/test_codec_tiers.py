"""Codecs in the chunk format and the tiers: the header names the codec, readers follow the header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_chunk import v1_blob

from kvtier.chunk import Chunk, decode, decode_header, encode
from kvtier.codec import StagedCodec, get_codec
from kvtier.codec.int8 import Int8
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ChunkFormatError, ChunkVersionError, ConfigError
from kvtier.keys import Namespace, chunk_spans
from kvtier.layout import KVLayout


@pytest.fixture
def big_ns() -> Namespace:
    """A layout whose chunks are large next to their header, as real ones are."""
    return Namespace("codec-test-model", KVLayout(num_layers=2, num_kv_heads=2, head_dim=64))


def _chunk(namespace: Namespace, n: int = 16) -> Chunk:
    tokens = np.arange(n, dtype="<u4")
    span = chunk_spans(namespace, tokens, n)[0]
    payload = torch.randn(namespace.layout.chunk_shape(n), generator=torch.Generator().manual_seed(1))
    return Chunk(span.key, None, namespace.digest, namespace.layout, tokens, payload)


@pytest.mark.parametrize("spec", ["raw+zstd", "fp16", "bf16", "int8", "int8+zstd", "fp8", "int4+lz4"])
def test_encoded_chunk_names_its_codec_and_decodes(namespace: Namespace, spec: str) -> None:
    chunk = _chunk(namespace)
    data = encode(chunk, get_codec(spec))
    back = decode(bytearray(data))
    assert back.codec == spec
    assert back.key == chunk.key and np.array_equal(back.tokens, chunk.tokens)
    assert back.payload.shape == chunk.payload.shape and back.payload.dtype == chunk.payload.dtype
    err = (back.payload - chunk.payload).abs().max().item()
    assert err == 0.0 if not get_codec(spec).lossy else err < 0.5


class _FutureInt8(Int8):
    """An int8 layout this version does not know (a base id from the future)."""

    ident = 99


def test_unknown_codec_in_header_is_a_format_error(namespace: Namespace) -> None:
    future = encode(_chunk(namespace), StagedCodec(_FutureInt8()))  # a valid chunk, checksum and all
    assert future[13] == 99
    with pytest.raises(ChunkFormatError, match="unknown codec"):
        decode_header(future)
    with pytest.raises(ChunkFormatError, match="unknown codec"):
        decode(bytearray(future))


def test_body_of_another_codec_is_a_format_error(namespace: Namespace) -> None:
    chunk = _chunk(namespace)
    fp16 = encode(chunk, get_codec("fp16"))
    # the fp16 body under a header that names bf16 (same length): the checksum covers the header's codec ids
    forged = bytearray(fp16)
    assert forged[13] == get_codec("fp16").base_id
    forged[13] = get_codec("bf16").base_id
    assert decode_header(forged).codec == "bf16"
    with pytest.raises(ChunkFormatError, match="checksum"):
        decode(forged)


def test_config_rejects_unknown_codec(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"l2\.codec"):
        load_config(env={}, overrides={"l2.codec": "int3"})
    assert load_config(env={}, overrides={"l2.codec": "INT8+ZSTD"}).l2.codec == "int8+zstd"


def _engine(tmp_path: Path, namespace: Namespace, **overrides: object) -> CacheEngine:
    values = {"cache_dir": str(tmp_path), "chunk_size": 16, **overrides}
    return CacheEngine.from_config(load_config(env={}, overrides=values), namespace).start()


def test_disk_codec_shrinks_files_and_any_reader_decodes_them(tmp_path: Path, big_ns: Namespace) -> None:
    tokens = np.arange(64)
    kv = torch.randn(big_ns.layout.chunk_shape(64))
    with _engine(tmp_path / "raw", big_ns) as raw:
        raw.store(tokens, kv)
    with _engine(tmp_path / "int8", big_ns, **{"l2.codec": "int8"}) as q:
        q.store(tokens, kv)
    raw_bytes = sum(p.stat().st_size for p in (tmp_path / "raw").rglob("*.kvc"))
    int8_bytes = sum(p.stat().st_size for p in (tmp_path / "int8").rglob("*.kvc"))
    assert int8_bytes < 0.4 * raw_bytes
    # a reader configured with another codec (raw, L1 off) still decodes what the header names
    with _engine(tmp_path / "int8", big_ns, **{"l1.enabled": False}) as reader:
        hit = reader.retrieve(tokens)
    assert hit.num_tokens == 64 and hit.tier_tokens["l2"] == 64
    got = torch.stack(hit.layers)
    assert 0 < (got - kv).abs().max().item() < 0.1


def test_l1_codec_holds_encoded_chunks_within_budget(tmp_path: Path, big_ns: Namespace) -> None:
    tokens = np.arange(64)
    kv = torch.randn(big_ns.layout.chunk_shape(64))
    with _engine(tmp_path, big_ns, **{"l1.codec": "fp16", "l2.enabled": False}) as engine:
        engine.store(tokens, kv)
        stats = engine.tiers.stats()[0]
        hit = engine.retrieve(tokens)
    assert stats.entries == 4
    assert stats.used_bytes < 0.6 * kv.nbytes
    got = torch.stack(hit.layers)
    assert torch.allclose(got, kv, rtol=1e-3, atol=1e-3)


def _rewrite_chunk_files(root: Path, write) -> int:
    """Rewrite every chunk file under ``root`` as ``write(chunk)`` (same key, tokens and KV); returns the count."""
    files = sorted(root.rglob("*.kvc"))
    for path in files:
        path.write_bytes(write(decode(bytearray(path.read_bytes()))))
    return len(files)


def test_chunk_files_of_format_1_are_a_miss(tmp_path: Path, big_ns: Namespace) -> None:
    """Files an older kvtier wrote (JSON header, format 1) are refused as another version: a miss, no exception."""
    tokens = np.arange(64)
    kv = torch.randn(big_ns.layout.chunk_shape(64))
    with _engine(tmp_path, big_ns, **{"l1.enabled": False}) as writer:
        writer.store(tokens, kv)
    assert _rewrite_chunk_files(tmp_path, v1_blob) == 4
    with pytest.raises(ChunkVersionError, match="version 1"):
        decode(next(tmp_path.rglob("*.kvc")).read_bytes())
    with _engine(tmp_path, big_ns, **{"l1.enabled": False}) as reader:
        hit = reader.retrieve(tokens)
    assert hit.num_tokens == 0


def test_chunk_with_unknown_codec_layout_is_a_clean_counted_miss(tmp_path: Path, big_ns: Namespace) -> None:
    """A chunk whose header names a codec layout this version lacks is dropped and counted, never decoded."""
    tokens = np.arange(64)
    kv = torch.randn(big_ns.layout.chunk_shape(64))
    chunk = _chunk(big_ns)
    with pytest.raises(ChunkFormatError, match="unknown codec"):
        decode(bytearray(encode(chunk, StagedCodec(_FutureInt8()))))
    with _engine(tmp_path, big_ns, **{"l2.codec": "int8", "l1.enabled": False}) as writer:
        writer.store(tokens, kv)
    assert _rewrite_chunk_files(tmp_path, lambda c: encode(c, StagedCodec(_FutureInt8()))) == 4
    with _engine(tmp_path, big_ns, **{"l2.codec": "raw", "l1.enabled": False}) as reader:
        hit = reader.retrieve(tokens)
        disk = reader.tiers.stats()[0]
    assert hit.num_tokens == 0
    assert disk.corrupt >= 1  # the first chunk is read, refused and dropped; its children are unreachable
