"""Codec specs (``BASE`` or ``BASE+LOSSLESS``, e.g. ``"int8"``, ``"fp16+zstd"``) and the ids a chunk header records.

Base stage ids: raw 1, fp16 2, bf16 3, fp8 5, int4 8, int8 9. Ids 4, 6 and 7
were earlier int8/int4 layouts, retired: they are never reused, and a header
naming one is refused like any unknown id. Lossless stage ids: none 0, zstd 1,
lz4 2.
"""

from __future__ import annotations

from functools import cache

from kvtier.codec.base import BaseStage, CodecError
from kvtier.codec.float import Bf16, Fp16, Raw
from kvtier.codec.fp8 import Fp8
from kvtier.codec.int4 import Int4
from kvtier.codec.int8 import Int8
from kvtier.codec.lossless import LOSSLESS, ZSTD_LEVEL, Lz4, Zstd, lossless_stage
from kvtier.codec.staged import StagedCodec

_BASES: tuple[type[BaseStage], ...] = (Raw, Fp16, Bf16, Int8, Fp8, Int4)
CODECS: tuple[str, ...] = tuple(base.name for base in _BASES)
LOSSLESS_STAGES: tuple[str, ...] = LOSSLESS
BASE_IDS: dict[int, type[BaseStage]] = {base.ident: base for base in _BASES}
LOSSLESS_IDS: dict[int, str] = {0: "", Zstd.ident: Zstd.name, Lz4.ident: Lz4.name}


def get_codec(spec: str, *, zstd_level: int = ZSTD_LEVEL) -> StagedCodec:
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
    return StagedCodec(bases[base_name](), lossless_stage(lossless_name, zstd_level) if plus else None)


@cache
def codec_from_ids(base_id: int, lossless_id: int) -> StagedCodec:
    """The codec a chunk header's (base stage id, lossless stage id) names; one shared instance per pair.

    Raises CodecError for an id this version does not know (a retired layout,
    a newer one, or damage) and ValueError if the lossless stage's package is
    missing. Decoding does not depend on the zstd level, so the default one
    serves every reader.
    """
    base = BASE_IDS.get(base_id)
    lossless = LOSSLESS_IDS.get(lossless_id)
    if base is None or lossless is None:
        raise CodecError(f"unknown codec ids (base {base_id}, lossless {lossless_id})")
    return StagedCodec(base(), lossless_stage(lossless) if lossless else None)
