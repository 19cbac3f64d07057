"""The byte format every codec writes, and :class:`FramedCodec`, a base stage plus an optional lossless stage.

An encoded payload is a 64-byte little-endian header followed by the body::

    offset size field
         0    4 magic b"KVCD"
         4    1 format version (1)
         5    1 base stage id        (raw 1, fp16 2, bf16 3, fp8 5, int4 8, int8 9;
                                     4, 7 are earlier int8 layouts and 6 int4's, still decoded)
         6    1 lossless stage id    (none 0, zstd 1, lz4 2)
         7    1 shuffle element size (1: bytes not shuffled)
         8    1 payload dtype        (float32 1, float16 2, bfloat16 3)
         9    3 zero
        12   20 shape, 5 x u32       (L, 2, H, T, D)
        32    8 u64 base stage output length
        40    8 u64 body length      (equal to the above without a lossless stage)
        48   12 zero
        60    4 u32 CRC-32 of bytes 0..59

The CRC catches any damaged header byte (CRC-32 detects every burst of up to
32 bits); the recorded ids, dtype and shape must equal the decoding codec's and
the caller's (the base id may also be that of one of the base stage's
``legacy`` stages: an earlier layout of the same codec, decoded by that
stage); the lengths must equal what that stage produces for that shape and
the bytes actually present. A base id that is neither (a layout newer than
this code, or another codec's) raises CodecError, which the chunk reader
turns into a refused chunk: a counted miss, never a wrong tensor.
The body's integrity beyond that is the chunk checksum's job (zstd and lz4
frames also carry their own content checksums). The body starts 64 bytes in,
so a body in an aligned buffer is aligned for any element type.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from kvtier.codec.base import BaseStage, Buffer, CodecError, LosslessStage, Shape, check_payload, check_shape
from kvtier.codec.lossless import shuffle, unshuffle

MAGIC = b"KVCD"
VERSION = 1
_HEAD = struct.Struct("<4sBBBBB3x5IQQ12x")  # everything but the CRC
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEAD.size + _CRC.size  # 64

_DTYPE_IDS: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


class FramedCodec:
    """A :class:`~kvtier.codec.base.Codec`: ``base`` stage, then ``lossless`` stage if any, in the frame above.

    Immutable and stateless; safe to share between threads.
    """

    def __init__(self, base: BaseStage, lossless: LosslessStage | None = None) -> None:
        self._base = base
        self._lossless = lossless
        # stages that decode this codec's data by base id: the current one, then earlier layouts
        self._readers: dict[int, BaseStage] = {base.ident: base}
        for stage in getattr(base, "legacy", ()):
            self._readers.setdefault(stage.ident, stage())
        self.name = base.name if lossless is None else f"{base.name}+{lossless.name}"
        self.lossy = base.lossy

    def __repr__(self) -> str:
        return f"<codec {self.name}>"

    def encode(self, payload: torch.Tensor) -> bytes:
        """See :meth:`kvtier.codec.base.Codec.encode`. The result is new bytes owned by the caller."""
        check_payload(payload)
        shape, dtype = tuple(payload.shape), payload.dtype
        raw = self._base.encode(payload.contiguous())  # [n] uint8, new memory
        assert raw.numel() == self._base.encoded_size(shape, dtype)
        raw_view = memoryview(raw.numpy())
        shuffle_size = 1
        if self._lossless is None:
            body: Buffer = raw_view
        else:
            shuffle_size = self._base.shuffle_size(dtype)
            body = self._lossless.compress(shuffle(raw_view, shuffle_size) if shuffle_size > 1 else raw_view)
        head = _HEAD.pack(
            MAGIC,
            VERSION,
            self._base.ident,
            0 if self._lossless is None else self._lossless.ident,
            shuffle_size,
            _DTYPE_IDS[dtype],
            *shape,
            len(raw_view),
            len(body),
        )
        return b"".join((head, _CRC.pack(zlib.crc32(head)), body))

    def decode(self, data: Buffer, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """See :meth:`kvtier.codec.base.Codec.decode` (ownership: only ``raw`` may share ``data``).

        Raises ValueError for a ``shape``/``dtype`` that no payload can have,
        CodecError for data that does not decode to them.
        """
        shape = tuple(shape)
        check_shape(shape)
        if dtype not in _DTYPE_IDS:
            raise ValueError(f"dtype must be one of {tuple(_DTYPE_IDS)}, got {dtype}")
        view = memoryview(data).cast("B")
        base, raw_len, shuffle_size = self._check_header(view, shape, dtype)
        body = view[HEADER_BYTES:]
        if self._lossless is None:
            if not body.readonly:
                return base.decode(torch.frombuffer(body, dtype=torch.uint8), shape, dtype)
            raw = np.frombuffer(body, dtype=np.uint8).copy()  # torch cannot wrap read-only memory
        else:
            raw = self._lossless.decompress(body, raw_len)
            if shuffle_size > 1:
                raw = unshuffle(raw, shuffle_size)
        return base.decode(torch.from_numpy(raw), shape, dtype)

    def _check_header(self, view: memoryview, shape: Shape, dtype: torch.dtype) -> tuple[BaseStage, int, int]:
        """Validate the header against this codec, the caller's shape/dtype and the data's length.

        Returns (the base stage that wrote the data, its output length, shuffle element size);
        raises CodecError.
        """
        if len(view) < HEADER_BYTES:
            raise CodecError(f"truncated: {len(view)} bytes, less than the {HEADER_BYTES}-byte header")
        fields = _HEAD.unpack_from(view)
        magic, version, base_id, lossless_id, shuffle_size, dtype_id = fields[:6]
        data_shape, raw_len, body_len = fields[6:11], fields[11], fields[12]
        if magic != MAGIC:
            raise CodecError(f"not kvtier codec data (magic {bytes(magic)!r})")
        if version != VERSION:
            raise CodecError(f"unsupported codec format version {version}")
        (crc,) = _CRC.unpack_from(view, _HEAD.size)
        if crc != zlib.crc32(view[: _HEAD.size]):
            raise CodecError("codec header checksum mismatch")
        expected_lossless = 0 if self._lossless is None else self._lossless.ident
        base = self._readers.get(base_id)
        if base is None or lossless_id != expected_lossless:
            raise CodecError(f"data was not written by codec {self.name!r} (ids {base_id}, {lossless_id})")
        if dtype_id != _DTYPE_IDS[dtype] or data_shape != shape:
            raise CodecError(f"data encodes shape {list(data_shape)} dtype #{dtype_id}, not {list(shape)} {dtype}")
        expected_raw = base.encoded_size(shape, dtype)
        expected_shuffle = 1 if self._lossless is None else base.shuffle_size(dtype)
        if raw_len != expected_raw or shuffle_size != expected_shuffle:
            raise CodecError(f"header says {raw_len} bytes shuffled by {shuffle_size}, codec makes {expected_raw}")
        if self._lossless is None and body_len != raw_len:
            raise CodecError(f"header body length {body_len} != {raw_len}")
        if body_len != len(view) - HEADER_BYTES:
            raise CodecError(f"body is {len(view) - HEADER_BYTES} bytes, header says {body_len} (truncated?)")
        return base, raw_len, shuffle_size
