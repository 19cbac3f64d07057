"""What a KV codec is: the public :class:`Codec` protocol, its error, and the two stages a codec is made of.

A codec turns a chunk payload ``[L, 2, H, T, D]`` (layers, key/value, kv heads,
tokens, head dim; float32, float16 or bfloat16) into a *body* of bytes and
back. A body is not self-describing: the shape, dtype and codec that wrote it
are recorded by the container (the chunk header, :mod:`kvtier.chunk`), which
also checksums it, and passed back to ``decode``. Every codec here is a
*base* stage (raw copy, a float downcast or a quantizer: :class:`BaseStage`)
optionally followed by a *lossless* stage (zstd or lz4 over byte-shuffled
bytes: :class:`LosslessStage`), put together by
:class:`kvtier.codec.staged.StagedCodec`.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from kvtier.errors import KvtierError

Shape = tuple[int, ...]
Buffer = bytes | bytearray | memoryview

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


class CodecError(KvtierError, ValueError):
    """Bytes handed to a codec's ``decode`` are not what that codec writes for that shape and dtype.

    Raised for a body of the wrong length, compressed bodies that fail to
    decompress, recorded choices (sink indices, bit widths) out of range, and
    unknown codec ids. A body written by another codec for the same length is
    not detected here: the container records which codec wrote it.
    """


@runtime_checkable
class Codec(Protocol):
    """Turns a chunk payload into bytes and back.

    ``name`` is the canonical spec (``"int8+zstd"``) that :func:`kvtier.codec.get_codec`
    accepts; ``lossy`` says whether ``decode(encode(x))`` may differ from ``x``.
    ``base_id``/``lossless_id`` and the three size methods are what a
    container records and checks (:mod:`kvtier.chunk`);
    :func:`kvtier.codec.codec_from_ids` maps the ids back to a codec.
    Codecs hold no mutable state: one instance may be shared by threads.
    """

    name: str
    lossy: bool
    base_id: int
    lossless_id: int

    def shuffle_size(self, dtype: torch.dtype) -> int:
        """Element size whose bytes are shuffled before the lossless stage (1: none)."""
        ...

    def stage_size(self, shape: Shape, dtype: torch.dtype) -> int:
        """Bytes of the base stage's output for a payload of ``shape``/``dtype``."""
        ...

    def body_bounds(self, shape: Shape, dtype: torch.dtype) -> tuple[int, int]:
        """(least, most) bytes ``encode`` returns for a payload of ``shape``/``dtype``."""
        ...

    def encode(self, payload: torch.Tensor) -> bytes:
        """The body for ``payload`` [L, 2, H, T, D] (float32/float16/bfloat16): no header, no frame of its own.

        Reads ``payload`` and never keeps a reference to it; the returned bytes
        are new and owned by the caller. Raises ValueError if the payload's
        shape or dtype is not a chunk payload's, or if a quantizing codec meets
        values it cannot represent (non-finite values, or beyond float16 range
        for int4).
        """
        ...

    def decode(self, data: Buffer, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """The contiguous ``shape``/``dtype`` tensor that the body ``data`` encodes.

        ``shape`` and ``dtype`` are the payload's (recorded by the container,
        not in ``data``). ``data`` is never modified. The result is new memory owned by the
        caller, except that the ``raw`` codec returns a tensor that *shares*
        ``data`` when ``data`` is writable (a bytearray, or a writable
        memoryview): the caller hands that buffer over and must not write to
        it afterwards. Raises :class:`CodecError` if ``data`` is not a body
        this codec writes for that shape and dtype (see :class:`CodecError`),
        ValueError if no payload can have that shape or dtype.
        """
        ...


class BaseStage(Protocol):
    """The first stage of a codec: payload tensor <-> one flat byte string of a size known in advance.

    ``encode`` returns a contiguous uint8 tensor (new memory) of exactly
    ``encoded_size(shape, dtype)`` bytes. ``decode`` reads ``data`` (a uint8
    tensor of that many bytes, possibly read-only in spirit: it must not be
    written) and returns a new contiguous tensor, except where documented.
    ``shuffle_size`` is the element size whose bytes a following lossless
    stage should shuffle (1: no shuffle).

    ``ident`` is the id the chunk header records; it changes whenever the
    stage's byte layout changes, and a retired layout's id is never reused.
    """

    name: ClassVar[str]
    ident: ClassVar[int]
    lossy: ClassVar[bool]

    def shuffle_size(self, dtype: torch.dtype) -> int: ...

    def encoded_size(self, shape: Shape, dtype: torch.dtype) -> int: ...

    def encode(self, payload: torch.Tensor) -> torch.Tensor: ...

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor: ...


class LosslessStage(Protocol):
    """The optional second stage: byte string <-> compressed byte string.

    ``decompress`` returns a new writable uint8 array of exactly ``size``
    bytes or raises :class:`CodecError`. ``body_bounds(size)`` is the (least,
    most) number of bytes ``compress`` can return for ``size`` input bytes.
    """

    name: ClassVar[str]
    ident: ClassVar[int]

    @staticmethod
    def body_bounds(size: int) -> tuple[int, int]: ...

    def compress(self, data: memoryview | np.ndarray) -> bytes: ...

    def decompress(self, data: memoryview, size: int) -> np.ndarray: ...


def check_payload(payload: torch.Tensor) -> None:
    """Raise ValueError unless ``payload`` is a non-empty [L, 2, H, T, D] float tensor."""
    if payload.dtype not in FLOAT_DTYPES:
        raise ValueError(f"payload dtype must be one of {FLOAT_DTYPES}, got {payload.dtype}")
    check_shape(tuple(payload.shape))


def check_shape(shape: Shape) -> None:
    """Raise ValueError unless ``shape`` is [L, 2, H, T, D] with every dim positive."""
    if len(shape) != 5 or shape[1] != 2 or min(shape) <= 0:
        raise ValueError(f"payload shape must be [L, 2, H, T, D] with positive dims, got {list(shape)}")
