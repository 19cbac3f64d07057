"""What a KV codec is: the public :class:`Codec` protocol, its error, and the two stages a codec is made of.

A codec turns a chunk payload ``[L, 2, H, T, D]`` (layers, key/value, kv heads,
tokens, head dim; float32, float16 or bfloat16) into self-contained bytes and
back. Every codec here is a *base* stage (raw copy, a float downcast or a
quantizer: :class:`BaseStage`) optionally followed by a *lossless* stage
(zstd or lz4 over byte-shuffled bytes: :class:`LosslessStage`); the two are
framed by :mod:`kvtier.codec.frame`.
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
    """Bytes handed to a codec's ``decode`` are not what that codec wrote for that shape and dtype.

    Raised for truncated or padded data, a damaged header, data written by a
    different codec, and compressed bodies that fail to decompress.
    """


@runtime_checkable
class Codec(Protocol):
    """Turns a chunk payload into bytes and back.

    ``name`` is the canonical spec (``"int8+zstd"``) that :func:`kvtier.codec.get_codec`
    accepts; ``lossy`` says whether ``decode(encode(x))`` may differ from ``x``.
    Codecs hold no mutable state: one instance may be shared by threads.
    """

    name: str
    lossy: bool

    def encode(self, payload: torch.Tensor) -> bytes:
        """Self-contained bytes for ``payload`` [L, 2, H, T, D] (float32/float16/bfloat16).

        Reads ``payload`` and never keeps a reference to it; the returned bytes
        are new and owned by the caller. Raises ValueError if the payload's
        shape or dtype is not a chunk payload's, or if a quantizing codec meets
        values it cannot represent (non-finite values, or beyond float16 range
        for int4).
        """
        ...

    def decode(self, data: Buffer, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """The contiguous ``shape``/``dtype`` tensor that ``data`` encodes.

        ``data`` is never modified. The result is new memory owned by the
        caller, except that the ``raw`` codec returns a tensor that *shares*
        ``data`` when ``data`` is writable (a bytearray, or a writable
        memoryview): the caller hands that buffer over and must not write to
        it afterwards. Raises :class:`CodecError` if ``data`` is truncated,
        damaged, or was written by another codec or for another shape/dtype.
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

    ``ident`` is the id the frame header records; it changes whenever the
    stage's byte layout changes. ``legacy`` lists the stages (by class) that
    wrote earlier layouts under the same ``name``: a codec still decodes data
    whose header names one of their ids, so chunks written before a format
    change stay readable.
    """

    name: ClassVar[str]
    ident: ClassVar[int]
    lossy: ClassVar[bool]
    legacy: ClassVar[tuple[type[BaseStage], ...]]

    def shuffle_size(self, dtype: torch.dtype) -> int: ...

    def encoded_size(self, shape: Shape, dtype: torch.dtype) -> int: ...

    def encode(self, payload: torch.Tensor) -> torch.Tensor: ...

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor: ...


class LosslessStage(Protocol):
    """The optional second stage: byte string <-> compressed byte string.

    ``decompress`` returns a new writable uint8 array of exactly ``size``
    bytes or raises :class:`CodecError`.
    """

    name: ClassVar[str]
    ident: ClassVar[int]

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
