"""Absmax-scaled ``fp8``, the first int8/int4 layouts (decoded, no longer written), and helpers shared with them.

``fp8`` (base id 5): symmetric absmax scales, keys one per (layer, head,
channel) over the T tokens, values one per (layer, head, token) over D (KIVI's
axes: keys have outlier channels, values do not), as float32; ``scale =
absmax / 448`` (float8 e4m3's largest finite value), ``q = e4m3(x / scale)``.
Scaling puts each row's absmax at 448 so small rows keep 3 significant bits
instead of underflowing: the error is at most 2^-4 of ``|x|`` where ``|x /
scale| >= 2^-6`` (e4m3's smallest normal) and at most ``2^-10 * scale`` below
that. Bytes: ``k_scale f32 [L, H, D] | v_scale f32 [L, H, T] | q e4m3 [L, 2,
H, T, D]``. Decoding widens e4m3 through a 256-entry float32 table (torch's
float8 -> float32 conversion is several times slower). Every computation is
in float32, whatever the payload dtype.

The current ``int8`` and ``int4`` are in :mod:`kvtier.codec.kivi` (with int8's
second layout). Their first layouts stay decodable so that chunks stored
before the change still read:

- int8 v1 (base id 4): as fp8 with 127 in place of 448 and ``q = round(x /
  scale)`` stored as int8 (keys symmetric per channel over the whole chunk).
- int4 v1 (base id 6): keys per channel in groups of 64 tokens along T, values
  per token in groups of 64 along D (the last group of each may be shorter),
  float16 ``min`` (rounded down) and ``scale = (max - min) / 15`` (rounded up)
  per group, ``q = round((x - min) / scale)`` in 0..15, two 4-bit codes per
  byte (low nibble first) in payload order. Bytes: ``k_scale, k_min f16 [L, H,
  ceil(T/64), D] | v_scale, v_min f16 [L, H, T, ceil(D/64)] | codes u8
  [L*2*H*T*D / 2]``.

All-zero rows and groups get scale zero and decode to exact zeros (no 0/0 anywhere).
"""

from __future__ import annotations

from math import ceil, prod
from typing import ClassVar

import numpy as np
import torch

from kvtier.codec import kernels
from kvtier.codec.base import BaseStage, Shape

INT4_V1_GROUP = 64


def _offsets(sizes: list[int]) -> list[int]:
    """Start offsets of consecutive sections of ``sizes`` bytes, then the total (for the layouts above)."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


def _check_finite(what: str, *tensors: torch.Tensor) -> None:
    # every payload element falls in exactly one scaled row or group, so finite scales imply finite input
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(f"{what} cannot encode non-finite values (nor, for int4, values beyond float16 range)")


def _absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    low, high = torch.aminmax(x, dim=dim, keepdim=True)  # one pass, no |x| temporary
    return torch.maximum(high, low.neg_())


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1: rows of zeros then quantize to 0, never 0/0."""
    return torch.where(scale == 0, 1.0, scale)


def _groups(x: torch.Tensor, dim: int, group: int) -> list[torch.Tensor]:
    """Views of ``x`` cut along ``dim`` into groups of ``group`` (the last may be shorter).

    Full groups come as one view with ``dim`` unflattened to (n_groups, group),
    a shorter tail as a second view with a group axis of 1; the group index is
    at ``dim``, the position inside the group at ``dim + 1``.
    """
    size = x.shape[dim]
    full = size // group * group
    views = []
    if full:
        views.append(x.narrow(dim, 0, full).unflatten(dim, (full // group, group)))
    if full < size:
        views.append(x.narrow(dim, full, size - full).unsqueeze(dim))
    return views


def _rounded(x: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """``x`` in ``dtype``, rounded towards ``direction`` (+inf: up, -inf: down) instead of to nearest."""
    h = x.to(dtype)
    wrong = (h.to(x.dtype) - x) * direction < 0
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


def _half(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` in float16, rounded towards ``direction`` (+inf: up, -inf: down) instead of to nearest."""
    return _rounded(x, torch.float16, direction)


# ---------------------------------------------------------------------------------------------- fp8 and int8 v1


class _Absmax:
    """Symmetric quantization with per-channel key scales and per-token value scales (fp8, int8 v1)."""

    name: ClassVar[str]
    ident: ClassVar[int]
    lossy: ClassVar[bool] = True
    legacy: ClassVar[tuple[type[BaseStage], ...]] = ()
    stored: ClassVar[torch.dtype]
    qmax: ClassVar[float]

    def shuffle_size(self, dtype: torch.dtype) -> int:
        return 1

    def encoded_size(self, shape: Shape, dtype: torch.dtype) -> int:
        layers, _, heads, tokens, dim = shape
        return 4 * layers * heads * (dim + tokens) + prod(shape)

    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        x = payload.float()  # [L, 2, H, T, D]; payload itself when already float32
        k, v = x[:, 0], x[:, 1]  # [L, H, T, D] each
        k_scale = _absmax(k, dim=2) / self.qmax  # [L, H, 1, D]
        v_scale = _absmax(v, dim=3) / self.qmax  # [L, H, T, 1]
        _check_finite(self.name, k_scale, v_scale)
        sizes = [4 * k_scale.numel(), 4 * v_scale.numel(), x.numel()]
        off = _offsets(sizes)
        out = torch.empty(off[-1], dtype=torch.uint8)
        out[off[0] : off[1]].view(torch.float32).copy_(k_scale.reshape(-1))
        out[off[1] : off[2]].view(torch.float32).copy_(v_scale.reshape(-1))
        q = out[off[2] :].view(self.stored).view(payload.shape)  # [L, 2, H, T, D]
        self._quantize(k, _nonzero(k_scale), q[:, 0])
        self._quantize(v, _nonzero(v_scale), q[:, 1])
        return out

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> None:
        q.copy_(x / scale)  # the cast to e4m3 rounds to nearest; int8 overrides this

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        layers, _, heads, tokens, dim = shape
        off = _offsets([4 * layers * heads * dim, 4 * layers * heads * tokens, prod(shape)])
        k_scale = data[off[0] : off[1]].view(torch.float32).view(layers, heads, 1, dim)
        v_scale = data[off[1] : off[2]].view(torch.float32).view(layers, heads, tokens, 1)
        q = data[off[2] :].view(self.stored).view(shape)
        out = torch.empty(shape, dtype=dtype)
        self._dequantize(q, k_scale, v_scale, out)
        return out

    def _dequantize(self, q: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, out: torch.Tensor) -> None:
        torch.mul(q[:, 0], k_scale, out=out[:, 0])
        torch.mul(q[:, 1], v_scale, out=out[:, 1])


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8 e4m3 bit patterns (NaN for the two NaN codes)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


class Fp8(_Absmax):
    name: ClassVar[str] = "fp8"
    ident: ClassVar[int] = 5
    stored: ClassVar[torch.dtype] = torch.float8_e4m3fn
    qmax: ClassVar[float] = 448.0
    _TABLE: ClassVar[np.ndarray] = _e4m3_table()

    def _dequantize(self, q: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, out: torch.Tensor) -> None:
        # torch widens float8 element by element (slow) and does not promote it in arithmetic: look the 256
        # possible values up instead (np.take with mode="wrap" does not buffer; every uint8 index is valid)
        codes = q.view(torch.uint8).numpy()
        wide = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
        if kernels.enabled():  # one fused pass (the torch code below makes three)
            layers, _, heads, tokens, dim = out.shape
            k, v = k_scale.reshape(layers, heads, dim).numpy(), v_scale.reshape(layers, heads, tokens).numpy()
            kernels.fp8_dequantize(codes, self._TABLE, k, v, wide.numpy())
            if wide is not out:
                out.copy_(wide)
            return
        np.take(self._TABLE, codes, out=wide.numpy(), mode="wrap")
        torch.mul(wide[:, 0], k_scale, out=out[:, 0])
        torch.mul(wide[:, 1], v_scale, out=out[:, 1])


class Int8V1(_Absmax):
    """The first int8 layout (base id 4): symmetric per-channel keys over the chunk. Decoded, no longer written."""

    name: ClassVar[str] = "int8"
    ident: ClassVar[int] = 4
    stored: ClassVar[torch.dtype] = torch.int8
    qmax: ClassVar[float] = 127.0

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> None:
        q.copy_((x / scale).round_())  # |x / scale| <= 127 (+ float32 rounding), so no clamp


# ---------------------------------------------------------------------------------------------- int4 v1


class Int4V1:
    """The first int4 layout (base id 6); see the module docstring. Decoded, no longer written."""

    name: ClassVar[str] = "int4"
    ident: ClassVar[int] = 6
    lossy: ClassVar[bool] = True
    legacy: ClassVar[tuple[type[BaseStage], ...]] = ()

    def shuffle_size(self, dtype: torch.dtype) -> int:
        return 1

    @staticmethod
    def _sections(shape: Shape) -> list[int]:
        layers, _, heads, tokens, dim = shape
        k_groups = layers * heads * ceil(tokens / INT4_V1_GROUP) * dim
        v_groups = layers * heads * tokens * ceil(dim / INT4_V1_GROUP)
        return [2 * k_groups, 2 * k_groups, 2 * v_groups, 2 * v_groups, prod(shape) // 2]

    def encoded_size(self, shape: Shape, dtype: torch.dtype) -> int:
        return sum(self._sections(shape))

    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        shape = tuple(payload.shape)
        off = _offsets(self._sections(shape))
        out = torch.empty(off[-1], dtype=torch.uint8)
        x = payload.float()  # [L, 2, H, T, D]
        codes = torch.empty(shape, dtype=torch.float32)  # the 0..15 codes, in float until packed
        params = []
        for part, dim in ((0, 2), (1, 3)):  # keys: groups along T; values: groups along D
            scale, low = self._quantize(x[:, part], codes[:, part], dim)
            params += [scale, low]
        _check_finite(self.name, *params)
        for i, p in enumerate(params):
            out[off[i] : off[i + 1]].view(torch.float16).copy_(p.reshape(-1))
        pairs = codes.view(-1, 2)  # N is even: the K/V axis has size 2
        torch.add(pairs[:, 0], pairs[:, 1], alpha=16, out=pairs[:, 0])
        out[off[4] :].copy_(pairs[:, 0])
        return out

    @staticmethod
    def _quantize(x: torch.Tensor, codes: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``x``'s codes into ``codes`` (same shape); return float16 (scale, min), group axis at ``dim``."""
        scales, lows = [], []
        for xg, cg in zip(_groups(x, dim, INT4_V1_GROUP), _groups(codes, dim, INT4_V1_GROUP), strict=True):
            low, high = torch.aminmax(xg, dim=dim + 1, keepdim=True)
            low = _half(low, -torch.inf)
            scale = _half((high - low.float()) / 15, torch.inf)
            torch.sub(xg, low.float(), out=cg)
            cg.div_(_nonzero(scale.float())).round_().clamp_(0, 15)
            scales.append(scale.squeeze(dim + 1))
            lows.append(low.squeeze(dim + 1))
        return torch.cat(scales, dim), torch.cat(lows, dim)

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        layers, _, heads, tokens, dim = shape
        off = _offsets(self._sections(shape))
        params = [data[off[i] : off[i + 1]].view(torch.float16) for i in range(4)]
        packed = data[off[4] :]
        codes = torch.empty(shape, dtype=torch.uint8)
        pairs = codes.view(-1, 2)
        torch.bitwise_and(packed, 15, out=pairs[:, 0])
        torch.bitwise_right_shift(packed, 4, out=pairs[:, 1])
        out = torch.empty(shape, dtype=dtype)
        k_groups = (layers, heads, ceil(tokens / INT4_V1_GROUP), dim)
        v_groups = (layers, heads, tokens, ceil(dim / INT4_V1_GROUP))
        _dequantize_groups(codes[:, 0], params[0].view(k_groups), params[1].view(k_groups), 2, INT4_V1_GROUP, out[:, 0])
        _dequantize_groups(codes[:, 1], params[2].view(v_groups), params[3].view(v_groups), 3, INT4_V1_GROUP, out[:, 1])
        return out


def _dequantize_groups(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dim: int, group: int, out: torch.Tensor
) -> None:
    """``out = low + codes * scale`` with (scale, low) per group of ``group`` along ``dim``, group axis at ``dim``."""
    scale = scale.float().unsqueeze(dim + 1)  # [..., n_groups, 1, ...]
    low = low.float().unsqueeze(dim + 1)
    start = 0
    for cg, og in zip(_groups(codes, dim, group), _groups(out, dim, group), strict=True):
        n = cg.shape[dim]
        torch.addcmul(low.narrow(dim, start, n), cg, scale.narrow(dim, start, n), out=og)
        start += n
