"""KV codecs: turn a chunk payload [L, 2, H, T, D] into compact self-contained bytes and back.

``get_codec("int8+zstd")`` gives a :class:`Codec`; :data:`CODECS` are the base
codecs (``raw``, ``fp16``, ``bf16``, ``int8``, ``fp8``, ``int4``), each usable
alone or followed by a lossless stage (``+zstd``, ``+lz4``). The byte format is
described in :mod:`kvtier.codec.frame`, the quantizers in :mod:`kvtier.codec.quant`.
"""

from kvtier.codec.base import Codec, CodecError
from kvtier.codec.registry import CODECS, LOSSLESS_STAGES, get_codec

__all__ = ["CODECS", "LOSSLESS_STAGES", "Codec", "CodecError", "get_codec"]
