"""Lossless stages (zstd, lz4) and the byte shuffle that runs before them.

The shuffle groups the bytes of ``n`` elements of ``k`` bytes by byte position
(all first bytes, then all second bytes, ...), like blosc's shuffle: a float's
sign/exponent bytes are far more alike across elements than its low mantissa
bytes, so grouping them gives the compressor long runs. Trailing bytes that do
not fill an element are copied as they are.

zstandard and lz4 are optional dependencies, imported when a stage is built:
:func:`lossless_stage` raises ValueError naming the missing package.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import ClassVar

import numpy as np

from kvtier.codec.base import CodecError


def shuffle(data: memoryview, size: int) -> np.ndarray:
    """A new uint8 array: the bytes of ``data`` grouped by byte position within ``size``-byte elements."""
    src = np.frombuffer(data, dtype=np.uint8)
    n = len(src) // size
    out = np.empty_like(src)
    planes = out[: n * size].reshape(size, n)  # [k, n]: plane j holds byte j of every element
    elems = src[: n * size].reshape(n, size)  # [n, k]
    for j in range(size):  # k <= 4 strided copies; faster than one transposing copy in numpy
        planes[j] = elems[:, j]
    out[n * size :] = src[n * size :]
    return out


def unshuffle(data: memoryview, size: int) -> bytearray:
    """Undo :func:`shuffle`; the result is a new writable buffer."""
    src = np.frombuffer(data, dtype=np.uint8)
    n = len(src) // size
    out = bytearray(len(src))
    dst = np.frombuffer(out, dtype=np.uint8)
    elems = dst[: n * size].reshape(n, size)
    planes = src[: n * size].reshape(size, n)
    for j in range(size):
        elems[:, j] = planes[j]
    dst[n * size :] = src[n * size :]
    return out


def _require(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"codec stage needs the {package!r} package (pip install {package})") from exc


class Zstd:
    """zstd frames with content size and checksum; a compressor/decompressor per call (they are not thread-safe)."""

    name: ClassVar[str] = "zstd"
    ident: ClassVar[int] = 1

    def __init__(self, level: int = 3) -> None:
        self._zstd = _require("zstandard", "zstandard")
        self._level = level

    def compress(self, data: memoryview | np.ndarray) -> bytes:
        cctx = self._zstd.ZstdCompressor(level=self._level, write_checksum=True, write_content_size=True)
        return cctx.compress(data)

    def decompress(self, data: memoryview, size: int) -> bytearray:
        """Decompress one frame of exactly ``size`` bytes into a new bytearray; raise CodecError otherwise."""
        zstd = self._zstd
        try:
            params = zstd.get_frame_parameters(data)
            if params.content_size != size:
                raise CodecError(f"zstd frame holds {params.content_size} bytes, expected {size}")
            out = bytearray(size)
            got = 0
            with zstd.ZstdDecompressor().stream_reader(data) as reader:
                view = memoryview(out)
                while got < size and (n := reader.readinto(view[got:])):
                    got += n
                extra = reader.read(1)
        except zstd.ZstdError as exc:
            raise CodecError(f"zstd: {exc}") from exc
        if got != size or extra:
            raise CodecError(f"zstd frame decompressed to {got}{'+' if extra else ''} bytes, expected {size}")
        return out


class Lz4:
    """lz4 frames with content size and checksum (lz4.frame)."""

    name: ClassVar[str] = "lz4"
    ident: ClassVar[int] = 2

    def __init__(self) -> None:
        self._frame = _require("lz4.frame", "lz4")

    def compress(self, data: memoryview | np.ndarray) -> bytes:
        return self._frame.compress(data, store_size=True, content_checksum=True)

    def decompress(self, data: memoryview, size: int) -> bytearray:
        """Decompress one frame of exactly ``size`` bytes into a new bytearray; raise CodecError otherwise."""
        try:
            out, used = self._frame.decompress(data, return_bytearray=True, return_bytes_read=True)
        except RuntimeError as exc:  # lz4.frame reports every malformed frame as RuntimeError
            raise CodecError(f"lz4: {exc}") from exc
        if len(out) != size or used != len(data):
            raise CodecError(f"lz4 frame decompressed to {len(out)} bytes from {used}/{len(data)}, expected {size}")
        return out


LOSSLESS: dict[str, type[Zstd] | type[Lz4]] = {Zstd.name: Zstd, Lz4.name: Lz4}


def lossless_stage(name: str) -> Zstd | Lz4:
    """A new stage by name (``"zstd"`` or ``"lz4"``); ValueError if unknown or its package is missing."""
    if name not in LOSSLESS:
        raise ValueError(f"unknown lossless stage {name!r}; valid: {sorted(LOSSLESS)}")
    return LOSSLESS[name]()
