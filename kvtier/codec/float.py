"""Base stages that keep floats: ``raw`` (the payload's own bytes) and ``fp16``/``bf16`` (a downcast).

``fp16`` keeps 11 significant bits (relative error <= 2^-11) but only the range
of float16: encoding a payload with finite values beyond 65504 raises
ValueError rather than storing inf. ``bf16`` keeps float32's range and 8
significant bits (relative error <= 2^-8). Both are exact for payloads already
in their dtype; non-finite values pass through as they are.
"""

from __future__ import annotations

from math import prod
from typing import ClassVar

import torch

from kvtier.codec.base import Shape


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _all_finite(x: torch.Tensor) -> bool:
    # aminmax propagates NaN and inf and is vectorized for half types, unlike isfinite (25x slower here)
    low, high = torch.aminmax(x.reshape(-1))
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


class Raw:
    """The payload's bytes as they are.

    ``encode`` returns a uint8 *view* of the payload (the codec copies it once
    into the bytes it returns). ``decode`` returns a view of ``data`` with no
    copy: the codec hands it either the caller's writable buffer (which the
    result then shares) or a private copy of read-only input.
    """

    name: ClassVar[str] = "raw"
    ident: ClassVar[int] = 1
    lossy: ClassVar[bool] = False

    def shuffle_size(self, dtype: torch.dtype) -> int:
        return _itemsize(dtype)

    def encoded_size(self, shape: Shape, dtype: torch.dtype) -> int:
        return prod(shape) * _itemsize(dtype)

    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        return payload.view(torch.uint8).reshape(-1)  # [n * itemsize], shares payload

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return data.view(dtype).view(shape)  # shares data


class _Downcast:
    """Store the payload in ``stored`` dtype; decode converts back to the payload's dtype (new memory)."""

    name: ClassVar[str]
    ident: ClassVar[int]
    stored: ClassVar[torch.dtype]
    lossy: ClassVar[bool] = True

    def shuffle_size(self, dtype: torch.dtype) -> int:
        return _itemsize(self.stored)

    def encoded_size(self, shape: Shape, dtype: torch.dtype) -> int:
        return prod(shape) * _itemsize(self.stored)

    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        # to() returns payload itself when it is already stored-dtype: a view, which the codec only reads
        stored = payload.to(self.stored)
        if stored is not payload and not _all_finite(stored):
            if bool((~torch.isfinite(stored) & torch.isfinite(payload)).any()):
                raise ValueError(f"{self.name} cannot hold this payload: finite values overflow {self.stored}")
        return stored.view(torch.uint8).reshape(-1)

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return data.view(self.stored).view(shape).to(dtype, copy=True)


class Fp16(_Downcast):
    name: ClassVar[str] = "fp16"
    ident: ClassVar[int] = 2
    stored: ClassVar[torch.dtype] = torch.float16


class Bf16(_Downcast):
    name: ClassVar[str] = "bf16"
    ident: ClassVar[int] = 3
    stored: ClassVar[torch.dtype] = torch.bfloat16
