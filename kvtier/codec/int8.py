"""``int8`` (base id 9): float16 sinks, keys asymmetric per channel in groups of 256 tokens, values per token.

KIVI's axes (keys per channel: keys have outlier channels; values per token)
plus the float16 sinks of :mod:`kvtier.codec.quant`. Every code is one byte,
so decoding is two broadcast multiply-adds; with the sinks and the asymmetric
keys it matches bf16's top-1 agreement with the raw model (numbers in
docs/codecs.md).

Keys: per (group of ``k_group`` = 256 tokens, channel) of the non-sink tokens,
``min`` rounded down to float16, ``scale = (max - min) / 255`` rounded up to
bfloat16, ``q = round((x - min) / scale)`` in 0..255. Values: per token,
``scale = absmax / 127`` rounded up to bfloat16, ``q = round(x / scale)``.
Rounding the min down and the scale up keeps every value within ``scale / 2``
of its level; sinks are exact to float16; all-zero groups decode to zeros.
Payload values must lie within float16 range (ValueError otherwise).

Bytes (S = min(2, T) sinks, Gk = ceil(T / 256) key groups), sections back to
back; 0.2598 of float32 at T=256, D=64::

    sink_idx   u16  [L, H, S]          token index of each sink, ascending
    sink_k     f16  [L, H, S, D]
    sink_v     f16  [L, H, S, D]
    k_min      f16  [L, H, Gk, D]
    k_scale    bf16 [L, H, Gk, D]
    v_scale    bf16 [L, H, T]
    k_codes    u8   [L, H, T, D]
    v_codes    i8   [L, H, T, D]
"""

from __future__ import annotations

from math import ceil
from typing import ClassVar

import torch

from kvtier.codec.base import Shape
from kvtier.codec.quant import SinkStage, groups, half, nonzero, put_sinks, rounded, sink_sizes


class Int8(SinkStage):
    """See the module docstring."""

    name: ClassVar[str] = "int8"
    ident: ClassVar[int] = 9
    k_group: ClassVar[int] = 256

    def _sections(self, shape: Shape) -> list[int]:
        layers, _, heads, tokens, dim = shape
        lh = layers * heads
        k_groups = ceil(tokens / self.k_group)
        return [
            *sink_sizes(shape),  # 0-2 sink_idx, sink_k, sink_v
            2 * lh * k_groups * dim,  # 3 k_min
            2 * lh * k_groups * dim,  # 4 k_scale
            2 * lh * tokens,  # 5 v_scale
            lh * tokens * dim,  # 6 k_codes
            lh * tokens * dim,  # 7 v_codes
        ]

    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        layers, _, heads, tokens, dim = payload.shape
        out, section, x, k, _ = self._begin_encode(payload)
        k_codes = section[6].view(layers, heads, tokens, dim)
        mins, scales = [], []
        for kg, qg in zip(groups(k, 2, self.k_group), groups(k_codes, 2, self.k_group), strict=True):
            low, high = torch.aminmax(kg, dim=3, keepdim=True)  # [L, H, n, 1, D]
            low = half(low, -torch.inf)
            scale = rounded((high - low.float()) / 255, torch.bfloat16, torch.inf)
            qg.copy_((kg - low.float()).div_(nonzero(scale.float())).round_().clamp_(0, 255))
            mins.append(low.squeeze(3))
            scales.append(scale.squeeze(3))
        section[3].view(torch.float16).copy_(torch.cat(mins, 2).reshape(-1))
        section[4].view(torch.bfloat16).copy_(torch.cat(scales, 2).reshape(-1))
        v = x[:, 1]
        low, high = torch.aminmax(v, dim=3, keepdim=True)
        v_scale = rounded(torch.maximum(high, low.neg_()) / 127, torch.bfloat16, torch.inf)  # [L, H, T, 1]
        section[5].view(torch.bfloat16).copy_(v_scale.reshape(-1))
        # |v / scale| <= 127 with the rounded-up scale (+ float32 rounding: round() stays within), no clamp
        section[7].view(torch.int8).view(layers, heads, tokens, dim).copy_(v.div(nonzero(v_scale.float())).round_())
        return out

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        layers, _, heads, tokens, dim = shape
        section, idx = self._begin_decode(data, shape)
        k_groups = ceil(tokens / self.k_group)
        k_min = section[3].view(torch.float16).view(layers, heads, k_groups, 1, dim).float()
        k_scale = section[4].view(torch.bfloat16).view(layers, heads, k_groups, 1, dim).float()
        v_scale = section[5].view(torch.bfloat16).view(layers, heads, tokens, 1).float()
        k_codes = section[6].view(layers, heads, tokens, dim)
        out = torch.empty(shape, dtype=dtype)
        start = 0
        for qg, og in zip(groups(k_codes, 2, self.k_group), groups(out[:, 0], 2, self.k_group), strict=True):
            n = qg.shape[2]
            torch.addcmul(k_min.narrow(2, start, n), qg, k_scale.narrow(2, start, n), out=og)
            start += n
        torch.mul(section[7].view(torch.int8).view(layers, heads, tokens, dim), v_scale, out=out[:, 1])
        put_sinks(out, idx, section[1], section[2])
        return out
