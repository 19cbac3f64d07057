"""The KIVI-style quantizers, ``int8`` and ``int4``: keys per channel, values per token, plus fixes.

The stages live in :mod:`kvtier.codec.int8` and :mod:`kvtier.codec.int4`
(their shared sinks and helpers in :mod:`kvtier.codec.quant`); this module
names both under one roof, as docs/codecs.md and the benchmarks do.
"""

from kvtier.codec.int4 import Int4, hadamard_size
from kvtier.codec.int8 import Int8

__all__ = ["Int4", "Int8", "hadamard_size"]
