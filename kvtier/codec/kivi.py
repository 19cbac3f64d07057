"""``int8`` (base id 7) and ``int4`` (base id 8): KIVI-style keys per channel and values per token, plus three fixes.

KIVI quantizes keys per channel (keys have outlier channels) and values per
token. Done plainly (uniform codes, one (scale, min) per group) that left
SmolLM2-135M's top-1 token agreeing with the raw model at 98.6% (int8) and
95.5% (int4) of positions. Three measured causes, and what these stages do
about each (numbers in docs/codecs.md):

1. **Attention sinks.** A few tokens per head (the first of a sequence, mostly)
   draw much of the attention and have keys unlike every other token: one of
   them stretches its key groups' range, and its own key and value errors are
   weighted by its large attention. Per (layer, head) the ``sinks = 2``
   tokens whose keys lie farthest from the chunk's per-channel mean (in
   channel standard deviations, max over channels) are stored as float16 keys
   and values, left out of the key groups' ranges, and put back on decode.
   The chunk needs no idea of its position: a chunk without a sink spends
   them on its two most unusual tokens.
2. **Key channels differ by orders of magnitude in range.** A fixed width
   wastes bits on narrow channels and starves wide ones. Keys are quantized
   per channel in groups of ``k_group`` tokens, each (group, channel) with its
   own (min, scale) and its own width ``b`` in ``[2, k_bits_max]`` bits, chosen
   per (layer, head, group) to minimize ``sum(w_c * err_c^2)`` under a fixed
   total of ``k_bit_budget(D)`` bits per token row: greedily, each next bit
   goes to the channel whose weighted squared error it reduces most, ``w_c *
   width^2 * (1/(2^b-1)^2 - 1/(2^(b+1)-1)^2)``. The weight ``w_c = rms_c ^
   k_rms_power`` (the channel's rms over the chunk's non-sink tokens) stands in
   for the size of the query the channel meets; plain MSE (power 0) measured
   clearly worse, powers 1 and 2 within noise of each other (the best measured
   is used). The total is fixed, so the byte size depends on the shape alone.
3. **Value channels with outliers** (int4). A per-token (min, scale) is set by
   the token's largest channels. int4 values are first rotated by an
   orthonormal Hadamard matrix in blocks of ``h`` channels (h = the largest
   power of two <= ``v_rotation`` dividing D: 16 for D = 64 or 128; blocks of
   16, 32 and 64 measured alike, 16 is the cheapest), which spreads an
   outlier over its block; int8 values are not rotated (their error is
   already small next to the keys'). Then values are quantized per token in
   groups of ``V_GROUP = 64`` channels to ``v_bits`` bits with one (min,
   scale) each, and rotated back on decode. Still one quantization group per
   token (per 64 channels), the KIVI axis; attention output is linear in V,
   so the rotation only reshapes the error.

Rounding: every min is rounded down and every scale up to its stored dtype, so
the ``2^b`` levels ``min + q * scale`` span the group and ``q = round((x -
min) / scale)`` (clamped) is within ``scale / 2`` of ``x`` (keys; values in
the rotated basis, where an orthonormal rotation preserves each token block's
error norm). Sinks are exact to float16. All-zero groups decode to zeros.
Payload values must lie within float16 range (ValueError otherwise): key
mins and sinks are float16.

=========  =======  ======  ===========  =========  ======  ========  ===================
stage      k_group  k bits  budget/row   rms power  v_bits  rotation  size, T=256, D=64
=========  =======  ======  ===========  =========  ======  ========  ===================
int8 (7)   256      2..12   7.73 D       2          8       none      0.2598 of float32
int4 (8)   64       2..8    4.25 D       1          4       h <= 16   0.1494 of float32
=========  =======  ======  ===========  =========  ======  ========  ===================

Bytes (S = min(sinks, T); Gk = ceil(T / k_group) key groups, of which Gf are
full; Gv = ceil(D / 64))::

    sink_idx   u16  [L, H, S]          token index of each sink, ascending
    sink_k     f16  [L, H, S, D]
    sink_v     f16  [L, H, S, D]
    k_min      f16  [L, H, Gk, D]
    k_scale    bf16 [L, H, Gk, D]
    v_min      bf16 [L, H, T, Gv]      (rotated basis)
    v_scale    bf16 [L, H, T, Gv]
    k_bits     u4   [L, H, Gk, D]      two per byte, low nibble first (zero-padded)
    v_codes    [L, H, T, D]            u8 (int8), or u4 two per byte low nibble first, zero-padded (int4)
    k_planes   per (l, h, full group, channel): its b bit planes, plane j holding
               bit j of the group's k_group codes, little-endian (token i at bit
               i % 8 of byte i // 8); then the same for the tail group, if any,
               with ceil(tail / 8) bytes per plane

The first int8 and int4 layouts (base ids 4 and 6) are decoded by the legacy
stages in :mod:`kvtier.codec.quant`.
"""

from __future__ import annotations

from functools import cache
from math import ceil
from typing import ClassVar

import numpy as np
import torch

from kvtier.codec.base import BaseStage, CodecError, Shape
from kvtier.codec.quant import Int4V1, Int8V1, _groups, _half, _nonzero, _offsets, _rounded

V_GROUP = 64
K_BITS_MIN = 2
_FP16_MAX = 65504.0


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
    return torch.matmul(x.unflatten(-1, (x.shape[-1] // h, h)), _hadamard(h)).flatten(-2)


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


class _Kivi:
    """The stage described in the module docstring; subclasses set its parameters."""

    name: ClassVar[str]
    ident: ClassVar[int]
    lossy: ClassVar[bool] = True
    legacy: ClassVar[tuple[type[BaseStage], ...]] = ()
    sinks: ClassVar[int] = 2
    k_group: ClassVar[int]
    k_bits_max: ClassVar[int]
    v_bits: ClassVar[int]
    v_rotation: ClassVar[int]  # largest Hadamard block for values (1: none)
    k_rms_power: ClassVar[float]  # a key channel's squared error counts rms^k_rms_power times

    @staticmethod
    def k_bit_budget(dim: int) -> int:
        """Key code bits per (layer, head, group, token row of D channels)."""
        raise NotImplementedError

    def shuffle_size(self, dtype: torch.dtype) -> int:
        return 1

    def _sections(self, shape: Shape) -> list[int]:
        layers, _, heads, tokens, dim = shape
        lh = layers * heads
        sinks = min(self.sinks, tokens)
        k_groups = ceil(tokens / self.k_group)
        full, tail = divmod(tokens, self.k_group)
        planes = self.k_bit_budget(dim)  # bit planes per (l, h, group)
        v_params = 2 * lh * tokens * ceil(dim / V_GROUP)
        return [
            2 * lh * sinks,  # 0 sink_idx
            2 * lh * sinks * dim,  # 1 sink_k
            2 * lh * sinks * dim,  # 2 sink_v
            2 * lh * k_groups * dim,  # 3 k_min
            2 * lh * k_groups * dim,  # 4 k_scale
            v_params,  # 5 v_min
            v_params,  # 6 v_scale
            ceil(lh * k_groups * dim / 2),  # 7 k_bits
            ceil(lh * tokens * dim * self.v_bits / 8),  # 8 v_codes
            lh * full * planes * ceil(self.k_group / 8),  # 9 k_planes, full groups
            lh * planes * ceil(tail / 8),  # 10 k_planes, tail group
        ]

    def encoded_size(self, shape: Shape, dtype: torch.dtype) -> int:
        return sum(self._sections(shape))

    # ------------------------------------------------------------------------------------------ encode

    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        shape = tuple(payload.shape)
        layers, _, heads, tokens, dim = shape
        off = _offsets(self._sections(shape))
        out = torch.empty(off[-1], dtype=torch.uint8)
        section = [out[off[i] : off[i + 1]] for i in range(len(off) - 1)]
        x = payload.float()  # [L, 2, H, T, D]
        low, high = torch.aminmax(x)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))) or max(-low, high) > _FP16_MAX:
            raise ValueError(f"{self.name} cannot encode non-finite values nor values beyond float16 range")
        k, v = x[:, 0], x[:, 1]  # [L, H, T, D]

        # sinks: the tokens whose keys lie farthest from the chunk's channel means, in channel std units
        sinks = min(self.sinks, tokens)
        mean = k.mean(2, keepdim=True)
        std = k.std(2, keepdim=True, correction=0)
        std = torch.where(std > 0, std, torch.inf)  # a constant channel makes no token unusual
        unusual = (k - mean).abs_().div_(std).amax(-1)  # [L, H, T]
        idx = unusual.topk(sinks, dim=-1).indices.sort(-1).values  # [L, H, S]
        is_sink = torch.zeros(layers, heads, tokens, 1, dtype=torch.bool)
        is_sink.scatter_(2, idx.unsqueeze(-1), True)
        section[0].view(torch.uint16).copy_(idx.reshape(-1))
        at = idx.unsqueeze(-1).expand(-1, -1, -1, dim)
        section[1].view(torch.float16).copy_(k.gather(2, at).reshape(-1))
        section[2].view(torch.float16).copy_(v.gather(2, at).reshape(-1))

        self._encode_keys(k, is_sink, section)
        self._encode_values(v, section)
        return out

    def _encode_keys(self, k: torch.Tensor, is_sink: torch.Tensor, section: list[torch.Tensor]) -> None:
        dim = k.shape[-1]
        steps = torch.arange(K_BITS_MIN, self.k_bits_max, dtype=torch.float64)  # a bit added at b bits
        gain = (1 / (2**steps - 1) ** 2 - 1 / (2 ** (steps + 1) - 1) ** 2).float()  # relative error^2 saved
        extra = self.k_bit_budget(dim) - K_BITS_MIN * dim  # bits handed out beyond the minimum, per row
        normal = ~is_sink
        count = normal.sum(2, keepdim=True).clamp_(min=1)
        mean_square = (k.square() * normal).sum(2, keepdim=True).div_(count)  # [L, H, 1, D], sinks left out
        importance = mean_square.pow_(self.k_rms_power / 2)
        k_low = k.masked_fill(is_sink, torch.inf)  # sinks do not widen their groups
        k_high = k.masked_fill(is_sink, -torch.inf)
        mins, scales, bits, planes = [], [], [], []
        for kg, lg, hg in zip(*(_groups(t, 2, self.k_group) for t in (k, k_low, k_high)), strict=True):
            low, high = lg.amin(3), hg.amax(3)  # kg: [L, H, n, g, D] -> [L, H, n, D]
            empty = low > high  # every token of the group is a sink
            low = _half(torch.where(empty, 0.0, low), -torch.inf)
            width = torch.where(empty, 0.0, high - low.float())
            weight = (width.square() * importance).unsqueeze(-1) * gain  # [L, H, n, D, steps]
            chosen = weight.flatten(-2).topk(extra, dim=-1).indices
            picked = torch.zeros(weight.flatten(-2).shape, dtype=torch.uint8).scatter_(-1, chosen, 1)
            b = picked.view(weight.shape).sum(-1, dtype=torch.uint8).add_(K_BITS_MIN)  # [L, H, n, D]
            levels = 2 ** b.float() - 1
            scale = _rounded(width / levels, torch.bfloat16, torch.inf)
            s = _nonzero(scale.float()).unsqueeze(3)
            codes = (kg - low.float().unsqueeze(3)).div_(s).round_().clamp_(min=0)
            codes = torch.minimum(codes, levels.unsqueeze(3))  # [L, H, n, g, D]
            mins.append(low)
            scales.append(scale)
            bits.append(b)
            planes.append(_bit_planes(codes, b, self.k_bits_max))
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
        for vg in _groups(vr, 3, V_GROUP):  # [L, H, T, n, g]
            low, high = torch.aminmax(vg, dim=4, keepdim=True)
            low = _rounded(low, torch.bfloat16, -torch.inf)
            scale = _rounded((high - low.float()) / top, torch.bfloat16, torch.inf)
            vg.sub_(low.float()).div_(_nonzero(scale.float())).round_().clamp_(0, top)
            mins.append(low.squeeze(4))
            scales.append(scale.squeeze(4))
        section[5].view(torch.bfloat16).copy_(torch.cat(mins, 3).reshape(-1))
        section[6].view(torch.bfloat16).copy_(torch.cat(scales, 3).reshape(-1))
        if self.v_bits == 8:
            section[8].copy_(vr.reshape(-1))
        else:
            _pack_nibbles(vr, section[8])

    # ------------------------------------------------------------------------------------------ decode

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        layers, _, heads, tokens, dim = shape
        off = _offsets(self._sections(shape))
        section = [data[off[i] : off[i + 1]] for i in range(len(off) - 1)]
        sinks = min(self.sinks, tokens)
        k_groups = ceil(tokens / self.k_group)
        idx = section[0].view(torch.uint16).view(layers, heads, sinks).to(torch.int64)
        if bool((idx >= tokens).any()):
            raise CodecError(f"{self.name}: sink index beyond the chunk's {tokens} tokens")
        bits = _unpack_nibbles(section[7], layers * heads * k_groups * dim).view(layers, heads, k_groups, dim)
        if bool(((bits < K_BITS_MIN) | (bits > self.k_bits_max)).any()) or bool(
            (bits.sum(-1, dtype=torch.int32) != self.k_bit_budget(dim)).any()
        ):
            raise CodecError(f"{self.name}: key bit widths are damaged")
        out = torch.empty(shape, dtype=dtype)

        k_min = section[3].view(torch.float16).view(layers, heads, k_groups, 1, dim).float()
        k_scale = section[4].view(torch.bfloat16).view(layers, heads, k_groups, 1, dim).float()
        start = 0
        for og in _groups(out[:, 0], 2, self.k_group):  # [L, H, n, g, D]
            n, g = og.shape[2], og.shape[3]
            plane_data = section[9] if g == self.k_group else section[10]
            codes = _from_bit_planes(plane_data, bits.narrow(2, start, n), g, self.k_bits_max)  # [L, H, n, D, g]
            torch.addcmul(k_min.narrow(2, start, n), codes.transpose(3, 4), k_scale.narrow(2, start, n), out=og)
            start += n

        v_groups = ceil(dim / V_GROUP)
        v_min = section[5].view(torch.bfloat16).view(layers, heads, tokens, v_groups, 1).float()
        v_scale = section[6].view(torch.bfloat16).view(layers, heads, tokens, v_groups, 1).float()
        if self.v_bits == 8:
            codes = section[8].view(layers, heads, tokens, dim)
        else:
            codes = _unpack_nibbles(section[8], layers * heads * tokens * dim).view(layers, heads, tokens, dim)
        h = hadamard_size(dim, self.v_rotation)
        vr = out[:, 1] if h == 1 else torch.empty(layers, heads, tokens, dim, dtype=torch.float32)
        start = 0
        for cg, vg in zip(_groups(codes, 3, V_GROUP), _groups(vr, 3, V_GROUP), strict=True):
            n = cg.shape[3]
            torch.addcmul(v_min.narrow(3, start, n), cg, v_scale.narrow(3, start, n), out=vg)
            start += n
        if h > 1:
            out[:, 1].copy_(rotate(vr, h))

        at = idx.unsqueeze(-1).expand(-1, -1, -1, dim)
        out[:, 0].scatter_(2, at, section[1].view(torch.float16).view(layers, heads, sinks, dim).to(dtype))
        out[:, 1].scatter_(2, at, section[2].view(torch.float16).view(layers, heads, sinks, dim).to(dtype))
        return out


def _transpose8(x: torch.Tensor) -> torch.Tensor:
    """Transpose the 8x8 bit matrix in each int64 of ``x`` (byte i = row i, bit j = column j), in place.

    Hacker's Delight's transpose8 on 64-bit words; the arithmetic right shifts are harmless because each
    mask clears the bits they fill.
    """
    for shift, mask in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)):
        t = torch.bitwise_and(x ^ (x >> shift), mask)
        x ^= t
        x ^= t << shift
    return x


def _bit_planes(codes: torch.Tensor, bits: torch.Tensor, max_bits: int) -> torch.Tensor:
    """The bit planes of ``codes`` [L, H, n, g, D] (integers as float) that ``bits`` [L, H, n, D] keeps, flat uint8.

    Order: (l, h, group, channel, plane j < bits); a plane is the g tokens' bit j, packed little-endian.
    """
    g = codes.shape[3]
    octets = ceil(g / 8)
    rows = codes.transpose(3, 4).reshape(-1, g)  # [R, g], one row per (l, h, group, channel)
    wide = rows.to(torch.int16 if max_bits > 8 else torch.uint8)
    planes = []
    for k in range(ceil(max_bits / 8)):  # 8 planes per byte of the code
        byte = torch.zeros(rows.shape[0], 8 * octets, dtype=torch.uint8)
        byte[:, :g] = (wide >> (8 * k)) & 0xFF if k else wide
        t = _transpose8(byte.view(torch.int64))  # [R, octets]: byte p of each word = plane p of 8 tokens
        planes.append(t.view(torch.uint8).view(-1, octets, 8).transpose(1, 2))  # [R, 8, octets]
    planes = torch.cat(planes, 1)[:, :max_bits]  # [R, max_bits, octets]
    keep = torch.arange(max_bits) < bits.reshape(-1, 1)  # [R, max_bits]
    return planes[keep].reshape(-1)


def _from_bit_planes(data: torch.Tensor, bits: torch.Tensor, g: int, max_bits: int) -> torch.Tensor:
    """Codes [L, H, n, D, g] (uint8, or int16 past 8 bits) from the planes :func:`_bit_planes` wrote."""
    octets = ceil(g / 8)
    byte_planes = 8 * ceil(max_bits / 8)
    keep = torch.arange(byte_planes) < bits.reshape(-1, 1)  # [R, 8 or 16]
    planes = torch.zeros(*keep.shape, octets, dtype=torch.uint8)
    planes[keep] = data.view(-1, octets)
    codes = None
    for k in range(byte_planes // 8):
        words = torch.empty(planes.shape[0], octets, 8, dtype=torch.uint8)
        words.copy_(planes[:, 8 * k : 8 * k + 8].transpose(1, 2))  # [R, octets, 8 planes]
        byte = _transpose8(words.view(torch.int64)).view(torch.uint8).view(-1, 8 * octets)  # code byte k per token
        codes = byte if k == 0 else codes.to(torch.int16) | (byte.to(torch.int16) << 8)
    return codes[:, :g].view(*bits.shape, g)


class Int8(_Kivi):
    name: ClassVar[str] = "int8"
    ident: ClassVar[int] = 7
    legacy: ClassVar[tuple[type[BaseStage], ...]] = (Int8V1,)
    k_group: ClassVar[int] = 256
    k_bits_max: ClassVar[int] = 12
    k_rms_power: ClassVar[float] = 2.0
    v_bits: ClassVar[int] = 8
    v_rotation: ClassVar[int] = 1

    @staticmethod
    def k_bit_budget(dim: int) -> int:
        return 495 * dim // 64  # 7.73 bits per key on average: a size of 0.2598 of float32 at T=256, D=64


class Int4(_Kivi):
    name: ClassVar[str] = "int4"
    ident: ClassVar[int] = 8
    legacy: ClassVar[tuple[type[BaseStage], ...]] = (Int4V1,)
    k_group: ClassVar[int] = 64
    k_bits_max: ClassVar[int] = 8
    k_rms_power: ClassVar[float] = 1.0
    v_bits: ClassVar[int] = 4
    v_rotation: ClassVar[int] = 16

    @staticmethod
    def k_bit_budget(dim: int) -> int:
        return 17 * dim // 4  # 4.25 bits per key on average: a size of 0.1494 of float32 at T=256, D=64
