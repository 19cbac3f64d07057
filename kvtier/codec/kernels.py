"""Compiled decode kernels (numba) for the codecs whose vectorized torch decode was slower than a disk read.

Measured on one real [30, 2, 3, 256, 64] chunk on this project's 2-core
machine: the torch decode of ``int4`` ran at ~1.2 GB/s (of float32 output), so
a disk hit with int4 chunks took 1.35x as long as one with raw chunks that are
7x larger. Each torch step is a pass over memory (unpack nibbles, widen uint8
to float, multiply-add, rotate, bit-transpose); a kernel does one pass per
output element and writes the float32 result once. ``fp8`` likewise fuses its
table lookup and the two scale multiplications.

The kernels compute what the torch code computes in float32 (``min +
float(code) * scale``, ``table[code] * scale``); only the Hadamard rotation
sums its terms in another order (butterflies instead of a matmul). The outputs
are bit-identical for fp8 and for int4 with 16-channel blocks (every D
divisible by 16) and within float32 rounding of that sum otherwise; tests
compare the two paths. They run
without the GIL (``nogil``), so tiers may decode several chunks at once from
threads, and are compiled on first use and cached on disk by numba (a few
seconds once per install).

They are used when numba imports and ``KVTIER_NUMBA`` is not ``0``;
otherwise the codecs fall back to their torch code (``enabled()``). Callers
validate every index the kernels follow (bit widths, sizes) before calling:
the kernels do no bounds checks.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from types import ModuleType

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["enabled", "fp8_dequantize", "int4_keys", "int4_values"]


@cache
def _numba() -> ModuleType | None:
    if os.environ.get("KVTIER_NUMBA", "1").strip() == "0":
        return None
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; a broken install falls back to torch
        log.warning("numba is not importable: int4 and fp8 chunks decode with slower torch code")
        return None
    return numba


def enabled() -> bool:
    """True when the compiled kernels are used (numba imports and ``KVTIER_NUMBA`` is not ``0``)."""
    return _numba() is not None


def _kernels() -> ModuleType:
    if _numba() is None:
        raise RuntimeError("compiled kernels are disabled (check kernels.enabled() first)")
    from kvtier.codec import _numba_kernels

    return _numba_kernels


def _contiguous(*arrays: np.ndarray) -> None:
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("kernel arrays must be C-contiguous")


def int4_keys(
    planes: np.ndarray, tail: np.ndarray, bits: np.ndarray, k_min: np.ndarray, k_scale: np.ndarray, out: np.ndarray
) -> None:
    """Decode int4 keys into ``out[:, 0]`` (see the kernel's docstring); ``planes`` is uint8, any alignment."""
    words = planes.view(np.uint64) if planes.ctypes.data % 8 == 0 else planes.copy().view(np.uint64)
    _contiguous(words, tail, bits, k_min, k_scale, out)
    _kernels().int4_keys(words, tail, bits, k_min, k_scale, out)


def int4_values(packed: np.ndarray, v_min: np.ndarray, v_scale: np.ndarray, block: int, out: np.ndarray) -> None:
    """Decode int4 values into ``out[:, 1]`` (see the kernel's docstring)."""
    _contiguous(packed, v_min, v_scale, out)
    _kernels().int4_values(packed, v_min, v_scale, block, out)


def fp8_dequantize(
    codes: np.ndarray, table: np.ndarray, k_scale: np.ndarray, v_scale: np.ndarray, out: np.ndarray
) -> None:
    """Decode fp8 codes into ``out`` (see the kernel's docstring)."""
    _contiguous(codes, table, k_scale, v_scale, out)
    _kernels().fp8_dequantize(codes, table, k_scale, v_scale, out)
