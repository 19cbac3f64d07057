"""``fp8`` (base id 5): float8 e4m3 codes with absmax scales.

Symmetric absmax scales, keys one per (layer, head, channel) over the T
tokens, values one per (layer, head, token) over D (KIVI's axes: keys have
outlier channels, values do not), as float32; ``scale = absmax / 448``
(float8 e4m3's largest finite value), ``q = e4m3(x / scale)``. Scaling puts
each row's absmax at 448 so small rows keep 3 significant bits instead of
underflowing: the error is at most 2^-4 of ``|x|`` where ``|x / scale| >=
2^-6`` (e4m3's smallest normal) and at most ``2^-10 * scale`` below that.
Bytes::

    k_scale  f32  [L, H, D]
    v_scale  f32  [L, H, T]
    q        e4m3 [L, 2, H, T, D]

Decoding widens e4m3 through a 256-entry float32 table (torch's float8 ->
float32 conversion is several times slower), fused with the scaling by a
numba kernel when one is available. Every computation is in float32, whatever
the payload dtype. All-zero rows get scale zero and decode to exact zeros.
"""

from __future__ import annotations

from math import prod
from typing import ClassVar

import numpy as np
import torch

from kvtier.codec import kernels
from kvtier.codec.base import Shape
from kvtier.codec.quant import Sectioned, nonzero, sections

QMAX = 448.0


def _absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    low, high = torch.aminmax(x, dim=dim, keepdim=True)  # one pass, no |x| temporary
    return torch.maximum(high, low.neg_())


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8 e4m3 bit patterns (NaN for the two NaN codes)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


class Fp8(Sectioned):
    name: ClassVar[str] = "fp8"
    ident: ClassVar[int] = 5
    _TABLE: ClassVar[np.ndarray] = _e4m3_table()

    def _sections(self, shape: Shape) -> list[int]:
        layers, _, heads, tokens, dim = shape
        return [4 * layers * heads * dim, 4 * layers * heads * tokens, prod(shape)]

    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        x = payload.float()  # [L, 2, H, T, D]; payload itself when already float32
        k, v = x[:, 0], x[:, 1]  # [L, H, T, D] each
        k_scale = _absmax(k, dim=2) / QMAX  # [L, H, 1, D]
        v_scale = _absmax(v, dim=3) / QMAX  # [L, H, T, 1]
        # every payload element falls in exactly one scaled row, so finite scales imply finite input
        if not (bool(torch.isfinite(k_scale).all()) and bool(torch.isfinite(v_scale).all())):
            raise ValueError(f"{self.name} cannot encode non-finite values")
        out = torch.empty(self.encoded_size(tuple(payload.shape), payload.dtype), dtype=torch.uint8)
        section = sections(out, self._sections(tuple(payload.shape)))
        section[0].view(torch.float32).copy_(k_scale.reshape(-1))
        section[1].view(torch.float32).copy_(v_scale.reshape(-1))
        q = section[2].view(torch.float8_e4m3fn).view(payload.shape)  # [L, 2, H, T, D]
        q[:, 0].copy_(k / nonzero(k_scale))  # the cast to e4m3 rounds to nearest
        q[:, 1].copy_(v / nonzero(v_scale))
        return out

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        layers, _, heads, tokens, dim = shape
        section = sections(data, self._sections(shape))
        k_scale = section[0].view(torch.float32).view(layers, heads, 1, dim)
        v_scale = section[1].view(torch.float32).view(layers, heads, tokens, 1)
        codes = section[2].numpy().reshape(shape)
        out = torch.empty(shape, dtype=dtype)
        wide = out if dtype == torch.float32 else torch.empty(shape, dtype=torch.float32)
        if kernels.enabled():  # one fused pass (the torch code below makes three)
            k, v = k_scale.reshape(layers, heads, dim).numpy(), v_scale.reshape(layers, heads, tokens).numpy()
            kernels.fp8_dequantize(codes, self._TABLE, k, v, wide.numpy())
            if wide is not out:
                out.copy_(wide)
            return out
        # torch widens float8 element by element (slow) and does not promote it in arithmetic: look the 256
        # possible values up instead (np.take with mode="wrap" does not buffer; every uint8 index is valid)
        np.take(self._TABLE, codes, out=wide.numpy(), mode="wrap")
        torch.mul(wide[:, 0], k_scale, out=out[:, 0])
        torch.mul(wide[:, 1], v_scale, out=out[:, 1])
        return out
