"""A chunk: the KV of one token span plus the header that proves what it is.

In memory a :class:`Chunk` holds its payload as a tensor. On disk or on the
wire it is ``encode``-d into::

    b"KVTC" | u16 version | u32 header length | JSON header | payload bytes

The JSON header holds the key, parent key, namespace digest, layout, codec,
token ids, payload length and an xxh3-128 checksum of the payload bytes. The
codec is a property of the *stored* form: ``raw`` means the payload's own bytes
(written and read without a copy); any other name is a :mod:`kvtier.codec`
spec (``int8+zstd``…) and the payload bytes are that codec's output. A reader
decodes whatever codec the header names, whatever codec it writes with itself;
a name it does not know is a ChunkFormatError (a miss), never a guess.
``decode`` checks the framing, length and checksum; :meth:`Chunk.mismatch` checks that a
chunk is the one the caller asked for (key, tokens, namespace, layout). A
chunk that fails either is never handed to an engine.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kvtier.codec import Codec, CodecError, get_codec
from kvtier.errors import ChunkFormatError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout

MAGIC = b"KVTC"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
MAX_HEADER_BYTES = 1 << 22
PREFIX_BYTES = _PREFIX.size
CODEC_RAW = "raw"


def payload_checksum(data: memoryview | bytes) -> str:
    """Checksum of payload bytes, as written in the header."""
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True, eq=False)
class Chunk:
    """The KV of tokens [start, start+n) of some prefix.

    ``payload`` is [L, 2, H, n, D] in ``layout.dtype``, contiguous. A chunk is
    immutable by contract: nobody writes into ``payload`` after construction,
    so tiers and readers may share it without copying.
    """

    key: ChunkKey
    parent: ChunkKey | None
    namespace: bytes
    layout: KVLayout
    tokens: np.ndarray  # [n] uint32
    payload: torch.Tensor
    codec: str = CODEC_RAW

    def __post_init__(self) -> None:
        expected = self.layout.chunk_shape(len(self.tokens))
        if tuple(self.payload.shape) != expected or self.payload.dtype != self.layout.torch_dtype:
            raise ValueError(
                f"payload {tuple(self.payload.shape)} {self.payload.dtype} does not fit {expected} {self.layout.dtype}"
            )
        if not self.payload.is_contiguous():
            raise ValueError("chunk payload must be contiguous")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes this chunk occupies in memory (payload plus token ids)."""
        return self.payload.nbytes + self.tokens.nbytes

    def mismatch(self, key: ChunkKey, tokens: np.ndarray, namespace: bytes, layout: KVLayout) -> str | None:
        """Why this chunk is not the expected one, or None if it is."""
        if self.key != key:
            return "key"
        if self.namespace != namespace:
            return "namespace"
        if self.layout != layout:
            return "layout"
        if not np.array_equal(self.tokens, tokens):
            return "tokens"
        return None


def _header(chunk: Chunk, payload: memoryview | bytes, codec: str) -> bytes:
    return json.dumps(
        {
            "key": chunk.key.hex(),
            "parent": chunk.parent.hex() if chunk.parent is not None else None,
            "namespace": chunk.namespace.hex(),
            "layout": chunk.layout.to_dict(),
            "codec": codec,
            "tokens": chunk.tokens.tolist(),
            "payload_len": len(payload),
            "checksum": payload_checksum(payload),
        },
        separators=(",", ":"),
    ).encode()


def payload_view(chunk: Chunk) -> memoryview:
    """The payload's bytes without copying (valid while ``chunk`` lives)."""
    return memoryview(chunk.payload.view(torch.uint8).reshape(-1).numpy())


def encode_parts(chunk: Chunk, codec: Codec | None = None) -> tuple[bytes, memoryview | bytes]:
    """(framing + header, payload bytes) of the stored form of ``chunk``.

    Without a codec, or with ``raw``, the payload bytes are a view of the
    chunk's own memory (no copy; valid while the chunk lives). Otherwise they
    are the codec's output (new bytes). CPU cost: one checksum pass, plus the
    codec's encode.
    """
    if codec is None or codec.name == CODEC_RAW:
        body: memoryview | bytes = payload_view(chunk)
        name = CODEC_RAW
    else:
        body, name = codec.encode(chunk.payload), codec.name
    header = _header(chunk, body, name)
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header, body


def encode(chunk: Chunk, codec: Codec | None = None) -> bytes:
    """The whole encoded chunk as one bytes object."""
    header, body = encode_parts(chunk, codec)
    return b"".join((header, body))  # one copy of the body


@dataclass(frozen=True)
class ChunkHeader:
    """A parsed header; ``offset`` is where the payload starts in the encoded bytes."""

    key: ChunkKey
    parent: ChunkKey | None
    namespace: bytes
    layout: KVLayout
    codec: str
    tokens: np.ndarray
    payload_len: int
    checksum: str
    offset: int


def decode_header(prefix: bytes | memoryview) -> ChunkHeader:
    """Parse the header at the start of ``prefix``; raise ChunkFormatError if it is not one."""
    end = header_length(prefix)
    version = _PREFIX.unpack_from(prefix)[1]
    if version != VERSION:
        raise ChunkFormatError(f"unsupported chunk version {version}")
    if len(prefix) < end:
        raise ChunkFormatError("truncated header")
    try:
        h = json.loads(bytes(prefix[_PREFIX.size : end]))
        header = ChunkHeader(
            key=ChunkKey.from_hex(h["key"]),
            parent=ChunkKey.from_hex(h["parent"]) if h["parent"] is not None else None,
            namespace=bytes.fromhex(h["namespace"]),
            layout=KVLayout.from_dict(h["layout"]),
            codec=str(h["codec"]),
            tokens=_token_array(h["tokens"]),
            payload_len=int(h["payload_len"]),
            checksum=str(h["checksum"]),
            offset=end,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ChunkFormatError(f"malformed header: {exc}") from exc
    if header.codec == CODEC_RAW:
        expected = len(header.tokens) * header.layout.bytes_per_token
        if header.payload_len != expected:
            raise ChunkFormatError(f"payload length {header.payload_len} does not match layout ({expected})")
    else:
        try:
            get_codec(header.codec)
        except ValueError as exc:
            raise ChunkFormatError(f"unknown codec {header.codec!r}") from exc
    return header


def decode_payload(header: ChunkHeader, payload: bytearray | memoryview | bytes) -> Chunk:
    """Build a chunk from its header and payload bytes, verifying length and checksum.

    With the ``raw`` codec the returned tensor shares ``payload`` (no copy), so
    the chunk keeps that memory alive; read-only memory (``bytes`` received
    from a network client) is shared too, which is safe because a chunk's
    payload is never written (see :class:`Chunk`).
    """
    if len(payload) != header.payload_len:
        raise ChunkFormatError(f"payload is {len(payload)} bytes, header says {header.payload_len}")
    if payload_checksum(payload) != header.checksum:
        raise ChunkFormatError("payload checksum mismatch")
    dtype = header.layout.torch_dtype
    shape = header.layout.chunk_shape(len(header.tokens))
    if header.codec == CODEC_RAW:
        if not len(payload):
            flat = torch.empty(0, dtype=dtype)
        else:
            with warnings.catch_warnings():  # torch warns on read-only buffers; chunks are never written
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(payload, dtype=dtype)
        tensor = flat.view(shape)
    else:
        try:
            tensor = get_codec(header.codec).decode(payload, shape, dtype)
        except (CodecError, ValueError) as exc:
            raise ChunkFormatError(f"{header.codec} payload does not decode: {exc}") from exc
    return Chunk(
        key=header.key,
        parent=header.parent,
        namespace=header.namespace,
        layout=header.layout,
        tokens=header.tokens,
        payload=tensor,
        codec=header.codec,
    )


def _token_array(values: object) -> np.ndarray:
    if not isinstance(values, list) or not all(isinstance(v, int) and 0 <= v < 2**32 for v in values):
        raise ValueError("tokens must be a list of ids in [0, 2**32)")
    return np.asarray(values, dtype="<u4")


def header_length(prefix: bytes | memoryview) -> int:
    """Total bytes of framing + header, read from the first ``PREFIX_BYTES`` of an encoded chunk."""
    if len(prefix) < _PREFIX.size:
        raise ChunkFormatError("truncated before header")
    magic, _version, hlen = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise ChunkFormatError("bad magic")
    if hlen > MAX_HEADER_BYTES:
        raise ChunkFormatError("header too large")
    return _PREFIX.size + hlen


def decode(data: bytes | bytearray) -> Chunk:
    """Decode a whole encoded chunk (copies ``data`` if it is immutable bytes)."""
    header = decode_header(memoryview(data)[: _PREFIX.size + MAX_HEADER_BYTES])
    body = memoryview(data if isinstance(data, bytearray) else bytearray(data))[header.offset :]
    return decode_payload(header, body)
