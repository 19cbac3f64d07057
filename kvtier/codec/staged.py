""":class:`StagedCodec`: a base stage, then an optional lossless stage; the :class:`~kvtier.codec.base.Codec` here.

Its output is the bare body: the base stage's bytes, or the lossless stage's
frame of them (after a byte shuffle by ``shuffle_size``). What a reader needs
to decode a body (which stages, the payload shape and dtype) and its checksum
are recorded by the chunk header (:mod:`kvtier.chunk`), from the ids and
sizes this class reports: ``base_id``, ``lossless_id``, ``shuffle_size``,
``stage_size`` and ``body_bounds``.
"""

from __future__ import annotations

import numpy as np
import torch

from kvtier.codec.base import (
    FLOAT_DTYPES,
    BaseStage,
    Buffer,
    CodecError,
    LosslessStage,
    Shape,
    check_payload,
    check_shape,
)
from kvtier.codec.lossless import shuffle, unshuffle


class StagedCodec:
    """``base`` stage, then ``lossless`` stage if any. Immutable and stateless; safe to share between threads."""

    def __init__(self, base: BaseStage, lossless: LosslessStage | None = None) -> None:
        self._base = base
        self._lossless = lossless
        self.name = base.name if lossless is None else f"{base.name}+{lossless.name}"
        self.lossy = base.lossy
        self.base_id = base.ident
        self.lossless_id = 0 if lossless is None else lossless.ident

    def __repr__(self) -> str:
        return f"<codec {self.name}>"

    def shuffle_size(self, dtype: torch.dtype) -> int:
        """Element size whose bytes are shuffled before the lossless stage (1: none, or no lossless stage)."""
        return 1 if self._lossless is None else self._base.shuffle_size(dtype)

    def stage_size(self, shape: Shape, dtype: torch.dtype) -> int:
        """Bytes the base stage writes for a payload of ``shape``/``dtype`` (what the lossless stage holds)."""
        return self._base.encoded_size(shape, dtype)

    def body_bounds(self, shape: Shape, dtype: torch.dtype) -> tuple[int, int]:
        """(least, most) bytes of a body for ``shape``/``dtype``; equal without a lossless stage."""
        size = self.stage_size(shape, dtype)
        return (size, size) if self._lossless is None else self._lossless.body_bounds(size)

    def encode(self, payload: torch.Tensor) -> bytes:
        """See :meth:`kvtier.codec.base.Codec.encode`. The result is new bytes owned by the caller."""
        check_payload(payload)
        raw = self._base.encode(payload.contiguous())  # [n] uint8, new memory (raw: a view of payload)
        assert raw.numel() == self._base.encoded_size(tuple(payload.shape), payload.dtype)
        view = memoryview(raw.numpy())
        if self._lossless is None:
            return view.tobytes()
        size = self._base.shuffle_size(payload.dtype)
        return self._lossless.compress(shuffle(view, size) if size > 1 else view)

    def decode(self, data: Buffer, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """See :meth:`kvtier.codec.base.Codec.decode` (ownership: only ``raw`` may share ``data``).

        The length of ``data`` is checked against :meth:`body_bounds` before
        anything is allocated or decompressed.
        """
        shape = tuple(shape)
        check_shape(shape)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        view = memoryview(data).cast("B")
        least, most = self.body_bounds(shape, dtype)
        if not least <= len(view) <= most:
            want = least if least == most else f"{least}..{most}"
            raise CodecError(f"{self.name} body is {len(view)} bytes, expected {want} for {list(shape)} {dtype}")
        if self._lossless is None:
            if not view.readonly:
                return self._base.decode(torch.frombuffer(view, dtype=torch.uint8), shape, dtype)
            raw = np.frombuffer(view, dtype=np.uint8).copy()  # torch cannot wrap read-only memory
        else:
            raw = self._lossless.decompress(view, self.stage_size(shape, dtype))
            size = self._base.shuffle_size(dtype)
            if size > 1:
                raw = unshuffle(raw, size)
        return self._base.decode(torch.from_numpy(raw), shape, dtype)
