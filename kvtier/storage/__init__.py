"""Storage tiers: backends (cpu, disk) and the tier stack that orders them."""

from kvtier.storage.base import BackendStats, StorageBackend
from kvtier.storage.cpu import MemoryBackend
from kvtier.storage.disk import DiskBackend
from kvtier.storage.tiers import TierStack

__all__ = ["BackendStats", "DiskBackend", "MemoryBackend", "StorageBackend", "TierStack"]
