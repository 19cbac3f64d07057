"""Storage tiers: backends (memory, node memory, disk, Redis), the tier stack that owns tier policy, and the builder."""

from kvtier.storage.base import BackendStats, InProcess, ReadOnly, SharedMemory, StorageBackend
from kvtier.storage.builder import TierAccess, build_backends, build_tiers
from kvtier.storage.cpu import MemoryBackend
from kvtier.storage.disk import DiskBackend
from kvtier.storage.ledger import Ledger
from kvtier.storage.node import NodeBackend
from kvtier.storage.tiers import TierStack

__all__ = [
    "BackendStats",
    "DiskBackend",
    "InProcess",
    "Ledger",
    "MemoryBackend",
    "NodeBackend",
    "ReadOnly",
    "SharedMemory",
    "StorageBackend",
    "TierAccess",
    "TierStack",
    "build_backends",
    "build_tiers",
]
