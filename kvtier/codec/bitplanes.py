"""Bit planes of up-to-8-bit codes (int4's keys), written and read 64 tokens at a time by word transposes.

A (group, channel) row of ``g`` codes of ``b`` bits is stored as ``b`` planes;
plane j holds bit j of the g codes, little-endian (token i at bit i % 8 of
byte i // 8), ``ceil(g / 8)`` bytes a plane. Turning 8 planes of 64 tokens
into 64 code bytes and back is an 8x8 byte transpose across 64-bit words and
an 8x8 bit transpose inside each (shift/xor passes, no per-bit unpacking).
"""

from __future__ import annotations

from math import ceil

import torch


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


def bit_planes(codes: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The bit planes of ``codes`` [L, H, n, g, D] (uint8) that ``bits`` [L, H, n, D] (each <= 8) keeps.

    Flat uint8 in the order (l, h, group, channel, plane j < bits). Per 64 tokens: one word per 8 tokens (a
    byte each), an 8x8 bit transpose inside each word (byte j: bit j of the 8 tokens), then an 8x8 byte
    transpose across the 8 words (word j: plane j).
    """
    layers, heads, n, g, dim = codes.shape
    octets = ceil(g / 8)
    words = ceil(octets / 8)  # 64-bit words per plane
    rows = layers * heads * n * dim
    byte = torch.zeros(layers, heads, n, dim, 64 * words, dtype=torch.uint8)
    byte[..., :g] = codes.transpose(3, 4)  # [L, H, n, D, g]
    w = _transpose8(byte.view(torch.int64).view(rows, words, 8))  # word (w, o): tokens 64 w + 8 o ...
    w = w.transpose(1, 2).contiguous() if words > 1 else w.view(rows, 8, 1)
    planes = _byte_transpose8(w)  # [R, 8, words]: word (j, w) = plane j of tokens 64 w ...
    keep = torch.arange(8) < bits.reshape(-1, 1)  # [R, 8]
    return planes[keep].view(torch.uint8).view(-1, 8 * words)[:, :octets].reshape(-1)


def from_bit_planes(data: torch.Tensor, bits: torch.Tensor, g: int) -> torch.Tensor:
    """The codes [L, H, n, g, D] (uint8, a view) that the planes :func:`bit_planes` wrote for ``bits`` encode."""
    octets = ceil(g / 8)
    words = ceil(octets / 8)  # 64-bit words per plane
    rows = data.view(-1, octets)
    if octets != 8 * words:  # a tail group: pad each plane to whole words
        rows = torch.nn.functional.pad(rows, (0, 8 * words - octets))
    planes = torch.cat([rows, rows.new_zeros(1, 8 * words)]).view(torch.int64)  # new, aligned; a last zero plane
    count = bits.reshape(-1).to(torch.int64)
    start = count.cumsum(0) - count  # each row's first plane
    codes = _plane_bytes(planes, start, count)  # [R, 64 * words]: each token's code
    layers, heads, n, dim = bits.shape
    return codes[:, :g].view(layers, heads, n, dim, g).transpose(3, 4)


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
