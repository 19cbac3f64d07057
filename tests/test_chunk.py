"""kvtier.chunk: the binary chunk format (v2), its validation and error cases, and Chunk's own checks."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch
import xxhash
from conftest import v1_blob

from kvtier.chunk import (
    HEADER_BYTES,
    MAGIC,
    MAX_PAYLOAD_BYTES,
    MAX_TOKENS,
    PREFIX_BYTES,
    VERSION,
    Chunk,
    decode,
    decode_header,
    decode_payload,
    encode,
    encode_parts,
    header_length,
    payload_view,
)
from kvtier.codec import StagedCodec, get_codec
from kvtier.errors import ChunkFormatError, ChunkVersionError
from kvtier.keys import Namespace, chunk_spans
from kvtier.layout import KVLayout

# the documented layout (docs/codecs.md, kvtier/chunk.py), written out independently of the module
FIELDS = struct.Struct("<4sHHIBBBBIIIIQQ32s32s32s32s")
NAMES = (
    "magic version flags tokens dtype base lossless shuffle layers heads dim reserved stage_len body_len "
    "key parent namespace mac"
).split()
CHECKSUM_AT = 176


def _chunk(layout: KVLayout, *, n: int = 4, index: int = 0, seed: int = 0, dtype: str | None = None) -> Chunk:
    if dtype is not None:
        layout = KVLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim, dtype)
    ns = Namespace("chunk-test", layout)
    tokens = np.arange(100, 100 + n * (index + 1), dtype="<u4")
    span = chunk_spans(ns, tokens, n)[index]
    gen = torch.Generator().manual_seed(seed)
    payload = torch.randn(layout.chunk_shape(n), generator=gen).to(layout.torch_dtype)
    return Chunk(span.key, span.parent, ns.digest, layout, tokens[span.start : span.end].copy(), payload)


def _parse(data: bytes) -> tuple[dict, bytes, bytes, bytes]:
    """(fields, checksum, token bytes, body) of an encoded chunk, by the documented layout."""
    fields = dict(zip(NAMES, FIELDS.unpack_from(data), strict=True))
    end = HEADER_BYTES + 4 * fields["tokens"]
    return fields, data[CHECKSUM_AT:HEADER_BYTES], data[HEADER_BYTES:end], data[end:]


def _checksum(fields: bytes, tokens: bytes, body: bytes) -> bytes:
    return xxhash.xxh3_128_digest(fields + tokens + body)


def forge(data: bytes, *, body: bytes | None = None, token_bytes: bytes | None = None, **changes: object) -> bytes:
    """``data`` with header fields, token ids or body replaced, its checksum made valid again.

    A new body or new token ids set the body length or token count to match unless ``changes`` says otherwise.
    """
    fields, _, tokens, old_body = _parse(data)
    if body is not None:
        fields["body_len"] = len(body)
    if token_bytes is not None:
        fields["tokens"] = len(token_bytes) // 4
    fields.update(changes)
    packed = FIELDS.pack(*(fields[n] for n in NAMES))
    body = old_body if body is None else body
    tokens = tokens if token_bytes is None else token_bytes
    return packed + _checksum(packed, tokens, body) + tokens + body


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


SPECS = ["raw", "raw+zstd", "fp16", "bf16", "int8", "int8+zstd", "fp8", "int4", "int4+lz4"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_codec_round_trips_through_the_format(spec: str, dtype: str) -> None:
    wide = KVLayout(2, 2, 64, dtype)
    chunk = _chunk(wide, n=20, index=1, dtype=dtype)
    codec = get_codec(spec)
    data = encode(chunk, codec)
    back = decode(bytearray(data))
    assert back.codec == spec == decode_header(data).codec
    assert back.payload.shape == chunk.payload.shape and back.payload.dtype == chunk.payload.dtype
    # the body is exactly the codec's output: no second frame, and it decodes on its own
    _, _, _, body = _parse(data)
    assert body == bytes(codec.encode(chunk.payload))
    assert torch.equal(back.payload, codec.decode(body, chunk.payload.shape, chunk.payload.dtype))
    if not codec.lossy:
        assert torch.equal(back.payload, chunk.payload)


def test_encoding_layout(layout: KVLayout) -> None:
    chunk = _chunk(layout, index=1)
    data = encode(chunk)
    header, body = encode_parts(chunk)
    assert data == header + bytes(body)
    fields, checksum, tokens, payload = _parse(data)
    assert fields == {
        "magic": b"KVTC",
        "version": 2,
        "flags": 1,  # has a parent
        "tokens": 4,
        "dtype": 1,
        "base": 1,
        "lossless": 0,
        "shuffle": 1,
        "layers": 2,
        "heads": 2,
        "dim": 4,
        "reserved": 0,
        "stage_len": 512,
        "body_len": 512,
        "key": chunk.key.digest,
        "parent": chunk.parent.digest,
        "namespace": chunk.namespace,
        "mac": bytes(32),
    }
    assert tokens == struct.pack("<4I", 104, 105, 106, 107)
    assert payload == chunk.payload.numpy().tobytes()
    assert checksum == _checksum(data[:CHECKSUM_AT], tokens, payload)
    assert len(header) == HEADER_BYTES + 16 == decode_header(data).offset == header_length(data[:PREFIX_BYTES])


def test_body_has_no_codec_frame(layout: KVLayout) -> None:
    chunk = _chunk(layout, n=6, dtype="float32")
    n_bytes = 6 * layout.bytes_per_token
    assert len(encode(chunk)) - decode_header(encode(chunk)).offset == n_bytes  # raw: tokens * bytes_per_token
    assert decode_header(encode(chunk, get_codec("raw"))).payload_len == n_bytes
    assert decode_header(encode(chunk, get_codec("fp16"))).payload_len == n_bytes // 2
    assert decode_header(encode(chunk, get_codec("bf16"))).payload_len == n_bytes // 2
    assert len(get_codec("fp16").encode(chunk.payload)) == n_bytes // 2


def test_root_chunk_has_zero_parent_and_no_flag(layout: KVLayout) -> None:
    fields, *_ = _parse(encode(_chunk(layout, index=0)))
    assert fields["flags"] == 0 and fields["parent"] == bytes(32)


def test_decode_header_offset_and_decode_payload(layout: KVLayout) -> None:
    chunk = _chunk(layout)
    data = encode(chunk)
    header = decode_header(data)
    assert header.offset == len(encode_parts(chunk)[0])
    assert header.payload_len == 512
    assert header.tokens.tolist() == chunk.tokens.tolist()
    back = decode_payload(header, bytearray(data[header.offset :]))
    assert torch.equal(back.payload, chunk.payload)


def test_raw_is_zero_copy_both_ways(layout: KVLayout) -> None:
    chunk = _chunk(layout)
    _, body = encode_parts(chunk)
    assert isinstance(body, memoryview)
    assert np.frombuffer(body, np.uint8).ctypes.data == chunk.payload.data_ptr()  # written from the chunk's memory
    data = encode(chunk)
    header = decode_header(data)
    buf = bytearray(data[header.offset :])
    back = decode_payload(header, buf)
    assert back.payload.data_ptr() == np.frombuffer(buf, np.uint8).ctypes.data  # read into the caller's buffer
    frozen = bytes(buf)
    assert torch.equal(decode_payload(header, memoryview(frozen)).payload, chunk.payload)  # read-only: shared too


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


def test_payload_view_is_the_payload(layout: KVLayout) -> None:
    chunk = _chunk(layout)
    assert bytes(payload_view(chunk)) == chunk.payload.numpy().tobytes()


# -- damage: every byte, truncation, padding ------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["raw", "fp16", "int8+zstd", "int4", "fp8+lz4"])
@pytest.mark.parametrize("index", [0, 1], ids=["root", "child"])
def test_every_flipped_header_or_token_byte_is_a_format_error(layout: KVLayout, spec: str, index: int) -> None:
    chunk = _chunk(KVLayout(2, 2, 16), n=5, index=index)
    data = encode(chunk, get_codec(spec))
    offset = decode_header(data).offset
    assert offset == HEADER_BYTES + 20
    for i in range(offset):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[i] ^= mask
            with pytest.raises(ChunkFormatError):
                decode(damaged)


@pytest.mark.parametrize("spec", ["raw", "fp16", "int8", "int4+zstd"])
def test_flipped_body_bytes_are_format_errors(spec: str) -> None:
    data = encode(_chunk(KVLayout(2, 2, 16), n=5), get_codec(spec))
    for i in range(decode_header(data).offset, len(data), 3):
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        with pytest.raises(ChunkFormatError, match="checksum"):
            decode(damaged)


@pytest.mark.parametrize("spec", ["raw", "int8+zstd"])
def test_truncated_or_padded_data_is_a_format_error(layout: KVLayout, spec: str) -> None:
    data = encode(_chunk(layout, index=1), get_codec(spec))
    for cut in range(len(data)):
        with pytest.raises(ChunkFormatError):
            decode(data[:cut])
    for extra in (b"\0", b"\0" * 100, data):
        with pytest.raises(ChunkFormatError, match="payload is"):
            decode(data + extra)


def test_decode_empty_input() -> None:
    with pytest.raises(ChunkFormatError, match="truncated before header"):
        decode(b"")


# -- forged headers (valid checksum): validation alone must refuse them ----------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"magic": b"KVTD"}, "bad magic"),
        ({"dtype": 0}, "unknown dtype"),
        ({"dtype": 4}, "unknown dtype"),
        ({"layers": 0}, "malformed header"),
        ({"dim": 0}, "malformed header"),
        ({"reserved": 1}, "reserved"),
        ({"mac": b"\1" * 32}, "reserved"),
        ({"flags": 0}, "reserved"),  # no parent flag, but parent bytes set
        ({"base": 4}, "unknown codec"),  # retired int8 v1
        ({"base": 6}, "unknown codec"),  # retired int4 v1
        ({"base": 7}, "unknown codec"),  # retired int8 v2
        ({"base": 99}, "unknown codec"),
        ({"lossless": 3}, "unknown codec"),
        ({"shuffle": 4}, "shuffled by 4"),
        ({"stage_len": 513}, "513 bytes"),
        ({"body_len": 516}, "payload length 516 does not match"),
        ({"tokens": 3}, r"raw makes \(384"),  # fewer tokens than the body holds
        ({"heads": 1}, r"raw makes \(256"),
        ({"dtype": 2}, r"raw makes \(256"),  # float16: half the bytes
    ],
)
def test_forged_header_is_refused(layout: KVLayout, changes: dict, message: str) -> None:
    data = forge(encode(_chunk(layout, index=1)), **changes)
    with pytest.raises(ChunkFormatError, match=message):
        decode_header(data)
    with pytest.raises(ChunkFormatError, match=message):
        decode(data)


def test_forged_body_length_checked_against_the_codec() -> None:
    chunk = _chunk(KVLayout(2, 2, 16), n=8)
    data = encode(chunk, get_codec("int8"))
    assert decode(data).codec == "int8"
    body = _parse(data)[3]
    for bad in (body[:-1], body + b"\0"):
        with pytest.raises(ChunkFormatError, match="payload length"):
            decode_header(forge(data, body=bad, body_len=len(bad)))
    zero_tokens = Chunk(chunk.key, None, chunk.namespace, chunk.layout, chunk.tokens[:0], chunk.payload[:, :, :, :0])
    with pytest.raises(ChunkFormatError, match="zero-token"):
        decode_header(forge(encode(zero_tokens), base=9))


@pytest.mark.parametrize(
    "changes",
    [
        {"layers": 2**32 - 1, "heads": 2**32 - 1, "dim": 2**32 - 1},  # raw: the body must be the whole payload
        {"layers": 1 << 20, "stage_len": 0},
        {"tokens": MAX_TOKENS + 1},
        {"tokens": 2**32 - 1},
    ],
)
def test_huge_claims_with_a_tiny_body_are_refused_before_any_allocation(layout: KVLayout, changes: dict) -> None:
    data = forge(encode(_chunk(layout)), **changes)
    tracemalloc.start()
    try:
        with pytest.raises(ChunkFormatError):
            decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_huge_compressed_claims_are_refused_before_decompressing(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object) -> None:
        raise AssertionError("the codec was asked to decode")

    monkeypatch.setattr(StagedCodec, "decode", never)
    small = KVLayout(2, 2, 16)
    data = encode(_chunk(small, n=8), get_codec("int8+zstd"))
    fields, _, _, body = _parse(data)
    n = MAX_TOKENS  # int8 writes ~140 MB for this many tokens: no zstd frame of a few hundred bytes holds that
    stage = get_codec("int8").stage_size(small.chunk_shape(n), torch.float32)
    assert len(body) < stage >> 16
    with pytest.raises(ChunkFormatError, match="payload length"):
        decode(forge(data, token_bytes=bytes(4 * n), stage_len=stage))
    with pytest.raises(ChunkFormatError, match="payload length"):  # far above zstd's bound for the stage output
        decode(forge(data, body=bytes(2 * fields["stage_len"] + 2048)))
    # and the payload a header may claim at all is capped, whatever the body
    big = forge(encode(_chunk(KVLayout(1, 1, 1))), layers=1 << 20, heads=1 << 10)
    with pytest.raises(ChunkFormatError, match="at most"):
        decode_header(big)
    assert MAX_PAYLOAD_BYTES <= 1 << 31


# -- other format versions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_format_1_chunk_is_a_version_error(layout: KVLayout, index: int) -> None:
    blob = v1_blob(_chunk(layout, index=index))
    for call in (decode, decode_header, lambda b: header_length(b[:PREFIX_BYTES]), lambda b: header_length(b[:6])):
        with pytest.raises(ChunkVersionError, match="version 1"):
            call(blob)
    assert issubclass(ChunkVersionError, ChunkFormatError)


def test_newer_version_and_unknown_flags_are_version_errors(layout: KVLayout) -> None:
    data = encode(_chunk(layout, index=1))
    assert VERSION == 2 and MAGIC == b"KVTC"
    with pytest.raises(ChunkVersionError, match="version 3"):
        decode(forge(data, version=3))
    for flag in (8, 0x8000):  # bits a later format may set
        with pytest.raises(ChunkVersionError, match="flags"):
            decode(forge(data, flags=1 | flag))


def test_encode_rejects_what_the_format_cannot_hold(layout: KVLayout) -> None:
    chunk = _chunk(layout)
    short = Chunk(chunk.key, None, b"x" * 16, layout, chunk.tokens, chunk.payload)
    with pytest.raises(ValueError, match="namespace digest"):
        encode(short)


def test_zero_token_chunk_round_trips_in_half_precision(layout: KVLayout) -> None:
    half = KVLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim, "float16")
    ns = Namespace("chunk-test", half)
    key = chunk_spans(ns, [1], 1)[0].key
    chunk = Chunk(
        key, None, ns.digest, half, np.zeros(0, dtype="<u4"), torch.zeros(half.chunk_shape(0), dtype=torch.float16)
    )
    data = encode(chunk)
    assert len(data) == HEADER_BYTES
    back = decode(data)
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
