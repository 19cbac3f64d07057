"""The numba kernels behind :mod:`kvtier.codec.kernels` (imported only when numba is used; see there)."""

from __future__ import annotations

import numba
import numpy as np

u64, u32 = np.uint64, np.uint32
_jit = numba.njit(nogil=True, cache=True)


@_jit
def int4_keys(words, tail, bits, k_min, k_scale, out):
    """Keys of ``out`` [L, 2, H, T, D] (float32) from the int4 bit planes.

    ``words``: the planes of the full 64-token groups, one uint64 each (token i at bit i), in the order
    (l, h, group, channel, plane j < bits); ``tail``: the tail group's planes, ``ceil(tail / 8)`` bytes
    each; ``bits`` uint8 [L, H, Gk, D]; ``k_min``/``k_scale`` float32 [L, H, Gk, D].
    """
    layers, heads, groups, dim = bits.shape
    tokens = out.shape[3]
    full = tokens // 64
    octets = (tokens - full * 64 + 7) // 8
    tile = np.empty((dim, 64), np.uint32)
    pw = 0
    pt = 0
    for la in range(layers):
        for h in range(heads):
            for g in range(groups):
                n = 64 if g < full else tokens - full * 64
                for c in range(dim):
                    b = bits[la, h, g, c]
                    row = tile[c]
                    for t in range(64):
                        row[t] = 0
                    if g < full:
                        for j in range(b):
                            w = words[pw + j]
                            for t in range(64):
                                row[t] |= u32((w >> u64(t)) & u64(1)) << u32(j)
                        pw += b
                    else:
                        for j in range(b):
                            for t in range(n):
                                byte = u32(tail[pt + j * octets + (t >> 3)])
                                row[t] |= ((byte >> u32(t & 7)) & u32(1)) << u32(j)
                        pt += b * octets
                base = g * 64
                for t in range(n):
                    for c in range(dim):
                        out[la, 0, h, base + t, c] = k_min[la, h, g, c] + np.float32(tile[c, t]) * k_scale[la, h, g, c]


@numba.njit(nogil=True, cache=True, inline="always")
def _butterflies(row, block, stages):
    """The Sylvester Hadamard transform (unnormalized) of each ``block`` (= 2 ** stages) of ``row``, in place.

    Inlined into its caller, so a call with constant ``block`` and ``stages`` compiles to constant trip counts
    (measured 4.5x faster than the same loops over runtime bounds).
    """
    for first in range(0, row.shape[0], block):
        span = 1
        for _ in range(stages):
            for a in range(first, first + block, 2 * span):
                for k in range(a, a + span):
                    x = row[k]
                    y = row[k + span]
                    row[k] = x + y
                    row[k + span] = x - y
            span *= 2


@_jit
def int4_values(packed, v_min, v_scale, block, out):
    """Values of ``out`` [L, 2, H, T, D] (float32) from 4-bit codes, rotated back by the block Hadamard.

    ``packed``: the codes, two per byte, low nibble first, in (l, h, t, d) order (D even); ``v_min`` /
    ``v_scale`` float32 [L, H, T, Gv] per 64 channels; ``block``: the Hadamard block size (a power of two
    dividing D). Dequantize a token row, transform each block (butterflies), scale by ``block ** -0.5``.
    """
    layers, _, heads, tokens, dim = out.shape
    norm = np.float32(1.0 / np.sqrt(np.float64(block)))
    stages = 0
    while (1 << stages) < block:
        stages += 1
    row = np.empty(dim, np.float32)
    i = 0
    for la in range(layers):
        for h in range(heads):
            for t in range(tokens):
                for c2 in range(dim // 2):
                    byte = packed[i]
                    i += 1
                    g = (2 * c2) >> 6
                    row[2 * c2] = v_min[la, h, t, g] + np.float32(byte & 15) * v_scale[la, h, t, g]
                    row[2 * c2 + 1] = v_min[la, h, t, g] + np.float32(byte >> 4) * v_scale[la, h, t, g]
                if block == 16:  # int4's block for every D divisible by 16: the constant-bound loops
                    _butterflies(row, 16, 4)
                elif block > 1:
                    _butterflies(row, block, stages)
                if block > 1:
                    for c in range(dim):
                        out[la, 1, h, t, c] = row[c] * norm
                else:
                    for c in range(dim):
                        out[la, 1, h, t, c] = row[c]


@_jit
def fp8_dequantize(codes, table, k_scale, v_scale, out):
    """out [L, 2, H, T, D] = table[codes] * scale; keys by ``k_scale`` [L, H, D], values by ``v_scale`` [L, H, T]."""
    layers, _, heads, tokens, dim = out.shape
    for la in range(layers):
        for h in range(heads):
            for t in range(tokens):
                for c in range(dim):
                    out[la, 0, h, t, c] = table[codes[la, 0, h, t, c]] * k_scale[la, h, c]
                s = v_scale[la, h, t]
                for c in range(dim):
                    out[la, 1, h, t, c] = table[codes[la, 1, h, t, c]] * s
