"""Codec specs: ``BASE`` or ``BASE+LOSSLESS``, e.g. ``"int8"``, ``"fp16+zstd"``, ``"raw+lz4"``."""

from __future__ import annotations

from kvtier.codec.base import BaseStage, Codec
from kvtier.codec.float import Bf16, Fp16, Raw
from kvtier.codec.frame import FramedCodec
from kvtier.codec.kivi import Int4, Int8
from kvtier.codec.lossless import LOSSLESS, lossless_stage
from kvtier.codec.quant import Fp8

_BASES: tuple[type[BaseStage], ...] = (Raw, Fp16, Bf16, Int8, Fp8, Int4)
CODECS: tuple[str, ...] = tuple(base.name for base in _BASES)
LOSSLESS_STAGES: tuple[str, ...] = LOSSLESS


def get_codec(spec: str, *, zstd_level: int = 1) -> Codec:
    """A new codec for ``spec`` (``BASE`` or ``BASE+LOSSLESS``).

    BASE is one of :data:`CODECS`, LOSSLESS one of :data:`LOSSLESS_STAGES`;
    ``codec.name`` is the canonical spelling (lower case, no spaces).
    ``zstd_level`` sets the compression level of ``+zstd`` (decoding does not
    depend on it). Raises ValueError listing the valid specs if ``spec`` is
    not one, or naming the package to install if a lossless stage's package
    is missing.
    """
    base_name, plus, lossless_name = spec.strip().lower().partition("+")
    bases = {base.name: base for base in _BASES}
    if base_name not in bases or (plus and lossless_name not in LOSSLESS_STAGES):
        valid = ", ".join(f"{b}[+{'|+'.join(LOSSLESS_STAGES)}]" for b in CODECS)
        raise ValueError(f"unknown codec {spec!r}; valid: {valid}")
    return FramedCodec(bases[base_name](), lossless_stage(lossless_name, zstd_level) if plus else None)
