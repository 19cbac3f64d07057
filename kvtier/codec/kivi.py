"""``int4`` (base id 8) and ``int8`` (base id 9): KIVI-style keys per channel and values per token, plus fixes.

KIVI quantizes keys per channel (keys have outlier channels) and values per
token. Done plainly (uniform codes, one (scale, min) per group) that left
SmolLM2-135M's top-1 token agreeing with the raw model at 98.6% (int8) and
95.5% (int4) of positions. Three measured causes, and what these stages do
about each (numbers in docs/codecs.md):

1. **Attention sinks** (int4 and int8). A few tokens per head (the first of a
   sequence, mostly) draw much of the attention and have keys unlike every
   other token: one of them stretches its key groups' range, and its own key
   and value errors are weighted by its large attention. Per (layer, head) the
   2 tokens whose keys lie farthest from the chunk's per-channel mean (in
   channel standard deviations, max over channels) are stored as float16 keys
   and values, left out of the key groups' ranges, and put back on decode.
   The chunk needs no idea of its position: a chunk without a sink spends
   them on its two most unusual tokens.
2. **Key channels differ by orders of magnitude in range** (int4). A fixed
   width wastes bits on narrow channels and starves wide ones. int4 keys are
   quantized per channel in groups of ``k_group`` tokens, each (group,
   channel) with its own (min, scale) and its own width ``b`` in ``[2,
   k_bits_max]`` bits, chosen per (layer, head, group) to minimize ``sum(w_c *
   err_c^2)`` under a fixed total of ``k_bit_budget(D)`` bits per token row:
   greedily, each next bit goes to the channel whose weighted squared error it
   reduces most, ``w_c * width^2 * (1/(2^b-1)^2 - 1/(2^(b+1)-1)^2)``. The
   weight ``w_c = rms_c ^ k_rms_power`` (the channel's rms over the chunk's
   non-sink tokens) stands in for the size of the query the channel meets;
   plain MSE (power 0) measured 15-40% more KL. The total is fixed, so the byte
   size depends on the shape alone. The codes are stored as bit planes.
3. **Value channels with outliers** (int4). A per-token (min, scale) is set by
   the token's largest channels. int4 values are first rotated by an
   orthonormal Hadamard matrix in blocks of ``h`` channels (h = the largest
   power of two <= 16 dividing D; blocks of 32 and 64 measured alike, 16 is the
   cheapest), which spreads an outlier over its block, then quantized per
   token in groups of ``V_GROUP = 64`` channels to 4 bits with one (min, scale)
   each, and rotated back on decode. Still one quantization group per token
   (per 64 channels), the KIVI axis; attention output is linear in V, so the
   rotation only reshapes the error.

int8 keeps one byte per code (keys asymmetric per channel over groups of 256
tokens, values symmetric per token), so that decoding is two broadcast
multiply-adds; with the sinks it already matches bf16's top-1 agreement with
the raw model. Its second layout (base id 7, :class:`Int8V2`: int4's scheme with
up to 12-bit keys, 7.73 bits per key on average, 8-bit values, no rotation)
halved its KL again but decoded 3-4x slower, which made a disk hit slower
than one of raw chunks; it is still decoded.

Rounding: every min is rounded down and every scale up to its stored dtype, so
the levels ``min + q * scale`` span the group and ``q = round((x - min) /
scale)`` (clamped) is within ``scale / 2`` of ``x`` (int8 values: ``q =
round(x / scale)``, ``scale = absmax / 127``; int4 values in the rotated basis,
where an orthonormal rotation preserves each token block's error norm). Sinks
are exact to float16. All-zero groups decode to zeros. Payload values must
lie within float16 range (ValueError otherwise): key mins and sinks are
float16.

int8 bytes (S = min(2, T) sinks, Gk = ceil(T / 256) key groups)::

    sink_idx   u16  [L, H, S]          token index of each sink, ascending
    sink_k     f16  [L, H, S, D]
    sink_v     f16  [L, H, S, D]
    k_min      f16  [L, H, Gk, D]
    k_scale    bf16 [L, H, Gk, D]
    v_scale    bf16 [L, H, T]
    k_codes    u8   [L, H, T, D]       q = round((x - min) / scale), 0..255
    v_codes    i8   [L, H, T, D]       q = round(x / scale), -127..127

0.2598 of float32 at T=256, D=64.

int4 (and int8 v2) bytes (Gk = ceil(T / k_group) key groups, Gv = ceil(D / 64))::

    sink_idx   u16  [L, H, S]          token index of each sink, ascending
    sink_k     f16  [L, H, S, D]
    sink_v     f16  [L, H, S, D]
    k_min      f16  [L, H, Gk, D]
    k_scale    bf16 [L, H, Gk, D]
    v_min      bf16 [L, H, T, Gv]      (rotated basis)
    v_scale    bf16 [L, H, T, Gv]
    k_bits     u4   [L, H, Gk, D]      two per byte, low nibble first (zero-padded)
    v_codes    u4 [L, H, T, D], two per byte, low nibble first, zero-padded (int8 v2: u8)
    k_planes   per (l, h, full group, channel): its b bit planes, plane j holding
               bit j of the group's k_group codes, little-endian (token i at bit
               i % 8 of byte i // 8); then the same for the tail group, if any,
               with ceil(tail / 8) bytes per plane

=========  =======  ======  ===========  =========  ======  ========  ===================
stage      k_group  k bits  budget/row   rms power  v_bits  rotation  size, T=256, D=64
=========  =======  ======  ===========  =========  ======  ========  ===================
int4 (8)   64       2..8    4.25 D       1          4       h <= 16   0.1494 of float32
int8 v2    256      2..12   7.73 D       2          8       none      0.2598 of float32
=========  =======  ======  ===========  =========  ======  ========  ===================

The first int8 and int4 layouts (base ids 4 and 6) are decoded by the legacy
stages in :mod:`kvtier.codec.quant`.
"""

from __future__ import annotations

from functools import cache
from math import ceil
from typing import ClassVar

import numpy as np
import torch

from kvtier.codec import kernels
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


def _check_range(name: str, x: torch.Tensor) -> None:
    low, high = torch.aminmax(x)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))) or max(-low, high) > _FP16_MAX:
        raise ValueError(f"{name} cannot encode non-finite values nor values beyond float16 range")


def _encode_sinks(
    x: torch.Tensor, payload: torch.Tensor, count: int, k_group: int, section: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the sinks of float32 ``x`` [L, 2, H, T, D] (``payload`` or a copy of it), write sections 0-2.

    Returns the keys [L, H, T, D] with each sink replaced by an ordinary token of its key group (the first
    of the group's first three tokens that is no sink; a copy if ``x`` is the caller's ``payload``), so that
    the groups' ranges leave the sinks out, and the channels' mean square over the other tokens [L, H, 1, D].
    """
    layers, _, heads, tokens, dim = x.shape
    k, v = x[:, 0], x[:, 1]
    # the tokens whose keys lie farthest from the chunk's channel means, in channel std units (variance as
    # E[k^2] - mean^2: one pass, and precise enough to rank tokens)
    sinks = min(count, tokens)
    mean = k.mean(2, keepdim=True)
    mean_square = torch.linalg.vector_norm(k, dim=2, keepdim=True).square_().div_(tokens)  # [L, H, 1, D]
    var = (mean_square - mean.square()).clamp_(min=0)
    std = torch.where(var > 0, var.sqrt(), torch.inf)  # a constant channel makes no token unusual
    unusual = (k - mean).abs_().div_(std).amax(-1)  # [L, H, T]
    idx = unusual.topk(sinks, dim=-1).indices.sort(-1).values  # [L, H, S]
    section[0].view(torch.uint16).copy_(idx.reshape(-1))
    at = idx.unsqueeze(-1).expand(-1, -1, -1, dim)
    sink_k = k.gather(2, at)  # [L, H, S, D]
    section[1].view(torch.float16).copy_(sink_k.reshape(-1))
    section[2].view(torch.float16).copy_(v.gather(2, at).reshape(-1))
    others = max(tokens - sinks, 1)
    mean_square.mul_(tokens).sub_(sink_k.square().sum(2, keepdim=True)).div_(others).clamp_(min=0)

    k_work = k if x is not payload else k.clone()
    is_sink = torch.zeros(layers, heads, tokens, dtype=torch.bool).scatter_(2, idx, True)
    first = idx // k_group * k_group  # [L, H, S]: start of each sink's group
    last = torch.clamp(first + k_group, max=tokens) - 1
    candidates = torch.minimum(first.unsqueeze(-1) + torch.arange(3), last.unsqueeze(-1))  # [L, H, S, 3]
    taken = is_sink.gather(2, candidates.flatten(2)).view(candidates.shape)
    pick = torch.argmin(taken.to(torch.uint8), dim=-1, keepdim=True)  # the first free one (0 if none)
    stand_in = torch.where(taken.all(-1), idx, candidates.gather(-1, pick).squeeze(-1))  # all sinks: keep
    k_work.scatter_(2, at, k.gather(2, stand_in.unsqueeze(-1).expand(-1, -1, -1, dim)))
    return k_work, mean_square


def _sink_index(name: str, data: torch.Tensor, shape: Shape, count: int) -> torch.Tensor:
    """The sink token indices [L, H, S] (int64) in section 0; CodecError if one is beyond the chunk."""
    layers, _, heads, tokens, _ = shape
    idx = data.view(torch.uint16).view(layers, heads, min(count, tokens)).to(torch.int64)
    if bool((idx >= tokens).any()):
        raise CodecError(f"{name}: sink index beyond the chunk's {tokens} tokens")
    return idx


def _put_sinks(out: torch.Tensor, idx: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor) -> None:
    """Write the float16 sink keys and values (sections 1 and 2) into ``out`` [L, 2, H, T, D] at ``idx``."""
    layers, heads, sinks = idx.shape
    dim = out.shape[-1]
    at = idx.unsqueeze(-1).expand(-1, -1, -1, dim)
    out[:, 0].scatter_(2, at, sink_k.view(torch.float16).view(layers, heads, sinks, dim).to(out.dtype))
    out[:, 1].scatter_(2, at, sink_v.view(torch.float16).view(layers, heads, sinks, dim).to(out.dtype))


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


class _Kivi:
    """The bit-plane stage of the module docstring (int4, int8 v2); subclasses set its parameters."""

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
        off = _offsets(self._sections(shape))
        out = torch.empty(off[-1], dtype=torch.uint8)
        section = [out[off[i] : off[i + 1]] for i in range(len(off) - 1)]
        x = payload.float()  # [L, 2, H, T, D]
        _check_range(self.name, x)
        k_work, mean_square = _encode_sinks(x, payload, self.sinks, self.k_group, section)
        self._encode_keys(k_work, mean_square.pow_(self.k_rms_power / 2), section)
        self._encode_values(x[:, 1], section)
        return out

    def _encode_keys(self, k: torch.Tensor, importance: torch.Tensor, section: list[torch.Tensor]) -> None:
        """Keys [L, H, T, D] (sinks already replaced) into sections 3, 4, 7, 9, 10; ``importance`` [L, H, 1, D]."""
        dim = k.shape[-1]
        steps = torch.arange(K_BITS_MIN, self.k_bits_max, dtype=torch.float64)  # a bit added at b bits
        gain = (1 / (2**steps - 1) ** 2 - 1 / (2 ** (steps + 1) - 1) ** 2).float()  # relative error^2 saved
        extra = self.k_bit_budget(dim) - K_BITS_MIN * dim  # bits handed out beyond the minimum, per row
        code_dtype = torch.int16 if self.k_bits_max > 8 else torch.uint8
        mins, scales, bits, planes = [], [], [], []
        for kg in _groups(k, 2, self.k_group):  # [L, H, n, g, D]
            low, high = torch.aminmax(kg, dim=3)  # [L, H, n, D]
            low = _half(low, -torch.inf)
            width = high - low.float()
            weight = (width.square() * importance).unsqueeze(-1) * gain  # [L, H, n, D, steps]
            chosen = weight.flatten(-2).topk(extra, dim=-1).indices
            picked = torch.zeros(weight.flatten(-2).shape, dtype=torch.uint8).scatter_(-1, chosen, 1)
            b = picked.view(weight.shape).sum(-1, dtype=torch.uint8).add_(K_BITS_MIN)  # [L, H, n, D]
            levels = (2 ** b.float() - 1).unsqueeze(3)
            scale = _rounded(width / levels.squeeze(3), torch.bfloat16, torch.inf)
            codes = (kg - low.float().unsqueeze(3)).div_(_nonzero(scale.float()).unsqueeze(3)).round_()
            codes = torch.minimum(codes.clamp_(min=0), levels, out=codes).to(code_dtype)  # [L, H, n, g, D]
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
        k_groups = ceil(tokens / self.k_group)
        idx = _sink_index(self.name, section[0], shape, self.sinks)
        bits = _unpack_nibbles(section[7], layers * heads * k_groups * dim).view(layers, heads, k_groups, dim)
        if bool(((bits < K_BITS_MIN) | (bits > self.k_bits_max)).any()) or bool(
            (bits.sum(-1, dtype=torch.int32) != self.k_bit_budget(dim)).any()
        ):
            raise CodecError(f"{self.name}: key bit widths are damaged")
        if self.k_group == 64 and self.k_bits_max <= 8 and self.v_bits == 4 and dim % 2 == 0 and kernels.enabled():
            return self._decode_compiled(section, bits, idx, shape, dtype)
        out = torch.empty(shape, dtype=dtype)
        k_min, k_scale, v_min, v_scale = _group_params(section, shape, k_groups)
        k_min, k_scale = k_min.unsqueeze(3), k_scale.unsqueeze(3)  # [L, H, Gk, 1, D]: over a group's tokens
        v_min, v_scale = v_min.unsqueeze(-1), v_scale.unsqueeze(-1)  # [L, H, T, Gv, 1]: over a group's channels
        start = 0
        for og in _groups(out[:, 0], 2, self.k_group):  # [L, H, n, g, D]
            n, g = og.shape[2], og.shape[3]
            plane_data = section[9] if g == self.k_group else section[10]
            low, high_rows, high = _from_bit_planes(plane_data, bits.narrow(2, start, n), g, self.k_bits_max)
            scale = k_scale.narrow(2, start, n)
            torch.addcmul(k_min.narrow(2, start, n), low, scale, out=og)  # low: [L, H, n, g, D]
            if high is not None:  # codes past 8 bits: redo those (group, channel) rows with the high byte
                lhn, d = high_rows // dim, high_rows % dim
                la, he, gr = lhn // (heads * n), lhn // n % heads, lhn % n
                code = low[la, he, gr, :, d].float().add_(high.float(), alpha=256)  # [rows, g]
                low_ = k_min.narrow(2, start, n)[la, he, gr, 0, d].unsqueeze(1)
                og[la, he, gr, :, d] = torch.addcmul(low_, code, scale[la, he, gr, 0, d].unsqueeze(1)).to(dtype)
            start += n

        if self.v_bits == 8:
            codes = section[8].view(layers, heads, tokens, dim)
        else:
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

        _put_sinks(out, idx, section[1], section[2])
        return out

    def _decode_compiled(
        self, section: list[torch.Tensor], bits: torch.Tensor, idx: torch.Tensor, shape: Shape, dtype: torch.dtype
    ) -> torch.Tensor:
        """:meth:`decode` by the numba kernels (int4's parameters, an even D: whole bytes of codes per token)."""
        out = torch.empty(shape, dtype=torch.float32)
        k_min, k_scale, v_min, v_scale = _group_params(section, shape, bits.shape[2])
        wide = out.numpy()
        kernels.int4_keys(section[9].numpy(), section[10].numpy(), bits.numpy(), k_min.numpy(), k_scale.numpy(), wide)
        block = hadamard_size(shape[4], self.v_rotation)
        kernels.int4_values(section[8].numpy(), v_min.numpy(), v_scale.numpy(), block, wide)
        if dtype != torch.float32:
            out = out.to(dtype)
        _put_sinks(out, idx, section[1], section[2])
        return out

    @staticmethod
    def _dequantize_values(codes: torch.Tensor, v_min: torch.Tensor, v_scale: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` [l, H, T, D] = min + codes * scale, with (min, scale) [l, H, T, Gv, 1] per group of 64 channels."""
        start = 0
        for cg, vg in zip(_groups(codes, 3, V_GROUP), _groups(out, 3, V_GROUP), strict=True):
            n = cg.shape[3]
            torch.addcmul(v_min.narrow(3, start, n), cg, v_scale.narrow(3, start, n), out=vg)
            start += n


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


def _byte_transpose8(w: torch.Tensor) -> torch.Tensor:
    """Transpose the 8x8 byte matrix that each w[r, :, c] forms (word i = row i, byte j = column j), in place.

    ``w`` is a contiguous int64 tensor [R, 8, C]. Three rounds swap 4x4, 2x2 and 1x1 blocks of bytes between
    pairs of words (the arithmetic right shifts are harmless: each mask clears the bits they fill).
    """
    rows, _, cols = w.shape
    for shift, mask in ((32, 0x00000000FFFFFFFF), (16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF)):
        pairs = w.view(rows, 64 // (2 * shift), 2, shift // 8, cols)
        lo, hi = pairs[:, :, 0], pairs[:, :, 1]  # words i and i + shift / 8
        t = torch.bitwise_and((lo >> shift) ^ hi, mask)
        hi ^= t
        lo ^= t << shift
    return w


def _bit_planes(codes: torch.Tensor, bits: torch.Tensor, max_bits: int) -> torch.Tensor:
    """The bit planes of ``codes`` [L, H, n, g, D] (uint8, int16 past 8 bits) that ``bits`` [L, H, n, D] keeps.

    Flat uint8 in the order (l, h, group, channel, plane j < bits); a plane holds bit j of the g tokens' codes,
    little-endian. Per 64 tokens: one word per 8 tokens (a byte each), an 8x8 bit transpose inside each word
    (byte j: bit j of the 8 tokens), then an 8x8 byte transpose across the 8 words (word j: plane j).
    """
    layers, heads, n, g, dim = codes.shape
    octets = ceil(g / 8)
    words = ceil(octets / 8)  # 64-bit words per plane
    rows = layers * heads * n * dim
    per_channel = codes.transpose(3, 4)  # [L, H, n, D, g]
    planes = []
    for k in range(ceil(max_bits / 8)):
        byte = torch.zeros(layers, heads, n, dim, 64 * words, dtype=torch.uint8)
        byte[..., :g] = per_channel if codes.dtype == torch.uint8 else (per_channel >> (8 * k)) & 0xFF
        w = _transpose8(byte.view(torch.int64).view(rows, words, 8))  # word (w, o): tokens 64 w + 8 o ...
        w = w.transpose(1, 2).contiguous() if words > 1 else w.view(rows, 8, 1)
        planes.append(_byte_transpose8(w))  # [R, 8, words]: word (j, w) = plane 8 k + j of tokens 64 w ...
    planes = torch.cat(planes, 1) if len(planes) > 1 else planes[0]
    keep = torch.arange(planes.shape[1]) < bits.reshape(-1, 1)  # [R, 8 or 16]
    return planes[keep].view(torch.uint8).view(-1, 8 * words)[:, :octets].reshape(-1)


def _from_bit_planes(
    data: torch.Tensor, bits: torch.Tensor, g: int, max_bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The codes the planes :func:`_bit_planes` wrote for ``bits`` [L, H, n, D] encode.

    Returns their low bytes [L, H, n, g, D] (uint8, a view), the rows (flat (l, h, group, channel) indices)
    whose codes have more than 8 bits, and those rows' high bytes [rows, g] (None if there are none).
    """
    octets = ceil(g / 8)
    words = ceil(octets / 8)  # 64-bit words per plane
    rows = data.view(-1, octets)
    if octets != 8 * words:  # a tail group: pad each plane to whole words
        rows = torch.nn.functional.pad(rows, (0, 8 * words - octets))
    planes = torch.cat([rows, rows.new_zeros(1, 8 * words)]).view(torch.int64)  # new, aligned; a last zero plane
    count = bits.reshape(-1).to(torch.int64)
    start = count.cumsum(0) - count  # each row's first plane
    codes = _plane_bytes(planes, start, count.clamp(max=8))  # [R, 64 * words]: bits 0..7 of each token's code
    layers, heads, n, dim = bits.shape
    low = codes[:, :g].view(layers, heads, n, dim, g).transpose(3, 4)
    high = (count > 8).nonzero().squeeze(1) if max_bits > 8 else count[:0]
    return low, high, (_plane_bytes(planes, start[high] + 8, count[high] - 8)[:, :g] if high.numel() else None)


def _plane_bytes(planes: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row, the ``count`` (<= 8) planes from ``planes[start]`` on as one byte per token [R, 64 * words].

    The planes are gathered as 64-bit words (64 tokens each; the last row of ``planes`` is zero and stands in
    for planes a row lacks); then an 8x8 byte transpose across each row's 8 words and an 8x8 bit transpose
    inside each word leave byte t of word o holding bits 0..7 (planes) of token 8 * o + t.
    """
    j = torch.arange(8)
    w = planes[torch.where(j < count.unsqueeze(1), start.unsqueeze(1) + j, planes.shape[0] - 1)]  # [R, 8, words]
    rows, _, words = w.shape
    _transpose8(_byte_transpose8(w))  # byte t of word (o, w): bits 0..7 of token 64 * w + 8 * o + t
    return (w if words == 1 else w.transpose(1, 2).contiguous()).view(torch.uint8).view(rows, 64 * words)


class Int8V2(_Kivi):
    """int8 with per-channel key bit widths (base id 7): written by an earlier version, decoded, not written."""

    name: ClassVar[str] = "int8"
    ident: ClassVar[int] = 7
    k_group: ClassVar[int] = 256
    k_bits_max: ClassVar[int] = 12
    k_rms_power: ClassVar[float] = 2.0
    v_bits: ClassVar[int] = 8
    v_rotation: ClassVar[int] = 1

    @staticmethod
    def k_bit_budget(dim: int) -> int:
        return 495 * dim // 64  # 7.73 bits per key on average: a size of 0.2598 of float32 at T=256, D=64


class Int8:
    """int8 (base id 9): float16 sinks, keys asymmetric per channel in groups of 256 tokens, values per token.

    See the module docstring; every code is one byte, so decoding is two broadcast multiply-adds.
    """

    name: ClassVar[str] = "int8"
    ident: ClassVar[int] = 9
    lossy: ClassVar[bool] = True
    legacy: ClassVar[tuple[type[BaseStage], ...]] = (Int8V1, Int8V2)
    sinks: ClassVar[int] = 2
    k_group: ClassVar[int] = 256

    def shuffle_size(self, dtype: torch.dtype) -> int:
        return 1

    def _sections(self, shape: Shape) -> list[int]:
        layers, _, heads, tokens, dim = shape
        lh = layers * heads
        sinks = min(self.sinks, tokens)
        k_groups = ceil(tokens / self.k_group)
        return [
            2 * lh * sinks,  # 0 sink_idx
            2 * lh * sinks * dim,  # 1 sink_k
            2 * lh * sinks * dim,  # 2 sink_v
            2 * lh * k_groups * dim,  # 3 k_min
            2 * lh * k_groups * dim,  # 4 k_scale
            2 * lh * tokens,  # 5 v_scale
            lh * tokens * dim,  # 6 k_codes
            lh * tokens * dim,  # 7 v_codes
        ]

    def encoded_size(self, shape: Shape, dtype: torch.dtype) -> int:
        return sum(self._sections(shape))

    def encode(self, payload: torch.Tensor) -> torch.Tensor:
        shape = tuple(payload.shape)
        layers, _, heads, tokens, dim = shape
        off = _offsets(self._sections(shape))
        out = torch.empty(off[-1], dtype=torch.uint8)
        section = [out[off[i] : off[i + 1]] for i in range(len(off) - 1)]
        x = payload.float()  # [L, 2, H, T, D]
        _check_range(self.name, x)
        k, _ = _encode_sinks(x, payload, self.sinks, self.k_group, section)
        k_codes = section[6].view(layers, heads, tokens, dim)
        mins, scales = [], []
        for kg, qg in zip(_groups(k, 2, self.k_group), _groups(k_codes, 2, self.k_group), strict=True):
            low, high = torch.aminmax(kg, dim=3, keepdim=True)  # [L, H, n, 1, D]
            low = _half(low, -torch.inf)
            scale = _rounded((high - low.float()) / 255, torch.bfloat16, torch.inf)
            qg.copy_((kg - low.float()).div_(_nonzero(scale.float())).round_().clamp_(0, 255))
            mins.append(low.squeeze(3))
            scales.append(scale.squeeze(3))
        section[3].view(torch.float16).copy_(torch.cat(mins, 2).reshape(-1))
        section[4].view(torch.bfloat16).copy_(torch.cat(scales, 2).reshape(-1))
        v = x[:, 1]
        low, high = torch.aminmax(v, dim=3, keepdim=True)
        v_scale = _rounded(torch.maximum(high, low.neg_()) / 127, torch.bfloat16, torch.inf)  # [L, H, T, 1]
        section[5].view(torch.bfloat16).copy_(v_scale.reshape(-1))
        # |v / scale| <= 127 with the rounded-up scale (+ float32 rounding: round() stays within), no clamp
        section[7].view(torch.int8).view(layers, heads, tokens, dim).copy_(v.div(_nonzero(v_scale.float())).round_())
        return out

    def decode(self, data: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        layers, _, heads, tokens, dim = shape
        off = _offsets(self._sections(shape))
        section = [data[off[i] : off[i + 1]] for i in range(len(off) - 1)]
        idx = _sink_index(self.name, section[0], shape, self.sinks)
        k_groups = ceil(tokens / self.k_group)
        k_min = section[3].view(torch.float16).view(layers, heads, k_groups, 1, dim).float()
        k_scale = section[4].view(torch.bfloat16).view(layers, heads, k_groups, 1, dim).float()
        v_scale = section[5].view(torch.bfloat16).view(layers, heads, tokens, 1).float()
        k_codes = section[6].view(layers, heads, tokens, dim)
        out = torch.empty(shape, dtype=dtype)
        start = 0
        for qg, og in zip(_groups(k_codes, 2, self.k_group), _groups(out[:, 0], 2, self.k_group), strict=True):
            n = qg.shape[2]
            torch.addcmul(k_min.narrow(2, start, n), qg, k_scale.narrow(2, start, n), out=og)
            start += n
        torch.mul(section[7].view(torch.int8).view(layers, heads, tokens, dim), v_scale, out=out[:, 1])
        _put_sinks(out, idx, section[1], section[2])
        return out


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
