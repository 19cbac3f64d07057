"""KV codecs: turn a chunk payload [L, 2, H, T, D] into a compact body of bytes and back.

``get_codec("int8+zstd")`` gives a :class:`Codec`; :data:`CODECS` are the base
codecs (``raw``, ``fp16``, ``bf16``, ``int8``, ``fp8``, ``int4``), each usable
alone or followed by a lossless stage (``+zstd``, ``+lz4``). A body carries no
header of its own: the chunk header (:mod:`kvtier.chunk`) records the codec's
ids, the payload's shape and dtype, and checksums the body;
:func:`codec_from_ids` maps the recorded ids back to a codec. The stages are
in :mod:`kvtier.codec.float`, :mod:`~kvtier.codec.fp8`, :mod:`~kvtier.codec.int8`,
:mod:`~kvtier.codec.int4` and :mod:`~kvtier.codec.lossless`.
"""

from kvtier.codec.base import Codec, CodecError
from kvtier.codec.registry import CODECS, LOSSLESS_STAGES, codec_from_ids, get_codec
from kvtier.codec.staged import StagedCodec

__all__ = ["CODECS", "LOSSLESS_STAGES", "Codec", "CodecError", "StagedCodec", "codec_from_ids", "get_codec"]
