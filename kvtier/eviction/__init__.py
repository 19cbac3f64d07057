"""Eviction policies for one tier's entries."""

from kvtier.eviction.lru import PrefixLRU

__all__ = ["PrefixLRU"]
