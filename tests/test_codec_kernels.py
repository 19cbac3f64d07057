"""kvtier.codec.kernels: the compiled int4/fp8 decoders give what the torch decoders give.

The torch code is the reference (tests/test_codec.py bounds the error of
whichever path is active, element by element); here both paths decode the same
bytes. int4 values with 16-channel Hadamard blocks (every D divisible by 16)
and fp8 agree bit for bit; smaller blocks sum the rotation in another order
than torch's matmul, so they agree to float32 rounding of that sum.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from kvtier.codec import CodecError, get_codec, kernels
from kvtier.codec.fp8 import Fp8
from kvtier.codec.int4 import Int4, hadamard_size


@contextmanager
def torch_code() -> Iterator[None]:
    """Kernels off (KVTIER_NUMBA=0) inside the block, back to the environment's setting after it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVTIER_NUMBA", "0")
        kernels._numba.cache_clear()
        try:
            yield
        finally:
            mp.undo()
            kernels._numba.cache_clear()


def _payload(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * (torch.rand(1, 1, shape[2], 1, shape[4], generator=gen) * 5 + 0.1)
    x[:, 0, :, :, ::16] *= 20  # outlier key channels: wide bit widths
    return x.to(dtype)


def _both(stage, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    data = stage.encode(x)
    shape = tuple(x.shape)
    compiled = stage.decode(data, shape, dtype)
    with torch_code():
        reference = stage.decode(data, shape, dtype)
    return compiled, reference


def test_kernels_are_enabled_here() -> None:
    # numba is a dependency: a silent fallback to the slow path would go unnoticed otherwise
    assert kernels.enabled()


def test_kernels_can_be_switched_off() -> None:
    with torch_code():
        assert not kernels.enabled()
        with pytest.raises(RuntimeError, match="disabled"):
            kernels._kernels()
    assert kernels.enabled()


SHAPES = [
    (2, 2, 3, 256, 64),  # SmolLM2's head dim, full key groups
    (2, 2, 3, 100, 64),  # a tail key group of 36 tokens
    (1, 2, 2, 1, 64),  # one token: one sink, no full group
    (1, 2, 1, 65, 128),  # two value groups of 64 channels
    (1, 2, 2, 64, 80),  # 80 = 16 * 5: Hadamard blocks of 16, a short value group
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int4_compiled_equals_torch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    assert hadamard_size(shape[4], Int4.v_rotation) == 16
    compiled, reference = _both(Int4(), _payload(shape, seed=sum(shape), dtype=dtype), dtype)
    assert compiled.dtype == dtype and compiled.shape == shape and compiled.is_contiguous()
    assert torch.equal(compiled, reference)


@pytest.mark.parametrize("dim", [2, 6, 8, 24, 130])  # Hadamard blocks of 2, 2, 8, 8, 2
def test_int4_small_rotation_blocks_agree_to_rounding(dim: int) -> None:
    x = _payload((2, 2, 3, 70, dim), seed=dim)
    compiled, reference = _both(Int4(), x, torch.float32)
    # each output is block ** -0.5 times a sum of `block` terms: a few float32 roundings of the largest term
    scale = x[:, 1].abs().amax(-1, keepdim=True) * 4
    assert bool(((compiled - reference)[:, 1].abs() <= scale * 2.0**-21).all())
    assert torch.equal(compiled[:, 0], reference[:, 0])  # keys: no rotation, same float32 operations


def test_int4_odd_head_dim_uses_the_torch_path() -> None:
    # an odd D packs codes across token rows: the kernel's whole-byte rows do not apply, torch decodes it
    x = _payload((1, 2, 2, 9, 5), seed=5)
    compiled, reference = _both(Int4(), x, torch.float32)
    assert torch.equal(compiled, reference)


@pytest.mark.parametrize("shape", [(2, 2, 3, 256, 64), (1, 2, 1, 1, 3), (3, 2, 2, 17, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_compiled_equals_torch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    compiled, reference = _both(Fp8(), _payload(shape, seed=len(shape), dtype=dtype), dtype)
    assert compiled.dtype == dtype and torch.equal(compiled, reference)


def test_codecs_decode_unaligned_bodies() -> None:
    # a body may start at any byte offset of its buffer (after a chunk header and its token ids), and so may
    # the base stage's sections
    x = _payload((2, 2, 3, 100, 64), seed=3)
    for spec in ("int4", "int4+zstd", "fp8", "fp8+lz4"):
        codec = get_codec(spec)
        data = bytearray(b"\0" + codec.encode(x))
        view = memoryview(data)[1:]
        got = codec.decode(view, tuple(x.shape), torch.float32)
        assert torch.equal(got, codec.decode(bytearray(codec.encode(x)), tuple(x.shape), torch.float32)), spec


def test_damaged_bit_widths_never_reach_the_kernel() -> None:
    # the widths are checked before the kernel follows them (it does no bounds checks)
    codec = Int4()
    x = _payload((1, 2, 1, 64, 64), seed=9)
    data = codec.encode(x).clone()
    sections = codec._sections(tuple(x.shape))
    bits_at = sum(sections[:7])
    data[bits_at] = 0xFF  # two channels at 15 bits: past k_bits_max and the budget
    with pytest.raises(CodecError, match="bit widths"):
        codec.decode(data, tuple(x.shape), torch.float32)
