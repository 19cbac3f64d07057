"""Lossless stages (zstd, lz4) and the byte shuffle that runs before them.

The shuffle groups the bytes of ``n`` elements of ``k`` bytes by byte position
(all first bytes, then all second bytes, ...), like blosc's shuffle: a float's
sign/exponent bytes are far more alike across elements than its low mantissa
bytes, so grouping them gives the compressor long runs. Trailing bytes that do
not fill an element are copied as they are.

zstandard and lz4 are optional dependencies, imported when a stage is built:
:func:`lossless_stage` raises ValueError naming the missing package.

Each stage also bounds the size of what it writes for ``size`` input bytes
(:meth:`Zstd.body_bounds`): a reader checks a stored body against those
bounds before it allocates or decompresses anything. The lower bound is the
format's largest possible ratio (zstd: a 4-byte RLE block per 128 KiB; lz4:
one byte per 255 of a match), with a factor of two to spare.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import ClassVar

import numpy as np

from kvtier.codec.base import CodecError

ZSTD_LEVEL = 1
"""The zstd compression level a codec writes with unless told otherwise (see :class:`Zstd`)."""


def _upper_bound(size: int) -> int:
    """More than zstd or lz4 ever write for ``size`` bytes (both frame incompressible data at < 1% + headers)."""
    return size + (size >> 7) + 1024


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


def unshuffle(data: np.ndarray, size: int) -> np.ndarray:
    """Undo :func:`shuffle` on a uint8 array; the result is a new uint8 array."""
    src = data
    n = len(src) // size
    dst = np.empty_like(src)
    elems = dst[: n * size].reshape(n, size)
    planes = src[: n * size].reshape(size, n)
    for j in range(size):
        elems[:, j] = planes[j]
    dst[n * size :] = src[n * size :]
    return dst


def _require(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"codec stage needs the {package!r} package (pip install {package})") from exc


class Zstd:
    """zstd frames with content size and checksum; a compressor/decompressor per call (they are not thread-safe).

    ``level`` only affects encoding; the default (:data:`ZSTD_LEVEL`) is 1, not zstd's 3: on byte-shuffled
    float32 KV ([30, 2, 3, 256, 64], randn) level 1 measured both faster and
    smaller: 0.846 of the input in 11 ms against 0.859 in 22 ms at level 3,
    which spends most of its time on the exponent-byte plane.
    """

    name: ClassVar[str] = "zstd"
    ident: ClassVar[int] = 1

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self._zstd = _require("zstandard", "zstandard")
        if not isinstance(level, int) or not -(1 << 17) <= level <= self._zstd.MAX_COMPRESSION_LEVEL:
            raise ValueError(
                f"zstd level must be an int in [-131072, {self._zstd.MAX_COMPRESSION_LEVEL}], got {level!r}"
            )
        self._level = level

    @staticmethod
    def body_bounds(size: int) -> tuple[int, int]:
        """(least, most) bytes a zstd frame of ``size`` content bytes can take (at most 32768:1, an RLE block)."""
        return size >> 16, _upper_bound(size)

    def compress(self, data: memoryview | np.ndarray) -> bytes:
        cctx = self._zstd.ZstdCompressor(level=self._level, write_checksum=True, write_content_size=True)
        return cctx.compress(data)

    def decompress(self, data: memoryview, size: int) -> np.ndarray:
        """Decompress one frame of exactly ``size`` bytes into a new uint8 array; raise CodecError otherwise."""
        zstd = self._zstd
        try:
            params = zstd.get_frame_parameters(data)
            if params.content_size != size:
                raise CodecError(f"zstd frame holds {params.content_size} bytes, expected {size}")
            # the decompressor does not notice a frame cut short in its checksum, nor trailing bytes: walk it
            end = _zstd_frame_end(data, zstd.frame_header_size(data), params.has_checksum)
            if end != len(data):
                raise CodecError(f"zstd frame is {end} bytes, body {len(data)}")
            out = np.empty(size, dtype=np.uint8)  # not a bytearray: no zero fill before the decompressor writes
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


def _zstd_frame_end(data: memoryview, pos: int, has_checksum: bool) -> int:
    """Where the zstd frame whose blocks start at ``pos`` ends, from its block headers (no decompression)."""
    while True:
        if pos + 3 > len(data):
            raise CodecError("zstd frame truncated")
        block = int.from_bytes(data[pos : pos + 3], "little")  # bit 0: last; bits 1-2: type; bits 3-23: size
        kind = block >> 1 & 3
        if kind == 3:
            raise CodecError("zstd frame has a reserved block type")
        pos += 3 + (1 if kind == 1 else block >> 3)  # an RLE block stores one byte
        if block & 1:
            return pos + 4 * has_checksum


class Lz4:
    """lz4 frames with content size and checksum (lz4.frame)."""

    name: ClassVar[str] = "lz4"
    ident: ClassVar[int] = 2

    def __init__(self) -> None:
        self._frame = _require("lz4.frame", "lz4")

    @staticmethod
    def body_bounds(size: int) -> tuple[int, int]:
        """(least, most) bytes an lz4 frame of ``size`` content bytes can take (at most about 255:1)."""
        return size >> 9, _upper_bound(size)

    def compress(self, data: memoryview | np.ndarray) -> bytes:
        return self._frame.compress(data, store_size=True, content_checksum=True)

    def decompress(self, data: memoryview, size: int) -> np.ndarray:
        """Decompress one frame of exactly ``size`` bytes into a new uint8 array; raise CodecError otherwise."""
        try:  # lz4.frame reports malformed frames as RuntimeError
            content_size = self._frame.get_frame_info(data)["content_size"]
            if content_size != size:  # checked first: the frame's own claim must not drive the allocation
                raise CodecError(f"lz4 frame holds {content_size} bytes, expected {size}")
            out, used = self._frame.decompress(data, return_bytearray=True, return_bytes_read=True)
        except RuntimeError as exc:
            raise CodecError(f"lz4: {exc}") from exc
        if len(out) != size or used != len(data):
            raise CodecError(f"lz4 frame decompressed to {len(out)} bytes from {used}/{len(data)}, expected {size}")
        return np.frombuffer(out, dtype=np.uint8)  # writable: ``out`` is a bytearray nobody else holds


LOSSLESS: tuple[str, ...] = (Zstd.name, Lz4.name)


def lossless_stage(name: str, zstd_level: int = ZSTD_LEVEL) -> Zstd | Lz4:
    """A new stage by name (``"zstd"`` or ``"lz4"``); ValueError if unknown or its package is missing."""
    if name == Zstd.name:
        return Zstd(zstd_level)
    if name == Lz4.name:
        return Lz4()
    raise ValueError(f"unknown lossless stage {name!r}; valid: {list(LOSSLESS)}")
