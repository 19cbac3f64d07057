"""kvtier: a tiered, prefix-keyed KV cache for LLM inference.

Only the engine-agnostic core is imported here; engine adapters live in
``kvtier.adapters`` and import their engine lazily.
"""

from kvtier.config import KvtierConfig, load_config
from kvtier.engine import CacheEngine, LookupResult, RetrieveResult, StoreResult
from kvtier.errors import ChunkFormatError, ConfigError, KvtierError, ModelError
from kvtier.keys import ChunkKey, Namespace
from kvtier.layout import KVLayout

__all__ = [
    "CacheEngine",
    "ChunkFormatError",
    "ChunkKey",
    "ConfigError",
    "KVLayout",
    "KvtierConfig",
    "KvtierError",
    "LookupResult",
    "ModelError",
    "Namespace",
    "RetrieveResult",
    "StoreResult",
    "load_config",
]

__version__ = "0.1.0"
