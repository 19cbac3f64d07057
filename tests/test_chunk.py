"""kvtier.chunk: the encoded chunk format, its error cases, and Chunk's own checks."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from kvtier.chunk import (
    MAGIC,
    MAX_HEADER_BYTES,
    VERSION,
    Chunk,
    decode,
    decode_header,
    decode_payload,
    encode,
    encode_parts,
    payload_checksum,
)
from kvtier.errors import ChunkFormatError
from kvtier.keys import Namespace, chunk_spans
from kvtier.layout import KVLayout

PREFIX = struct.Struct("<4sHI")


def _chunk(layout: KVLayout, *, n: int = 4, index: int = 0, seed: int = 0, dtype: str | None = None) -> Chunk:
    if dtype is not None:
        layout = KVLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim, dtype)
    ns = Namespace("chunk-test", layout)
    tokens = np.arange(100, 100 + n * (index + 1), dtype="<u4")
    span = chunk_spans(ns, tokens, n)[index]
    gen = torch.Generator().manual_seed(seed)
    payload = torch.randn(layout.chunk_shape(n), generator=gen).to(layout.torch_dtype)
    return Chunk(span.key, span.parent, ns.digest, layout, tokens[span.start : span.end].copy(), payload)


def _split(data: bytes) -> tuple[dict, bytes]:
    magic, version, hlen = PREFIX.unpack_from(data)
    assert (magic, version) == (MAGIC, VERSION)
    return json.loads(data[PREFIX.size : PREFIX.size + hlen]), data[PREFIX.size + hlen :]


def _frame(header: dict, payload: bytes, *, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return PREFIX.pack(magic, version, len(h)) + h + payload


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("index", [0, 2], ids=["root", "child"])
def test_round_trip(layout: KVLayout, dtype: str, index: int) -> None:
    chunk = _chunk(layout, index=index, dtype=dtype)
    data = encode(chunk)
    for form in (data, bytearray(data)):
        back = decode(form)
        assert back.key == chunk.key
        assert back.parent == chunk.parent
        assert (back.parent is None) == (index == 0)
        assert back.namespace == chunk.namespace
        assert back.layout == chunk.layout
        assert back.tokens.dtype == np.dtype("<u4")
        assert back.tokens.tolist() == chunk.tokens.tolist()
        assert back.payload.dtype == chunk.payload.dtype
        assert back.payload.shape == chunk.payload.shape
        assert torch.equal(back.payload, chunk.payload)
        assert back.codec == "raw"
        assert back.mismatch(chunk.key, chunk.tokens, chunk.namespace, chunk.layout) is None


def test_encoding_layout(layout: KVLayout) -> None:
    chunk = _chunk(layout, index=1)
    data = encode(chunk)
    header, body = encode_parts(chunk)
    assert data == header + bytes(body)
    header, payload = _split(data)
    assert payload == chunk.payload.numpy().tobytes()
    assert len(payload) == 4 * layout.bytes_per_token == 4 * 128
    assert header == {
        "key": chunk.key.hex(),
        "parent": chunk.parent.hex(),
        "namespace": chunk.namespace.hex(),
        "layout": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float32"},
        "codec": "raw",
        "tokens": [104, 105, 106, 107],
        "payload_len": 512,
        "checksum": payload_checksum(payload),
    }
    assert header["checksum"].startswith("xxh3_128:") and len(header["checksum"]) == 9 + 32


def test_decode_header_offset_and_decode_payload(layout: KVLayout) -> None:
    chunk = _chunk(layout)
    data = encode(chunk)
    header = decode_header(data)
    assert header.offset == len(encode_parts(chunk)[0])
    assert header.payload_len == 512
    back = decode_payload(header, bytearray(data[header.offset :]))
    assert torch.equal(back.payload, chunk.payload)


def test_decoded_payload_owns_its_memory(layout: KVLayout) -> None:
    chunk = _chunk(layout)
    buf = bytearray(encode(chunk))
    back = decode(bytes(buf))
    buf[-1] ^= 0xFF  # the bytes passed were immutable, so decode copied them
    assert torch.equal(back.payload, chunk.payload)


def test_nbytes(layout: KVLayout) -> None:
    chunk = _chunk(layout)
    assert chunk.num_tokens == 4
    assert chunk.nbytes == 512 + 4 * 4


# -- decode errors --------------------------------------------------------------------------------------------


def _bad_magic(data: bytes) -> bytes:
    return b"XXXX" + data[4:]


def _bad_version(data: bytes) -> bytes:
    return data[:4] + struct.pack("<H", VERSION + 1) + data[6:]


def _flip_payload_byte(data: bytes) -> bytes:
    b = bytearray(data)
    b[-7] ^= 0x01
    return bytes(b)


def _wrong_payload_len(data: bytes) -> bytes:
    header, payload = _split(data)
    header["payload_len"] += 4
    return _frame(header, payload + b"\0\0\0\0")


def _checksum_for_other_payload(data: bytes) -> bytes:
    header, payload = _split(data)
    header["checksum"] = payload_checksum(b"\0" * len(payload))
    return _frame(header, payload)


def _header_len_too_big(data: bytes) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, MAX_HEADER_BYTES + 1) + data[PREFIX.size :]


def _garbage_header(data: bytes) -> bytes:
    return _frame({"key": "zz"}, b"")  # type: ignore[arg-type]


def _not_json(data: bytes) -> bytes:
    junk = b"{not json"
    return PREFIX.pack(MAGIC, VERSION, len(junk)) + junk


def _missing_field(data: bytes) -> bytes:
    header, payload = _split(data)
    del header["checksum"]
    return _frame(header, payload)


def _bad_codec(data: bytes) -> bytes:
    header, payload = _split(data)
    header["codec"] = "zstd"
    return _frame(header, payload)


def _bad_layout(data: bytes) -> bytes:
    header, payload = _split(data)
    header["layout"]["num_layers"] = 0
    return _frame(header, payload)


def _tokens_disagree_with_payload(data: bytes) -> bytes:
    header, payload = _split(data)
    header["tokens"] = header["tokens"][:3]
    return _frame(header, payload)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_bad_magic, "bad magic"),
        (_bad_version, "unsupported chunk version 2"),
        (lambda d: d[:5], "truncated before header"),
        (lambda d: d[: PREFIX.size + 20], "truncated header"),
        (_header_len_too_big, "header too large"),
        (lambda d: d[:-1], "payload is 511 bytes, header says 512"),
        (lambda d: d + b"\0", "payload is 513 bytes, header says 512"),
        (_flip_payload_byte, "checksum"),
        (_checksum_for_other_payload, "checksum"),
        (_wrong_payload_len, "payload length 516 does not match layout"),
        (_tokens_disagree_with_payload, "payload length 512 does not match layout"),
        (_not_json, "malformed header"),
        (_garbage_header, "malformed header"),
        (_missing_field, "malformed header"),
        (_bad_codec, "unknown codec"),
        (_bad_layout, "malformed header"),
    ],
    ids=[
        "magic",
        "version",
        "truncated-prefix",
        "truncated-header",
        "header-len-too-big",
        "truncated-payload",
        "extra-payload-byte",
        "flipped-payload-byte",
        "wrong-checksum",
        "wrong-payload-len",
        "tokens-vs-payload",
        "not-json",
        "garbage-header",
        "missing-field",
        "codec",
        "layout",
    ],
)
def test_decode_rejects(layout: KVLayout, damage, message: str) -> None:
    data = damage(encode(_chunk(layout, index=1)))
    with pytest.raises(ChunkFormatError, match=message):
        decode(data)


def test_decode_empty_input() -> None:
    with pytest.raises(ChunkFormatError, match="truncated before header"):
        decode(b"")


def test_decode_rejects_negative_token_in_header(layout: KVLayout) -> None:
    header, payload = _split(encode(_chunk(layout)))
    header["tokens"][0] = -1
    with pytest.raises(ChunkFormatError):
        decode(_frame(header, payload))


def test_zero_token_chunk_round_trips_in_half_precision(layout: KVLayout) -> None:
    half = KVLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim, "float16")
    ns = Namespace("chunk-test", half)
    key = chunk_spans(ns, [1], 1)[0].key
    chunk = Chunk(
        key, None, ns.digest, half, np.zeros(0, dtype="<u4"), torch.zeros(half.chunk_shape(0), dtype=torch.float16)
    )
    back = decode(encode(chunk))
    assert back.payload.dtype == torch.float16
    assert back.payload.shape == half.chunk_shape(0)


# -- Chunk.mismatch -------------------------------------------------------------------------------------------


def test_mismatch_reasons(layout: KVLayout) -> None:
    chunk = _chunk(layout, index=1)
    other = _chunk(layout, index=2)
    key, tokens, ns, lay = chunk.key, chunk.tokens, chunk.namespace, chunk.layout
    assert chunk.mismatch(key, tokens.copy(), ns, lay) is None
    assert chunk.mismatch(other.key, tokens, ns, lay) == "key"
    assert chunk.mismatch(key, tokens, Namespace("other-model", layout).digest, lay) == "namespace"
    assert chunk.mismatch(key, tokens, ns, KVLayout(2, 2, 4, "float16")) == "layout"
    assert chunk.mismatch(key, tokens[::-1].copy(), ns, lay) == "tokens"
    assert chunk.mismatch(key, tokens[:3], ns, lay) == "tokens"
    # the key is checked first, then namespace, layout and tokens
    assert chunk.mismatch(other.key, tokens[:3], b"x" * 32, KVLayout(1, 1, 1)) == "key"
    assert chunk.mismatch(key, tokens[:3], b"x" * 32, KVLayout(1, 1, 1)) == "namespace"
    assert chunk.mismatch(key, tokens[:3], ns, KVLayout(1, 1, 1)) == "layout"


# -- Chunk construction ---------------------------------------------------------------------------------------


def test_chunk_rejects_wrong_payload(layout: KVLayout) -> None:
    good = _chunk(layout)
    args = (good.key, good.parent, good.namespace, layout, good.tokens)
    with pytest.raises(ValueError, match="does not fit"):
        Chunk(*args, torch.zeros(2, 2, 2, 3, 4))  # 3 tokens of payload, 4 token ids
    with pytest.raises(ValueError, match="does not fit"):
        Chunk(*args, torch.zeros(2, 2, 2, 4, 5))  # head_dim
    with pytest.raises(ValueError, match="does not fit"):
        Chunk(*args, torch.zeros(2, 2, 4, 4))  # missing a dim
    with pytest.raises(ValueError, match="does not fit"):
        Chunk(*args, torch.zeros(2, 2, 2, 4, 4, dtype=torch.float16))
    non_contiguous = torch.zeros(2, 2, 2, 4, 4).transpose(3, 4).contiguous().transpose(3, 4)
    assert non_contiguous.shape == (2, 2, 2, 4, 4) and not non_contiguous.is_contiguous()
    with pytest.raises(ValueError, match="contiguous"):
        Chunk(*args, non_contiguous)
    Chunk(*args, torch.zeros(2, 2, 2, 4, 4))  # the right one is accepted
