"""``int4`` (base id 8): float16 sinks, per-channel key bit widths, rotated 4-bit values.

KIVI quantizes keys per channel (keys have outlier channels) and values per
token; done plainly (uniform 4-bit codes, one (scale, min) per group) that
left SmolLM2-135M's top-1 token agreeing with the raw model at 95.5% of
positions. Three measured causes and what this stage does about each (numbers
in docs/codecs.md):

1. **Attention sinks**: the float16 sinks of :mod:`kvtier.codec.quant`.
2. **Key channels differ by orders of magnitude in range.** A fixed width
   wastes bits on narrow channels and starves wide ones. Keys are quantized
   per channel in groups of ``k_group`` = 64 tokens, each (group, channel)
   with its own (min, scale) and its own width ``b`` in ``[2, 8]`` bits,
   chosen per (layer, head, group) to minimize ``sum(w_c * err_c^2)`` under a
   fixed total of ``k_bit_budget(D)`` = 4.25 D bits per token row: greedily,
   each next bit goes to the channel whose weighted squared error it reduces
   most, ``w_c * width^2 * (1/(2^b-1)^2 - 1/(2^(b+1)-1)^2)``. The weight
   ``w_c`` (the channel's rms over the chunk's non-sink tokens) stands in for
   the size of the query the channel meets; plain MSE measured 15-40% more
   KL. The total is fixed, so the byte size depends on the shape alone. The
   codes are stored as bit planes (:mod:`kvtier.codec.bitplanes`).
3. **Value channels with outliers.** A per-token (min, scale) is set by the
   token's largest channels. Values are first rotated by an orthonormal
   Hadamard matrix in blocks of ``h`` channels (h = the largest power of two
   <= 16 dividing D), which spreads an outlier over its block, then quantized
   per token in groups of ``V_GROUP = 64`` channels to 4 bits with one (min,
   scale) each, and rotated back on decode. Attention output is linear in V,
   so the rotation only reshapes the error.

Rounding: every min is rounded down and every scale up to its stored dtype, so
the levels ``min + q * scale`` span the group and ``q = round((x - min) /
scale)`` (clamped) is within ``scale / 2`` of ``x`` (values in the rotated
basis, where an orthonormal rotation preserves each block's error norm).
Sinks are exact to float16; all-zero groups decode to zeros. Payload values
must lie within float16 range (ValueError otherwise).

Bytes (Gk = ceil(T / 64) key groups, Gv = ceil(D / 64)); 0.1494 of float32 at
T=256, D=64::

    sink_idx   u16  [L, H, S]          token index of each sink, ascending
    sink_k     f16  [L, H, S, D]
    sink_v     f16  [L, H, S, D]
    k_min      f16  [L, H, Gk, D]
    k_scale    bf16 [L, H, Gk, D]
    v_min      bf16 [L, H, T, Gv]      (rotated basis)
    v_scale    bf16 [L, H, T, Gv]
    k_bits     u4   [L, H, Gk, D]      two per byte, low nibble first (zero-padded)
    v_codes    u4   [L, H, T, D]       two per byte, low nibble first (zero-padded)
    k_planes   per (l, h, full group, channel): its b bit planes, 8 bytes each;
               then the same for the tail group, if any, ceil(tail / 8) bytes a plane
"""

from __future__ import annotations

from functools import cache
from math import ceil
from typing import ClassVar

import numpy as np
import torch

from kvtier.codec import kernels
from kvtier.codec.base import CodecError, Shape
from kvtier.codec.bitplanes import bit_planes, from_bit_planes
from kvtier.codec.quant import SinkStage, groups, half, nonzero, put_sinks, rounded, sink_sizes

V_GROUP = 64
K_BITS_MIN = 2


def hadamard_size(dim: int, limit: int) -> int:
    """Block size of the value rotation: the largest power of two <= ``limit`` that divides ``dim``."""
    return min(dim & -dim, limit)


@cache
def _hadamard(n: int) -> torch.Tensor:
    """Orthonormal (and symmetric, so its own inverse) Sylvester Hadamard matrix of size ``n``, float32."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).float()


def rotate(x: torch.Tensor, h: int) -> torch.Tensor:
    """``x`` [..., D] times the block-diagonal Hadamard matrix with blocks of ``h`` (D % h == 0); new memory."""
    if h == 1:
        return x.clone()
    return torch.mm(x.reshape(-1, h), _hadamard(h)).view(x.shape)  # one GEMM (a batched matmul is slower)


def _pack_nibbles(codes: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``codes`` (values 0..15, any real dtype) two per byte, low nibble first, into uint8 ``out``."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    torch.bitwise_or(pairs[:, 0], pairs[:, 1] << 4, out=out)


@cache
def _nibble_table() -> np.ndarray:
    """uint16 per byte value: its low nibble in the first byte, its high nibble in the second (little-endian)."""
    values = np.arange(256, dtype=np.uint16)
    return (values & 15) | ((values >> 4) << 8)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit codes of ``packed`` (uint8), as a new uint8 tensor (a table lookup per byte)."""
    pairs = np.take(_nibble_table(), packed.numpy(), mode="wrap")  # np.take(mode="wrap") does not buffer
    return torch.from_numpy(pairs.view(np.uint8))[:n]


def _group_params(
    section: list[torch.Tensor], shape: Shape, k_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sections 3-6 as float32: key (min, scale) [L, H, Gk, D], value (min, scale) [L, H, T, Gv]."""
    layers, _, heads, tokens, dim = shape
    v_groups = ceil(dim / V_GROUP)
    return (
        section[3].view(torch.float16).view(layers, heads, k_groups, dim).float(),
        section[4].view(torch.bfloat16).view(layers, heads, k_groups, dim).float(),
        section[5].view(torch.bfloat16).view(layers, heads, tokens, v_groups).float(),
        section[6].view(torch.bfloat16).view(layers, heads, tokens, v_groups).float(),
    )


class Int4(SinkStage):
    """See the module docstring. Immutable and stateless."""

    name: ClassVar[str] = "int4"
    ident: ClassVar[int] = 8
    k_group: ClassVar[int] = 64
    k_bits_max: ClassVar[int] = 8
    v_bits: ClassVar[int] = 4
    v_rotation: ClassVar[int] = 16  # largest Hadamard block for values
    k_rms_power: ClassVar[float] = 1.0  # a key channel's squared error counts rms^k_rms_power times

    @staticmethod
    def k_bit_budget(dim: int) -> int:
        """Key code bits per (layer, head, group, token row of D channels): 4.25 per key on average."""
        return 17 * dim // 4

    def _sections(self, shape: Shape) -> list[int]:
        layers, _, heads, tokens, dim = shape
        lh = layers * heads
        k_groups = ceil(tokens / self.k_group)
        full, tail = divmod(tokens, self.k_group)
        planes = self.k_bit_budget(dim)  # bit planes per (l, h, group)
        v_params = 2 * lh * tokens * ceil(dim / V_GROUP)
        return [
            *sink_sizes(shape),  # 0-2 sink_idx, sink_k, sink_v
            2 * lh * k_groups * dim,  # 3 k_min
            2 * lh * k_groups * dim,  # 4 k_scale
            v_params,  # 5 v_min
            v_params,  # 6 v_scale
            ceil(lh * k_groups * dim / 2),  # 7 k_bits
            ceil(lh * tokens * dim * self.v_bits / 8),  # 8 v_codes
            lh * full * planes * ceil(self.k_group / 8),  # 9 k_planes, full groups
            lh * planes * ceil(tail / 8),  # 10 k_planes, tail group
        ]

    # ------------------------------------------------------------------------------------------ encode

    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        out, section, x, k_work, mean_square = self._begin_encode(payload)
        self._encode_keys(k_work, mean_square.pow_(self.k_rms_power / 2), section)
        self._encode_values(x[:, 1], section)
        return out

    def _encode_keys(self, k: torch.Tensor, importance: torch.Tensor, section: list[torch.Tensor]) -> None:
        """Keys [L, H, T, D] (sinks already replaced) into sections 3, 4, 7, 9, 10; ``importance`` [L, H, 1, D]."""
        dim = k.shape[-1]
        steps = torch.arange(K_BITS_MIN, self.k_bits_max, dtype=torch.float64)  # a bit added at b bits
        gain = (1 / (2**steps - 1) ** 2 - 1 / (2 ** (steps + 1) - 1) ** 2).float()  # relative error^2 saved
        extra = self.k_bit_budget(dim) - K_BITS_MIN * dim  # bits handed out beyond the minimum, per row
        mins, scales, bits, planes = [], [], [], []
        for kg in groups(k, 2, self.k_group):  # [L, H, n, g, D]
            low, high = torch.aminmax(kg, dim=3)  # [L, H, n, D]
            low = half(low, -torch.inf)
            width = high - low.float()
            weight = (width.square() * importance).unsqueeze(-1) * gain  # [L, H, n, D, steps]
            chosen = weight.flatten(-2).topk(extra, dim=-1).indices
            picked = torch.zeros(weight.flatten(-2).shape, dtype=torch.uint8).scatter_(-1, chosen, 1)
            b = picked.view(weight.shape).sum(-1, dtype=torch.uint8).add_(K_BITS_MIN)  # [L, H, n, D]
            levels = (2 ** b.float() - 1).unsqueeze(3)
            scale = rounded(width / levels.squeeze(3), torch.bfloat16, torch.inf)
            codes = (kg - low.float().unsqueeze(3)).div_(nonzero(scale.float()).unsqueeze(3)).round_()
            codes = torch.minimum(codes.clamp_(min=0), levels, out=codes).to(torch.uint8)  # [L, H, n, g, D]
            mins.append(low)
            scales.append(scale)
            bits.append(b)
            planes.append(bit_planes(codes, b))
        section[3].view(torch.float16).copy_(torch.cat(mins, 2).reshape(-1))
        section[4].view(torch.bfloat16).copy_(torch.cat(scales, 2).reshape(-1))
        _pack_nibbles(torch.cat(bits, 2), section[7])
        if section[9].numel():
            section[9].copy_(planes[0])
        if section[10].numel():
            section[10].copy_(planes[-1])

    def _encode_values(self, v: torch.Tensor, section: list[torch.Tensor]) -> None:
        top = 2**self.v_bits - 1
        vr = rotate(v, hadamard_size(v.shape[-1], self.v_rotation))  # new memory: becomes the codes
        mins, scales = [], []
        for vg in groups(vr, 3, V_GROUP):  # [L, H, T, n, g]
            low, high = torch.aminmax(vg, dim=4, keepdim=True)
            low = rounded(low, torch.bfloat16, -torch.inf)
            scale = rounded((high - low.float()) / top, torch.bfloat16, torch.inf)
            vg.sub_(low.float()).div_(nonzero(scale.float())).round_().clamp_(0, top)
            mins.append(low.squeeze(4))
            scales.append(scale.squeeze(4))
        section[5].view(torch.bfloat16).copy_(torch.cat(mins, 3).reshape(-1))
        section[6].view(torch.bfloat16).copy_(torch.cat(scales, 3).reshape(-1))
        _pack_nibbles(vr, section[8])

    # ------------------------------------------------------------------------------------------ decode

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        layers, _, heads, tokens, dim = shape
        section, idx = self._begin_decode(data, shape)
        k_groups = ceil(tokens / self.k_group)
        bits = _unpack_nibbles(section[7], layers * heads * k_groups * dim).view(layers, heads, k_groups, dim)
        if bool(((bits < K_BITS_MIN) | (bits > self.k_bits_max)).any()) or bool(
            (bits.sum(-1, dtype=torch.int32) != self.k_bit_budget(dim)).any()
        ):
            raise CodecError(f"{self.name}: key bit widths are damaged")
        if dim % 2 == 0 and kernels.enabled():
            return self._decode_compiled(section, bits, idx, shape, dtype)
        out = torch.empty(shape, dtype=dtype)
        k_min, k_scale, v_min, v_scale = _group_params(section, shape, k_groups)
        k_min, k_scale = k_min.unsqueeze(3), k_scale.unsqueeze(3)  # [L, H, Gk, 1, D]: over a group's tokens
        v_min, v_scale = v_min.unsqueeze(-1), v_scale.unsqueeze(-1)  # [L, H, T, Gv, 1]: over a group's channels
        start = 0
        for og in groups(out[:, 0], 2, self.k_group):  # [L, H, n, g, D]
            n, g = og.shape[2], og.shape[3]
            codes = from_bit_planes(section[9] if g == self.k_group else section[10], bits.narrow(2, start, n), g)
            torch.addcmul(k_min.narrow(2, start, n), codes, k_scale.narrow(2, start, n), out=og)
            start += n

        codes = _unpack_nibbles(section[8], layers * heads * tokens * dim).view(layers, heads, tokens, dim)
        h = hadamard_size(dim, self.v_rotation)
        if h == 1:
            self._dequantize_values(codes, v_min, v_scale, out[:, 1])
        else:  # by blocks of layers: dequantize into a small float32 buffer, rotate it into ``out``
            step = max(1, (1 << 18) // (heads * tokens * dim))  # a 1 MiB buffer: stays in cache
            buf = torch.empty(min(step, layers), heads, tokens, dim, dtype=torch.float32)
            for first in range(0, layers, step):
                vr = buf[: min(step, layers - first)]
                part = slice(first, first + vr.shape[0])
                self._dequantize_values(codes[part], v_min[part], v_scale[part], vr)
                rotated = vr.view(-1, h)
                for i, layer in enumerate(range(first, first + vr.shape[0])):
                    target = out[layer, 1].view(-1, h)  # one layer's values: contiguous
                    rows = slice(i * target.shape[0], (i + 1) * target.shape[0])
                    if dtype == torch.float32:
                        torch.mm(rotated[rows], _hadamard(h), out=target)
                    else:  # rotate in float32, round once
                        target.copy_(torch.mm(rotated[rows], _hadamard(h)))

        put_sinks(out, idx, section[1], section[2])
        return out

    def _decode_compiled(
        self, section: list[torch.Tensor], bits: torch.Tensor, idx: torch.Tensor, shape: Shape, dtype: torch.dtype
    ) -> torch.Tensor:
        """:meth:`decode` by the numba kernels (an even D: whole bytes of codes per token)."""
        out = torch.empty(shape, dtype=torch.float32)
        k_min, k_scale, v_min, v_scale = _group_params(section, shape, bits.shape[2])
        wide = out.numpy()
        kernels.int4_keys(section[9].numpy(), section[10].numpy(), bits.numpy(), k_min.numpy(), k_scale.numpy(), wide)
        block = hadamard_size(shape[4], self.v_rotation)
        kernels.int4_values(section[8].numpy(), v_min.numpy(), v_scale.numpy(), block, wide)
        if dtype != torch.float32:
            out = out.to(dtype)
        put_sinks(out, idx, section[1], section[2])
        return out

    @staticmethod
    def _dequantize_values(codes: torch.Tensor, v_min: torch.Tensor, v_scale: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` [l, H, T, D] = min + codes * scale, with (min, scale) [l, H, T, Gv, 1] per group of 64 channels."""
        start = 0
        for cg, vg in zip(groups(codes, 3, V_GROUP), groups(out, 3, V_GROUP), strict=True):
            n = cg.shape[3]
            torch.addcmul(v_min.narrow(3, start, n), cg, v_scale.narrow(3, start, n), out=vg)
            start += n
