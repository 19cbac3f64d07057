"""kvtier.codec: error bounds per codec, sizes, body validation, codec ids, and property tests over shapes/dtypes.

Every bound is computed here independently of the codec's code, from the input
(scales, group min/max) and, for int8/int4, the two data-dependent choices
their documented byte layout records (which tokens are sinks, how many bits
each key channel got), read back from the encoded bytes; checked element by
element.
"""

from __future__ import annotations

import inspect
import struct
import sys
import zlib
from math import ceil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.codec import CODECS, LOSSLESS_STAGES, Codec, CodecError, StagedCodec, codec_from_ids, get_codec
from kvtier.codec.lossless import ZSTD_LEVEL, Lz4, Zstd, lossless_stage, shuffle, unshuffle


def _installed(stage: str) -> bool:
    try:
        get_codec(f"raw+{stage}")
    except ValueError:  # its package (zstandard, lz4) is missing: those specs are left out below
        return False
    return True


STAGES = tuple(stage for stage in LOSSLESS_STAGES if _installed(stage))
SPECS = [base + stage for base in CODECS for stage in ("", *(f"+{s}" for s in STAGES))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = 2.0**-24  # float32 unit roundoff
G = 64  # group size of the per-token simulations below


# the layout with per-channel key bit widths (int4), as docs/codecs.md and kvtier.codec.int4's docstring state
# it; int8 has one byte per code, see _int8_bound
KIVI = {
    # k_group, k bits max, key bit budget per token row (of D channels), v_bits, Hadamard block limit
    "int4": {"k_group": 64, "k_max": 8, "budget": lambda d: 17 * d // 4, "v_bits": 4, "rot": 16},
}
SINKS = 2


# ---------------------------------------------------------------- payloads: [L, 2, H, T, D]


def normal(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def outlier_channels(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Normal data whose keys have a few channels 50x larger in every token (what KIVI observed)."""
    x = normal(shape, seed)
    x[:, 0, :, :, ::16] *= 50.0
    return x


def structured(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth along tokens, a per-channel offset, sparse spikes, an all-zero K channel and an all-zero V token."""
    tokens, dim = shape[3], shape[4]
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(tokens, dtype=torch.float32).view(tokens, 1)
    freq = torch.rand(dim, generator=gen) * 0.2
    offset = torch.randn(dim, generator=gen) * 3
    x = (torch.sin(t * freq) + offset).expand(shape).clone()
    spikes = torch.rand(shape, generator=gen) < 0.01
    x[spikes] = torch.randn(int(spikes.sum()), generator=gen) * 40
    x[:, 0, :, :, 0] = 0.0
    x[:, 1, :, 0, :] = 0.0
    return x


# ---------------------------------------------------------------- independent error bounds (float32 input)


def _absmax_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-element scale: keys per (layer, head, channel) over tokens, values per (layer, head, token) over D."""
    k_scale = x[:, 0].abs().amax(dim=2, keepdim=True) / qmax  # [L, H, 1, D]
    v_scale = x[:, 1].abs().amax(dim=3, keepdim=True) / qmax  # [L, H, T, 1]
    return torch.stack([k_scale.expand_as(x[:, 0]), v_scale.expand_as(x[:, 1])], dim=1)


def kivi_layout(base: str, shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """(offset, length) of each section of an int4 body, from the documented layout."""
    p = KIVI[base]
    layers, _, heads, tokens, dim = shape
    lh, sinks, gk = layers * heads, min(SINKS, tokens), ceil(tokens / p["k_group"])
    full, tail = divmod(tokens, p["k_group"])
    sizes = {
        "sink_idx": 2 * lh * sinks,
        "sink_k": 2 * lh * sinks * dim,
        "sink_v": 2 * lh * sinks * dim,
        "k_min": 2 * lh * gk * dim,
        "k_scale": 2 * lh * gk * dim,
        "v_min": 2 * lh * tokens * ceil(dim / 64),
        "v_scale": 2 * lh * tokens * ceil(dim / 64),
        "k_bits": ceil(lh * gk * dim / 2),
        "v_codes": ceil(lh * tokens * dim * p["v_bits"] / 8),
        "k_planes": lh * p["budget"](dim) * (full * p["k_group"] // 8 + ceil(tail / 8)),
    }
    out, at = {}, 0
    for name, size in sizes.items():
        out[name] = (at, size)
        at += size
    return out


def sink_indices(base: str, x: torch.Tensor) -> torch.Tensor:
    """The sink token indices [L, H, S] that int8/int4 ``base`` recorded for ``x`` (their first section)."""
    layers, _, heads, tokens, _ = x.shape
    body = np.frombuffer(get_codec(base).encode(x), dtype=np.uint8)
    n = 2 * layers * heads * min(SINKS, tokens)
    return torch.from_numpy(body[:n].view("<u2").astype(np.int64)).view(layers, heads, -1)


def kivi_choices(base: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sink token indices [L, H, S] and key bit widths [L, H, Gk, D] that ``base`` recorded for ``x``."""
    layers, _, heads, tokens, dim = x.shape
    body = np.frombuffer(get_codec(base).encode(x), dtype=np.uint8)
    lay = kivi_layout(base, tuple(x.shape))
    assert sum(lay["k_planes"]) == len(body), "documented layout does not add up to the encoded size"
    sinks = sink_indices(base, x)
    at, n = lay["k_bits"]
    packed = body[at : at + n]
    nibbles = np.stack([packed & 15, packed >> 4], axis=1).reshape(-1)
    gk = ceil(tokens / KIVI[base]["k_group"])
    bits = torch.from_numpy(nibbles[: layers * heads * gk * dim].astype(np.int64)).view(layers, heads, gk, dim)
    return sinks, bits


def hadamard_block(dim: int, limit: int) -> torch.Tensor:
    """The block-diagonal orthonormal Sylvester Hadamard matrix [D, D] the docs describe (identity for h = 1)."""
    h = min(dim & -dim, limit)
    block = torch.ones(1, 1, dtype=torch.float64)
    while block.shape[0] < h:
        block = torch.cat([torch.cat([block, block], 1), torch.cat([block, -block], 1)], 0)
    return torch.block_diag(*[block / h**0.5] * (dim // h)), h


def _kivi_bound(base: str, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound for int8/int4 (kvtier.codec.int8, int4): keys and values as documented, sinks exact to fp16."""
    p = KIVI[base]
    layers, _, heads, tokens, dim = x.shape
    sinks, bits = kivi_choices(base, x)
    assert bool(((bits >= 2) & (bits <= p["k_max"])).all()), "key bit widths outside the documented range"
    assert bool((bits.sum(-1) == p["budget"](dim)).all()), "key bit widths do not add up to the budget"
    assert bool((sinks.diff(dim=-1) > 0).all()) and bool((sinks < tokens).all()), "sink indices not ascending"
    is_sink = torch.zeros(layers, heads, tokens, 1, dtype=torch.bool).scatter_(2, sinks.unsqueeze(-1), True)
    bound = torch.empty_like(x)
    # keys: per (group, channel) of non-sink tokens, min rounded down to float16, b bits, scale rounded up to bf16
    k, kb = x[:, 0], bound[:, 0]
    g = p["k_group"]
    for gi, start in enumerate(range(0, tokens, g)):
        n = min(g, tokens - start)
        xg, sg = k.narrow(2, start, n), is_sink.narrow(2, start, n)
        low = xg.masked_fill(sg, torch.inf).amin(2, keepdim=True)
        high = xg.masked_fill(sg, -torch.inf).amax(2, keepdim=True)
        empty = low > high
        low, high = torch.where(empty, 0.0, low), torch.where(empty, 0.0, high)
        widened = high - low + torch.clamp(low.abs() * 2.0**-10, min=2.0**-24)
        levels = 2.0 ** bits[:, :, gi : gi + 1].float() - 1  # [L, H, 1, D]
        scale = widened / levels * (1 + 2.0**-7) + 2.0**-133  # bfloat16 rounded up
        kb.narrow(2, start, n).copy_((scale / 2).expand_as(xg))
    kb += 8 * EPS32 * (k.abs() + kb * 2 ** p["k_max"])  # float32 rounding in (x - min) / s and min + q * s
    # values: rotated by the block Hadamard matrix, then per (token, group of 64) min/scale in bf16, v_bits codes;
    # the rotation is orthonormal, so a block's error norm is the rotated error's: at most sqrt(h) * scale / 2
    hm, h = hadamard_block(dim, p["rot"])
    y = (x[:, 1].double() @ hm).float()  # [L, H, T, D]
    vb = bound[:, 1]
    top = 2 ** p["v_bits"] - 1
    for start in range(0, dim, 64):
        yg = y.narrow(3, start, min(64, dim - start))
        low, high = yg.amin(3, keepdim=True), yg.amax(3, keepdim=True)
        widened = high - low + low.abs() * 2.0**-7  # min rounded down to bfloat16
        scale = widened / top * (1 + 2.0**-7) + 2.0**-133
        vb.narrow(3, start, yg.shape[3]).copy_((h**0.5 * scale / 2).expand_as(yg))
    vb += 8 * EPS32 * (y.abs().amax(3, keepdim=True) + vb * top) * h
    # sinks: float16 copies of the token's key and value
    fp16 = torch.clamp(x.abs() * 2.0**-11, min=2.0**-25)
    return torch.where(is_sink.unsqueeze(1), fp16, bound)


def _int8_bound(x: torch.Tensor) -> torch.Tensor:
    """int8 (id 9): sinks exact to fp16; keys per (256-token group, channel) of non-sink tokens, min rounded down
    to float16, scale = width / 255 rounded up to bfloat16; values per token, scale = absmax / 127 (bfloat16 up)."""
    layers, _, heads, tokens, dim = x.shape
    sinks = sink_indices("int8", x)
    assert bool((sinks.diff(dim=-1) > 0).all()) and bool((sinks < tokens).all()), "sink indices not ascending"
    body = get_codec("int8").encode(x)
    lh, s, gk = layers * heads, min(SINKS, tokens), ceil(tokens / 256)
    assert len(body) == lh * (2 * s + 4 * s * dim + 4 * gk * dim + 2 * tokens + 2 * tokens * dim)
    is_sink = torch.zeros(layers, heads, tokens, 1, dtype=torch.bool).scatter_(2, sinks.unsqueeze(-1), True)
    bound = torch.empty_like(x)
    k, kb = x[:, 0], bound[:, 0]
    for start in range(0, tokens, 256):
        n = min(256, tokens - start)
        xg, sg = k.narrow(2, start, n), is_sink.narrow(2, start, n)
        low = xg.masked_fill(sg, torch.inf).amin(2, keepdim=True)
        high = xg.masked_fill(sg, -torch.inf).amax(2, keepdim=True)
        empty = low > high  # only sinks: their own range
        low = torch.where(empty, xg.amin(2, keepdim=True), low)
        high = torch.where(empty, xg.amax(2, keepdim=True), high)
        widened = high - low + torch.clamp(low.abs() * 2.0**-10, min=2.0**-24)
        scale = widened / 255 * (1 + 2.0**-7) + 2.0**-133
        kb.narrow(2, start, n).copy_((scale / 2).expand_as(xg))
    kb += 8 * EPS32 * (k.abs() + kb * 256)
    v = x[:, 1]
    scale = v.abs().amax(3, keepdim=True) / 127 * (1 + 2.0**-7) + 2.0**-133
    bound[:, 1] = (scale / 2).expand_as(v) + 4 * EPS32 * v.abs()
    fp16 = torch.clamp(x.abs() * 2.0**-11, min=2.0**-25)
    return torch.where(is_sink.unsqueeze(1), fp16, bound)


def error_bound(spec: str, x: torch.Tensor) -> torch.Tensor:
    """Largest |decode(encode(x)) - x| allowed per element, for float32 ``x``, from the formats alone."""
    base = spec.split("+")[0]
    a = x.abs()
    if base == "raw":
        return torch.zeros_like(x)
    if base == "fp16":  # 11 significant bits: half an ulp is 2^-11 relative; float16 subnormals are 2^-24 apart
        return torch.clamp(a * 2.0**-11, min=2.0**-25)
    if base == "bf16":  # 8 significant bits, float32's exponent range
        return a * 2.0**-8
    if base == "fp8":
        # e4m3 has 3 mantissa bits, so rounding a scaled value y with |y| >= 2^-6 (smallest normal) moves it by
        # at most 2^-4 |y|; below that the spacing is 2^-9, so at most 2^-10. Scaling by s maps back to x.
        scale = _absmax_scale(x, 448.0)
        return torch.maximum(a * 2.0**-4, scale * 2.0**-10) + 4 * EPS32 * a
    if base == "int8":
        return _int8_bound(x)
    assert base in KIVI
    return _kivi_bound(base, x)


def output_rounding(dtype: torch.dtype, y: torch.Tensor) -> torch.Tensor:
    """Extra error from casting a float32 result to the payload dtype (half an ulp)."""
    if dtype == torch.float16:
        return torch.clamp(y.abs() * 2.0**-11, min=2.0**-25)
    if dtype == torch.bfloat16:
        return y.abs() * 2.0**-8
    return torch.zeros_like(y)


def roundtrip(spec: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    codec = get_codec(spec)
    data = codec.encode(x)
    y = codec.decode(data, tuple(x.shape), x.dtype)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    return data, y


def assert_within_bound(spec: str, x: torch.Tensor, y: torch.Tensor) -> None:
    x32, y32 = x.float(), y.float()
    bound = error_bound(spec, x32)
    bound += output_rounding(x.dtype, x32.abs() + bound)
    err = (y32 - x32).abs()
    bad = err > bound
    assert not bad.any(), f"{spec}: {int(bad.sum())} elements over bound, worst excess {(err - bound).max().item():.3g}"


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", [normal, outlier_channels, structured])
@pytest.mark.parametrize("spec", SPECS)
def test_roundtrip_within_bound(spec: str, make) -> None:
    x = make((2, 2, 3, 70, 40), seed=1)  # T, D not multiples of 32: int4 has short last groups
    _, y = roundtrip(spec, x)
    assert torch.isfinite(y).all()
    if spec.startswith("raw"):
        assert torch.equal(y, x)
    assert_within_bound(spec, x, y)


@pytest.mark.parametrize("shape", [(2, 2, 2, 256, 64), (1, 2, 2, 300, 64), (1, 2, 1, 129, 128), (1, 2, 3, 513, 96)])
@pytest.mark.parametrize("base", ["int8", "int4"])
def test_kivi_full_and_tail_groups(base: str, shape: tuple[int, ...]) -> None:
    """Chunks of one or more full key groups, with and without a shorter tail group, D of 64, 128 and 96."""
    x = outlier_channels(shape, seed=28)
    x[:, 0, :, 3] += 20.0  # a sink-like token
    for spec in (base, *(f"{base}+{s}" for s in STAGES)):
        _, y = roundtrip(spec, x)
        assert_within_bound(spec, x, y)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_payloads(spec: str, dtype: torch.dtype) -> None:
    x = structured((2, 2, 2, 40, 24), seed=2).to(dtype)
    _, y = roundtrip(spec, x)
    if spec.split("+")[0] in ("raw", {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]):
        assert torch.equal(y, x)  # storing a payload in its own dtype loses nothing
    assert_within_bound(spec, x, y)


@pytest.mark.parametrize("base", CODECS)
@pytest.mark.parametrize("stage", STAGES)
def test_lossless_stage_is_exact(base: str, stage: str) -> None:
    x = outlier_channels((2, 2, 2, 64, 32), seed=3)
    plain = get_codec(base)
    packed = get_codec(f"{base}+{stage}")
    assert packed.lossy == plain.lossy
    y_plain = plain.decode(plain.encode(x), x.shape, x.dtype)
    y_packed = packed.decode(packed.encode(x), x.shape, x.dtype)
    assert torch.equal(y_plain, y_packed)


def test_zero_rows_decode_to_exact_zeros() -> None:
    x = normal((1, 2, 1, 40, 36), seed=3)
    x[0, 0, 0, :, 1] = 0.0  # an all-zero key channel: scale 0
    x[0, 1, 0, 3] = 0.0  # an all-zero value token: scale 0
    for spec in ("int8", "fp8", "int4"):
        _, y = roundtrip(spec, x)
        assert torch.isfinite(y).all(), spec
        assert torch.equal(y[0, 0, 0, :, 1], torch.zeros(40)), spec
        assert torch.equal(y[0, 1, 0, 3], torch.zeros(36)), spec


def test_int8_exact_on_grid() -> None:
    # one key channel holding -1 + q / 128 for q = 0..255 (scale 2^-7, min -1: exact in bfloat16 and float16)
    # in 126 tokens, plus two far-off tokens that become the sinks (float16-exact); one value token of
    # q / 64 for q = -127..127 (scale 1/64, exact in bfloat16)
    grid = torch.cat([torch.tensor([0.0, 255.0]), torch.linspace(1, 254, 124).round()])
    x = torch.zeros(1, 2, 1, 128, 255)
    x[0, 0, 0, :, 0] = torch.cat([grid[:60] / 128 - 1, torch.tensor([100.0, -100.0]), grid[60:] / 128 - 1])
    x[0, 1, 0, 7] = torch.arange(-127, 128) / 64
    _, y = roundtrip("int8", x)
    assert torch.equal(y, x)


def test_int4_exact_on_grid() -> None:
    # keys: one channel (D=1: 4 bits) of -1 + q / 4, q = 0..15, repeated over a group of 64 tokens with two
    # far-off sinks among them; values all zero (rotated zeros stay zero)
    grid = torch.arange(16).repeat(4)[:62] * 0.25 - 1
    grid[-2:] = torch.tensor([-1.0, 2.75])
    x = torch.zeros(1, 2, 1, 64, 1)
    x[0, 0, 0, :, 0] = torch.cat([grid[:30], torch.tensor([50.0, -50.0]), grid[30:]])
    _, y = roundtrip("int4", x)
    assert torch.equal(y, x)


def test_int4_group_min_is_rounded_down_to_float16() -> None:
    # float16 steps are 0.5 near 1000: a min rounded to nearest (1000.5) would clamp the group's lower values
    x = torch.zeros(1, 2, 1, 32, 32)
    x[0, 0, 0, :, 0] = 1000.3 + torch.linspace(0, 0.5, 32)
    x[0, 1, 0, 4] = -1000.3 - torch.linspace(0, 0.5, 32)
    for spec in ("int4", "int8"):
        _, y = roundtrip(spec, x)
        sinks = sink_indices(spec, x)
        keys = torch.ones(32, dtype=torch.bool)
        keys[sinks.flatten()] = False  # sinks are float16 copies: 1000.3 -> 1000.5
        assert (y - x)[0, 0, 0, keys, 0].abs().max() < 0.05, spec
        assert_within_bound(spec, x, y)


def test_sinks_are_kept_in_float16() -> None:
    """Per (layer, head) the two tokens whose keys lie farthest from the channel means come back as float16."""
    x = structured((2, 2, 3, 100, 32), seed=21)
    x[:, 0, :, 37] = 30.0  # an attention-sink-like key, far from every channel's mean
    x[:, 1, :, 37] = torch.linspace(-3, 3, 32)
    for base in ("int8", "int4"):
        sinks = sink_indices(base, x)
        assert bool((sinks == 37).any(-1).all()), base
        _, y = roundtrip(base, x)
        idx = sinks.unsqueeze(-1).expand(-1, -1, -1, 32)
        for part in (0, 1):
            want = x[:, part].gather(2, idx).half().float()
            assert torch.equal(y[:, part].gather(2, idx), want), (base, part)


def test_sinks_leave_key_groups_narrow() -> None:
    """One huge key token does not coarsen the other tokens of its channel group (it is a sink)."""
    x = normal((1, 2, 2, 64, 16), seed=22)
    plain = roundtrip("int4", x)[1]
    x_sink = x.clone()
    x_sink[:, 0, :, 10] = 500.0
    y = roundtrip("int4", x_sink)[1]
    others = torch.ones(64, dtype=torch.bool)
    others[10] = False
    err_sink = (y - x_sink)[:, 0, :, others].abs().max()
    err_plain = (plain - x)[:, 0, :, others].abs().max()
    assert err_sink < 2 * err_plain, (err_sink, err_plain)
    assert torch.equal(y[:, 0, :, 10], x_sink[:, 0, :, 10])


def test_key_bits_follow_channel_width() -> None:
    """The bit budget goes to wide key channels: a channel 16x wider gets about 4 more bits (a similar step)."""
    x = normal((1, 2, 1, 128, 16), seed=23)
    x[:, 0, :, :, 3] *= 16.0
    _, bits = kivi_choices("int4", x)
    others = torch.cat([bits[..., :3], bits[..., 4:]], -1)
    assert bool((bits[..., 3] >= others.max(-1).values + 3).all()), bits


def uniform4_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., D] quantized plainly: 4-bit codes, one (min, scale) per token and group of G channels."""
    groups = x.unflatten(-1, (x.shape[-1] // G, G))  # [..., D/G, G]
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    step = (high - low) / 15
    return (((groups - low) / step).round() * step + low).flatten(-2)


def test_value_rotation_spreads_an_outlier_channel() -> None:
    """int4 values: an outlier channel in every token costs the other channels far less than without rotation."""
    x = normal((2, 2, 2, 64, 64), seed=24)
    x[:, 1, :, :, 5] *= 30.0
    _, y = roundtrip("int4", x)
    y1 = x.clone()
    y1[:, 1] = uniform4_per_token(x[:, 1])  # plain per-token groups of 64, no rotation
    normal_channels = torch.arange(64) != 5
    rms = (y - x)[:, 1][..., normal_channels].square().mean().sqrt()
    rms_v1 = (y1 - x)[:, 1][..., normal_channels].square().mean().sqrt()
    assert rms * 1.5 < rms_v1, (rms, rms_v1)


def test_per_channel_key_scaling_beats_per_token() -> None:
    """With outlier key channels, scaling keys per token (over D) lets the outliers set every token's step."""
    x = outlier_channels((2, 2, 2, 256, 64), seed=4)
    k = x[:, 0]  # [L, H, T, D]
    normal_channels = torch.ones(64, dtype=torch.bool)
    normal_channels[::16] = False
    # the same quantizers with key scales per token instead of per channel, simulated here
    step8 = k.abs().amax(dim=3, keepdim=True) / 127
    per_token = {"int8": (k / step8).round() * step8}
    per_token["int4"] = uniform4_per_token(k)
    for spec, simulated in per_token.items():
        _, y = roundtrip(spec, x)
        rms_channel = (y[:, 0] - k)[..., normal_channels].square().mean().sqrt()
        rms_token = (simulated - k)[..., normal_channels].square().mean().sqrt()
        assert rms_channel * 5 < rms_token, (spec, rms_channel, rms_token)


# ---------------------------------------------------------------- sizes


def test_sizes_at_reference_shape() -> None:
    layers, heads, tokens, dim = 30, 3, 256, 64
    shape = (layers, 2, heads, tokens, dim)
    x = normal(shape, seed=5)
    n = x.numel()
    raw_bytes = 4 * n
    expected = {
        "raw": 4 * n,
        "fp16": 2 * n,
        "bf16": 2 * n,
        "fp8": n + 4 * layers * heads * (dim + tokens),  # float32 scales: keys per channel, values per token
        # per (layer, head): 2 sinks (u16 index, fp16 key and value) 516, key (min, scale) per group and channel,
        # value (min, scale) per token, key bit widths as nibbles, value codes, key bit planes (budget x tokens)
        # int8: sinks, key (min, scale) per channel (one 256-token group), value scale per token, codes
        "int8": layers * heads * (516 + 1 * dim * 4 + tokens * 2 + 2 * tokens * dim),
        "int4": layers
        * heads
        * (516 + 4 * dim * 4 + tokens * 4 + 4 * dim // 2 + tokens * dim // 2 + 272 * tokens // 8),
    }
    ratio = {}
    for base in CODECS:
        data = get_codec(base).encode(x)
        assert len(data) == expected[base] == get_codec(base).stage_size(shape, x.dtype)  # the body alone
        ratio[base] = len(data) / raw_bytes
    assert ratio["raw"] == pytest.approx(1.0, abs=1e-5)
    assert ratio["fp16"] == pytest.approx(0.5, abs=1e-5)
    assert ratio["bf16"] == pytest.approx(0.5, abs=1e-5)
    assert ratio["int8"] == pytest.approx(0.2598, abs=1e-4) and ratio["fp8"] <= 0.26
    assert ratio["int4"] == pytest.approx(0.1494, abs=1e-4)


@pytest.mark.skipif("zstd" not in STAGES, reason="zstandard not installed")
def test_compression_shrinks_structured_data() -> None:
    x = structured((2, 2, 2, 128, 64), seed=6)
    for base in CODECS:
        plain = len(get_codec(base).encode(x))
        assert len(get_codec(f"{base}+zstd").encode(x)) < plain, base


# ---------------------------------------------------------------- properties over shapes and dtypes


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.sampled_from(SPECS),
    dtype=st.sampled_from(DTYPES),
    dims=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 75), st.integers(1, 70)),
    magnitude=st.sampled_from([1e-3, 1.0, 100.0]),  # outliers x50 stay in float16 range
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(spec: str, dtype: torch.dtype, dims: tuple[int, ...], magnitude: float, seed: int) -> None:
    layers, heads, tokens, dim = dims
    x = (outlier_channels((layers, 2, heads, tokens, dim), seed) * magnitude).to(dtype)
    data, y = roundtrip(spec, x)
    assert_within_bound(spec, x, y)
    if spec.split("+")[0] == "raw":
        assert torch.equal(y, x)
    with pytest.raises(CodecError):
        get_codec(spec).decode(data[:-1], x.shape, x.dtype)


@given(data=st.binary(max_size=300), size=st.integers(1, 8))
def test_shuffle_roundtrip(data: bytes, size: int) -> None:
    shuffled = shuffle(memoryview(data), size)
    assert len(shuffled) == len(data)
    assert unshuffle(shuffled, size).tobytes() == data


def test_shuffle_groups_bytes_by_position() -> None:
    data = bytes(range(10))  # three 3-byte elements and one trailing byte
    assert shuffle(memoryview(data), 3).tobytes() == bytes([0, 3, 6, 1, 4, 7, 2, 5, 8, 9])


# ---------------------------------------------------------------- bodies: validation and ownership


SMALL = (1, 2, 2, 33, 8)


@pytest.mark.parametrize("spec", SPECS)
def test_truncated_or_padded_body_raises(spec: str) -> None:
    x = normal(SMALL, seed=7)
    codec = get_codec(spec)
    data = codec.encode(x)
    for cut in (0, 1, 3, len(data) // 2, len(data) - 1):
        with pytest.raises(CodecError):
            codec.decode(data[:cut], SMALL, torch.float32)
    with pytest.raises(CodecError):
        codec.decode(data + b"\0", SMALL, torch.float32)


@pytest.mark.parametrize("spec", SPECS)
def test_body_is_bare_codec_output(spec: str) -> None:
    """No frame: a base stage's body is exactly its output's size; a compressed one is a bare zstd/lz4 frame."""
    x = normal(SMALL, seed=8)
    codec = get_codec(spec)
    data = codec.encode(x)
    least, most = codec.body_bounds(SMALL, x.dtype)
    assert least <= len(data) <= most
    if "+" not in spec:
        assert len(data) == codec.stage_size(SMALL, x.dtype) == least == most
        if spec == "raw":
            assert data == x.numpy().tobytes()
        if spec == "fp16":
            assert data == x.half().numpy().tobytes()
    elif spec.endswith("+zstd"):
        assert data[:4] == b"\x28\xb5\x2f\xfd"  # zstd's frame magic, first
    else:
        assert data[:4] == b"\x04\x22\x4d\x18"  # lz4's


@pytest.mark.parametrize("spec", [s for s in SPECS if "+" in s])
def test_damaged_compressed_body_raises(spec: str) -> None:
    x = structured(SMALL, seed=9)
    codec = get_codec(spec)
    data = codec.encode(x)
    for i in range(0, len(data), 7):
        damaged = bytearray(data)
        damaged[i] ^= 0x5A
        with pytest.raises(CodecError):
            codec.decode(damaged, SMALL, torch.float32)


def test_compressed_body_is_checked_against_its_bounds_before_decompressing(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("zstandard")
    x = structured(SMALL, seed=10)
    codec = get_codec("int8+zstd")
    data = codec.encode(x)

    def never(*args: object) -> None:
        raise AssertionError("decompress called")

    monkeypatch.setattr(Zstd, "decompress", never)
    huge = (1 << 10, 2, 64, 4096, 128)  # a ~34 GB stage output: no zstd frame of this size holds it
    with pytest.raises(CodecError, match="body is"):
        codec.decode(data, huge, torch.float32)
    assert Zstd.body_bounds(1 << 20) == (16, (1 << 20) + (1 << 13) + 1024)
    assert Lz4.body_bounds(1 << 20) == (2048, (1 << 20) + (1 << 13) + 1024)


@pytest.mark.parametrize("spec", SPECS)
def test_codec_ids_name_the_codec(spec: str) -> None:
    codec = get_codec(spec)
    again = codec_from_ids(codec.base_id, codec.lossless_id)
    assert again.name == spec and isinstance(again, StagedCodec)
    assert again is codec_from_ids(codec.base_id, codec.lossless_id)  # shared: codecs are stateless
    x = normal(SMALL, seed=11)
    assert torch.equal(again.decode(codec.encode(x), SMALL, x.dtype), codec.decode(codec.encode(x), SMALL, x.dtype))


def test_codec_ids() -> None:
    ids = {spec: (get_codec(spec).base_id, get_codec(spec).lossless_id) for spec in SPECS}
    base = {"raw": 1, "fp16": 2, "bf16": 3, "fp8": 5, "int4": 8, "int8": 9}
    lossless = {"": 0, "zstd": 1, "lz4": 2}
    for spec, got in ids.items():
        b, _, stage = spec.partition("+")
        assert got == (base[b], lossless[stage]), spec
    # ids 4, 6 and 7 were earlier int8/int4 layouts: retired, never decoded, never reused
    for base_id, lossless_id in ((4, 0), (6, 0), (7, 0), (0, 0), (10, 0), (255, 0), (9, 3), (9, 255)):
        with pytest.raises(CodecError, match="unknown codec ids"):
            codec_from_ids(base_id, lossless_id)


def test_wrong_shape_or_dtype_raises() -> None:
    x = normal(SMALL, seed=11)
    int8 = get_codec("int8")
    data = int8.encode(x)
    with pytest.raises(CodecError):
        int8.decode(data, (1, 2, 2, 32, 8), torch.float32)
    raw = get_codec("raw")
    with pytest.raises(CodecError):  # float32 bytes read as float16: twice the expected length
        raw.decode(raw.encode(x), SMALL, torch.float16)
    with pytest.raises(ValueError):
        int8.decode(data, (2, 33, 8), torch.float32)
    with pytest.raises(ValueError):
        int8.decode(data, SMALL, torch.int32)


def test_raw_decode_shares_writable_buffer_and_copies_bytes() -> None:
    x = normal(SMALL, seed=13)
    codec = get_codec("raw")
    data = codec.encode(x)
    buf = bytearray(data)
    shared = codec.decode(buf, SMALL, torch.float32)
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    assert shared.data_ptr() == base  # zero copy: the tensor lives in the caller's buffer
    owned = codec.decode(data, SMALL, torch.float32)  # immutable bytes: a private copy
    owned.add_(1)
    assert torch.equal(codec.decode(data, SMALL, torch.float32), x)
    assert torch.equal(shared, x)


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith("raw")])
def test_decode_never_aliases_input(spec: str) -> None:
    x = normal(SMALL, seed=14)
    codec = get_codec(spec)
    buf = bytearray(codec.encode(x))
    before = bytes(buf)
    y = codec.decode(buf, SMALL, torch.float32)
    y.fill_(7.0)
    assert bytes(buf) == before


def test_encode_is_deterministic_and_keeps_no_reference() -> None:
    x = structured(SMALL, seed=15)
    original = x.clone()
    for spec in SPECS:
        data = get_codec(spec).encode(x)
        x.add_(1)  # must not reach bytes already returned
        assert data == get_codec(spec).encode(original), spec
        x.copy_(original)


# ---------------------------------------------------------------- encode misuse and get_codec


@pytest.mark.parametrize("spec", SPECS)
def test_encode_rejects_non_payloads(spec: str) -> None:
    codec = get_codec(spec)
    for bad in (
        torch.zeros(2, 3, 4),
        torch.zeros(1, 3, 1, 4, 4),
        torch.zeros(1, 2, 1, 0, 4),
        torch.zeros(SMALL, dtype=torch.int32),
    ):
        with pytest.raises(ValueError):
            codec.encode(bad)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.split("+")[0] in ("int8", "fp8", "int4")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_quantizers_reject_non_finite(spec: str, value: float) -> None:
    x = normal(SMALL, seed=16)
    x[0, 1, 1, 5, 3] = value
    with pytest.raises(ValueError, match="non-finite"):
        get_codec(spec).encode(x)


def test_int_codecs_reject_values_beyond_float16_range() -> None:
    x = normal(SMALL, seed=17)
    x[0, 0, 0, 0, 0] = 1e6
    for spec in ("int4", "int8"):  # float16 key mins and sinks
        with pytest.raises(ValueError, match="float16 range"):
            get_codec(spec).encode(x)
    y = get_codec("fp8").decode(get_codec("fp8").encode(x), SMALL, torch.float32)  # float32 scales: fine
    assert_within_bound("fp8", x, y)


def test_get_codec() -> None:
    assert CODECS == ("raw", "fp16", "bf16", "int8", "fp8", "int4")
    for spec in SPECS:
        codec = get_codec(spec)
        assert isinstance(codec, Codec)
        assert codec.name == spec
        assert codec.lossy == (not spec.startswith("raw"))
    assert get_codec(" INT8 ").name == "int8"
    for bad in ("", "int3", "int8+", "+zstd", "int8+gzip", "int8+zstd+lz4", "int8-zstd"):
        with pytest.raises(ValueError, match="valid: raw"):
            get_codec(bad)


def test_missing_lossless_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lz4.frame", None)  # makes ``import lz4.frame`` raise ImportError
    with pytest.raises(ValueError, match="pip install lz4"):
        get_codec("int8+lz4")


def test_fp16_refuses_values_beyond_its_range() -> None:
    x = normal(SMALL, seed=19)
    x[0, 0, 1, 2, 3] = 70000.0
    with pytest.raises(ValueError, match="overflow"):
        get_codec("fp16").encode(x)
    x[0, 0, 1, 2, 3] = float("inf")  # already non-finite: stored as is
    assert torch.equal(get_codec("fp16").decode(get_codec("fp16").encode(x), SMALL, torch.float32), x.half().float())
    x[0, 0, 1, 2, 3] = 70000.0
    assert torch.equal(
        get_codec("bf16").decode(get_codec("bf16").encode(x), SMALL, torch.float32), x.bfloat16().float()
    )


def test_non_contiguous_payload_encodes_like_its_copy() -> None:
    wide = normal((1, 2, 2, 40, 16), seed=20)
    x = wide[:, :, :, ::2]  # [1, 2, 2, 20, 16], strided
    for spec in SPECS:
        assert get_codec(spec).encode(x) == get_codec(spec).encode(x.contiguous()), spec


@pytest.mark.skipif("zstd" not in STAGES, reason="zstandard not installed")
def test_zstd_level_changes_encoding_not_format() -> None:
    x = structured((1, 2, 2, 64, 32), seed=18)
    slow = get_codec("raw+zstd", zstd_level=19).encode(x)
    default = get_codec("raw+zstd").encode(x)
    assert slow != default
    assert torch.equal(get_codec("raw+zstd").decode(slow, x.shape, x.dtype), x)
    assert torch.equal(get_codec("raw+zstd", zstd_level=19).decode(default, x.shape, x.dtype), x)
    assert default == get_codec("raw+zstd", zstd_level=ZSTD_LEVEL).encode(x)


def test_one_zstd_default_level() -> None:
    defaults = {
        inspect.signature(get_codec).parameters["zstd_level"].default,
        inspect.signature(lossless_stage).parameters["zstd_level"].default,
        inspect.signature(Zstd).parameters["level"].default,
    }
    assert defaults == {ZSTD_LEVEL} == {1}


def test_zstd_level_is_validated() -> None:
    pytest.importorskip("zstandard")
    for bad in (23, 1.5, -(1 << 20)):
        with pytest.raises(ValueError, match="zstd level"):
            get_codec("int8+zstd", zstd_level=bad)


# ---------------------------------------------------------------- damaged recorded choices


@pytest.mark.parametrize("base", ["int8", "int4"])
def test_damaged_kivi_choices_are_clean_errors(base: str) -> None:
    """Sink indices past T or bit widths that break the budget raise CodecError, not garbage or IndexError."""
    x = normal(SMALL, seed=27)
    codec = get_codec(base)
    data = codec.encode(x)
    bad_sink = bytearray(data)
    bad_sink[0:2] = struct.pack("<H", SMALL[3])  # the first sink index: section 0
    with pytest.raises(CodecError, match="int"):
        codec.decode(bad_sink, SMALL, torch.float32)
    if base == "int8":
        return  # no bit widths
    lay = kivi_layout(base, SMALL)
    off_by_one = bytearray(data)
    off_by_one[lay["k_bits"][0]] ^= 0x01  # one width off by one: the budget no longer adds up
    zero = bytearray(data)
    zero[lay["k_bits"][0]] = 0  # widths of 0 bits
    below_min = bytearray(data)
    at = lay["k_bits"][0]
    a, b = data[at] & 15, data[at] >> 4
    below_min[at] = 1 | (a + b - 1) << 4  # widths 1 and a + b - 1: the same sum, one below the minimum
    for damaged in (off_by_one, zero, below_min):
        with pytest.raises(CodecError, match="bit widths"):
            codec.decode(damaged, SMALL, torch.float32)


# ---------------------------------------------------------------- real KV (SmolLM2-135M)


@pytest.fixture(scope="module")
def real_kv() -> torch.Tensor:
    """The prefill KV [30, 2, 3, 320, 64] of 320 tokens of real English (a license text), float32."""
    from pathlib import Path

    from kvtier.config import load_config
    from kvtier.models import load_model, resolve_model

    model, tok = load_model(resolve_model("smollm2-135m", load_config(env={}).cache_dir))
    gpl = Path("/usr/share/common-licenses/GPL-3")
    text = gpl.read_text() if gpl.is_file() else (Path(zlib.__file__).parent / "LICENSE.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :320]
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).contiguous()


@pytest.mark.model
@pytest.mark.parametrize("spec", SPECS)
def test_real_kv_roundtrip_within_bound(real_kv: torch.Tensor, spec: str) -> None:
    # real keys have the outlier channels and attention sinks the codecs are built around; 320 tokens = one
    # full int8 key group plus a tail, five full int4 groups
    assert real_kv.shape == (30, 2, 3, 320, 64)
    _, y = roundtrip(spec, real_kv)
    if spec.startswith("raw"):
        assert torch.equal(y, real_kv)
    assert_within_bound(spec, real_kv, y)
